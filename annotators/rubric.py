"""The HelpSteer rubric: labelling guide, prompt, reply schema and reply parser.

Five attributes from NVIDIA's HelpSteer dataset (Wang et al. 2023, arXiv:2311.09528, and the
``nvidia/HelpSteer`` dataset card), each an integer 0-4, used as a granular judge rubric for
vision-language answers as Li, Lin and Pei (2024, arXiv:2402.10884) did: Gemini read HelpSteer's
labelling guide, rated all candidates of a prompt in one call and, prompted for zero-shot chain of
thought, wrote "the reasoning for rating each response, an inner calibration monologue, and ratings".

What HelpSteer publishes about its attributes is one definition each (helpfulness overall; correctness
as every relevant fact, stated without error; coherence as consistent, clear expression; complexity as
the depth of thought needed to write the response, from basic language skills to domain expertise;
verbosity as the amount of detail relative to what the prompt asks for), each rated 0-4, every response
on its own. ``RUBRIC`` restates those definitions in our own words for an answer about an image and
spells out five levels per attribute along each definition's own axis (the level wording is ours:
the guide given to HelpSteer's annotators is not published). The reply is structured JSON with
``reasoning`` before ``ratings``, so the model reasons, calibrates across the candidates, and only then
scores. Shared by the Gemini judge and the local critic's rubric mode. ``TEMPLATE_VERSION`` names this
exact wording; change it whenever the guide, the prompt or the schema changes, so cached replies and
stored judgments of the old wording stay apart from the new.
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

TEMPLATE_VERSION = "helpsteer-v2"

SCORE_MIN, SCORE_MAX = 0, 4


@dataclass(frozen=True)
class Metric:
    name: str
    definition: str
    levels: tuple[str, str, str, str, str]
    """what a 0, 1, 2, 3 and 4 look like"""


# HelpSteer's five published attribute definitions (dataset card and arXiv:2311.09528, Sec. 2), restated
# in our own words for an answer about an image; the five levels run along each definition's axis.
RUBRIC: dict[str, Metric] = {
    "helpfulness": Metric(
        "helpfulness",
        "How much the answer, taken as a whole, does for the person who asked this question about this "
        "image.",
        ("Not helpful: it ignores or refuses the question, or would mislead the person who asked.",
         "Slightly helpful: it touches the question but misses what was asked or gets the key point wrong.",
         "Partly helpful: it answers part of the question, with gaps or mistakes that matter.",
         "Mostly helpful: it answers the question well, apart from small gaps or slips.",
         "Fully helpful: it gives the person exactly what they asked for, correctly and usefully."),
    ),
    "correctness": Metric(
        "correctness",
        "Whether the answer contains every fact the question calls for, and whether each fact it states is "
        "true. Check every claim against the image: objects, counts, colours, text, positions or relations "
        "that the image does not show are errors (hallucinations), as are false statements about the world.",
        ("Wrong throughout or invented: its main claims do not match the image.",
         "Mostly wrong: a few true statements among errors, or the central claim is false.",
         "Partly correct: the central claim holds, but there are clear errors or a relevant fact is missing.",
         "Mostly correct: no error that matters, but a small slip or a minor missing detail.",
         "Fully correct: every claim is supported by the image or true, and no relevant fact is left out."),
    ),
    "coherence": Metric(
        "coherence",
        "How clearly the answer is expressed and how consistent it is with itself: does it read as one "
        "logical whole, without contradicting itself, repeating itself, drifting off topic or breaking off?",
        ("Incoherent: it cannot be followed (garbled, looping or broken text).",
         "Mostly unclear: contradictions or jumps make it hard to follow.",
         "Somewhat clear: it can be followed with effort; parts are confusing or repetitive.",
         "Mostly clear: easy to follow, with a small awkward or repetitive passage.",
         "Perfectly clear and consistent from start to end."),
    ),
    "complexity": Metric(
        "complexity",
        "How much knowledge and depth of thought it takes to write this answer, from something anyone "
        "with basic reading and writing could produce to something only a specialist could. It describes "
        "the answer, it is not a grade: a plain answer to a plain question is fine.",
        ("Basic: a few words or one simple sentence that anyone could write.",
         "Simple: everyday language that a young pupil could write.",
         "Intermediate: it takes some general education, about secondary school level.",
         "Advanced: it takes university-level knowledge or careful reasoning in several steps.",
         "Expert: it takes deep knowledge of a specialist field."),
    ),
    "verbosity": Metric(
        "verbosity",
        "How much detail the answer gives, measured against how much the question asks for. It describes "
        "the answer, it is not a grade: 2 gives about what was asked, lower is sparer, higher is fuller.",
        ("Minimal: a word or a fragment, far less detail than the question invites.",
         "Brief: less detail than the question asks for.",
         "Matched: about as much detail as the question asks for.",
         "Expansive: more detail than the question asks for.",
         "Exhaustive: far more than was asked, with digressions or padding."),
    ),
}
assert tuple(RUBRIC) == METRICS


def labelling_guide() -> str:
    """The guide a rater (Gemini, the critic, or a person) reads before rating."""
    parts = [
        "You are an expert annotator rating answers to a question about an image.",
        ("Look at the image carefully and read the question, then rate every candidate answer on the five "
         "attributes below, each an integer from 0 to 4. Rate each answer on its own merits against the "
         "image and the question; several answers may get the same score. Do not favour an answer because "
         "of its position or its length."),
        "",
    ]
    for m in RUBRIC.values():
        parts.append(f"## {m.name.capitalize()}")
        parts.append(m.definition)
        parts.extend(f"- {i}: {text}" for i, text in enumerate(m.levels))
        parts.append("")
    parts.append(
        "Reply with JSON only, and think step by step before you score. First write `reasoning`: for each "
        "candidate in turn, what it gets right and wrong about the image and the question, attribute by "
        "attribute; then compare the candidates with one another and check that the scores you are about "
        "to give keep the same order and distance as the differences you found (calibrate them). Only "
        "then write `ratings`: exactly one entry per candidate, with `candidate` (its number) and the five "
        "scores."
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
    """JSON schema of the reply: ``reasoning`` before ``ratings``, so the model reasons first.

    Gemini writes the properties in the order the schema lists them (both in ``properties`` and in
    ``required``), so the reasoning and its calibration come before any score.
    """
    score = {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX}
    rating = {
        "type": "object",
        "properties": {"candidate": {"type": "integer", "minimum": 1, "maximum": k},
                       **{m: dict(score) for m in METRICS}},
        "required": ["candidate", *METRICS],
    }
    reasoning = {"type": "string", "description": "each candidate attribute by attribute, then a calibration "
                                                  "of the scores across the candidates"}
    return {
        "type": "object",
        "properties": {
            "reasoning": reasoning,
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
