"""The registered names ``prefloop.toml`` may use, each with a one-line description.

Plain dicts, so that ``core.config`` validates a name when the config loads without importing the
layers that implement them (no torch, no trl, no google-genai). Each implementation registry is keyed
by exactly these names, in this order: ``backend.pairs.STRATEGIES``, ``backend.dpo.LOSSES`` and
``annotators.registry.JUDGES``; ``tests/test_registries.py`` fails when one of them disagrees
(``backend.jobs.train.METHODS`` and ``TRAIN_METHODS``: ``tests/test_sft_baselines.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

PAIR_STRATEGIES: dict[str, str] = {
    "best-worst": "OV-Chat: the highest-scored candidate vs the lowest by one judge's score",
    "best-vs-random": "Li/Lin/Pei 2024: the best by helpfulness+correctness+coherence vs a random candidate "
                      "at least `min_margin` lower",
    "seva": "SeVa: the original-view answer chosen, each augmented-view answer rejected",
    "human-only": "no AI pairs: only prompts with a human (or imported) decision give pairs",
}
"""``pairs.strategy`` -> what the strategy pairs."""

LOSSES: dict[str, str] = {
    "sigmoid": "DPO: -log sigmoid(beta * margin)",
    "ipo": "IPO: squared distance of the length-normalised margin from 1/(2 beta)",
    "hinge": "SLiC hinge: relu(1 - beta * margin)",
    "robust": "robust DPO: unbiased under `label_smoothing` flipped labels",
    "sft": "NLL of the chosen answer; add beside a DPO loss with `loss_weights`",
}
"""``train.loss`` entries -> what the loss computes."""

TRAIN_METHODS: dict[str, str] = {
    "dpo": "DPO on the round's chosen/rejected pairs (the losses of `train.loss`)",
    "sft": "rejection sampling (Li/Lin/Pei 2024): SFT on each prompt's best answer, the chosen side of its pairs",
    "steerlm": "SteerLM (Li/Lin/Pei 2024): SFT on every candidate scored by `pairs.judge`, its five HelpSteer "
               "values appended to the question; generation asks for the best values",
}
"""``train.method`` (a Literal in ``core.config.TrainConfig``) -> what the method trains on."""

JUDGES: dict[str, str] = {
    "gemini": "Gemini rates all candidates of a prompt on the five HelpSteer metrics (0-4), reasoning first",
    "critic": "a local critic VLM (LLaVA-Critic style): pointwise 0-100, pairwise over all ordered pairs, or rubric",
    "reference": "exact / contained match against the prompt's ground-truth reference answer (0-4)",
}
"""``judges.default`` entries, ``pairs.judge`` and ``round.eval_judge`` -> what the judge does. A judge is
named exactly (no version suffix): the version is stored beside it, in ``judgments.judge_version``."""


def unknown(kind: str, registry: Iterable[str], name: object) -> str:
    """The message for a name not in ``registry``, e.g. "unknown judge 'x'; choose one of: a, b"."""
    return f"unknown {kind} {name!r}; choose one of: {', '.join(registry)}"
