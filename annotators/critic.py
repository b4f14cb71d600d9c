"""The local critic VLM judge: prompt templates per mode, critic requests, and aggregation into Verdicts.

Three modes, entries of the plain registry ``MODES`` (``judges.critic.mode`` in prefloop.toml, or
``prefloop judge --mode``):

- ``pointwise``: one request per candidate with the LLaVA-Critic pointwise prompt; the critic reasons
  and scores out of 100. score = the parsed 0-100 value, overall = score / 100.
- ``pairwise``: one request per ordered pair (i, j), i != j, with the LLaVA-Critic pairwise prompt: all
  K(K-1) of them, so every pair is asked in both orders (the OV-Chat recipe). With a_ij = 1 when i beat
  j in a comparison, r_i = sum_k a_ik - sum_l a_li (wins minus losses; ties and unparseable replies
  count for nobody).
  A critic with pure position bias (always "first") gives every r_i = 0. score = r_i; overall =
  (r_i + m_i) / (2 m_i) = (wins + ties / 2) / m_i, where m_i is the number of valid comparisons that
  involve i (2(K-1) when all parse), so overall stays in 0-1.
- ``rubric``: one request per candidate with the HelpSteer guide of ``annotators.rubric`` (the same
  definitions Gemini reads); five 0-4 metrics, overall = ``rubric_overall``. Status: ``ok`` when all
  five parse, ``ok`` with NULLs for the missing ones when some parse (overall is then NULL unless
  helpfulness, correctness and coherence all parsed), ``invalid`` when none parse.

The pointwise and pairwise prompts are LLaVA-Critic's as it was trained (the ``lmms-lab/llava-critic-7b``
model card's quick start): the instruction, ``Question: [..]``, the response(s) in brackets and a final
``ASSISTANT:`` line inside the user turn; the critic model's own chat template then wraps that turn (image
first) and opens the assistant turn, as the card's ``qwen_1_5`` conversation does. One deviation: the
card's pointwise line reads "the quality of answer answers", a doubled word; ours reads "the quality of
the answer". Its replies reason first and conclude last, so ``judges.critic.max_new_tokens`` must leave
room for the reasoning (default 1024; the card's example allows 4096).

Templates live in ``annotators/templates/critic_<mode>_<version>.txt`` (``TEMPLATE_VERSIONS``); the judge
version stored with each judgment is ``<mode>-<version>`` (rubric: ``rubric-v1+<rubric.TEMPLATE_VERSION>``),
so modes and template revisions never collide (v1 of pointwise and pairwise was our own wording).

The critic's model runs as a job subprocess (``backend.jobs.critic``, through the same engine interface
as the policy, greedy) that the judge step starts and plugs in as ``hooks.run_model``; this module only
builds the requests and turns the raw replies into Verdicts. A reply that does not parse makes that
candidate ``invalid`` with the raw reply kept; nothing here raises for a bad reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from annotators import rubric
from annotators.base import (
    CandidateScore,
    JudgeHooks,
    JudgeItem,
    JudgeTraits,
    ModelReply,
    PairwiseVerdict,
    Verdict,
    rubric_overall,
)
from annotators.critic_parsers import parse_pairwise, parse_pointwise, parse_rubric
from core.config import CriticConfig, WorkspaceConfig
from core.errors import UsageError

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_VERSIONS: dict[str, str] = {"pointwise": "v2", "pairwise": "v2", "rubric": "v1"}
"""The current template revision per mode; a new wording gets a new file and a new version."""
NAME = "critic"


@dataclass(frozen=True)
class CriticRequest:
    """One critic call: the image, the rendered prompt, and what it is about."""

    request_id: str
    prompt_id: str
    image_path: str
    text: str
    candidate_id: str | None = None
    first_id: str | None = None
    second_id: str | None = None


CriticReply = ModelReply
"""The critic job's raw answer to one request."""

# ---------------------------------------------------------------------------------------------- templates

def template_path(mode: str) -> Path:
    return TEMPLATE_DIR / f"critic_{mode}_{TEMPLATE_VERSIONS[mode]}.txt"


def load_template(mode: str) -> str:
    return template_path(mode).read_text(encoding="utf-8")


def helpsteer_guide() -> str:
    """The HelpSteer definitions and levels from ``annotators.rubric`` (one candidate, no JSON reply)."""
    parts = []
    for m in rubric.RUBRIC.values():
        parts.append(f"## {m.name.capitalize()}\n{m.definition}")
        parts.extend(f"- {i}: {text}" for i, text in enumerate(m.levels))
        parts.append("")
    return "\n".join(parts).strip()


def judge_version(mode: str) -> str:
    """The judge_version stored with a mode's judgments, e.g. ``pointwise-v2``."""
    base = f"{mode}-{TEMPLATE_VERSIONS[mode]}"
    return f"{base}+{rubric.TEMPLATE_VERSION}" if mode == "rubric" else base


def _request_id(*parts: str) -> str:
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------- requests

def _per_candidate(mode: str) -> Callable[[JudgeItem], list[CriticRequest]]:
    def build(item: JudgeItem) -> list[CriticRequest]:
        template = load_template(mode)
        extra = {"guide": helpsteer_guide()} if mode == "rubric" else {}
        return [CriticRequest(_request_id(item.prompt_id, c.candidate_id), item.prompt_id, item.image_path,
                              template.format(question=item.question, response=c.text, **extra),
                              candidate_id=c.candidate_id)
                for c in item.candidates]
    return build


def ordered_pairs(candidate_ids: Sequence[str]) -> list[tuple[str, str]]:
    """All K(K-1) ordered pairs (first, second), first != second."""
    return [(a, b) for a in candidate_ids for b in candidate_ids if a != b]


def _pairwise_requests(item: JudgeItem) -> list[CriticRequest]:
    template = load_template("pairwise")
    text = {c.candidate_id: c.text for c in item.candidates}
    return [CriticRequest(_request_id(item.prompt_id, a, b), item.prompt_id, item.image_path,
                          template.format(question=item.question, first=text[a], second=text[b]),
                          first_id=a, second_id=b)
            for a, b in ordered_pairs([c.candidate_id for c in item.candidates])]


# ---------------------------------------------------------------------------------------------- aggregation

def _verdict(item: JudgeItem, scores: list[CandidateScore], replies: list[CriticReply | None],
             raw: str | None, pairwise: list[PairwiseVerdict] | None = None) -> Verdict:
    got = [r for r in replies if r is not None]
    status = "ok" if any(s.status == "ok" for s in scores) else (
        "error" if scores and all(s.status == "error" for s in scores) else "invalid")
    return Verdict(prompt_id=item.prompt_id, status=status, scores=scores, raw_output=raw,
                   latency_ms=sum(r.latency_ms for r in got) if got else None,
                   tokens_out=sum(r.num_tokens for r in got) if got else None, pairwise=pairwise or [])


def _labelled_raw(item: JudgeItem, replies: list[CriticReply | None]) -> str:
    return "\n\n".join(f"### candidate {c.candidate_id}\n{r.text if r is not None else '(no reply)'}"
                       for c, r in zip(item.candidates, replies))


def _missing(candidate_id: str) -> CandidateScore:
    return CandidateScore(candidate_id, status="error", reasoning="the critic job returned no reply for this candidate")


def _aggregate_pointwise(item: JudgeItem, replies: dict[str, CriticReply]) -> Verdict:
    got = [replies.get(_request_id(item.prompt_id, c.candidate_id)) for c in item.candidates]
    scores = []
    for c, r in zip(item.candidates, got):
        if r is None:
            scores.append(_missing(c.candidate_id))
            continue
        value = parse_pointwise(r.text)
        scores.append(CandidateScore(c.candidate_id, status="ok" if value is not None else "invalid",
                                     score=value, overall=None if value is None else value / 100.0,
                                     reasoning=r.text))
    return _verdict(item, scores, got, _labelled_raw(item, got))


def _aggregate_rubric(item: JudgeItem, replies: dict[str, CriticReply]) -> Verdict:
    got = [replies.get(_request_id(item.prompt_id, c.candidate_id)) for c in item.candidates]
    scores = []
    for c, r in zip(item.candidates, got):
        if r is None:
            scores.append(_missing(c.candidate_id))
            continue
        metrics = parse_rubric(r.text)
        s = CandidateScore(c.candidate_id, status="ok" if metrics else "invalid", reasoning=r.text,
                           **(metrics or {}))
        s.overall = rubric_overall(s)
        scores.append(s)
    return _verdict(item, scores, got, _labelled_raw(item, got))


@dataclass(frozen=True)
class PairwiseTally:
    wins: int = 0
    losses: int = 0
    ties: int = 0

    @property
    def valid(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def r(self) -> int:
        """r_i = wins - losses."""
        return self.wins - self.losses

    @property
    def overall(self) -> float | None:
        """(r_i + m_i) / (2 m_i): the share of valid comparisons won, ties counting half."""
        return None if self.valid == 0 else (self.r + self.valid) / (2 * self.valid)


def pairwise_tally(candidate_ids: Sequence[str],
                   verdicts: Sequence[tuple[str, str, str | None]]) -> dict[str, PairwiseTally]:
    """Wins, losses and ties per candidate from ordered verdicts (first_id, second_id, winner).

    winner is ``first``, ``second``, ``tie`` or None (invalid: counts for nobody).
    r_i = sum_k a_ik - sum_l a_li with a_ij = 1 when i beat j in one comparison.
    """
    t = {c: [0, 0, 0] for c in candidate_ids}
    for first, second, winner in verdicts:
        if winner == "first":
            t[first][0] += 1
            t[second][1] += 1
        elif winner == "second":
            t[second][0] += 1
            t[first][1] += 1
        elif winner == "tie":
            t[first][2] += 1
            t[second][2] += 1
    return {c: PairwiseTally(*v) for c, v in t.items()}


def _aggregate_pairwise(item: JudgeItem, replies: dict[str, CriticReply]) -> Verdict:
    ids = [c.candidate_id for c in item.candidates]
    pairs = ordered_pairs(ids)
    got = [replies.get(_request_id(item.prompt_id, a, b)) for a, b in pairs]
    pv = []
    for (a, b), r in zip(pairs, got):
        if r is None:
            pv.append(PairwiseVerdict(a, b, None, status="error", raw_output=None))
            continue
        winner = parse_pairwise(r.text)
        pv.append(PairwiseVerdict(a, b, winner, status="ok" if winner else "invalid", raw_output=r.text))
    tally = pairwise_tally(ids, [(v.first_id, v.second_id, v.winner) for v in pv])
    scores = []
    for cid in ids:
        t = tally[cid]
        n = 2 * (len(ids) - 1)
        if len(ids) < 2:
            why = "pairwise mode needs at least two candidates for a prompt"
        else:
            why = (f"r_i = wins - losses = {t.wins} - {t.losses} = {t.r} ({t.ties} ties; {t.valid} of {n} "
                   "ordered comparisons parsed; replies in pairwise_verdicts)")
        scores.append(CandidateScore(cid, status="ok" if t.valid else "invalid",
                                     score=float(t.r) if t.valid else None, overall=t.overall, reasoning=why))
    return _verdict(item, scores, got, None, pairwise=pv)


@dataclass(frozen=True)
class CriticMode:
    """One critic mode: how to turn a JudgeItem into critic requests, and replies back into a Verdict."""

    build: Callable[[JudgeItem], list[CriticRequest]]
    aggregate: Callable[[JudgeItem, dict[str, CriticReply]], Verdict]
    doc: str


MODES: dict[str, CriticMode] = {
    "pointwise": CriticMode(_per_candidate("pointwise"), _aggregate_pointwise,
                            "LLaVA-Critic pointwise: reasoning and a score out of 100 per candidate"),
    "pairwise": CriticMode(_pairwise_requests, _aggregate_pairwise,
                           "all K(K-1) ordered pairs; r_i = wins - losses cancels position bias"),
    "rubric": CriticMode(_per_candidate("rubric"), _aggregate_rubric,
                         "five HelpSteer metrics 0-4 per candidate (the Gemini guide)"),
}
assert set(MODES) == set(TEMPLATE_VERSIONS)


def build_requests(items: Sequence[JudgeItem], mode: str) -> list[CriticRequest]:
    return [r for item in items for r in MODES[mode].build(item)]


def aggregate(items: Sequence[JudgeItem], mode: str, replies: Sequence[CriticReply]) -> list[Verdict]:
    """One Verdict per item, same order; a request with no reply makes its candidate ``error``."""
    by_id = {r.request_id: r for r in replies}
    return [MODES[mode].aggregate(item, by_id) for item in items]


# ---------------------------------------------------------------------------------------------- the judge

class CriticJudge:
    """``judge(items)``: the critic requests of the items, answered by ``hooks.run_model``, parsed into Verdicts.

    The judge step plugs the critic job in as ``hooks.run_model`` (``backend.steps.judge``); tests plug
    in a fake. ``image_root`` resolves relative image paths (the workspace folder).
    """

    name = NAME

    def __init__(self, critic: CriticConfig, image_root: Path | None = None):
        if critic.mode not in MODES:
            raise UsageError(f"unknown critic mode {critic.mode!r}; choose one of: {', '.join(MODES)}")
        self.critic = critic
        self.mode = critic.mode
        self.image_root = Path(image_root) if image_root is not None else None
        self.version = judge_version(self.mode)
        # pointwise/rubric judge each candidate alone; pairwise needs every candidate of a prompt
        self.traits = JudgeTraits(per_candidate=self.mode != "pairwise", runs_model_job=True, variant=self.mode)
        self.hooks = JudgeHooks()

    def _resolve(self, item: JudgeItem) -> JudgeItem:
        p = Path(item.image_path)
        if p.is_absolute() or self.image_root is None:
            return item
        return JudgeItem(item.prompt_id, item.question, str(self.image_root / p), item.image_id, item.candidates,
                         item.reference)

    def requests(self, items: Sequence[JudgeItem]) -> list[CriticRequest]:
        """The critic requests of ``items`` in this judge's mode (image paths made absolute)."""
        return build_requests([self._resolve(i) for i in items], self.mode)

    def parse(self, items: Sequence[JudgeItem], replies: Sequence[CriticReply]) -> list[Verdict]:
        """One Verdict per item from the critic's raw replies (a request without a reply is ``error``)."""
        return aggregate(items, self.mode, replies)

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        requests = self.requests(items)
        if not requests:
            return self.parse(items, [])
        if self.hooks.run_model is None:
            raise UsageError("the critic's model runs as a job that the judge step starts: run it with "
                             "`prefloop judge --judge critic` (or plug a runner into hooks.run_model)")
        replies = self.hooks.run_model(requests)
        log.info("critic %s: %d replies for %d prompts", self.version, len(replies), len(items))
        return self.parse(items, replies)


def make_critic(config: WorkspaceConfig, workspace_root: Path) -> CriticJudge:
    """Registry factory: the critic in ``config.judges.critic.mode``."""
    return CriticJudge(config.judges.critic, workspace_root)
