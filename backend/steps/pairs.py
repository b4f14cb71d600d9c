"""The pairs step (owner side): read a round's candidates, judgments and labels; build and store pairs.

A strategy with a SQL path (``backend.pairs.STRATEGIES[name].sql``) is built inside DuckDB
(``storage.pair_sql``); any other is built by its Python reference over every candidate loaded as a
``PromptItem``. Both give the same ``BuiltPairs`` (pairs, skip counts, prompts for an admin).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from backend.pairs import STRATEGIES, Candidate, Label, PairOptions, PromptItem, build_pairs
from backend.steps.common import checkpoint_path
from backend.token_budget import Budget, Measurer, limit_of
from core import names
from core.config import TrainConfig
from core.errors import PrefloopError, UsageError
from storage import pair_sql, rounds
from storage import pairs as pairstore
from storage.workspace import Workspace

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)


def load_items(ws: Workspace, round_id: int) -> list[PromptItem]:
    return read_items(ws.cursor(), round_id)


def read_items(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[PromptItem]:
    """The round's prompts with candidates as ``PromptItem``s (scores and labels attached), by prompt id."""
    scores: dict[str, dict[str, dict]] = defaultdict(dict)
    for j in pairstore.pairing_judgments(cur, round_id):
        scores[j["candidate_id"]][j["judge"]] = {k: j[k] for k in (
            "overall", "helpfulness", "correctness", "coherence", "complexity", "verbosity", "score")}
    cands: dict[str, list[Candidate]] = defaultdict(list)
    for c in pairstore.pairing_candidates(cur, round_id):
        cands[c["prompt_id"]].append(Candidate(c["candidate_id"], c["text"], c["origin"], c["view"],
                                               c["sample_index"], dict(scores.get(c["candidate_id"], {}))))
    labels: dict[str, list[Label]] = defaultdict(list)
    for lb in pairstore.pairing_labels(cur, round_id):
        ranking = json.loads(lb["ranking"]) if lb["ranking"] else None
        labels[lb["prompt_id"]].append(Label(lb["annotator"], lb["source"], lb["chosen_id"], lb["rejected_id"],
                                             tuple(ranking) if ranking else None, bool(lb["all_bad"]),
                                             lb["skipped_reason"] is not None))
    return [PromptItem(pid, tuple(cs), tuple(labels.get(pid, ()))) for pid, cs in sorted(cands.items())]


def build_round_pairs(cur: duckdb.DuckDBPyConnection, round_id: int, strategy: str,
                      opts: PairOptions) -> pairstore.BuiltPairs:
    """The round's pairs by ``strategy``: in DuckDB when it has a SQL path, else by the Python reference.

    Raises ValueError for an unknown strategy, or one that needs a judge and has none.
    """
    if strategy not in STRATEGIES:
        raise ValueError(names.unknown("pair strategy", STRATEGIES, strategy))
    if STRATEGIES[strategy].sql:
        return pair_sql.build_pairs(cur, round_id, strategy, judge=opts.judge, score=opts.score,
                                    min_margin=opts.min_margin, seed=opts.seed)
    items = read_items(cur, round_id)
    result = build_pairs(items, strategy, opts)
    table = pairstore.pairs_table([{**asdict(p), "round_id": round_id} for p in result.pairs])
    return pairstore.BuiltPairs(table=table, skipped=dict(result.skipped), needs_admin=result.needs_admin,
                                prompts=len(items), path="python")


SKIP_ADVICE: dict[str, str] = {
    "no_augmented_view": "no answer on an augmented view: add a SeVa view to generation.views (e.g. "
                         "`aug:diffusion:500`, SeVa's) and generate again, or choose another pairs.strategy",
    "no_original_view": "no answer on the `original` view: add `original` to generation.views",
    "equal_answers": "the original and augmented answers were equal: a stronger view "
                     "(e.g. `aug:diffusion:800`) or a higher generation.temperature",
    "fewer_than_two_scored": "fewer than two candidates scored by pairs.judge: run `prefloop judge` with it, "
                             "or raise generation.k",
    "tie": "every candidate scored the same: another pairs.judge or pairs.score",
    "below_margin": "no candidate far enough below: lower pairs.min_margin",
    "no_label": "pairs.strategy human-only needs labels: review in the studio, or choose another "
                "pairs.strategy",
    "all_bad": "the annotators marked every answer bad",
    "label_names_unknown_candidate": "a label names a candidate that is not in this round",
    "annotator_tie": "annotators tied: an admin decides in the studio",
}
"""skip reason (backend.pairs) -> what it means and which setting changes it."""


def explain(pairs: int, prompts: int, strategy: str, skipped: dict[str, int], round_id: int) -> str:
    """One message: how many pairs were made and why the other prompts gave none."""
    if prompts == 0:
        return (f"round {round_id}: 0 pairs: the round has no candidates; run `prefloop generate` first "
                "(or import candidates with preferences)")
    head = f"round {round_id}: {pairs} pairs from {prompts} prompts ({strategy})"
    if not skipped:
        return head
    why = "; ".join(f"{n} prompt(s) {reason}: {SKIP_ADVICE.get(reason, reason)}"
                    for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"{head}; no pairs from {sum(skipped.values())} prompt(s): {why}"


@functools.lru_cache(maxsize=4)
def _processor(folder: str, stamp: float, image_processor: str):
    from backend.models import load_processor

    return load_processor(folder, image_processor=json.loads(image_processor))


def measure(ws: Workspace, round_id: int, policy_checkpoint_id: str, train: TrainConfig,
            image_processor: dict) -> Budget | str:
    """The round's draft pairs measured in tokens with the policy's processor (``backend.token_budget``),
    or why they could not be (the train job then measures them itself)."""
    rows = pairstore.training_rows(ws.cursor(), round_id, str(ws.root))
    if not rows:
        return Budget(limit=limit_of(train.max_length))
    try:
        folder = checkpoint_path(ws, policy_checkpoint_id)
        config = Path(folder) / "config.json"
        processor = _processor(str(folder), config.stat().st_mtime if config.is_file() else 0.0,
                               json.dumps(image_processor, sort_keys=True))
        return Measurer(processor, train.max_completion_length).measure(rows, limit_of(train.max_length))
    except (PrefloopError, OSError, ValueError) as err:
        log.warning("pair lengths not measured: %s", err)
        return f"pair lengths not measured ({type(err).__name__}: {err})"


def explain_budget(budget: Budget | str, train: TrainConfig) -> str:
    """The pairs' token lengths against train.max_length, and what to change when some do not fit."""
    if isinstance(budget, str):
        return budget
    if not budget.lengths:
        return ""
    head = (f"longest pair {budget.longest} tokens (longest prompt {budget.longest_prompt} with its image "
            f"tokens; answers capped at train.max_completion_length={train.max_completion_length})")
    if budget.too_long == 0:
        return f"{head}; all fit train.max_length={budget.summary()['max_length']}"
    return (f"{head}; {budget.too_long} of {len(budget.lengths)} pairs are longer than train.max_length="
            f"{budget.limit} and will be skipped by training: set train.max_length = \"auto\" (or at least "
            f"{budget.longest}), lower train.max_completion_length, or cap the image resolution "
            "(policy.image_processor)")


def run_pairs(ws: Workspace, *, strategy: str | None = None, judge: str | None = None,
              min_margin: float | None = None, seed: int | None = None) -> dict:
    """Build the current round's draft pairs (replacing earlier drafts); frozen pairs never change."""
    cfg = ws.config.pairs
    cur = ws.cursor()
    rnd = rounds.current_round(cur)
    round_id = rnd["round_id"]
    if pairstore.is_frozen(cur, round_id):
        raise UsageError(f"round {round_id}'s pairs were frozen when its training started; they never change")
    opts = PairOptions(judge=judge or cfg.judge, score=cfg.score,
                       min_margin=cfg.min_margin if min_margin is None else min_margin,
                       seed=cfg.seed if seed is None else seed)
    name = strategy or cfg.strategy
    try:
        built = build_round_pairs(cur, round_id, name, opts)
    except ValueError as err:
        raise UsageError(str(err)) from None
    n = pairstore.replace_draft_pairs(cur, round_id, built.table)
    budget = measure(ws, round_id, rnd["policy_checkpoint_id"], ws.config.train, ws.config.policy.image_processor)
    usable = n - (budget.too_long if isinstance(budget, Budget) else 0)
    lengths = explain_budget(budget, ws.config.train)
    message = "; ".join(m for m in (explain(n, built.prompts, name, built.skipped, round_id), lengths) if m)
    return {"round_id": round_id, "strategy": name, "pairs": n, "usable": usable,
            "by_source": built.by_source, "skipped": built.skipped, "needs_admin": built.needs_admin,
            **(budget.summary() if isinstance(budget, Budget) else {}), "lengths": lengths, "message": message}
