"""The judge registry: name -> factory(config: WorkspaceConfig, workspace_root: Path) -> Judge.

The name is what ``judgments.judge`` stores and what ``prefloop judge --judge`` takes. Factories
import their module only when called, so listing the judges stays cheap (no torch, no google-genai).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from annotators.base import Judge
from core import names
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
"""Keyed by ``core.names.JUDGES``: the judge names prefloop.toml may use (checked when it loads)."""

DESCRIPTIONS: dict[str, str] = names.JUDGES
"""name -> one-line description (kept in ``core.names``)."""


def make_judge(name: str, config: WorkspaceConfig, workspace_root: Path) -> Judge:
    """Build the judge registered as ``name``; a UsageError listing the choices otherwise."""
    try:
        factory = JUDGES[name]
    except KeyError:
        raise UsageError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGES)}") from None
    return factory(config, Path(workspace_root))
