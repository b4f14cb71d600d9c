"""Pair strategies: turn a round's scored candidates and human labels into chosen/rejected pairs.

Pure functions over plain dataclasses (no database): ``build_pairs(items, strategy, options)``.
Human decisions always win over AI ones: for a prompt with human labels the majority decision of its
annotators gives the pairs (a ranking expands to every ordered pair, "all bad" drops the prompt), and
a tie between annotators drops the prompt and lists it for an admin. Imported preferences come next,
then the configured AI strategy. Ties and prompts with fewer than two valid candidates are skipped
and counted, never a crash.

This module is the reference. ``STRATEGIES`` says which strategies also have a SQL path
(``storage.pair_sql``, run inside DuckDB by the pairs step); ``tests/test_pair_sql.py`` checks on random
workspaces that both give the same pairs, skip counts and admin list. Both share two rules that could
not be copied from one to the other: the random pick of best-vs-random (``random_pick_key``) and the
equal-answer test of SeVa (``core.text.normalize_answer``, called from DuckDB as a function).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from core import names
from core.text import normalize_answer

METRICS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HCC = ("helpfulness", "correctness", "coherence")
AI_ORIGINS = ("policy", "imported")


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    text: str
    origin: str = "policy"
    view: str = "original"
    sample_index: int = 0
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """judge -> {"overall": .., "helpfulness": .., ..., "score": ..}"""


@dataclass(frozen=True)
class Label:
    annotator: str
    source: str = "human"  # human | imported
    chosen_id: str | None = None
    rejected_id: str | None = None
    ranking: tuple[str, ...] | None = None  # best first
    all_bad: bool = False
    skipped: bool = False

    def decision(self) -> tuple | None:
        """A hashable vote: what this annotator decided (None for a skip or an empty label)."""
        if self.skipped:
            return None
        if self.all_bad:
            return ("all_bad",)
        if self.ranking and len(self.ranking) >= 2:
            return ("ranking", tuple(self.ranking))
        if self.chosen_id and self.rejected_id and self.chosen_id != self.rejected_id:
            return ("pair", self.chosen_id, self.rejected_id)
        return None


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    candidates: tuple[Candidate, ...]
    labels: tuple[Label, ...] = ()


@dataclass(frozen=True)
class PairOptions:
    judge: str | None = None
    """Judge whose scores rank candidates (best-worst, best-vs-random)."""
    score: str = "overall"
    """Score used by best-worst."""
    min_margin: float = 2.0
    """best-vs-random: HCC sum of the rejected at least this much lower (inclusive)."""
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    chosen_id: str
    rejected_id: str
    source: str
    strategy: str
    margin: float | None = None
    chosen_scores: dict | None = None
    rejected_scores: dict | None = None
    rubric_delta: dict | None = None


@dataclass
class PairResult:
    pairs: list[Pair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    """reason -> number of prompts skipped"""
    needs_admin: list[str] = field(default_factory=list)
    """prompts whose annotators tied: dropped until an admin decides"""

    @property
    def by_source(self) -> Counter:
        return Counter(p.source for p in self.pairs)


class Skip(Exception):
    """A prompt yields no pair; the message is the counted reason."""


StrategyFn = Callable[[PromptItem, PairOptions, random.Random], list[Pair]]


def _rubric_delta(a: Candidate, b: Candidate, judge: str | None) -> dict | None:
    if judge is None or judge not in a.scores or judge not in b.scores:
        return None
    sa, sb = a.scores[judge], b.scores[judge]
    delta = {m: sa[m] - sb[m] for m in METRICS if sa.get(m) is not None and sb.get(m) is not None}
    return delta or None


def _pair(item: PromptItem, chosen: Candidate, rejected: Candidate, source: str, strategy: str,
          margin: float | None, judge: str | None) -> Pair:
    return Pair(item.prompt_id, chosen.candidate_id, rejected.candidate_id, source, strategy, margin,
                chosen.scores or None, rejected.scores or None, _rubric_delta(chosen, rejected, judge))


def _scored(item: PromptItem, judge: str, key: Callable[[dict], float | None]) -> list[tuple[float, Candidate]]:
    out = []
    for c in item.candidates:
        if c.origin not in AI_ORIGINS or judge not in c.scores:
            continue
        v = key(c.scores[judge])
        if v is not None:
            out.append((float(v), c))
    return out


def _need_judge(opts: PairOptions, strategy: str) -> str:
    if not opts.judge:
        raise ValueError(f"the {strategy} strategy needs a judge (pairs.judge in prefloop.toml or --judge)")
    return opts.judge


def best_worst(item: PromptItem, opts: PairOptions, rng: random.Random) -> list[Pair]:
    """OV-Chat: the highest-scored candidate vs the lowest by one judge's score."""
    judge = _need_judge(opts, "best-worst")
    scored = _scored(item, judge, lambda s: s.get(opts.score))
    if len(scored) < 2:
        raise Skip("fewer_than_two_scored")
    scored.sort(key=lambda t: (-t[0], t[1].candidate_id))
    (hi, best), (lo, worst) = scored[0], scored[-1]
    if hi == lo:
        raise Skip("tie")
    return [_pair(item, best, worst, judge, "best-worst", hi - lo, judge)]


def _hcc(s: dict) -> float | None:
    vals = [s.get(m) for m in HCC]
    return None if any(v is None for v in vals) else float(sum(vals))


def random_pick_key(seed: int, prompt_id: str, candidate_id: str) -> str:
    """The seeded "random" order of best-vs-random: the eligible candidate with the smallest key is picked
    (ties, i.e. never, by candidate id). SHA-256 hex of ``"{seed}|{prompt_id}|{candidate_id}"``, so DuckDB's
    ``sha256()`` gives the same order (``storage.pair_sql``); Python's ``random.Random`` cannot be replayed
    in SQL."""
    return hashlib.sha256(f"{seed}|{prompt_id}|{candidate_id}".encode()).hexdigest()


def best_vs_random(item: PromptItem, opts: PairOptions, rng: random.Random) -> list[Pair]:
    """Li/Lin/Pei 2024: the best by helpfulness+correctness+coherence vs a random candidate whose sum is
    at least ``min_margin`` lower (inclusive; the authors' code used a strict > 2). The random choice is
    the seeded hash order of ``random_pick_key`` (uniform over the eligible ones, same in SQL)."""
    judge = _need_judge(opts, "best-vs-random")
    scored = _scored(item, judge, _hcc)
    if len(scored) < 2:
        raise Skip("fewer_than_two_scored")
    scored.sort(key=lambda t: (-t[0], t[1].candidate_id))
    top, best = scored[0]
    eligible = [(v, c) for v, c in scored[1:] if top - v >= opts.min_margin]
    if not eligible:
        raise Skip("tie" if all(v == top for v, _ in scored) else "below_margin")
    v, rejected = min(eligible, key=lambda t: (random_pick_key(opts.seed, item.prompt_id, t[1].candidate_id),
                                               t[1].candidate_id))
    return [_pair(item, best, rejected, judge, "best-vs-random", top - v, judge)]


def seva(item: PromptItem, opts: PairOptions, rng: random.Random) -> list[Pair]:
    """SeVa: the original-view answer is chosen, each augmented-view answer rejected; equal answers
    (after whitespace and case normalisation) are dropped."""
    originals = sorted((c for c in item.candidates if c.origin == "policy" and c.view == "original"),
                       key=lambda c: (c.sample_index, c.candidate_id))
    augmented = [c for c in item.candidates if c.origin == "seva_augmented"]
    if not originals or not augmented:
        raise Skip("no_augmented_view" if originals else "no_original_view")
    chosen = originals[0]
    pairs = [_pair(item, chosen, a, "seva", "seva", None, opts.judge) for a in augmented
             if normalize_answer(a.text) != normalize_answer(chosen.text)]
    if not pairs:
        raise Skip("equal_answers")
    return pairs


def human_only(item: PromptItem, opts: PairOptions, rng: random.Random) -> list[Pair]:
    """No AI pairs: only prompts with a human (or imported) decision give pairs."""
    raise Skip("no_label")


@dataclass(frozen=True)
class Strategy:
    """One pair strategy: its Python reference and whether DuckDB runs it too."""

    python: StrategyFn
    """the reference, per prompt over ``PromptItem``s (its docstring's first line is the CLI help)"""
    sql: bool = False
    """``storage.pair_sql`` has the same strategy in SQL, which the pairs step then runs instead"""


STRATEGIES: dict[str, Strategy] = {
    "best-worst": Strategy(best_worst, sql=True),
    "best-vs-random": Strategy(best_vs_random, sql=True),
    "seva": Strategy(seva, sql=True),
    "human-only": Strategy(human_only, sql=True),
}
"""Keyed by ``core.names.PAIR_STRATEGIES``: the ``pairs.strategy`` names (checked when prefloop.toml loads).
A strategy added later may stay Python-only (``sql=False``): the pairs step then loads every candidate."""


class AnnotatorTie(Exception):
    pass


def _majority(labels: list[Label]) -> tuple | None:
    votes = Counter(d for d in (lbl.decision() for lbl in labels) if d is not None)
    if not votes:
        return None
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise AnnotatorTie()
    return ranked[0][0]


def _from_decision(item: PromptItem, decision: tuple, source: str) -> list[Pair]:
    by_id = {c.candidate_id: c for c in item.candidates}
    kind = decision[0]
    if kind == "all_bad":
        raise Skip("all_bad")
    order = list(decision[1]) if kind == "ranking" else [decision[1], decision[2]]
    missing = [cid for cid in order if cid not in by_id]
    if missing:
        raise Skip("label_names_unknown_candidate")
    out = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            out.append(_pair(item, by_id[a], by_id[b], source, "human" if source == "human" else "imported",
                             None, None))
    return out


def _prompt_rng(seed: int, prompt_id: str) -> random.Random:
    h = hashlib.sha256(f"{seed}|{prompt_id}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def build_pairs(items: list[PromptItem], strategy: str, opts: PairOptions = PairOptions()) -> PairResult:
    """Pairs for every prompt: human majority, else imported preference, else the AI strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(names.unknown("pair strategy", STRATEGIES, strategy))
    fn = STRATEGIES[strategy].python
    result = PairResult()
    for item in items:
        try:
            for source in ("human", "imported"):
                labels = [lbl for lbl in item.labels if lbl.source == source]
                decision = _majority(labels) if labels else None
                if decision is not None:
                    result.pairs.extend(_from_decision(item, decision, source))
                    break
            else:
                result.pairs.extend(fn(item, opts, _prompt_rng(opts.seed, item.prompt_id)))
        except AnnotatorTie:
            result.skipped["annotator_tie"] += 1
            result.needs_admin.append(item.prompt_id)
        except Skip as s:
            result.skipped[str(s)] += 1
    return result
