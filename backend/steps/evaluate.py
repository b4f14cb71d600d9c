"""The eval step: c(r) against c(r-1) on held-out prompts, judged by ``round.eval_judge``.

Both checkpoints answer every held-out prompt (greedy, one answer each, stored with origin `eval`,
never paired); the judge scores both answers of a prompt together (the pairwise critic compares them
in both orders, which cancels position bias; the other judges score each answer on its own scale);
the round records wins, losses and ties of c(r) by the normalised overall score.
"""

from __future__ import annotations

import logging

from annotators.base import CandidateText, JudgeItem
from annotators.registry import make_judge
from backend.job_runner import CancelCheck, EventHandler
from backend.steps.common import step_dir, tracked_step
from backend.steps.generate import run_generate
from storage import generation, rounds
from storage import judgments as jstore
from storage.workspace import Workspace

log = logging.getLogger(__name__)

EVAL_SAMPLING = {"k": 1, "temperature": 0.0, "views": ["original"]}


def compare(scores: list[dict], new: str, old: str) -> tuple[int, int, int, int]:
    """(wins, losses, ties, n) of ``new`` over ``old``; a prompt missing a valid score is a tie."""
    by_prompt: dict[str, dict[str, float | None]] = {}
    for s in scores:
        by_prompt.setdefault(s["prompt_id"], {})[s["checkpoint_id"]] = s["overall"]
    wins = losses = ties = 0
    for per in by_prompt.values():
        a, b = per.get(new), per.get(old)
        if a is None or b is None or a == b:
            ties += 1
        elif a > b:
            wins += 1
        else:
            losses += 1
    return wins, losses, ties, len(by_prompt)


def run_eval(ws: Workspace, round_id: int, *, on_event: EventHandler | None = None,
             cancel: CancelCheck | None = None) -> dict:
    cur = ws.cursor()
    judge_name = ws.config.round.eval_judge
    if not judge_name:
        return {"skipped": "no eval judge configured (round.eval_judge in prefloop.toml)"}
    if generation.count_prompts_in_split(cur, "heldout") == 0:
        return {"skipped": "no held-out prompts (import some with \"split\": \"heldout\")"}
    rnd = rounds.get_round(cur, round_id)
    new, old = f"c{round_id}", rnd["policy_checkpoint_id"]
    for ckpt in (new, old):
        run_generate(ws, round_id=round_id, checkpoint_id=ckpt, split="heldout", eval_origin=True,
                     overrides=EVAL_SAMPLING, on_event=on_event, cancel=cancel)
    judge = make_judge(judge_name, ws.config, ws.root)
    items = [JudgeItem(p["prompt_id"], p["question"], p["image_path"], p["image_id"],
                       tuple(CandidateText(c["candidate_id"], c["text"]) for c in p["candidates"]), p["reference"])
             for p in generation.eval_prompts(cur, round_id, str(ws.root))]
    run_dir = step_dir(ws, round_id, "eval-judge")
    from backend.steps.judge import plug_model_job, verdict_rows

    plug_model_job(judge, ws.root, ws.config, run_dir, on_event)

    with tracked_step(ws, round_id, "eval-judge", run_dir):
        verdicts = judge.judge(items)
        jrows, prows = verdict_rows(items, verdicts, judge_name, judge.version)
        jstore.write_judgments(cur, jrows, prows)
        wins, losses, ties, n = compare(rounds.eval_scores(cur, round_id, judge_name), new, old)
        rounds.add_eval(cur, round_id=round_id, baseline_checkpoint_id=old, checkpoint_id=new, judge=judge_name,
                        wins=wins, losses=losses, ties=ties, n=n)
        summary = {"judge": judge_name, "checkpoint": new, "baseline": old, "wins": wins, "losses": losses,
                   "ties": ties, "n": n}
        rounds.finish_step(cur, round_id, "eval-judge", "done", summary=summary)
    return summary
