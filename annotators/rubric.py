"""The HelpSteer rubric: labelling guide, prompt, reply schema and reply parser.

Five attributes from NVIDIA's HelpSteer dataset (Wang et al. 2023), each an integer 0-4, used as a
granular judge rubric for vision-language answers (Li, Lin, Pei 2024): all candidates of a prompt are
rated in one reply, reasoning first, then the scores. Shared by the Gemini judge and the local
critic's rubric mode. ``TEMPLATE_VERSION`` names this exact wording; change it whenever the guide,
the prompt or the schema changes, so cached replies and stored judgments of the old wording stay
apart from the new.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from annotators.base import METRICS

TEMPLATE_VERSION = "helpsteer-v1"

SCORE_MIN, SCORE_MAX = 0, 4


@dataclass(frozen=True)
class Metric:
    name: str
    definition: str
    levels: tuple[str, str, str, str, str]
    """what a 0, 1, 2, 3 and 4 look like"""


# The HelpSteer definitions, written out for a rater looking at an image and a question.
RUBRIC: dict[str, Metric] = {
    "helpfulness": Metric(
        "helpfulness",
        "How useful the answer is, all things considered, to the person who asked this question "
        "about this image. It sums up the others: an answer that is wrong about the image, hard to "
        "follow or far too long cannot be very helpful.",
        ("Useless: ignores or refuses the question, or is wrong in a way that would mislead.",
         "Barely helpful: touches the question but misses what was asked or gets the key point wrong.",
         "Partly helpful: answers some of the question, with gaps or errors that matter.",
         "Mostly helpful: answers the question well, with small gaps or small errors.",
         "Fully helpful: answers exactly what was asked, correctly and usefully."),
    ),
    "correctness": Metric(
        "correctness",
        "Whether the answer states every fact that matters for the question, and states them without "
        "errors. Check each claim against the image: objects, counts, colours, text, positions and "
        "relations that are not in the image are errors (hallucinations), as are wrong facts about "
        "the world.",
        ("Wrong throughout, or made up: the main claims do not match the image.",
         "Mostly wrong: a few true statements among errors, or the main claim is wrong.",
         "Partly correct: the main claim is right, but there are clear errors or an important omission.",
         "Mostly correct: no error that matters, but a minor slip or a missing relevant detail.",
         "Completely correct: every claim is supported by the image or true, and nothing that matters is missing."),
    ),
    "coherence": Metric(
        "coherence",
        "How clear and consistent the writing is: whether it reads as one logical whole, without "
        "contradicting itself, repeating itself, changing the subject or breaking off.",
        ("Incoherent: cannot be followed, or garbled, repeated or broken text.",
         "Mostly unclear: contradictions or jumps that make it hard to follow.",
         "Somewhat clear: can be followed with effort; some confusing or repetitive parts.",
         "Mostly clear: easy to follow, with a small awkward or repetitive passage.",
         "Perfectly clear and consistent from start to end."),
    ),
    "complexity": Metric(
        "complexity",
        "How much knowledge and thought it would take to write this answer: could anyone who can read "
        "and write produce it, or does it take the expertise of a specialist? This describes the "
        "answer; it is not a grade, and a simple answer to a simple question is fine.",
        ("Basic: a few words or a very simple sentence anyone could write.",
         "Simple: plain everyday language, what a young pupil could write.",
         "Moderate: needs some schooling, like a high-school answer.",
         "Advanced: needs university-level knowledge or careful reasoning.",
         "Expert: needs deep knowledge of a specialist field."),
    ),
    "verbosity": Metric(
        "verbosity",
        "How much detail the answer gives compared with what the question asks for. This describes "
        "the answer; it is not a grade: 2 means about as long as needed, below is terser, above is "
        "more elaborate.",
        ("Far too short: a word or fragment where an explanation was needed.",
         "Terse: shorter than the question calls for.",
         "About right: as much detail as the question asks for.",
         "Detailed: more detail than asked for.",
         "Far too long: much more than asked, with digressions or padding."),
    ),
}
assert tuple(RUBRIC) == METRICS


def labelling_guide() -> str:
    """The guide a rater (Gemini, the critic, or a person) reads before rating."""
    parts = [
        "You are an expert annotator rating answers to a question about an image.",
        ("Look at the image carefully, read the question, then rate every candidate answer on five "
         "attributes, each an integer from 0 to 4. Rate each answer on its own merits against the image "
         "and the question; several answers may get the same score. Do not favour an answer because of "
         "its position or its length."),
        "",
    ]
    for m in RUBRIC.values():
        parts.append(f"## {m.name.capitalize()}")
        parts.append(m.definition)
        parts.extend(f"- {i}: {text}" for i, text in enumerate(m.levels))
        parts.append("")
    parts.append(
        "Reply with JSON only. First write `reasoning`: for each candidate, what it gets right and wrong "
        "about the image and the question. Then `ratings`: exactly one entry per candidate, with "
        "`candidate` (its number) and the five scores."
    )
    return "\n".join(parts)


def _escape(text: str) -> str:
    return text.replace("</candidate", "<\\/candidate")


def build_user_prompt(question: str, candidates: Sequence[str]) -> str:
    """The text that goes after the image: the question and the candidates numbered 1..k in order."""
    lines = [f"<question>\n{question}\n</question>", "",
             f"There are {len(candidates)} candidate answers, numbered 1 to {len(candidates)}.", ""]
    for i, text in enumerate(candidates, start=1):
        lines.append(f'<candidate n="{i}">\n{_escape(text)}\n</candidate>')
        lines.append("")
    lines.append(f"Rate each of the {len(candidates)} candidates exactly once: reasoning first, then ratings.")
    return "\n".join(lines)


def response_json_schema(k: int) -> dict:
    """JSON schema of the reply (``reasoning`` before ``ratings``, so the model reasons first)."""
    score = {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX}
    rating = {
        "type": "object",
        "properties": {"candidate": {"type": "integer", "minimum": 1, "maximum": k},
                       **{m: dict(score) for m in METRICS}},
        "required": ["candidate", *METRICS],
    }
    return {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string"},
            "ratings": {"type": "array", "items": rating, "minItems": k, "maxItems": k},
        },
        "required": ["reasoning", "ratings"],
    }


def presentation_order(prompt_id: str, seed: int, k: int) -> list[int]:
    """A seeded shuffle of candidate indices: ``order[p]`` is the input index shown at position p+1."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    order = list(range(k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


# ---- the reply -------------------------------------------------------------------------------

Score = Annotated[int, Field(ge=SCORE_MIN, le=SCORE_MAX, strict=True)]


class Rating(BaseModel):
    model_config = ConfigDict(extra="ignore")
    candidate: Annotated[int, Field(strict=True)]
    helpfulness: Score
    correctness: Score
    coherence: Score
    complexity: Score
    verbosity: Score


class RubricReply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reasoning: str
    ratings: list[Rating]


class RubricParseError(ValueError):
    """The reply is not a complete, valid rating of every candidate (the item becomes ``invalid``)."""


@dataclass(frozen=True)
class ParsedRubric:
    reasoning: str
    ratings: dict[int, dict[str, int]]
    """1-based position -> the five scores"""


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _describe(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = e["loc"]
    where = ".".join(str(p) for p in loc) or "reply"
    if len(loc) >= 3 and loc[0] == "ratings":
        where = f"rating #{int(loc[1]) + 1} {'.'.join(str(p) for p in loc[2:])}"
    got = e.get("input")
    got_s = f" (got {repr(got)[:60]})" if not isinstance(got, (dict, list)) and e["type"] != "missing" else ""
    more = f"; {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    return f"{where}: {e['msg']}{got_s}{more}"


def parse_reply(text: str | None, k: int) -> ParsedRubric:
    """Validate a reply for k candidates; raise RubricParseError with a short reason otherwise."""
    if not text or not text.strip():
        raise RubricParseError("empty reply")
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise RubricParseError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    try:
        reply = RubricReply.model_validate(data)
    except ValidationError as err:
        raise RubricParseError(_describe(err)) from None
    ratings: dict[int, dict[str, int]] = {}
    for r in reply.ratings:
        if not 1 <= r.candidate <= k:
            raise RubricParseError(f"rates candidate {r.candidate}, but there are only {k} (1-{k})")
        if r.candidate in ratings:
            raise RubricParseError(f"rates candidate {r.candidate} more than once")
        ratings[r.candidate] = {m: getattr(r, m) for m in METRICS}
    missing = [p for p in range(1, k + 1) if p not in ratings]
    if missing:
        raise RubricParseError(f"candidate{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(str, missing))} not rated")
    return ParsedRubric(reasoning=reply.reasoning, ratings=ratings)
