"""Packaged recipes: published training recipes as TOML files of workspace-config overrides.

A recipe file (``backend/recipes/NAME.toml``, run with ``prefloop round start --recipe NAME``) holds:

- ``[recipe]``: metadata (``RecipeMeta``): the paper, its authors and year, what a real run needs
  (GPU memory, an API key's environment variable), its default number of rounds, and the model names
  a real run must set in ``prefloop.toml``;
- every other table: overrides of ``WorkspaceConfig`` sections (``[generation]``, ``[pairs]``, ...);
- ``[[paper]]``: the paper's table, one row per value (``PaperRow``): the paper's value, where it comes
  from (section, table, quote, or the authors' script), and ours with why when they differ;
  ``tests/test_recipe_papers.py`` resolves the recipe and checks every row with a config ``key``;
- ``[tiny]``: further overrides applied only when the workspace's policy model is ``tiny`` or one of
  the tiny family builds (``tiny-qwen2-vl``, ...) (smaller
  LoRA ranks, short answers, one local process), so every recipe also runs end to end on this machine.

The registry is the folder: ``RECIPES`` maps each ``*.toml`` stem to its file. Files are validated
when loaded: an unknown key, in the metadata, the overrides or ``[tiny]``, is a ``ConfigError`` that
names it. A plain override file (``round start --config FILE``) goes through the same loader with the
metadata optional.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend.models import BUILTIN, TINY_FAMILIES
from core import config as cfgmod
from core.errors import ConfigError, UsageError

RECIPE_DIR = Path(__file__).resolve().parent
META_TABLE = "recipe"
PAPER_TABLE = "paper"
TINY_TABLE = "tiny"
TINY_MODEL = "tiny"
TINY_MODELS = (TINY_MODEL, *TINY_FAMILIES)
"""Policy models that get a recipe's ``[tiny]`` overrides."""
BUILTIN_MODELS = BUILTIN

RECIPES: dict[str, Path] = {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}
"""name -> recipe file (every TOML file in this folder)."""


class RecipeMeta(BaseModel):
    """The ``[recipe]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """The recipe's name: its file name without ``.toml``."""
    title: str
    """One line: what the recipe is."""
    paper: str
    """The paper (or report) the recipe follows."""
    authors: list[str] = Field(min_length=1)
    """The paper's authors."""
    year: int = Field(ge=2000, le=2100)
    """The paper's year."""
    url: str | None = None
    """Where to read the paper."""
    paper_model: str
    """The paper's model (``backend.memory.PAPER_MODELS``): the README's memory estimate is for it."""
    paper_gpus: int = Field(1, ge=1)
    """GPUs the paper trained on (the estimate spreads ZeRO-3 over them)."""
    paper_seq_len: int = Field(ge=16)
    """The longest pair the estimate assumes: the image's tokens for a 1024x768 photo (bench/token_budget.py)
    plus the recipe's answer cap."""
    api_key: str = ""
    """The environment variable of an API key a real run needs (empty: none)."""
    default_rounds: int = Field(1, ge=1)
    """Rounds the paper ran (`prefloop round start --rounds N`)."""
    models: list[str] = ["policy.model"]
    """Config keys naming models a real run must set in prefloop.toml (built-in names only on tiny/demo)."""


class PaperRow(BaseModel):
    """One row of a recipe's paper table (``[[paper]]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    item: str
    """What the row is about, in words."""
    paper: Any
    """The paper's value (or the authors' script's where the paper is silent)."""
    source: str
    """Where the value comes from: section, table or quote, or ``[code] repo/script:line``."""
    key: str | None = None
    """The workspace-config key that holds our value (dotted); rows without one are not config."""
    ours: Any = None
    """Our value when it deviates from the paper (unset: the paper's); a deviation needs ``why``."""
    why: str = ""
    """Why we deviate, or a note."""

    @property
    def expected(self) -> Any:
        """What the resolved recipe must hold at ``key``."""
        return self.paper if self.ours is None else self.ours


class _MetaTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: RecipeMeta


@dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe file."""

    path: Path
    meta: RecipeMeta | None
    overrides: dict[str, Any]
    tiny: dict[str, Any] = field(default_factory=dict)
    paper_rows: tuple[PaperRow, ...] = ()
    """The ``[[paper]]`` table."""

    @property
    def name(self) -> str:
        return self.meta.name if self.meta else self.path.stem

    def overrides_for(self, policy_model: str) -> dict[str, Any]:
        """The overrides for a workspace whose policy model is ``policy_model`` (``[tiny]`` on tiny builds)."""
        return merge(self.overrides, self.tiny) if policy_model in TINY_MODELS else dict(self.overrides)

    def resolve(self, base: cfgmod.WorkspaceConfig) -> dict[str, Any]:
        """The overrides for the workspace config ``base``, checked: the result validates, and on a real
        policy model every model the recipe needs is set to a real model too."""
        over = self.overrides_for(base.policy.model)
        self.check_models(cfgmod.validate(merge(base.model_dump(), over), self.source))
        return over

    def check_models(self, resolved: cfgmod.WorkspaceConfig) -> None:
        """On a real policy model, a ConfigError when a model the recipe needs is still a built-in one."""
        if resolved.policy.model not in BUILTIN_MODELS and self.meta is not None:
            for key in self.meta.models:
                value = _get(resolved.model_dump(), key)
                if value in BUILTIN_MODELS:
                    raise ConfigError(
                        f"recipe {self.name} runs policy {resolved.policy.model!r} but {key} is the built-in "
                        f"{value!r}: set {key} in prefloop.toml to a real model (see the comment at the top "
                        f"of {self.path})")

    @property
    def source(self) -> str:
        return f"recipe {self.name} ({self.path})" if self.meta else str(self.path)

    def command(self) -> str:
        rounds = self.meta.default_rounds if self.meta else 1
        return f"prefloop round start --recipe {self.name} --rounds {rounds}"


merge = cfgmod.merge
"""``base`` with ``over`` laid on top, table by table (``core.config.merge``)."""


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_overrides(over: dict, source: str) -> None:
    """Raise ConfigError naming any unknown or invalid key: the overrides must validate over the defaults."""
    cfgmod.validate(merge(cfgmod.WorkspaceConfig().model_dump(), over), source)


def load_file(path: Path, *, require_meta: bool = True) -> Recipe:
    """Read and validate a recipe (or, with ``require_meta=False``, a plain override file)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    raw_meta = data.pop(META_TABLE, None)
    tiny = data.pop(TINY_TABLE, None) or {}
    rows = _paper_rows(data.pop(PAPER_TABLE, None) or [], path)
    meta = None
    if raw_meta is not None or require_meta:
        if not isinstance(raw_meta, dict):
            raise ConfigError(f"{path}: a recipe needs a [{META_TABLE}] table of metadata "
                              f"({', '.join(RecipeMeta.model_fields)})")
        try:
            meta = _MetaTable.model_validate({META_TABLE: raw_meta}).recipe
        except ValidationError as err:  # keys named in full: "recipe.year: ..."
            raise ConfigError(cfgmod.format_validation_error(err, str(path))) from None
        if meta.name != path.stem:
            raise ConfigError(f"{path}: recipe.name is {meta.name!r} but the file is {path.name}; they must match")
    if not isinstance(tiny, dict):
        raise ConfigError(f"{path}: [{TINY_TABLE}] must be a table of overrides")
    _check_overrides(data, str(path))
    _check_overrides(merge(data, tiny), f"{path} [{TINY_TABLE}]")
    return Recipe(path=path, meta=meta, overrides=data, tiny=tiny, paper_rows=rows)


def _paper_rows(raw: list, path: Path) -> tuple[PaperRow, ...]:
    """The validated ``[[paper]]`` rows: known config keys, and a ``why`` for every deviation."""
    known = set(cfgmod.leaves(cfgmod.WorkspaceConfig().model_dump()))
    rows = []
    for i, item in enumerate(raw if isinstance(raw, list) else [raw]):
        try:
            row = PaperRow.model_validate(item)
        except ValidationError as err:
            raise ConfigError(cfgmod.format_validation_error(err, f"{path} [[{PAPER_TABLE}]] row {i + 1}")) from None
        if row.key is not None and row.key not in known:
            raise ConfigError(f"{path} [[{PAPER_TABLE}]] row {i + 1} ({row.item}): unknown config key {row.key!r}")
        if row.ours is not None and row.ours != row.paper and not row.why.strip():
            raise ConfigError(f"{path} [[{PAPER_TABLE}]] row {i + 1} ({row.item}): ours differs from the paper; "
                              "say why")
        rows.append(row)
    return tuple(rows)


REAL_POLICY = "org/real-vlm"
"""A policy name that is not a built-in model: the recipe as a real run resolves it (no [tiny] table)."""


def paper_mismatches(recipe: Recipe) -> list[str]:
    """Rows of the recipe's paper table whose config key does not hold the expected value once the
    recipe is resolved for a real policy model (an empty list when the recipe matches its table)."""
    over = recipe.overrides_for(REAL_POLICY)
    resolved = cfgmod.leaves(cfgmod.validate(merge(cfgmod.WorkspaceConfig().model_dump(), over)).model_dump())
    return [f"{recipe.name}: {r.item} ({r.key}) is {resolved[r.key]!r}, the table says {r.expected!r}"
            for r in recipe.paper_rows if r.key is not None and resolved[r.key] != r.expected]


def memory_line(recipe: Recipe) -> str:
    """The estimator's per-GPU memory for the recipe at its paper's model and GPU count (README)."""
    from backend import memory

    title, build = memory.PAPER_MODELS[recipe.meta.paper_model]
    train = cfgmod.validate(merge(cfgmod.WorkspaceConfig().model_dump(), recipe.overrides_for(REAL_POLICY))).train
    shape = memory.shape_of(build())
    plan = memory.RunPlan(lora=train.lora, lora_r=train.lora_r, train_projector=train.train_projector,
                          zero_stage=train.zero_stage, gpus_per_node=recipe.meta.paper_gpus,
                          micro_batch=train.batch_size, seq_len=recipe.meta.paper_seq_len,
                          gradient_checkpointing=train.gradient_checkpointing)
    est = memory.estimate(shape, plan)
    mode = f"LoRA r={train.lora_r}" if train.lora else "full fine-tuning"
    return (f"{title} ({shape.total_params / 1e9:.2f}B), {mode} ({est.trainable_params / 1e9:.2f}B trainable), "
            f"ZeRO-{plan.zero_stage} on {plan.gpus_per_node} GPUs, {plan.micro_batch} x {plan.seq_len} tokens: "
            f"~{est.gib():.0f} GiB per GPU (estimate)")


def paper_table(recipe: Recipe) -> str:
    """The recipe's paper table as Markdown (the README shows it)."""
    def show(v: Any) -> str:
        return "" if v is None else f"`{v}`" if not isinstance(v, str) else v.replace("|", "\\|")

    lines = ["| item | paper | source | ours | config key | why |", "|---|---|---|---|---|---|"]
    for r in recipe.paper_rows:
        ours = "same" if r.ours is None or r.ours == r.paper else show(r.ours)
        lines.append(f"| {r.item} | {show(r.paper)} | {show(r.source)} | {ours} | "
                     f"{f'`{r.key}`' if r.key else ''} | {show(r.why)} |")
    return "\n".join(lines)


def names() -> list[str]:
    """The packaged recipes' names, sorted."""
    return sorted(RECIPES)


def load(name: str) -> Recipe:
    """The packaged recipe ``name``; a UsageError listing the recipes when there is none."""
    path = RECIPES.get(name)
    if path is None:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(names()) or 'none'}")
    return load_file(path)


def all_recipes() -> list[Recipe]:
    return [load(n) for n in names()]
