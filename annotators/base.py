"""The judge contract: ``judge(items) -> list[Verdict]``, same length and order as its input.

A bad item (unparseable reply, missing candidate, score out of range, a call that failed after its
retries) comes back with ``status="invalid"`` or ``"error"`` and its raw output kept; it never raises
and never kills the batch. Scores keep the judge's own shape (five 0-4 HelpSteer metrics, a 0-100
score, pairwise wins) plus ``overall`` normalised to 0-1, used for pairing and disagreement marks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

METRICS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
STATUSES = ("ok", "invalid", "error")


@dataclass(frozen=True)
class CandidateText:
    candidate_id: str
    text: str


@dataclass(frozen=True)
class JudgeItem:
    """One prompt with its candidates, as a judge sees it."""

    prompt_id: str
    question: str
    image_path: str
    image_id: str
    candidates: tuple[CandidateText, ...]
    reference: str | None = None


@dataclass
class CandidateScore:
    candidate_id: str
    status: str = "ok"
    helpfulness: float | None = None
    correctness: float | None = None
    coherence: float | None = None
    complexity: float | None = None
    verbosity: float | None = None
    score: float | None = None
    """judge-native scalar: 0-100 (pointwise), r_i = wins - losses (pairwise), 0-4 (reference)"""
    overall: float | None = None
    """normalised 0-1"""
    reasoning: str | None = None


@dataclass
class PairwiseVerdict:
    first_id: str
    second_id: str
    winner: str | None  # first | second | tie | None when invalid
    status: str = "ok"
    raw_output: str | None = None


@dataclass
class Verdict:
    """A judge's answer for one JudgeItem."""

    prompt_id: str
    status: str
    scores: list[CandidateScore] = field(default_factory=list)
    raw_output: str | None = None
    reasoning: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    pairwise: list[PairwiseVerdict] = field(default_factory=list)


class Judge(Protocol):
    name: str
    """registry name, stored in judgments.judge"""
    version: str
    """template/prompt version, stored in judgments.judge_version"""

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


def rubric_overall(s: CandidateScore) -> float | None:
    """Mean of helpfulness, correctness and coherence on 0-4, mapped to 0-1 (None if any is missing)."""
    vals = [s.helpfulness, s.correctness, s.coherence]
    if any(v is None for v in vals):
        return None
    return sum(vals) / (3 * 4.0)


JudgeFactory = Callable[..., Judge]
