"""The pairs step (owner side): read a round's candidates, judgments and labels; build and store pairs."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict

from backend.pairs import Candidate, Label, PairOptions, PromptItem, build_pairs
from core.errors import UsageError
from storage import pairs as pairstore
from storage import rounds
from storage.workspace import Workspace


def load_items(ws: Workspace, round_id: int) -> list[PromptItem]:
    cur = ws.cursor()
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
        result = build_pairs(load_items(ws, round_id), name, opts)
    except ValueError as err:
        raise UsageError(str(err)) from None
    rows = [{**asdict(p), "round_id": round_id} for p in result.pairs]
    pairstore.replace_draft_pairs(cur, round_id, rows)
    return {"round_id": round_id, "strategy": name, "pairs": len(rows), "by_source": dict(result.by_source),
            "skipped": dict(result.skipped), "needs_admin": result.needs_admin}
