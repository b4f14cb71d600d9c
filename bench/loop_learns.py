"""Benchmark: does the loop learn? Iterative DPO on easy-vqa with the `reference` judge, vs a blind control.

    python bench/loop_learns.py [--model demo|tiny] [--rounds 3] [--train-questions N] [--test-questions M]
                                [--k 5] [--types color,shape,yesno] [--lr 5e-4] [--workdir DIR]

Two workspaces go through the real product path (init_workspace, app.importer.import_path, prefloop.toml,
backend.loop.run_rounds(ws, 1) per round): `images` with the easy-vqa pictures, and `blank`, the control,
with every picture replaced by a uniform gray one (each original image gets its own gray image, equal
but for one pixel off by one level, so prompts stay distinct and the control carries no information).
Round r: generate k samples per train question from c(r-1) -> reference judge -> best-worst pairs -> DPO
(LoRA + trainable projector) -> eval: greedy answers of c(r) and c(r-1) on the held-out easy-vqa TEST
questions, judged by `reference`. Accuracy = the reference judge's exact match (score 4) on those greedy
answers; "sampled" is the exact-match rate of the k samples on the train questions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import common

from backend.loop import run_rounds
from core import config as cfgmod
from core.errors import UsageError
from storage import judgments as jstore
from storage import prompts as pstore
from storage import rounds
from storage.workspace import init_workspace

COLORS = {"red", "green", "blue", "yellow", "teal", "brown", "black", "gray"}
SHAPES = {"circle", "rectangle", "triangle"}
TYPES = {"color": COLORS, "shape": SHAPES, "yesno": {"yes", "no"}}
# What the question asks for; SmolLM2-135M ignores "Answer with one word." for yes/no questions (it
# describes the picture instead) but follows "Answer yes or no.". Options are never listed for colours
# or shapes: an answer repeating the list would "contain" any reference and score 3 with the judge.
SUFFIX = {"color": " Answer with one word.", "shape": " Answer with one word.", "yesno": " Answer yes or no."}
NEGATED = (" not ", " no ")


def question_type(answer: str) -> str:
    return next(name for name, answers in TYPES.items() if answer in answers)


def about(question: str) -> str:
    """What a yes/no question asks about: `color` (names a colour) or `shape`."""
    return "color" if COLORS & set(question.replace("?", " ").split()) else "shape"


def pick(questions: tuple, paths: dict, n: int, types: set[str], rng: random.Random,
         negated: bool = False, yesno_about: str = "any") -> list[dict]:
    """n easy-vqa questions of the chosen types, balanced over the types and, within a type, over the
    answers (easy-vqa's plain yes/no questions are 85% "no": a model always saying "no" would look good);
    one question per image at most; negated questions ("is there not a red shape?") only with ``negated``;
    yes/no questions only about colours or shapes with ``yesno_about``."""
    pools: dict[tuple[str, str], list[dict]] = {}
    for q, a, image_id in zip(*questions):
        if question_type(a) == "yesno" and yesno_about != "any" and about(q) != yesno_about:
            continue
        if question_type(a) in types and (negated or not any(w in f" {q} " for w in NEGATED)):
            pools.setdefault((question_type(a), a), []).append(
                {"question": q, "answer": a, "image_id": image_id, "path": paths[image_id]})
    for rows in pools.values():
        rng.shuffle(rows)
    order = [key for t in sorted(types) for key in sorted(k for k in pools if k[0] == t)]
    # round-robin over types, and within a type over its answers
    per_type = {t: [k for k in order if k[0] == t] for t in sorted(types)}
    turn = {t: 0 for t in per_type}
    chosen, seen = [], set()
    while len(chosen) < n and any(pools[k] for k in order):
        for t, keys in per_type.items():
            live = [k for k in keys if pools[k]]
            if not live or len(chosen) == n:
                continue
            key = live[turn[t] % len(live)]
            turn[t] += 1
            while pools[key]:
                row = pools[key].pop()
                if row["image_id"] not in seen:
                    seen.add(row["image_id"])
                    chosen.append(row)
                    break
    rng.shuffle(chosen)
    return chosen


def blank_image(path: Path, index: int, size: tuple[int, int]) -> None:
    """Uniform gray, with one pixel one level off at a position given by ``index`` (a distinct file)."""
    from PIL import Image

    img = Image.new("RGB", size, (128, 128, 128))
    img.putpixel((index % size[0], (index // size[0]) % size[1]), (129, 128, 128))
    img.save(path)


def write_data(folder: Path, train: list[dict], test: list[dict], blind: bool) -> Path:
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, names = [], {}
    for split, qs in (("train", train), ("heldout", test)):
        for i, q in enumerate(qs):
            key = (split, q["image_id"])
            if key not in names:
                names[key] = f"{split}-{q['image_id']}.png"
                dest = images / names[key]
                if blind:
                    blank_image(dest, len(names), Image.open(q["path"]).size)
                else:
                    shutil.copyfile(q["path"], dest)
            rows.append({"id": f"{split}-{i}", "image": f"images/{names[key]}", "question": q["question"] + SUFFIX[question_type(q["answer"])],
                         "reference": q["answer"], "split": split,
                         "meta": {"type": question_type(q["answer"]), "easy_vqa_image": q["image_id"]}})
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(opts) -> dict:
    return {
        "generation.k": opts.k, "generation.temperature": opts.temperature, "generation.max_new_tokens": 8,
        "generation.batch_size": 16, "generation.seed": opts.seed,
        "pairs.strategy": "best-worst", "pairs.judge": "reference", "judges.default": ["reference"],
        "round.eval_judge": "reference", "round.promote": "always",
        "train.loss": ["sigmoid", "sft"] if opts.sft_weight else ["sigmoid"],
        "train.loss_weights": [1.0, opts.sft_weight] if opts.sft_weight else None,
        "train.train_projector": True, "train.learning_rate": opts.lr, "train.lora_r": opts.lora_r,
        "train.lora_alpha": 2 * opts.lora_r, "train.lora_target": opts.lora_target, "train.beta": opts.beta,
        "train.batch_size": 2, "train.max_completion_length": 16, "train.seed": opts.seed,
    }


def accuracy(scores: list[dict], checkpoint: str, least: float = 1.0) -> tuple[float, int]:
    """Share of held-out answers of ``checkpoint`` scored at least ``least`` (1.0: exact, 0.75: contained)."""
    got = [s["overall"] for s in scores if s["checkpoint_id"] == checkpoint]
    return (sum(v is not None and v >= least for v in got) / len(got) if got else float("nan")), len(got)


def sampled_accuracy(cur, round_id: int) -> float:
    """Exact-match rate of the policy samples of a round (they come from c(round_id - 1))."""
    policy = {c["candidate_id"] for c in pstore.list_candidates(cur, round_id=round_id) if c["origin"] == "policy"}
    got = [j["overall"] for j in jstore.list_judgments(cur, judge="reference", round_id=round_id, status="ok")
           if j["candidate_id"] in policy]
    return sum(v == 1.0 for v in got) / len(got) if got else float("nan")


def by_type(cur, round_id: int, checkpoint: str) -> dict[str, float]:
    meta = {p["prompt_id"]: json.loads(p["meta"])["type"] if isinstance(p["meta"], str) else p["meta"]["type"]
            for p in pstore.list_prompts(cur, split="heldout")}
    hits: dict[str, list[bool]] = {}
    for s in rounds.eval_scores(cur, round_id, "reference"):
        if s["checkpoint_id"] == checkpoint:
            hits.setdefault(meta[s["prompt_id"]], []).append(s["overall"] == 1.0)
    return {t: sum(v) / len(v) for t, v in sorted(hits.items())}


def answers(cur, round_id: int, checkpoint: str) -> Counter:
    return Counter(c["text"].strip() for c in pstore.list_candidates(cur, round_id=round_id)
                   if c["origin"] == "eval" and c["checkpoint_id"] == checkpoint)


def yes_margins(model_dir: Path, items: list[dict]) -> list[float]:
    """log P("Yes") - log P("No") of the first answer token, per held-out item (image path + question)."""
    import torch
    from PIL import Image

    from backend.models import load_model, load_processor

    model, processor = load_model(model_dir), load_processor(model_dir)
    tok = processor.tokenizer
    yes, no = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]
    out = []
    for i in range(0, len(items), 16):
        batch = items[i:i + 16]
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": it["question"]}]}], add_generation_prompt=True) for it in batch]
        images = [Image.open(it["image_path"]).convert("RGB") for it in batch]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1].log_softmax(-1)
        out += (logits[:, yes] - logits[:, no]).tolist()
    return out


def auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random "yes" item scores above a random "no" item (ties count half)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg)) if pos and neg else float("nan")


def yes_auc(ws, checkpoint: str) -> float:
    """Threshold-free grounding measure for yes/no questions: AUC of the yes-vs-no margin of
    ``checkpoint`` over the held-out yes/no questions (0.5: the answer does not depend on the input)."""
    from backend.steps.common import checkpoint_path

    items = [{"question": p["question"], "image_path": str(ws.root / p["image_path"]), "yes": p["reference"] == "yes"}
             for p in pstore.list_prompts(ws.cursor(), split="heldout") if p["reference"] in ("yes", "no")]
    if not items:
        return float("nan")
    return auc(yes_margins(checkpoint_path(ws, checkpoint), items), [it["yes"] for it in items])


def run_variant(name: str, root: Path, opts, train: list[dict], test: list[dict]) -> list[dict]:
    data = write_data(root / f"data-{name}", train, test, blind=name == "blank")
    cfg = cfgmod.update(cfgmod.WorkspaceConfig(name=name, policy=cfgmod.PolicyConfig(model=opts.model)),
                        settings(opts))
    from app.importer import import_path

    ws = init_workspace(root / name, cfg, command="bench/loop_learns.py")
    try:
        rounds.ensure_first_round(ws.cursor(), base_model=opts.model)
        result = import_path(ws, data, progress=False)
        print(f"[{name}] imported: {result.summary()}", flush=True)
        rows = []
        for r in range(1, opts.rounds + 1):
            events: dict[str, dict] = {}

            def on_event(ev, events=events):
                if ev.get("event") == "step" and ev.get("status") == "done":
                    events[f"r{ev['round_id']}:{ev['step']}"] = ev
            start = time.perf_counter()
            try:
                run_rounds(ws, 1, on_event=on_event)
            except UsageError as err:  # e.g. no pairs: every sample of every prompt scored the same
                print(f"[{name}] round {r} stopped: {err}", flush=True)
                break
            seconds = time.perf_counter() - start
            cur = ws.cursor()
            scores = rounds.eval_scores(cur, r, "reference")
            base_acc, n = accuracy(scores, f"c{r - 1}")
            acc, _ = accuracy(scores, f"c{r}")
            train_step = events.get(f"r{r}:train", {}).get("summary", {})
            row = {"round": r, "acc": acc, "prev_acc": base_acc, "n_test": n, "pairs": train_step.get("pairs"),
                   "correct": accuracy(scores, f"c{r}", 0.75)[0], "prev_correct": accuracy(scores, f"c{r - 1}", 0.75)[0],
                   "train_loss": train_step.get("train_loss"), "sampled": sampled_accuracy(cur, r),
                   "sampled_next": sampled_accuracy(cur, r + 1), "seconds": seconds,
                   "train_seconds": train_step.get("seconds"), "by_type": by_type(cur, r, f"c{r}"),
                   "answers": answers(cur, r, f"c{r}").most_common(6),
                   "ref_cache": train_step.get("ref_cache")}
            row["auc"] = yes_auc(ws, f"c{r}")
            if r == 1:
                row["prev_auc"] = yes_auc(ws, "c0")
                row["base_by_type"] = by_type(cur, 1, "c0")
                row["base_answers"] = answers(cur, 1, "c0").most_common(6)
            rows.append(row)
            print(f"[{name}] round {r}: exact c{r - 1} {base_acc:.3f} -> c{r} {acc:.3f}, contained-or-exact "
                  f"{row['prev_correct']:.3f} -> {row['correct']:.3f} (n={n}), {row['pairs']} pairs, "
                  f"yes/no AUC {row['auc']:.3f}, sampled {row['sampled']:.3f}, loss {row['train_loss']}, {seconds:.0f} s; by type {row['by_type']}; "
                  f"answers {row['answers']}", flush=True)
        return rows
    finally:
        ws.close()


def report(results: dict[str, list[dict]], n_rounds: int) -> str:
    """The per-round table of every variant, and the verdict (normal rising, gap to the control)."""
    names = list(results)

    def cell(name: str, i: int, key: str):
        rows = results[name]
        if i == 0:
            return rows[0][{"acc": "prev_acc", "correct": "prev_correct", "sampled_next": "sampled",
                            "auc": "prev_auc"}.get(key, key)] \
                if rows and key in ("acc", "correct", "sampled_next", "auc") else "-"
        return rows[i - 1][key] if i <= len(rows) else "-"

    cols = [("exact", "acc"), ("contained", "correct"), ("AUC", "auc"), ("sampled", "sampled_next"), ("pairs", "pairs"),
            ("s", "seconds")]
    head = ["round"] + [f"{label} {n}" for label, _ in cols for n in names]
    table = [[i] + [cell(n, i, key) if key != "seconds" or i == 0 else round(cell(n, i, key))
                    if cell(n, i, key) != "-" else "-" for _, key in cols for n in names]
             for i in range(n_rounds + 1)]
    lines = ["",
             "held-out accuracy of c(r), greedy, by the reference judge: exact = score 4, contained = 3 or 4;",
             "AUC = how well c(r)'s log P(Yes) - log P(No) ranks yes-questions above no-questions (0.5: blind);",
             "sampled = exact-match rate of the k samples drawn from c(r) on the train questions;",
             "pairs = pairs trained in round r; s = wall seconds of run_rounds(ws, 1)",
             common.table(head, table)]
    if len(names) == 2 and all(len(results[n]) == n_rounds for n in names):
        normal, control = (results[n] for n in names)
        for label, key, prev in (("exact", "acc", "prev_acc"), ("contained", "correct", "prev_correct")):
            curve = [normal[0][prev]] + [r[key] for r in normal]
            rising = all(b > a for a, b in itertools.pairwise(curve))
            lines.append(f"{label}: {names[0]} - {names[1]} at round {n_rounds}: "
                         f"{100 * (normal[-1][key] - control[-1][key]):+.1f} points; {names[0]} rising every round: "
                         f"{rising}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-questions", type=int, default=120)
    ap.add_argument("--test-questions", type=int, default=90)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--types", default="yesno", help="question types, comma-separated: color, shape, yesno")
    ap.add_argument("--negated", action="store_true", help="also negated questions (is there not a red shape?)")
    ap.add_argument("--yesno-about", default="color", choices=["any", "color", "shape"],
                    help="yes/no questions about colours only (the random vision features carry colour "
                         "linearly, shape hardly), shapes only, or any")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sft-weight", type=float, default=1.0,
                    help="weight of an SFT (NLL of the chosen answer) term beside the DPO loss; 0: DPO alone")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-target", default=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    ap.add_argument("--variants", default="images,blank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspaces here (default: a temp folder)")
    opts = ap.parse_args()

    import easy_vqa

    rng = random.Random(opts.seed)
    types = set(opts.types.split(","))
    train = pick(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), opts.train_questions, types, rng,
                 opts.negated, opts.yesno_about)
    test = pick(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), opts.test_questions, types, rng,
                opts.negated, opts.yesno_about)
    print(f"model {opts.model}: {len(train)} train / {len(test)} test questions ({opts.types}, yes/no about "
          f"{opts.yesno_about}), k={opts.k}, "
          f"temperature {opts.temperature}, lr {opts.lr}, beta {opts.beta}, sft weight {opts.sft_weight}, "
          f"LoRA r={opts.lora_r} on "
          f"{opts.lora_target} + projector; train answer mix {Counter(q['answer'] for q in train).most_common()}",
          flush=True)
    tmp = None if opts.workdir else tempfile.TemporaryDirectory(prefix="bench-loop-")
    root = opts.workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    try:
        for name in opts.variants.split(","):
            if (root / name).exists():
                shutil.rmtree(root / name)
            results[name] = run_variant(name, root, opts, train, test)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(report(results, opts.rounds))
    print(f"total {time.perf_counter() - started:.0f} s")
    if opts.workdir:
        (root / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
