"""The judge contract: ``judge(items) -> list[Verdict]``, same length and order as its input.

A bad item (unparseable reply, missing candidate, score out of range, a call that failed after its
retries) comes back with ``status="invalid"`` or ``"error"`` and its raw output kept; it never raises
and never kills the batch. Scores keep the judge's own shape (five 0-4 HelpSteer metrics, a 0-100
score, pairwise wins) plus ``overall`` normalised to 0-1, used for pairing and disagreement marks.

Every judge declares what it is in ``traits`` (:class:`JudgeTraits`) and carries ``hooks``
(:class:`JudgeHooks`), the optional callbacks the judge step plugs in: progress, and for a judge whose
model runs as a job subprocess (the critic), ``run_model``, which answers its requests. A judge never
starts a process itself: nothing under ``annotators/`` imports ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(frozen=True)
class JudgeTraits:
    """What a judge is, declared once; the judge step reads it (instead of probing for attributes)."""

    per_candidate: bool = False
    """Scores each candidate on its own: a prompt comes with its unjudged candidates only (else all of them)."""
    requires_reference: bool = False
    """Scores against the prompt's reference answer: the judge step skips, and counts, prompts without one."""
    runs_model_job: bool = False
    """Its model runs as a job subprocess (the critic job): it needs ``hooks.run_model``, and the job
    reports its own progress."""
    reports_progress: bool = False
    """Calls ``hooks.on_progress`` as items finish (else the judge step feeds it chunks and reports per chunk)."""
    variant: str | None = None
    """The judge's variant (the critic's mode), part of the step's name: ``judge-critic-pairwise``."""
    deferred: bool = False
    """Answers later (Gemini's Batch API): it is a :class:`DeferredJudge`, whose ``prepare(items, state_dir)``
    submits the requests or polls them and raises ``core.errors.Waiting`` until the replies are in. The judge
    step calls it before the step starts, with the step's run folder for the state that must survive a
    restart of the owner."""


class ModelRequest(Protocol):
    """One question for a judge's model job: an image and a rendered prompt (``annotators.critic.CriticRequest``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def image_path(self) -> str: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class ModelReply:
    """The model job's raw answer to one request."""

    request_id: str
    """The request it answers."""
    text: str
    """The model's reply, unparsed."""
    num_tokens: int = 0
    """Tokens generated."""
    latency_ms: float = 0.0
    """Generation time of the reply (its share of the batch)."""
    finish_reason: str = "stop"
    """`stop` (end of sequence) or `length` (hit max_new_tokens)."""


ProgressHook = Callable[[int, int], None]
"""``(done, total)`` after each finished item."""
ModelRunner = Callable[[Sequence[ModelRequest]], list[ModelReply]]
"""Answers a judge's model requests (any order, any subset: a request without a reply is an ``error``)."""


@dataclass
class JudgeHooks:
    """The optional callbacks the judge step plugs into a judge; unplugged, each is None."""

    on_progress: ProgressHook | None = None
    """Called by judges whose traits say ``reports_progress``."""
    run_model: ModelRunner | None = None
    """Needed by judges whose traits say ``runs_model_job`` (the judge step runs the critic job)."""


class Judge(Protocol):
    name: str
    """registry name, stored in judgments.judge"""
    version: str
    """template/prompt version, stored in judgments.judge_version"""
    traits: JudgeTraits
    """what the judge is: per candidate or per prompt, needs references, runs a model job, reports progress"""
    hooks: JudgeHooks
    """the callbacks the judge step plugs in (a judge that uses none keeps ``JudgeHooks()``)"""

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


class DeferredJudge(Judge, Protocol):
    """A judge whose traits say ``deferred``: its replies come later than the call that asks for them."""

    def prepare(self, items: Sequence[JudgeItem], state_dir: Path) -> None:
        """Submit the requests ``items`` need (once), or poll the submitted ones; keep what must survive a
        restart in ``state_dir``. Returns when every reply is in (``judge(items)`` then answers from them);
        raises ``core.errors.Waiting`` while some are not."""
        ...


def rubric_overall(s: CandidateScore) -> float | None:
    """Mean of helpfulness, correctness and coherence on 0-4, mapped to 0-1 (None if any is missing)."""
    vals = [s.helpfulness, s.correctness, s.coherence]
    if any(v is None for v in vals):
        return None
    return sum(vals) / (3 * 4.0)


JudgeFactory = Callable[..., Judge]
