"""Agreement statistics between judges, and between judges and humans (pure functions over rows).

Rows come from ``storage.agreement``: ``judged_scores`` (one per ok judgment) and ``latest_labels``.
A "judge" here is a (judge, judge_version) pair written ``judge:version``, so the critic's pointwise
and pairwise modes are compared like two judges. Everything is per round.

- ``rank_agreement``: Spearman rho and Kendall tau (scipy.stats) between two judges' scores of the
  candidates both judged, per metric (overall, plus each rubric metric both judges produce).
- ``best_worst_agreement``: on prompts where both judges scored at least two common candidates and
  neither gave them all the same score, the share where they pick the same best and the same worst
  (a tie at the top counts as the same best when the tied sets overlap).
- ``human_agreement``: per judge, against the latest human label per (prompt, annotator):
  ``disagree`` counts labels whose chosen the judge scores below the rejected; ``contradicts``
  counts labels that go against the judge's own best-worst pair (the human chose one of the judge's
  worst over a candidate the judge rates higher, or rejected one of the judge's best for a candidate
  the judge rates lower; ties inside the best or worst set are no contradiction) - the pairs a
  best-worst strategy would train on against a person.
- ``disagreement_prompts``: prompts ranked by the mean absolute difference of normalised overall
  between judges, over the candidates several judges scored: where reviewers should start.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from scipy import stats

from annotators.base import METRICS

AGREEMENT_METRICS = ("overall", *METRICS)


def judge_key(row: dict) -> str:
    return f"{row['judge']}:{row['judge_version']}"


def _by_round(rows: Iterable[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["round_id"]].append(r)
    return dict(sorted(out.items()))


def _scores(rows: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """{judge: {candidate_id: value}} for one metric (None values dropped)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[judge_key(r)][r["candidate_id"]] = float(v)
    return out


def _corr(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """(spearman, kendall), None when undefined (fewer than 2 values, or one side constant)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    rho = stats.spearmanr(a, b).statistic
    tau = stats.kendalltau(a, b).statistic
    return (None if math.isnan(rho) else float(rho)), (None if math.isnan(tau) else float(tau))


def judges_of(rows: Iterable[dict]) -> list[str]:
    return sorted({judge_key(r) for r in rows})


def rank_agreement(rows: list[dict], metrics: tuple[str, ...] = AGREEMENT_METRICS) -> list[dict]:
    """Per round, judge pair and metric: n candidates both judged, Spearman rho, Kendall tau."""
    out = []
    for round_id, rrows in _by_round(rows).items():
        for metric in metrics:
            scores = _scores(rrows, metric)
            for a, b in itertools.combinations(sorted(scores), 2):
                common = sorted(set(scores[a]) & set(scores[b]))
                if not common:
                    continue
                xa, xb = [scores[a][c] for c in common], [scores[b][c] for c in common]
                rho, tau = _corr(xa, xb)
                out.append({"round_id": round_id, "judge_a": a, "judge_b": b, "metric": metric, "n": len(common),
                            "spearman": rho, "kendall": tau})
    return out


def _per_prompt(rows: list[dict], metric: str = "overall") -> dict[str, dict[str, dict[str, float]]]:
    """{prompt_id: {judge: {candidate_id: value}}}."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        v = r.get(metric)
        if v is not None:
            out[r["prompt_id"]][judge_key(r)][r["candidate_id"]] = float(v)
    return out


def _extremes(scores: dict[str, float]) -> tuple[set[str], set[str]] | None:
    """(best set, worst set) of one judge on one prompt; None when all scores are equal."""
    if len(scores) < 2:
        return None
    hi, lo = max(scores.values()), min(scores.values())
    if hi == lo:
        return None
    return {c for c, v in scores.items() if v == hi}, {c for c, v in scores.items() if v == lo}


def best_worst_agreement(rows: list[dict]) -> list[dict]:
    """Per round and judge pair: prompts compared, share with the same best, share with the same worst."""
    out = []
    for round_id, rrows in _by_round(rows).items():
        prompts = _per_prompt(rrows)
        for a, b in itertools.combinations(judges_of(rrows), 2):
            compared = same_best = same_worst = undecided = 0
            for by_judge in prompts.values():
                if a not in by_judge or b not in by_judge:
                    continue
                common = set(by_judge[a]) & set(by_judge[b])
                if len(common) < 2:
                    continue
                ea = _extremes({c: by_judge[a][c] for c in common})
                eb = _extremes({c: by_judge[b][c] for c in common})
                if ea is None or eb is None:
                    undecided += 1
                    continue
                compared += 1
                same_best += bool(ea[0] & eb[0])
                same_worst += bool(ea[1] & eb[1])
            out.append({"round_id": round_id, "judge_a": a, "judge_b": b, "prompts": compared,
                        "undecided": undecided,
                        "same_best": same_best / compared if compared else None,
                        "same_worst": same_worst / compared if compared else None})
    return out


def human_agreement(rows: list[dict], labels: list[dict]) -> list[dict]:
    """Per round and judge: how often the latest human labels go against the judge."""
    out = []
    labels_by_round = _by_round(labels)
    for round_id, rrows in _by_round(rows).items():
        prompts = _per_prompt(rrows)
        round_labels = labels_by_round.get(round_id, [])
        for judge in judges_of(rrows):
            n_pair = contradicts = n_both = disagree = 0
            for lab in round_labels:
                scores = prompts.get(lab["prompt_id"], {}).get(judge)
                if not scores:
                    continue
                chosen, rejected = lab["chosen_id"], lab["rejected_id"]
                if chosen in scores and rejected in scores:
                    n_both += 1
                    disagree += scores[rejected] > scores[chosen]
                ext = _extremes(scores)
                if ext is not None:
                    n_pair += 1
                    best, worst = ext
                    contradicts += (chosen in worst and rejected not in worst) or \
                        (rejected in best and chosen not in best)
            out.append({"round_id": round_id, "judge": judge, "labels": len(round_labels),
                        "labels_with_pair": n_pair, "contradicts": contradicts,
                        "contradiction_rate": contradicts / n_pair if n_pair else None,
                        "labels_scored": n_both, "disagree": disagree,
                        "disagree_rate": disagree / n_both if n_both else None})
    return out


def disagreement_prompts(rows: list[dict], top: int = 20) -> list[dict]:
    """Prompts where judges disagree most: mean |overall_a - overall_b| over judge pairs and candidates."""
    out = []
    for round_id, rrows in _by_round(rows).items():
        for prompt_id, by_judge in _per_prompt(rrows).items():
            if len(by_judge) < 2:
                continue
            cands = {c for s in by_judge.values() for c in s}
            diffs, scored = [], 0
            for c in cands:
                vals = [s[c] for s in by_judge.values() if c in s]
                if len(vals) < 2:
                    continue
                scored += 1
                diffs.append(float(np.mean([abs(x - y) for x, y in itertools.combinations(vals, 2)])))
            if not diffs:
                continue
            best = {j: sorted(e[0]) if (e := _extremes(s)) else [] for j, s in sorted(by_judge.items())}
            out.append({"round_id": round_id, "prompt_id": prompt_id, "disagreement": float(np.mean(diffs)),
                        "judges": len(by_judge), "candidates": scored, "best": best})
    out.sort(key=lambda r: (-r["disagreement"], r["round_id"], r["prompt_id"]))
    return out[:top]


def agreement_report(rows: list[dict], labels: list[dict], top: int = 20) -> dict:
    """Everything ``prefloop agreement`` shows, as one JSON-able dict."""
    return {
        "rounds": sorted({r["round_id"] for r in rows}),
        "judges": judges_of(rows),
        "rank": rank_agreement(rows),
        "best_worst": best_worst_agreement(rows),
        "human": human_agreement(rows, labels),
        "disagreement": disagreement_prompts(rows, top),
    }
