"""SteerLM's attribute conditioning (Dong et al. 2023; the Li/Lin/Pei 2024 baseline): one format for training
and generation.

A steerlm example's question carries the HelpSteer attribute values of its answer, appended as

    <question>\\n<attributes> helpfulness:4 correctness:4 coherence:4 complexity:2 verbosity:2

(the five attributes in this order, each 0-4 as the judge gave it; a whole number is written without a
decimal point). A checkpoint trained so records in its ``meta.json`` the string it asks for at generation
(``steerlm.suffix``): the maximum, 4, on helpfulness, correctness and coherence, and for complexity and
verbosity ``train.steerlm_target`` or else the training data's median; the owner's generate step appends it
to every question asked of that checkpoint (the next round's candidates and the eval answers).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""The HelpSteer attributes, in the order the conditioning string lists them."""
MAXIMISED = ("helpfulness", "correctness", "coherence")
"""Attributes generation always asks the maximum of (more is better); complexity and verbosity are a style."""
SCALE_MAX = 4
"""Top of the HelpSteer 0-4 scale."""
TAG = "<attributes>"
FORMAT = "\\n<attributes> helpfulness:H correctness:C coherence:O complexity:X verbosity:V"
"""The documented format, as recorded in a steerlm checkpoint's meta.json."""


def _number(value: float) -> str:
    return f"{value:g}"


def attribute_string(values: Mapping[str, float]) -> str:
    """The conditioning suffix for ``values`` (all five attributes), e.g. ``"\\n<attributes> helpfulness:4 ..."``."""
    missing = [a for a in ATTRIBUTES if values.get(a) is None]
    if missing:
        raise ValueError(f"SteerLM conditioning needs all five HelpSteer attributes; missing {', '.join(missing)}")
    return "\n" + " ".join([TAG, *(f"{a}:{_number(float(values[a]))}" for a in ATTRIBUTES)])


def condition(question: str, values: Mapping[str, float]) -> str:
    """``question`` with the attribute values of its answer appended."""
    return question + attribute_string(values)


def generation_target(rows: Iterable[Mapping[str, float]], overrides: Mapping[str, float]) -> dict[str, float]:
    """The attribute values a steerlm checkpoint asks for: ``overrides`` (train.steerlm_target) first, then
    the maximum on MAXIMISED and the training rows' median (the lower middle value, a value the data has) on
    the others."""
    rows = list(rows)
    target: dict[str, float] = {}
    for a in ATTRIBUTES:
        if a in overrides:
            target[a] = float(overrides[a])
        elif a in MAXIMISED:
            target[a] = float(SCALE_MAX)
        else:
            seen = [float(r[a]) for r in rows if r.get(a) is not None]
            target[a] = float(statistics.median_low(seen)) if seen else SCALE_MAX / 2
    return target


def question_suffix(checkpoint_meta: Mapping | None) -> str:
    """What generation from a checkpoint appends to each question: its recorded steerlm suffix, else ""."""
    if not checkpoint_meta or checkpoint_meta.get("method") != "steerlm":
        return ""
    return (checkpoint_meta.get("steerlm") or {}).get("suffix") or ""
