"""What a gemini judge step costs, online and in batch mode: tokens and dollars, for `prefloop doctor`.

Input tokens per prompt are estimated offline, the way the judge's rate limiter estimates them before a
call (``annotators.gemini.estimate_tokens``: ~4 characters a token for the guide, the question and the
candidates; 258 tokens per 768-pixel image tile). The doctor runs before every `round start`, with no
network and possibly no key, so it does not call ``client.models.count_tokens``; that call could not count
the request as sent anyway: in the Gemini Developer API the SDK refuses a ``system_instruction`` in
``CountTokensConfig`` (google-genai ``models.py``, ``_CountTokensConfig_to_mldev``), and the rubric guide is
the system instruction. Before generation a prompt's candidates are counted at their token cap
(``generation.max_new_tokens``, ~4 characters a token): an upper bound.

Output tokens: once the workspace holds gemini replies, their measured output per candidate
(``usage_metadata``, thinking included, stored on every judgment); before that a rough allowance
(``OUTPUT_TOKENS_PER_CANDIDATE`` and ``OUTPUT_TOKENS_PER_REPLY``). Prices come from ``judges.gemini``
(``price_input_per_mtok``, ``price_output_per_mtok``, ``batch_discount``), never from this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from annotators import rubric
from annotators.gemini import estimate_tokens_of
from core.config import GeminiConfig, GenerationConfig

CHARS_PER_TOKEN = 4
OUTPUT_TOKENS_PER_CANDIDATE = 150
"""Rough allowance: the reasoning about one candidate and its five scores."""
OUTPUT_TOKENS_PER_REPLY = 500
"""Rough allowance: the calibration, the JSON around the ratings, and thinking (gemini-2.5-flash thinks by
default; thinking is billed as output)."""


@dataclass(frozen=True)
class JudgeCost:
    """The estimate for one judge step."""

    prompts: int
    """Prompts (one request each)."""
    tokens_in: int
    """Input tokens of all requests."""
    tokens_out: int
    """Output tokens of all replies."""
    online_usd: float
    """At the online price."""
    batch_usd: float
    """At the batch price (``batch_discount`` of the online one)."""
    output_basis: str
    """Where the output figure comes from: "allowance" or "measured on N candidates"."""


def candidates_per_prompt(gen: GenerationConfig) -> int:
    """Candidates the generate step makes per prompt: k per view (1 per view when greedy)."""
    return (1 if gen.temperature == 0 else gen.k) * len(gen.views)


def prompt_tokens(guide_chars: int, question: str, n_candidates: int, candidate_chars: int,
                  image_size: tuple[int, int]) -> int:
    """Estimated input tokens of one request (the guide, the user prompt around the candidates, the image)."""
    frame = len(rubric.build_user_prompt(question, [""] * n_candidates))
    return estimate_tokens_of(guide_chars + frame + candidate_chars, image_size)


def estimate(inputs: Iterable[dict], gemini: GeminiConfig, generation: GenerationConfig,
             measured: dict | None = None) -> JudgeCost:
    """The cost of judging ``inputs`` (``storage.judge_usage.judge_inputs`` rows: question, width, height,
    n_candidates, candidate_chars); ``measured`` (``storage.judge_usage.measured_tokens``) replaces the output
    allowance when it counts any candidate."""
    guide = len(rubric.labelling_guide())
    per_prompt = candidates_per_prompt(generation)
    cap_chars = generation.max_new_tokens * CHARS_PER_TOKEN
    per_candidate_out = OUTPUT_TOKENS_PER_CANDIDATE
    basis = "allowance"
    if measured and measured.get("candidates"):
        per_candidate_out = measured["tokens_out"] / measured["candidates"]
        basis = f"measured on {measured['candidates']} candidates"
    prompts = tokens_in = 0
    tokens_out = 0.0
    for row in inputs:
        n, chars = row["n_candidates"], row["candidate_chars"]
        if n == 0:  # not generated yet: k x views answers at their token cap
            n, chars = per_prompt, per_prompt * cap_chars
        prompts += 1
        tokens_in += prompt_tokens(guide, row["question"], n, chars, (row["width"], row["height"]))
        tokens_out += n * per_candidate_out + (OUTPUT_TOKENS_PER_REPLY if basis == "allowance" else 0)
    online = tokens_in / 1e6 * gemini.price_input_per_mtok + tokens_out / 1e6 * gemini.price_output_per_mtok
    return JudgeCost(prompts, tokens_in, round(tokens_out), online, online * gemini.batch_discount, basis)


def usd(x: float) -> str:
    """$0.0123 below a dollar, $1,234.56 above."""
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"
