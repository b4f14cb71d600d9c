"""The judge registry: name -> factory(config: WorkspaceConfig, workspace_root: Path) -> Judge.

The name is what ``judgments.judge`` stores and what ``prefloop judge --judge`` takes. Factories
import their module only when called, so listing the judges stays cheap (no torch, no google-genai).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from annotators.base import Judge
from core.config import WorkspaceConfig
from core.errors import UsageError

JudgeFactory = Callable[[WorkspaceConfig, Path], Judge]


def _gemini(config: WorkspaceConfig, workspace_root: Path) -> Judge:
    from annotators.gemini import make_gemini

    return make_gemini(config, workspace_root)


def _critic(config: WorkspaceConfig, workspace_root: Path) -> Judge:
    from annotators.critic import make_critic

    return make_critic(config, workspace_root)


def _reference(config: WorkspaceConfig, workspace_root: Path) -> Judge:
    from annotators.reference import make_reference

    return make_reference(config, workspace_root)


JUDGES: dict[str, JudgeFactory] = {
    "gemini": _gemini,
    "critic": _critic,
    "reference": _reference,
}

DESCRIPTIONS: dict[str, str] = {
    "gemini": "Gemini rates all candidates of a prompt on the five HelpSteer metrics (0-4), reasoning first",
    "critic": "a local critic VLM (LLaVA-Critic style): pointwise 0-100, pairwise over all ordered pairs, or rubric",
    "reference": "exact / contained match against the prompt's ground-truth reference answer (0-4)",
}


def make_judge(name: str, config: WorkspaceConfig, workspace_root: Path) -> Judge:
    """Build the judge registered as ``name``; a UsageError listing the choices otherwise."""
    try:
        factory = JUDGES[name]
    except KeyError:
        raise UsageError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGES)}") from None
    return factory(config, Path(workspace_root))
