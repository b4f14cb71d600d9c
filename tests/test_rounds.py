"""The round state machine on `tiny`: unattended rounds, the review gate, kill -9 + resume, promotion."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.cli import main as cli_main
from tests.helpers import REPO, cpu_seconds, make_ws, q, wait_for_job, wait_until

NO_EVAL = {"round.eval_judge": None}  # for the tests that check no eval rows: 2 generate jobs less per round


def counts(ws: Path, round_id: int) -> tuple:
    return (q(ws, "SELECT count(*) FROM candidates WHERE round_id = ? AND origin <> 'eval'", [round_id])[0][0],
            q(ws, "SELECT count(*) FROM pairs WHERE round_id = ?", [round_id])[0][0])


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model_dir):
    """`round start --rounds 2` with review off: shared by the tests that only read the result."""
    ws = make_ws(tmp_path_factory.mktemp("two"), tiny_model_dir)
    assert cli_main(["round", "start", "-w", str(ws), "--rounds", "2", "--quiet"]) == 0
    return ws


def test_two_unattended_rounds_lineage(two_rounds):
    ws = two_rounds
    assert q(ws, "SELECT round_id, status, policy_checkpoint_id, promoted FROM rounds ORDER BY 1") == [
        (1, "done", "c0", True), (2, "done", "c1", True), (3, "collecting", "c2", None)]
    assert q(ws, "SELECT checkpoint_id, parent_id FROM checkpoints ORDER BY 1") == [
        ("c0", None), ("c1", "c0"), ("c2", "c1")]
    # round 2 was generated from round 1's checkpoint; round 3 (stopped at review) from round 2's
    assert q(ws, "SELECT DISTINCT checkpoint_id FROM candidates WHERE round_id = 2 AND origin = 'policy'") == [("c1",)]
    assert q(ws, "SELECT DISTINCT checkpoint_id FROM candidates WHERE round_id = 3") == [("c2",)]
    meta = json.loads((ws / "checkpoints" / "r002" / "meta.json").read_text())
    assert meta["parent_id"] == "c1"
    for r in (1, 2):
        cands, pairs = counts(ws, r)
        assert cands == 5 * 3 and pairs > 0


def test_eval_rows_and_train_metrics(two_rounds):
    ws = two_rounds
    evals = q(ws, "SELECT round_id, baseline_checkpoint_id, checkpoint_id, judge, wins + losses + ties, n "
                  "FROM evals ORDER BY 1")
    assert evals == [(1, "c0", "c1", "reference", 2, 2), (2, "c1", "c2", "reference", 2, 2)]
    assert q(ws, "SELECT count(DISTINCT checkpoint_id) FROM candidates WHERE origin = 'eval' AND round_id = 2")[0][0] == 2
    assert q(ws, "SELECT count(*) > 0 FROM train_metrics WHERE round_id = 2")[0][0]
    steps = q(ws, "SELECT step, status FROM round_steps WHERE round_id = 1 ORDER BY started_at")
    assert ("train", "done") in steps and ("generate", "done") in steps


def test_review_required_stops_at_gate_and_resume_continues(tmp_path, tiny_model_dir):
    ws = make_ws(tmp_path, tiny_model_dir, **NO_EVAL, **{"review.required": "required", "review.quota": 2})
    assert cli_main(["round", "start", "-w", str(ws), "--rounds", "2", "--quiet"]) == 0
    assert q(ws, "SELECT status, step FROM rounds WHERE round_id = 1") == [("waiting_review", "review")]
    assert not (ws / "checkpoints" / "r001").exists()
    # not enough labels yet: resume stops at the same gate
    assert cli_main(["round", "resume", "-w", str(ws), "--quiet"]) == 0
    assert q(ws, "SELECT status FROM rounds WHERE round_id = 1") == [("waiting_review",)]
    from storage import prompts
    from storage.workspace import open_workspace

    with open_workspace(ws) as w:
        cur = w.cursor()
        cands = prompts.list_candidates(cur, round_id=1)
        by_prompt: dict[str, list] = {}
        for c in cands:
            if c["origin"] == "policy":
                by_prompt.setdefault(c["prompt_id"], []).append(c["candidate_id"])
        labels = [{"prompt_id": p, "round_id": 1, "annotator": "ann", "source": "human", "kind": "label",
                   "chosen_id": ids[1], "rejected_id": ids[0], "all_bad": False}
                  for p, ids in sorted(by_prompt.items())[:2]]
        prompts.insert_labels(cur, labels)
    assert cli_main(["round", "resume", "-w", str(ws), "--quiet"]) == 0
    assert q(ws, "SELECT round_id, status FROM rounds ORDER BY 1") == [(1, "done"), (2, "waiting_review")]
    human = q(ws, "SELECT count(*) FROM pairs WHERE round_id = 1 AND source = 'human'")[0][0]
    assert human == 2


def _owner(ws: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "round", "start", "-w", str(ws), "--rounds", "1",
                             "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


# A killed train step: tests/reliability/test_app_kill9.py kills `prefloop serve` while its train job runs
# (the job dies with it, the step is failed, `round resume` retrains), and test_ref_cache.py re-runs a train
# job in the same folder; here a killed generate job.
@pytest.mark.parametrize("victim", ["backend.jobs.generate"])
def test_kill9_then_resume_matches_uninterrupted(victim, tmp_path, tiny_model_dir, two_rounds):
    ws = make_ws(tmp_path, tiny_model_dir, **NO_EVAL)  # the counts compared leave eval candidates out
    owner = _owner(ws)
    job = wait_for_job(owner, victim, timeout=300)
    # killed once it is at work (0.5 s of its own CPU time: still loading, whatever the machine's load)
    wait_until(lambda: cpu_seconds(job) >= 0.5, 60, f"the {victim} job to use 0.5 s of CPU")
    job.send_signal(signal.SIGKILL)
    owner.wait(120)
    assert owner.returncode != 0
    assert "failed" in owner.stderr.read()
    assert not psutil.pid_exists(job.pid) or job.status() == psutil.STATUS_ZOMBIE
    assert cli_main(["round", "resume", "-w", str(ws), "--quiet"]) == 0
    assert q(ws, "SELECT status FROM rounds WHERE round_id = 1") == [("done",)]
    assert counts(ws, 1) == counts(two_rounds, 1)
    assert counts(ws, 2)[0] == counts(two_rounds, 2)[0]
    assert q(ws, "SELECT count(*) FROM checkpoints WHERE checkpoint_id = 'c1'")[0][0] == 1


class PreferFirstCheckpoint:
    """A rigged eval judge: scores every answer of the parent checkpoint 1.0 and the new one 0.0."""

    name = "rigged"
    version = "v1"

    def __init__(self, parent_ids: set[str]):
        from annotators.base import JudgeHooks, JudgeTraits

        self.parent_ids = parent_ids
        self.traits = JudgeTraits()
        self.hooks = JudgeHooks()

    def judge(self, items):
        from annotators.base import CandidateScore, Verdict

        return [Verdict(i.prompt_id, "ok", [CandidateScore(c.candidate_id, overall=1.0 if c.candidate_id in
                                                           self.parent_ids else 0.0) for c in i.candidates])
                for i in items]


def test_if_not_worse_does_not_promote_a_worse_round(tmp_path, tiny_model_dir, monkeypatch):
    from annotators import registry
    from backend.jobs.generate import candidate_id
    from core import names

    monkeypatch.setitem(names.JUDGES, "rigged", "prefers the parent checkpoint's answers")  # a name the config accepts
    ws = make_ws(tmp_path, tiny_model_dir, **{"round.promote": "if_not_worse", "round.eval_judge": "rigged"})
    heldout = [r[0] for r in q(ws, "SELECT prompt_id FROM prompts WHERE split = 'heldout'")]
    parent_ids = {candidate_id(1, "c0", p, "original", 0) for p in heldout}
    monkeypatch.setitem(registry.JUDGES, "rigged", lambda config, root: PreferFirstCheckpoint(parent_ids))
    assert cli_main(["round", "start", "-w", str(ws), "--rounds", "1", "--quiet"]) == 0
    (promoted, reason), = q(ws, "SELECT promoted, promote_reason FROM rounds WHERE round_id = 1")
    assert promoted is False and "0 wins, 2 losses" in reason
    assert q(ws, "SELECT wins, losses FROM evals WHERE round_id = 1") == [(0, 2)]
    # the next round starts again from the last promoted checkpoint: the base
    assert q(ws, "SELECT policy_checkpoint_id FROM rounds WHERE round_id = 2") == [("c0",)]


@pytest.mark.slow
def test_round_with_two_deepspeed_cpu_ranks(tmp_path, tiny_model_dir):
    """One round whose training step runs the deepspeed launcher with 2 CPU ranks (ZeRO-3, gloo)."""
    ws = make_ws(tmp_path, tiny_model_dir, **{"train.launcher": "deepspeed", "train.num_processes": 2,
                                              "train.batch_size": 1, "round.eval_judge": None})
    assert cli_main(["round", "start", "-w", str(ws), "--rounds", "1", "--quiet"]) == 0
    assert q(ws, "SELECT status FROM rounds WHERE round_id = 1") == [("done",)]
    log = (ws / "runs" / "r001" / "train" / "job.log").read_text()
    assert "deepspeed.launcher.runner" in log and "--num_gpus 2" in log
    meta = json.loads((ws / "checkpoints" / "r001" / "meta.json").read_text())
    assert meta["parent_id"] == "c0"
    assert q(ws, "SELECT count(*) > 0 FROM train_metrics WHERE round_id = 1")[0][0]
