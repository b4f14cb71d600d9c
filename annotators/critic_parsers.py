"""Lenient parsers for a critic VLM's free-text replies: a registry ``PARSERS`` mode -> parser.

Critic models (LLaVA-Critic, an instruction-tuned VLM used as a judge, a random ``tiny``) answer in
many shapes. Each parser takes the raw reply and returns the value it found, or ``None`` when it
found nothing usable (the caller stores the item as ``invalid`` with the raw reply kept).

- ``parse_pointwise(text) -> float | None``: a 0-100 score. A score given over a scale is rescaled
  (``8.5/10`` -> 85, ``4/5`` -> 80); a score outside its scale is ``None``.
- ``parse_pairwise(text) -> "first" | "second" | "tie" | None``: which of two responses won.
- ``parse_rubric(text) -> dict[metric, float | None] | None``: the five HelpSteer metrics on 0-4
  (a metric not found, or out of range, is ``None``; ``None`` overall when no metric was found).

When a reply states a verdict several times, the last statement wins: critics reason first and
conclude last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from annotators.base import METRICS

NUM = r"[-+]?\d+(?:\.\d+)?"
_SCALE = rf"\s*(?:/|out\s+of|of)\s*({NUM})"
_MARKUP = re.compile(r"[*_`#]+")


def _clean(text: str) -> str:
    """Drop markdown emphasis and heading marks; keep everything else."""
    return _MARKUP.sub("", text or "")


def _json_objects(text: str) -> list[dict]:
    """Every JSON object embedded in ``text`` (fenced or inline), outermost first."""
    found = []
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _json_value(text: str, keys: tuple[str, ...]) -> Any:
    """The value of the first matching key (case-insensitive) in the last JSON object that has one."""
    for obj in reversed(_json_objects(text)):
        lowered = {str(k).lower().strip(): v for k, v in obj.items()}
        for k in keys:
            if k in lowered:
                return lowered[k]
    return None


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(rf"\s*({NUM})(?:{_SCALE})?\s*", v)
        if m:
            return _scaled(m.group(1), m.group(2), 100.0)
    return None


def _scaled(value: str, scale: str | None, target: float) -> float | None:
    """``value`` (over ``scale`` when given) on 0..target; None when out of range."""
    v = float(value)
    if scale is not None:
        s = float(scale)
        if s <= 0 or not 0 <= v <= s:
            return None
        return v / s * target
    return v if 0 <= v <= target else None


# ---------------------------------------------------------------------------------------------- pointwise

_POINT_LABEL = re.compile(
    rf"\b(?:overall\s+)?(?:score|rating|grade|rate)(?:s|d)?\b\s*(?:\(\s*{NUM}\s*-\s*{NUM}\s*\))?"
    rf"\s*(?:of|is|:|=|-|as|would\s+be|i\s+would\s+give|at)?\s*(?:a\s+)?\[?\s*({NUM})\s*\]?(?:{_SCALE})?",
    re.IGNORECASE)
_POINT_BRACKETS = re.compile(rf"\[\[\s*({NUM})(?:{_SCALE})?\s*\]\]")
_POINT_FRACTION = re.compile(rf"({NUM})\s*(?:/|out\s+of)\s*(100|10|5)\b", re.IGNORECASE)
_POINT_TRAILING = re.compile(rf"({NUM})\s*(?:/\s*(100|10|5))?\s*[.!)\]]*\s*$")


def parse_pointwise(text: str) -> float | None:
    """A 0-100 score from a critic's reply, or None (garbage, no number, or out of range).

    Tried in order: JSON ``{"score": ..}``; ``[[85]]``; a labelled score (``Score: 85``,
    ``**Score:** 85``, ``score of 85``, ``Overall score: 8.5/10``, ``Rating: 4/5``); a bare fraction
    (``85/100``, ``7 out of 10``); a number ending the reply. The last match of a form wins.
    """
    if not text or not text.strip():
        return None
    v = _json_value(text, ("score", "rating", "overall_score", "overall"))
    if v is not None:
        return _as_number(v)
    clean = _clean(text)
    for pattern in (_POINT_BRACKETS, _POINT_LABEL, _POINT_FRACTION):
        matches = list(pattern.finditer(clean))
        if matches:
            m = matches[-1]
            return _scaled(m.group(1), m.group(2), 100.0)
    m = _POINT_TRAILING.search(clean.strip())
    if m:
        return _scaled(m.group(1), m.group(2), 100.0)
    return None


# ---------------------------------------------------------------------------------------------- pairwise

_SIDE_WORDS: dict[str, str] = {
    "1": "first", "a": "first", "one": "first", "first": "first", "former": "first", "left": "first",
    "2": "second", "b": "second", "two": "second", "second": "second", "latter": "second", "right": "second",
    "c": "tie", "tie": "tie", "tied": "tie", "equal": "tie", "equally": "tie", "same": "tie", "draw": "tie",
    "both": "tie", "neither": "tie",
}
_NOUN = r"(?:response|answer|output|assistant|model|option|candidate|reply)"
_ID = r"(?:\(?\s*(?:1|2|a|b|one|two)\s*\)?)"
_BETTER = r"(?:better|superior|preferred|preferable|stronger|more\s+(?:accurate|helpful|correct|detailed)|wins?)"
_WORSE = r"(?:worse|inferior|weaker|less\s+(?:accurate|helpful|correct))"
# an aside between the subject and the verb ("the second response, however, is better") is skipped
_VERB = r"(?:,\s*\w+(?:\s+\w+){0,2},\s*)?(?:is|was|seems|appears|would\s+be|'s)?\s*(?:\w+\s+)?"
_PAIR_PATTERNS: list[tuple[re.Pattern, bool]] = [
    # "Response 1 is better", "Answer (B) is more accurate", "the second response is better"
    (re.compile(rf"\b{_NOUN}\s*({_ID})\s*{_VERB}{_BETTER}\b", re.IGNORECASE), False),
    (re.compile(rf"\b(?:the\s+)?(first|second|former|latter)\s+(?:{_NOUN}\s*|one\s*)?{_VERB}{_BETTER}\b", re.IGNORECASE), False),
    (re.compile(rf"\b{_NOUN}\s*({_ID})\s*{_VERB}{_WORSE}\b", re.IGNORECASE), True),
    (re.compile(rf"\b(?:the\s+)?(first|second|former|latter)\s+(?:{_NOUN}\s*|one\s*)?{_VERB}{_WORSE}\b", re.IGNORECASE), True),
    # "the better response is Response 2", "better answer: A", "winner: first", "I prefer answer 2"
    (re.compile(rf"\b(?:better|best|preferred|winning)\s+(?:{_NOUN}|one)?\s*(?:is|:|=|-)\s*(?:the\s+)?"
                rf"(?:{_NOUN}\s*)?({_ID}|first|second)\b", re.IGNORECASE), False),
    (re.compile(rf"\b(?:winner|verdict|judgment|judgement|choice|decision|preference)\s*(?:is|:|=|-)\s*"
                rf"(?:the\s+)?(?:{_NOUN}\s*)?({_ID}|first|second|tie)\b", re.IGNORECASE), False),
    (re.compile(rf"\bi\s+(?:would\s+)?(?:prefer|choose|pick|select)\s+(?:the\s+)?(?:{_NOUN}\s*)?"
                rf"({_ID}|first|second)\b", re.IGNORECASE), False),
]
_TIE = re.compile(r"\b(?:it'?s\s+a\s+)?(tie|tied|draw|equally\s+(?:good|bad|helpful|accurate|correct|valid)|"
                  r"(?:are|is)\s+(?:of\s+)?(?:equal|the\s+same)\s+(?:quality|good|merit)?|equal\s+quality|"
                  r"neither\s+(?:response|answer|one)?\s*is\s+better|both\s+(?:responses|answers)\s+are\s+equally)\b",
                  re.IGNORECASE)
_ALONE = re.compile(r"^\W*(?:(?:the\s+)?(?:" + _NOUN + r")\s*)?\(?\s*([12ab]|first|second|tie|equal|c)\s*\)?"
                    r"(?:\s+(?:" + _NOUN + r"|one))?\W*$", re.IGNORECASE)


def _side(token: str) -> str | None:
    token = re.sub(r"[()\s]", "", token.lower())
    return _SIDE_WORDS.get(token)


def parse_pairwise(text: str) -> str | None:
    """``first`` / ``second`` / ``tie`` from a pairwise critic reply, or None.

    Forms: JSON ``{"winner": "A"}``; ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie) / ``[[1]]``; a reply that is
    only ``A``, ``2``, ``first``, ``Response B`` or ``tie``; statements such as ``Response 1 is better``,
    ``The second answer is more accurate``, ``Answer 2 is worse`` (-> first), ``The better response
    is Response 2``, ``Winner: first``, ``I prefer answer B``; and ties (``tie``, ``both are equally
    good``, ``neither is better``). A stated winner beats tie words; the last statement wins.
    """
    if not text or not text.strip():
        return None
    v = _json_value(text, ("winner", "better", "better_response", "preferred", "choice", "verdict", "answer"))
    if v is not None:
        side = _side(re.sub(rf"^{_NOUN}\s*", "", str(v).strip(), flags=re.IGNORECASE))
        return side
    clean = _clean(text)
    brackets = re.findall(r"\[\[\s*([^\[\]]{1,12}?)\s*\]\]", clean)
    for token in reversed(brackets):
        side = _side(re.sub(rf"^{_NOUN}\s*", "", token, flags=re.IGNORECASE))
        if side:
            return side
    m = _ALONE.match(clean.strip())
    if m:
        return _side(m.group(1))
    hits: list[tuple[int, str]] = []
    for pattern, flip in _PAIR_PATTERNS:
        for m in pattern.finditer(clean):
            side = _side(m.group(1))
            if side in ("first", "second") and flip:
                side = "second" if side == "first" else "first"
            if side:
                hits.append((m.start(), side))
    decided = [h for h in hits if h[1] != "tie"]
    if decided:
        return max(decided)[1]
    if hits or _TIE.search(clean):
        return "tie"
    return None


# ---------------------------------------------------------------------------------------------- rubric

_RANGE_NOTE = re.compile(rf"[(\[]\s*(?:{NUM}\s*(?:-|to|–)\s*{NUM}|scale[^)\]]*)\s*[)\]]", re.IGNORECASE)


def _metric_pattern(name: str) -> re.Pattern:
    # "Helpfulness: 3", "helpfulness=3/4", "Helpfulness - 3", "| Helpfulness | 3 |", "Helpfulness score: 3"
    return re.compile(rf"\b{name}\b(?:\s*(?:score|rating))?[\s:=|\-–>]{{0,8}}(?:is\s+|of\s+)?({NUM})(?:{_SCALE})?",
                      re.IGNORECASE)


_METRIC_PATTERNS = {m: _metric_pattern(m) for m in METRICS}


def _metric_value(v: Any) -> float | None:
    """A JSON metric value on 0-4: a number, or text such as "3" or "3/4"."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v) if 0 <= v <= 4 else None
    if isinstance(v, str):
        m = re.fullmatch(rf"\s*({NUM})(?:{_SCALE})?\s*", v)
        if m:
            return _scaled(m.group(1), m.group(2), 4.0)
    return None


def parse_rubric(text: str) -> dict[str, float | None] | None:
    """The five HelpSteer metrics (0-4) from a reply, each None when missing; None when none is found.

    Forms: JSON ``{"helpfulness": 3, ...}`` (also nested under "scores"); ``Helpfulness: 3``;
    ``helpfulness=3/4``; ``**Helpfulness:** 3``; ``Helpfulness (0-4): 3``; ``- Helpfulness - 3``;
    markdown tables ``| Helpfulness | 3 |``. A score over another scale is rescaled to 0-4
    (``7/10`` -> 2.8); out of range is None. The last mention of a metric wins.
    """
    if not text or not text.strip():
        return None
    out: dict[str, float | None] = {m: None for m in METRICS}
    for obj in reversed(_json_objects(text)):
        scores = obj.get("scores") if isinstance(obj.get("scores"), dict) else obj
        lowered = {str(k).lower().strip(): v for k, v in scores.items()}
        if any(m in lowered for m in METRICS):
            for m in METRICS:
                out[m] = _metric_value(lowered.get(m))
            return out if any(v is not None for v in out.values()) else None
    clean = _RANGE_NOTE.sub(" ", _clean(text))
    for m, pattern in _METRIC_PATTERNS.items():
        matches = list(pattern.finditer(clean))
        if matches:
            last = matches[-1]
            out[m] = _scaled(last.group(1), last.group(2), 4.0)
    return out if any(v is not None for v in out.values()) else None


PARSERS: dict[str, Callable[[str], Any]] = {
    "pointwise": parse_pointwise,
    "pairwise": parse_pairwise,
    "rubric": parse_rubric,
}
