"""The ``reference`` judge: checks an answer against the prompt's ground-truth answer (``prompts.reference``).

Scores 0-4 (overall = score / 4), per candidate, in-process:

- 4: exact match after normalisation (lowercase, Unicode NFKC, punctuation, the articles a/an/the and
  extra whitespace removed; number words zero-twenty written as digits; yes/no synonyms such as
  "yeah", "nope" folded), e.g. "Circle." == "circle", "two" == "2";
- 3: the normalised reference appears in the normalised answer as a whole word or phrase
  ("The shape is a circle." contains "circle"), unless the reference is yes/no and the answer also
  says the opposite;
- 0: otherwise.

Items whose prompt has no reference are not this judge's to score: ``prefloop judge`` skips them
(``requires_reference``) and counts them; given one anyway, the verdict holds no scores.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

from annotators.base import CandidateScore, JudgeHooks, JudgeItem, JudgeTraits, Verdict

NAME = "reference"
VERSION = "v1"
EXACT, CONTAINS, MISS = 4.0, 3.0, 0.0

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])}
SYNONYMS = {"yeah": "yes", "yep": "yes", "yup": "yes", "nope": "no", "nah": "no", "grey": "gray"}
OPPOSITE = {"yes": "no", "no": "yes"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014]")


def normalize(text: str | None) -> str:
    """Lowercase, NFKC, no punctuation or articles, number words as digits, single spaces."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = _PUNCT.sub(" ", text)
    words = [SYNONYMS.get(w, NUMBER_WORDS.get(w, w)) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def score_answer(answer: str | None, reference: str) -> tuple[float, str]:
    """(score 0-4, why) for one answer against the reference."""
    ans, ref = normalize(answer), normalize(reference)
    if not ref:
        return MISS, "the reference is empty after normalisation"
    if ans == ref:
        return EXACT, f"exact match with the reference {reference!r}"
    words = f" {ans} "
    if f" {ref} " in words:
        opposite = OPPOSITE.get(ref)
        if opposite and f" {opposite} " in words:
            return MISS, f"the answer says both {ref!r} and {opposite!r}"
        return CONTAINS, f"the answer contains the reference {reference!r}"
    return MISS, f"the reference {reference!r} is not in the answer"


class ReferenceJudge:
    """Exact / contained match against ``JudgeItem.reference``."""

    name = NAME
    version = VERSION
    traits = JudgeTraits(per_candidate=True, requires_reference=True)

    def __init__(self):
        self.hooks = JudgeHooks()

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts = []
        for item in items:
            if item.reference is None or not item.reference.strip():
                verdicts.append(Verdict(item.prompt_id, status="ok", error="the prompt has no reference answer"))
                continue
            scores = []
            for c in item.candidates:
                value, why = score_answer(c.text, item.reference)
                scores.append(CandidateScore(c.candidate_id, score=value, overall=value / EXACT, reasoning=why))
            verdicts.append(Verdict(item.prompt_id, status="ok", scores=scores, latency_ms=0.0))
        return verdicts


def make_reference(config=None, workspace_root=None) -> ReferenceJudge:
    """Registry factory (needs no config)."""
    return ReferenceJudge()
