"""Packaged recipes: the registry, validation, the [tiny] table, the README table, and one round of each on `tiny`."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest

from app.cli import main as cli_main
from backend import recipes
from backend.launch import resolve_num_processes
from core import config as cfgmod
from core.errors import ConfigError, UsageError
from tests.fakes.gemini_server import METRICS, FakeGemini
from tests.helpers import REPO, ROUND_CONFIG, make_ws, q, unset

REAL = "llava-hf/llava-onevision-qwen2-7b-ov-hf"


def resolved(name: str, policy: str = "tiny", **changes) -> cfgmod.WorkspaceConfig:
    """The workspace config a recipe gives on a workspace with ``policy`` (plus dotted ``changes``)."""
    base = cfgmod.update(cfgmod.WorkspaceConfig(), {"policy.model": policy, **changes})
    return cfgmod.validate(recipes.merge(base.model_dump(), recipes.load(name).resolve(base)))


# ---- registry and metadata -------------------------------------------------------------------

def test_registry_is_the_folder_and_every_recipe_loads():
    files = sorted(p.stem for p in (REPO / "backend" / "recipes").glob("*.toml"))
    assert recipes.names() == files == ["gemini_rubric", "ov_chat", "seva"]
    for r in recipes.all_recipes():
        assert r.meta.name == r.path.stem
        assert r.meta.paper and r.meta.authors and 2020 <= r.meta.year <= 2030 and r.meta.paper_model
        assert r.command() == f"prefloop round start --recipe {r.name} --rounds {r.meta.default_rounds}"
        if "lora_r" in r.tiny.get("train", {}):
            assert "LoRA ranks scaled down" in r.path.read_text(), f"{r.name}: say why [tiny] changes the ranks"


def test_ov_chat_values():
    cfg = resolved("ov_chat", REAL, **{"judges.critic.model": "my/llava-critic-7b-hf"})
    g, t = cfg.generation, cfg.train
    assert (g.k, g.temperature, g.top_p, g.views) == (5, 0.7, 0.9, ["original"])
    assert cfg.judges.default == ["critic"] and cfg.judges.critic.mode == "pairwise"
    assert cfg.judges.critic.max_new_tokens == 1024  # room for LLaVA-Critic's reasoning before its verdict
    assert (cfg.pairs.strategy, cfg.pairs.judge) == ("best-worst", "critic")
    assert (t.lora, t.epochs, t.launcher, t.zero_stage) == (False, 1.0, "deepspeed", 3)
    assert recipes.load("ov_chat").meta.default_rounds == 3
    assert t.num_processes == "auto"  # every GPU the machine has, not a fixed 8
    assert [resolve_num_processes(t, gpus) for gpus in (0, 1, 8)] == [1, 1, 8]
    tiny = resolved("ov_chat").train
    assert (tiny.lora, tiny.launcher, tiny.num_processes) == (False, "local", 1)


def test_seva_values():
    cfg = resolved("seva", REAL)
    assert cfg.generation.views == ["original", "aug:diffusion:800"] and cfg.pairs.strategy == "seva"  # 7B
    t = cfg.train
    assert (t.lora, t.lora_r, t.lora_alpha, t.beta, t.learning_rate) == (True, 1024, 2048, 0.1, 2e-6)
    tiny = resolved("seva").train
    assert (tiny.lora_r, tiny.lora_alpha) == (8, 16), "ranks scaled down on tiny"


def test_gemini_rubric_values():
    cfg = resolved("gemini_rubric", REAL)
    assert (cfg.generation.k, cfg.generation.temperature) == (4, 0.7)
    assert cfg.generation.top_p == 1.0  # the paper sets no top_p: LLaVA's default
    assert cfg.judges.default == ["gemini"]
    assert (cfg.pairs.strategy, cfg.pairs.judge, cfg.pairs.min_margin) == ("best-vs-random", "gemini", 2.0)
    t = cfg.train
    assert (t.lora, t.lora_r, t.lora_alpha, t.beta, t.learning_rate) == (True, 128, 256, 0.1, 5e-5)
    assert recipes.load("gemini_rubric").meta.api_key == "GEMINI_API_KEY"
    assert resolved("gemini_rubric").train.lora_r < 128


def test_tiny_table_applies_only_on_tiny():
    r = recipes.load("seva")
    assert r.overrides_for("tiny")["train"]["lora_r"] == 8
    assert r.overrides_for(REAL)["train"]["lora_r"] == 1024
    assert r.overrides_for("demo")["train"]["lora_r"] == 1024


def test_a_real_policy_with_a_builtin_critic_is_refused():
    with pytest.raises(ConfigError, match=r"judges\.critic\.model"):
        resolved("ov_chat", REAL)  # critic still the default `tiny`


# ---- validation ----------------------------------------------------------------------------------

def _bad_copy(tmp_path, name: str, old: str, new: str):
    text = recipes.RECIPES[name].read_text()
    assert old in text
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old,new,key", [
    ("[train]\n", "[train]\nlora_rank = 8\n", "train.lora_rank: unknown key"),
    ("[tiny]\n", "[tiny]\nsampling = { k = 2 }\n", "sampling: unknown key"),
    ("train = { lora_r = 8", "train = { lora_rr = 8", "train.lora_rr: unknown key"),
    ("[recipe]\n", "[recipe]\ngpus = 8\n", "recipe.gpus: unknown key"),
    ("k = 4", "k = \"four\"", "generation.k"),
])
def test_an_unknown_or_bad_key_is_named(tmp_path, old, new, key):
    with pytest.raises(ConfigError) as exc:
        recipes.load_file(_bad_copy(tmp_path, "gemini_rubric", old, new))
    assert key in str(exc.value)


def test_recipe_name_must_match_the_file(tmp_path):
    path = tmp_path / "other.toml"
    shutil.copy(recipes.RECIPES["seva"], path)
    with pytest.raises(ConfigError, match="recipe.name is 'seva'"):
        recipes.load_file(path)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UsageError) as exc:
        recipes.load("dpo_magic")
    assert all(n in str(exc.value) for n in recipes.names())


def test_cli_refuses_a_bad_override_file_with_one_line(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert cli_main(["init", str(ws), "--model", "tiny"]) == 0
    bad = _bad_copy(tmp_path, "seva", "[train]\n", "[train]\nlora_rank = 8\n")
    capsys.readouterr()
    assert cli_main(["round", "start", "-w", str(ws), "--config", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lora_rank: unknown key" in err
    assert cli_main(["round", "start", "-w", str(ws), "--recipe", "nope", "--quiet"]) == 2
    assert "choose one of: gemini_rubric, ov_chat, seva" in capsys.readouterr().err
    assert q(ws, "SELECT status, step FROM rounds") == [("collecting", "generate")]


# ---- the README ------------------------------------------------------------------------------------

def test_readme_recipe_table_lists_exactly_the_registry():
    lines = (REPO / "README.md").read_text().splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("| recipe |")]
    assert header, "README.md has no recipe table (a header row starting `| recipe |`)"
    names = set()
    for ln in lines[header[0] + 2:]:
        if not ln.startswith("|"):
            break
        m = re.match(r"\|\s*`([^`]+)`", ln)
        if m:
            names.add(m.group(1))
    assert names == set(recipes.names())


# ---- one round of each on tiny ---------------------------------------------------------------------

def _round_one_done(ws):
    assert q(ws, "SELECT round_id, status FROM rounds ORDER BY 1") == [(1, "done"), (2, "collecting")]
    assert q(ws, "SELECT checkpoint_id, parent_id FROM checkpoints ORDER BY 1") == [("c0", None), ("c1", "c0")]
    assert q(ws, "SELECT count(*) > 0 FROM train_metrics WHERE round_id = 1")[0][0]
    assert q(ws, "SELECT count(*) FROM evals WHERE round_id = 1")[0][0] == 1


def _recipe_ws(tmp_path, tiny_model_dir, name: str, **changes):
    """make_ws's workspace minus the small-round keys the recipe sets: prefloop.toml wins over a recipe, so
    those keys are left to the recipe (and its [tiny] table) as a user would."""
    ws = make_ws(tmp_path, tiny_model_dir, **changes)
    unset(ws, *(set(cfgmod.leaves(recipes.load(name).overrides_for("tiny"))) & set(ROUND_CONFIG)))
    return ws


@pytest.mark.slow
def test_seva_one_round_on_tiny(tmp_path, tiny_model_dir):
    ws = _recipe_ws(tmp_path, tiny_model_dir, "seva")
    assert cli_main(["round", "start", "-w", str(ws), "--recipe", "seva", "--rounds", "1", "--quiet"]) == 0
    _round_one_done(ws)
    views = q(ws, "SELECT origin, view, count(*) FROM candidates WHERE round_id = 1 AND origin <> 'eval' "
                  "GROUP BY ALL ORDER BY 1")
    assert views == [("policy", "original", 5), ("seva_augmented", "aug:diffusion:800", 5)]
    pairs = q(ws, """SELECT c.text, r.text, p.source FROM pairs p JOIN candidates c ON c.candidate_id = p.chosen_id
                     JOIN candidates r ON r.candidate_id = p.rejected_id WHERE p.round_id = 1""")
    assert pairs and all(src == "seva" for *_, src in pairs)
    assert all(" ".join(a.split()).casefold() != " ".join(b.split()).casefold() for a, b, _ in pairs), \
        "equal answers must be dropped"
    (kind, lora_r), = q(ws, "SELECT kind, meta->>'$.config.lora_r' FROM checkpoints WHERE checkpoint_id = 'c1'")
    assert kind == "merged" and lora_r == "8", "LoRA with the [tiny] rank, merged"


def _spread_scores(text: str) -> dict[str, int]:
    """helpfulness = correctness = coherence: two different texts differ by >= 3 in their sum."""
    v = hashlib.sha256(text.encode()).digest()[0] % 5
    return dict.fromkeys(METRICS, v)


@pytest.mark.slow
def test_gemini_rubric_one_round_on_tiny(tmp_path, tiny_model_dir, monkeypatch):
    key = "fake-recipe-key-31c"
    monkeypatch.setenv("GEMINI_API_KEY", key)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with FakeGemini(api_key=key, scorer=_spread_scores) as fake:
        ws = _recipe_ws(tmp_path, tiny_model_dir, "gemini_rubric",
                        **{"judges.gemini.base_url": fake.url, "judges.gemini.backoff_s": 0.05})
        assert cli_main(["round", "start", "-w", str(ws), "--recipe", "gemini_rubric", "--rounds", "1",
                         "--quiet"]) == 0
        sent = fake.requests
    _round_one_done(ws)
    assert sent and all(r.key_ok for r in sent)
    assert {len(r.candidates) for r in sent if r.question and "shape" in r.question} == {4}
    assert q(ws, "SELECT count(*) FROM candidates WHERE round_id = 1 AND origin = 'policy'")[0][0] == 5 * 4
    assert q(ws, """SELECT j.status, count(*) FROM judgments j JOIN candidates c USING (candidate_id)
                    WHERE c.round_id = 1 AND c.origin = 'policy' GROUP BY 1""") == [("ok", 20)]
    pairs = q(ws, "SELECT source, strategy, margin FROM pairs WHERE round_id = 1")
    assert pairs and all(s == "gemini" and st == "best-vs-random" and m >= 2 for s, st, m in pairs)
    assert q(ws, "SELECT judge FROM evals WHERE round_id = 1") == [("gemini",)]


@pytest.mark.slow
def test_ov_chat_one_round_on_tiny_with_human_labels(tmp_path, tiny_model_dir):
    """The tiny critic's replies are noise: its judgments are invalid, so two human labels carry the round."""
    from backend.pairs import PairOptions, build_pairs
    from backend.steps.pairs import load_items
    from storage import prompts
    from storage.workspace import open_workspace

    ws = _recipe_ws(tmp_path, tiny_model_dir, "ov_chat", **{"review.required": "required", "review.quota": 2})
    assert cli_main(["round", "start", "-w", str(ws), "--recipe", "ov_chat", "--rounds", "1", "--quiet"]) == 0
    assert q(ws, "SELECT status, step FROM rounds WHERE round_id = 1") == [("waiting_review", "review")]
    # critic pairwise over all K(K-1) = 20 ordered pairs of each prompt's 5 candidates
    assert q(ws, "SELECT count(*) FROM pairwise_verdicts")[0][0] == 5 * 20
    assert q(ws, "SELECT DISTINCT judge, judge_version FROM judgments") == [("critic", "pairwise-v2")]
    with open_workspace(ws) as w:
        cur = w.cursor()
        by_prompt: dict[str, list[str]] = {}
        for c in prompts.list_candidates(cur, round_id=1):
            if c["origin"] == "policy":
                by_prompt.setdefault(c["prompt_id"], []).append(c["candidate_id"])
        labelled = sorted(by_prompt)[:2]
        prompts.insert_labels(cur, [{"prompt_id": p, "round_id": 1, "annotator": "ann", "source": "human",
                                     "kind": "label", "chosen_id": by_prompt[p][1], "rejected_id": by_prompt[p][0],
                                     "all_bad": False} for p in labelled])
        # what best-worst makes of the critic's judgments alone (no labels)
        ai = build_pairs([i for i in load_items(w, 1) if i.prompt_id not in labelled], "best-worst",
                         PairOptions(judge="critic", score="score"))
    assert cli_main(["round", "resume", "-w", str(ws), "--quiet"]) == 0
    _round_one_done(ws)
    assert sum(ai.skipped.values()) + len({p.prompt_id for p in ai.pairs}) == 3
    got = q(ws, "SELECT source, count(*) FROM pairs WHERE round_id = 1 GROUP BY 1 ORDER BY 1")
    assert got == sorted([("human", 2)] + ([("critic", len(ai.pairs))] if ai.pairs else []))
    assert q(ws, "SELECT kind FROM checkpoints WHERE checkpoint_id = 'c1'") == [("full",)]
    assert q(ws, "SELECT judge FROM evals WHERE round_id = 1") == [("critic",)]
