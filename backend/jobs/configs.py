"""What the owner writes to ``RUN_DIR/config.json`` for each job, and the one loader every job uses.

Each job config embeds the workspace config sections it runs on (``core.config``: ``policy``,
``generation``, ``train``, ``judges.critic``) as nested objects, beside the paths and ids of the run.
The owner builds these models and writes their ``model_dump()``, so the config beside each run is the
validated one; a job validates it again on load and an error names the file and the key
(``config.json: generation.top_p: ...``). Light on purpose (pydantic only): the owner imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import CriticConfig, GenerationConfig, PolicyConfig, TrainConfig, format_validation_error
from core.errors import ConfigError, UsageError

CONFIG = "config.json"

Dtype = Literal["float32", "bfloat16", "float16"]
"""A resolved weights dtype: the owner turns policy.dtype `auto` into one (backend.models.resolve_dtype)."""


class _JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class GenerateJobConfig(_JobConfig):
    """``backend.jobs.generate``: the policy answers the run's prompts with the generation settings."""

    model_path: str
    """Folder (or cached hub id) of the policy checkpoint (the base model when adapter_path is set)."""
    adapter_path: str | None = None
    """LoRA adapter folder on top of model_path (vllm LoRARequest / peft for hf)."""
    device: str = "cpu"
    """Torch device for the hf engine."""
    round_id: int
    """Round the candidates belong to."""
    checkpoint_id: str
    """Policy checkpoint id recorded with each candidate."""
    policy: PolicyConfig
    """The workspace's ``[policy]``: ``model`` is the name recorded with each candidate; engine, dtype (resolved:
    never `auto`), tensor_parallel_size."""
    generation: GenerationConfig
    """The workspace's ``[generation]`` with the command's overrides: k, sampling, seed, batch size, views."""


class CriticJobConfig(_JobConfig):
    """``backend.jobs.critic``: the critic VLM answers pre-rendered critic prompts, greedily."""

    model_path: str
    """Folder (or cached hub id) of the critic VLM."""
    device: str = "cpu"
    """Torch device for the hf engine."""
    dtype: Dtype = "float32"
    """Weights dtype (the workspace's policy.dtype, resolved)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm: GPUs per job (the workspace's policy.tensor_parallel_size)."""
    batch_size: int = Field(8, ge=1)
    """Requests per generate() call (the workspace's generation.batch_size)."""
    judge_version: str = ""
    """Judge version of the prompts (for logs)."""
    critic: CriticConfig
    """The workspace's ``[judges.critic]`` (mode as run): model name, mode, engine, max_new_tokens."""


TRAIN_INPUT: dict[str, str] = {"dpo": "pairs.parquet", "sft": "pairs.parquet", "steerlm": "scored.parquet"}
"""``train.method`` -> the input Parquet the owner writes to a train run's folder: the round's frozen pairs, or
for steerlm its candidates scored by ``pairs.judge`` (columns: ``backend.jobs.train.METHODS``)."""


class TrainJobConfig(_JobConfig):
    """``backend.jobs.train``: one training round (``train.method``) from ``model_path`` on the run's input."""

    model_path: str
    """Folder of the policy to start from: c(r-1), full or merged weights."""
    ref_model_path: str | None = None
    """Folder of the reference policy (None or equal to model_path: TRL derives it from the model)."""
    output_dir: str
    """The checkpoint folder to write (must not exist, unless it holds this same checkpoint_id)."""
    round_id: int | None = None
    """Round the checkpoint closes (recorded in meta.json)."""
    checkpoint_id: str
    """Id of the checkpoint to write."""
    parent_id: str | None = None
    """Id of the checkpoint trained from (recorded in meta.json)."""
    base_model: str
    """The base model name of the lineage (e.g. `tiny` or a hub id), recorded in meta.json."""
    pairs_hash: str | None = None
    """Hash of the training input (the frozen pairs; steerlm: the scored candidates), recorded in meta.json."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Torch device of a single-process job."""
    dtype: Dtype = "float32"
    """Weights dtype (the workspace's policy.dtype, resolved)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (tests, smoke runs); -1 runs `epochs` in full."""
    image_processor: dict = {}
    """The workspace's policy.image_processor (settings that cap an image's tokens)."""
    ref_cache_dir: str | None = None
    """Folder of the reference log-prob cache (kept across retries of the round); None: no cache."""
    train: TrainConfig
    """The workspace's ``[train]`` with the command's overrides."""


M = TypeVar("M", bound=BaseModel)


def load_job_config(run_dir: Path, model: type[M]) -> M:
    """``RUN_DIR/config.json`` validated as ``model``; a missing file, bad JSON or a bad key is our error."""
    path = Path(run_dir) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{run_dir} has no {CONFIG}; the owner writes it before starting the job") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
