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


# LLaVA-Critic's shape: it answers the card's prompt ("Score the response out of 100 and explain your
# reasoning") with several sentences of image-grounded reasoning, then the score; numbers about the image
# come earlier in the reasoning. Its model card shows the prompts, not a reply.
LLAVA_CRITIC_POINTWISE = [
    (("The LMM response correctly identifies the handwritten number seven. It is concise and answers "
      "the question, though it could mention that the digit has 2 strokes.\n\nOverall score: 85"), 85.0),
    (("The response calls the sketch a cross made of 2 straight lines, but the image shows a handwritten "
      "seven. The description is fluent yet wrong about the main content. Therefore, I would give it a "
      "score of 20 out of 100."), 20.0),
    ("Score: 90\nReason: the response names the digit correctly and adds nothing the image lacks.", 90.0),
    ("Overall score: 7", 7.0),   # read on the 0-100 scale it was asked for, not as 7/10
    ("Evaluation: the answer misses the colour of 1 of the 3 shapes.\nFinal Score: 75/100", 75.0),
]


@pytest.mark.parametrize("text,expected", POINTWISE + LLAVA_CRITIC_POINTWISE)
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


# LLaVA-Critic's pairwise shape: the card's prompt names "The first response" and "The second response"
# and asks "which answer is better"; the reply compares them and states the verdict at the end.
LLAVA_CRITIC_PAIRWISE = [
    (("The first response describes the image as a cross, which is incorrect. The second response "
      "correctly identifies it as a handwritten number seven. Therefore, the second response is better."),
     "second"),
    ("Answer 1 is better", "first"),
    (("Both answers describe the scene, but Answer 1 mentions the red car that is visible in the image. "
      "Overall, Answer 1 is better than Answer 2."), "first"),
    ("In conclusion, Response 2 is better than Response 1.", "second"),
    ("The first response misses the number; the second response, however, is better.", "second"),
    ("The first answer, in my view, is worse.", "second"),
    ("Two responses are equally good.", "tie"),
    ("Therefore, Answer 2 is the better answer.", "second"),
]


@pytest.mark.parametrize("text,expected", PAIRWISE + LLAVA_CRITIC_PAIRWISE)
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
