"""The critic's lenient parsers on reply shapes seen from real critic models, garbage included."""

from __future__ import annotations

import pytest

from annotators.base import METRICS
from annotators.critic_parsers import PARSERS, parse_pairwise, parse_pointwise, parse_rubric

POINTWISE = [
    ("Score: 85", 85.0),
    ("The response names the shape correctly and is concise. 85/100", 85.0),
    ("**Score:** 85", 85.0),
    ("Overall, I would give this response a score of 85.", 85.0),
    ("The answer is mostly right.\nOverall score: 8.5/10", 85.0),
    ("Explanation: accurate.\nRating: [[85]]", 85.0),
    ("Rating: 4/5", 80.0),
    ('{"score": 85, "reason": "accurate and grounded"}', 85.0),
    ('```json\n{"Score": "72"}\n```', 72.0),
    ("The response correctly identifies the blue circle and nothing else.\n\n90", 90.0),
    ("The LMM response correctly identifies the shape. Therefore, the score is 60.", 60.0),
    ("I'd rate it 7 out of 10 because it misses the colour.", 70.0),
    ("### Score\n75", 75.0),
    ("[[7.5/10]]", 75.0),
    ("The image shows 3 shapes and the answer says 2. Score: 40", 40.0),
    ("Score: 3 out of 5 points", 60.0),
    ("Score: 150", None),            # out of range
    ("Score: 12/10", None),          # over its own scale
    ("score: -5", None),
    ("lorem ipsum dolor sit amet", None),
    ("", None),
    ("ĠtheĠcircleĠredĠshape yes no", None),
]


@pytest.mark.parametrize("text,expected", POINTWISE)
def test_pointwise_shapes(text, expected):
    got = parse_pointwise(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


PAIRWISE = [
    ("Response 1 is better.", "first"),
    ("[[A]]", "first"),
    ("A", "first"),
    ("first", "first"),
    ("Answer 2", "second"),
    ("tie", "tie"),
    ("Both responses are equally good.", "tie"),
    ("After comparing, the second response is better because it mentions the colour.", "second"),
    ("The better response is Response 2.", "second"),
    ('{"winner": "B", "reason": "names the shape"}', "second"),
    ("[[C]]", "tie"),
    ("Response A is more accurate than Response B.", "first"),
    ("Answer 1 is worse than answer 2.", "second"),
    ("Overall Judgment: Response 1 is better in detail, but Response 2 is better overall.", "second"),
    ("I prefer answer B.", "second"),
    ("Neither response is better; they are of equal quality.", "tie"),
    ("**Response (a)**", "first"),
    ("Winner: second", "second"),
    ("lorem ipsum dolor sit amet", None),
    ("", None),
    ("the circle is red and the square is blue", None),
]


@pytest.mark.parametrize("text,expected", PAIRWISE)
def test_pairwise_shapes(text, expected):
    assert parse_pairwise(text) == expected


FULL = {"helpfulness": 3.0, "correctness": 4.0, "coherence": 4.0, "complexity": 1.0, "verbosity": 2.0}
RUBRIC = [
    ("Helpfulness: 3\nCorrectness: 4\nCoherence: 4\nComplexity: 1\nVerbosity: 2", FULL),
    ("helpfulness=3/4, correctness=4/4, coherence=4/4, complexity=1/4, verbosity=2/4", FULL),
    ('{"helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}', FULL),
    (('Reasoning first.\n```json\n{"reasoning": "ok", "scores": {"Helpfulness": "3/4", "Correctness": 4, '
     '"Coherence": "4", "Complexity": 1, "Verbosity": 2}}\n```'), FULL),
    ("**Helpfulness:** 3\n**Correctness:** 4\n**Coherence:** 4\n**Complexity:** 1\n**Verbosity:** 2", FULL),
    (("| Metric | Score |\n|---|---|\n| Helpfulness | 3 |\n| Correctness | 4 |\n| Coherence | 4 |\n"
     "| Complexity | 1 |\n| Verbosity | 2 |"), FULL),
    ("Helpfulness (0-4): 3\nCorrectness (0-4): 4\nCoherence (0-4): 4\nComplexity (0-4): 1\nVerbosity (0-4): 2", FULL),
    (("The helpfulness is limited since the colour is missing.\n- Helpfulness - 3\n- Correctness - 4\n"
     "- Coherence - 4\n- Complexity - 1\n- Verbosity - 2"), FULL),
    ("Helpfulness: 2\nCorrectness: 1", {**{m: None for m in METRICS}, "helpfulness": 2.0, "correctness": 1.0}),
    ("Helpfulness: 7/10", {**{m: None for m in METRICS}, "helpfulness": 2.8}),
    ("Helpfulness: 9", None),        # out of range and nothing else
    ("lorem ipsum dolor sit amet", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", RUBRIC)
def test_rubric_shapes(text, expected):
    got = parse_rubric(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parser_registry_covers_every_critic_mode():
    from core.config import CriticConfig

    modes = set(CriticConfig.model_fields["mode"].annotation.__args__)
    assert set(PARSERS) == modes
