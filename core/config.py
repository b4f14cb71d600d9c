"""Workspace configuration (``prefloop.toml``): pydantic models, one docstring per field.

Validated on every load: an error names the bad key and, for a choice, the allowed values.
Secrets never live here: API keys come only from the environment.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomlkit
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from core import names, steerlm
from core.errors import ConfigError

CONFIG_NAME = "prefloop.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _registered(kind: str, registry: dict[str, str], value: str | list[str] | None):
    """``value`` (a name, a list of names, or None) when every name is in ``registry`` (``core.names``);
    else an error naming the first unknown one and listing the registered names."""
    for name in [value] if isinstance(value, str) else value or []:
        if name not in registry:
            raise PydanticCustomError("unknown_name", "{message}", {"message": names.unknown(kind, registry, name)})
    return value


class PolicyConfig(_Section):
    model: str = "tiny"
    """Base policy model: `tiny`, `demo`, a tiny family build (`tiny-llava-onevision`, `tiny-qwen2-vl`,
    `tiny-idefics3`), a Hugging Face hub id, or a local folder."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine: `hf` (transformers generate, CPU or GPU) or `vllm` (GPU extra)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for generation, training and the critic (hf and vllm): `auto` is bfloat16 on a CUDA GPU
    that supports it and float32 on CPU; bf16/fp16 need a GPU. Each job's config.json holds the resolved one."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism: the GPUs one vLLM engine splits the model over (for a model too large for
    one GPU); the critic's engine uses it too."""
    data_parallel_size: int = Field(1, ge=1)
    """vLLM data parallelism: independent vLLM engines (each on `tensor_parallel_size` GPUs of its own) that
    each answer a contiguous share of a step's prompts; a job uses data_parallel_size x tensor_parallel_size
    GPUs. The `hf` engine ignores both."""
    image_processor: dict[str, Any] = {}
    """Image-processor settings that cap an image's tokens, applied wherever the policy's processor is loaded
    (generation hf and vLLM, the pairs step's token count, training). Allowed keys per family: Qwen2-VL /
    Qwen2.5-VL `min_pixels`, `max_pixels` (e.g. `max_pixels = 1003520`: at most 1280 image tokens);
    Idefics3 / SmolVLM `size` (e.g. `{longest_edge = 768}`), `max_image_size`. LLaVA's size is fixed, and
    LLaVA-OneVision's anyres grid is part of the model's own config, so neither takes any."""


class GenerationConfig(_Section):
    k: int = Field(5, ge=1, le=64)
    """Candidates sampled per prompt from the policy view."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature (0 means greedy)."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling threshold."""
    max_new_tokens: int = Field(64, ge=1)
    """Cap on the length of each answer, in tokens."""
    seed: int = 0
    """Base seed; each prompt's seed is derived from it and the prompt id."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate() call (each expands to k sequences)."""
    views: list[str] = ["original", "aug:diffusion:500"]
    """Views to answer: `original` plus SeVa views such as `aug:diffusion:500` or `aug:flip` (the default
    pair strategy `seva` pairs the original view's answer against each augmented view's)."""


class PairsConfig(_Section):
    strategy: str = "seva"
    """Pair strategy (see `prefloop pairs --help`): seva, best-worst, best-vs-random, human-only."""
    judge: str | None = None
    """Judge whose scores rank candidates for best-worst / best-vs-random."""
    score: str = "overall"
    """Score column used by best-worst: overall, helpfulness, ..., score."""
    min_margin: float = 2.0
    """best-vs-random: helpfulness+correctness+coherence of the rejected is at least this much lower."""
    seed: int = 0
    """Seed for random choices in pair strategies."""

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return _registered("pair strategy", names.PAIR_STRATEGIES, v)

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, v: str | None) -> str | None:
        return _registered("judge", names.JUDGES, v)


class TrainConfig(_Section):
    method: Literal["dpo", "sft", "steerlm"] = "dpo"
    """Training method: `dpo` on the round's pairs; the Li/Lin/Pei baselines `sft` (rejection sampling: SFT on
    each prompt's chosen answer) and `steerlm` (SFT on every candidate scored by `pairs.judge`, its HelpSteer
    values in the prompt; see core/steerlm.py). Same LoRA, launcher and lineage for all three."""
    lora: bool = True
    """LoRA (peft) when true, full fine-tuning when false."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA alpha."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout."""
    lora_target: str = "auto"
    """Regex over module names that get LoRA adapters; `auto`: the model family's attention and MLP layers
    of the language model (never the vision tower; see backend/families.py)."""
    train_projector: bool = True
    """Also train the multimodal projector in full (peft modules_to_save; the family's projector module)."""
    full_modules: list[Literal["language_model", "vision_tower", "projector"]] = [
        "language_model", "vision_tower", "projector"]
    """Full fine-tuning (lora = false): the parts of the model that train, the others frozen (the family's
    module names, backend/families.py); e.g. `["projector"]` with method `sft` is LLaVA's stage-1 alignment."""
    loss: list[str] = ["sigmoid"]
    """DPO loss types: sigmoid, ipo, hinge, robust, sft (several are summed with `loss_weights`)."""
    loss_weights: list[float] | None = None
    """Weights for the loss types, same length as `loss`."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Label smoothing for the `robust` loss."""
    beta: float = Field(0.1, gt=0.0)
    """DPO beta."""
    learning_rate: float = Field(5e-5, gt=0.0)
    """Peak learning rate."""
    epochs: float = Field(1.0, gt=0.0)
    """Epochs over the round's pairs."""
    batch_size: int = Field(2, ge=1)
    """Per-device batch size."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps (set from `global_batch` when that is given)."""
    global_batch: int | None = Field(None, ge=1)
    """Pairs per optimizer step over all ranks (the papers' "batch size"): sets grad_accum = global_batch /
    (batch_size x ranks), which must divide evenly; the job's config.json holds the resolved grad_accum."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup (all three recipes' papers use cosine)."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    max_completion_length: int = Field(128, ge=1)
    """Cap on each answer's tokens; prompts (with image tokens) are never truncated."""
    max_length: int | Literal["auto"] = "auto"
    """Longest pair (prompt with its image tokens + capped answer) trained on: `auto` takes every pair, however
    long (the pairs step reports the longest); a number skips longer pairs, and the pairs step says how many.
    A 384x384 image alone is ~1.5k LLaVA-OneVision tokens (a photo up to ~7k), ~190 Qwen2-VL tokens."""

    @field_validator("max_length")
    @classmethod
    def _max_length_floor(cls, v):
        if isinstance(v, int) and v < 16:
            raise ValueError("max_length must be at least 16 tokens, or \"auto\"")
        return v
    reference: Literal["previous", "initial"] = "previous"
    """Reference policy: the previous round's checkpoint, or the initial base model."""
    merge: bool = True
    """Merge the LoRA adapter into full weights after training (in a fresh process)."""
    launcher: Literal["local", "deepspeed"] = "local"
    """`local` runs one process; `deepspeed` runs the deepspeed launcher with `num_processes` ranks."""
    num_processes: int | Literal["auto"] = "auto"
    """Ranks per node for the deepspeed launcher: `auto` is the CUDA GPUs this machine sees (1 on CPU, and
    always 1 with the `local` launcher), or a number (more than the GPUs seen stops before launch; on CPU
    the ranks are CPU processes). The job's config.json holds the resolved number."""
    zero_stage: Literal[2, 3] = 3
    """DeepSpeed ZeRO stage of the shipped config."""
    hostfile: str | None = None
    """DeepSpeed hostfile (`host slots=N` lines) for a multi-node launch over pdsh; the first host runs rank 0.
    The workspace must be on a filesystem every host mounts at the same path, and prefloop installed at the
    same path on each."""
    seed: int = 0
    """Training seed."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (slower; useful for 7B models on GPUs)."""
    steerlm_target: dict[str, float] = {}
    """steerlm: attribute values a steerlm checkpoint asks for when it generates (keys among helpfulness,
    correctness, coherence, complexity, verbosity; 0-4). Unset keys: 4 for helpfulness, correctness and
    coherence, the training data's median for complexity and verbosity."""

    @field_validator("steerlm_target")
    @classmethod
    def _known_attributes(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if key not in steerlm.ATTRIBUTES:
                raise PydanticCustomError("unknown_name", "{message}", {
                    "message": names.unknown("HelpSteer attribute", steerlm.ATTRIBUTES, key)})
            if not 0 <= value <= steerlm.SCALE_MAX:
                raise ValueError(f"{key} must be between 0 and {steerlm.SCALE_MAX} (got {value})")
        return v

    @field_validator("full_modules")
    @classmethod
    def _some_modules(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("full_modules is empty: name at least one of language_model, vision_tower, projector")
        return v

    @field_validator("loss")
    @classmethod
    def _known_losses(cls, v: list[str]) -> list[str]:
        return _registered("loss type", names.LOSSES, v)

    @field_validator("num_processes", mode="before")
    @classmethod
    def _auto_or_count(cls, v: Any) -> int | str:
        if v == "auto":
            return v
        try:
            n = int(v) if not isinstance(v, bool | float) else 0
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise PydanticCustomError("num_processes", '"auto" or a number of ranks >= 1')
        return n


class GeminiConfig(_Section):
    model: str = "gemini-2.5-flash"
    """Gemini model name."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Sampling temperature of the judge."""
    base_url: str | None = None
    """API base URL override (a proxy, or a fake server in tests)."""
    concurrency: int = Field(8, ge=1)
    """Calls in flight at once."""
    requests_per_minute: int = Field(60, ge=1)
    """Client-side request limit."""
    tokens_per_minute: int = Field(1_000_000, ge=1)
    """Client-side token limit."""
    timeout_s: float = Field(60.0, gt=0)
    """Per-call timeout in seconds."""
    max_retries: int = Field(5, ge=0)
    """Retries on 408/429/5xx and timeouts, with exponential backoff and jitter."""
    backoff_s: float = Field(1.0, gt=0)
    """First backoff delay in seconds."""
    mode: Literal["online", "batch"] = "online"
    """`online`: one call per prompt while the step runs. `batch`: the step's requests go to the Gemini Batch
    API (about half the online price, results within a day); the round stops and waits, and `prefloop round
    resume` picks the results up (items the batch could not answer are then sent online)."""
    batch_poll_s: float = Field(0.0, ge=0)
    """Batch mode: how long the judge step keeps polling a submitted batch before the round stops to wait
    (0: look once)."""
    batch_poll_interval_s: float = Field(30.0, gt=0)
    """Batch mode: seconds between two polls within `batch_poll_s`."""
    batch_max_mb: float = Field(19.0, gt=0, le=20)
    """Batch mode: the largest batch job, in MB of inlined requests (Google takes at most 20 MB inline); a
    larger step is split into several jobs."""
    # Prices in USD per million tokens for `model`. The defaults are gemini-2.5-flash's paid tier (text and
    # image input; output includes thinking tokens) as published on the day they were written: check
    # https://ai.google.dev/gemini-api/docs/pricing before relying on them. Used only for estimates.
    price_input_per_mtok: float = Field(0.30, ge=0)
    """Online price of a million input tokens, USD (`prefloop doctor`'s estimate)."""
    price_output_per_mtok: float = Field(2.50, ge=0)
    """Online price of a million output tokens (thinking included), USD (`prefloop doctor`'s estimate)."""
    batch_discount: float = Field(0.5, gt=0, le=1)
    """Batch price as a fraction of the online price (0.5: half)."""


class CriticConfig(_Section):
    model: str = "tiny"
    """Critic VLM: `tiny`, `demo`, a tiny family build, a hub id or a local folder (e.g. a -hf conversion of
    LLaVA-Critic). Its weights dtype is policy.dtype's."""
    mode: Literal["rubric", "pointwise", "pairwise"] = "pointwise"
    """rubric: five 0-4 metrics; pointwise: 0-100 score; pairwise: all ordered pairs."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine for the critic."""
    max_new_tokens: int = Field(1024, ge=1)
    """Cap on the critic's reply. LLaVA-Critic reasons before its verdict (a few hundred tokens); 1024
    leaves room for that and still stops a reply that loops (its model card's example allows 4096)."""


class JudgesConfig(_Section):
    gemini: GeminiConfig = GeminiConfig()
    """Gemini HelpSteer rubric judge."""
    critic: CriticConfig = CriticConfig()
    """Local critic VLM judge."""
    default: list[str] = []
    """Judges run automatically after generation in a round."""

    @field_validator("default")
    @classmethod
    def _known_judges(cls, v: list[str]) -> list[str]:
        return _registered("judge", names.JUDGES, v)


class ReviewConfig(_Section):
    required: Literal["off", "required"] = "off"
    """`required`: a round stops at review until `quota` prompts are labelled."""
    quota: int = Field(0, ge=0)
    """Prompts that must be labelled before training when review is required."""
    overlap: int = Field(1, ge=1)
    """Annotators per prompt."""
    claim_minutes: float = Field(15.0, gt=0)
    """A served prompt is held for this long, then offered again."""
    queue_order: Literal["disagreement", "margin", "random", "in_order"] = "disagreement"
    """Order of the review queue."""


class RoundConfig(_Section):
    promote: Literal["always", "if_not_worse"] = "always"
    """`if_not_worse`: a round whose checkpoint loses the eval is not promoted."""
    eval_judge: str | None = None
    """Judge comparing c(r) with c(r-1) on held-out prompts (None: skip eval)."""

    @field_validator("eval_judge")
    @classmethod
    def _known_judge(cls, v: str | None) -> str | None:
        return _registered("judge", names.JUDGES, v)


class WorkspaceConfig(_Section):
    name: str = "prefloop"
    """A label for this workspace."""
    policy: PolicyConfig = PolicyConfig()
    generation: GenerationConfig = GenerationConfig()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    judges: JudgesConfig = JudgesConfig()
    review: ReviewConfig = ReviewConfig()
    round: RoundConfig = RoundConfig()

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_s = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {key}: {msg}{got_s}")
    return "; ".join(lines)


def validate(data: dict[str, Any], source: str = CONFIG_NAME) -> WorkspaceConfig:
    try:
        return WorkspaceConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load(path: Path) -> WorkspaceConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return validate(data, str(path))


def dump(cfg: WorkspaceConfig) -> str:
    """TOML text of a config, with each field's docstring as a comment."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("prefloop workspace config; validated on every load. API keys come only from"))
    doc.add(tomlkit.comment("the environment (GEMINI_API_KEY / GOOGLE_API_KEY) and never live here."))
    _fill(doc, cfg)
    return tomlkit.dumps(doc)


def _fill(container, model: BaseModel) -> None:
    """Set fields as TOML values; fields left at their default as a commented line showing the default, so
    that the file holds exactly what was chosen (a recipe's values apply wherever prefloop.toml is silent)."""
    fields = type(model).model_fields
    for name, info in fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            continue
        doc = (info.description or "").replace("\n", " ")
        if name not in model.model_fields_set or value is None:
            shown = "(unset)" if value is None else tomlkit.item(value).as_string()
            container.add(tomlkit.comment(f"{name} = {shown}  # default. {doc}"))
            continue
        item = tomlkit.item(value)
        if doc:
            item.comment(doc)
        container.add(name, item)
    for name, info in fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            table = tomlkit.table()
            _fill(table, value)
            container.add(name, table)


def save(cfg: WorkspaceConfig, path: Path) -> None:
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dump(cfg), encoding="utf-8")
    tmp.replace(path)


def update(cfg: WorkspaceConfig, changes: dict[str, Any]) -> WorkspaceConfig:
    """A new validated config with dotted-key changes applied, e.g. {"train.beta": 0.2}. The keys ``cfg`` had
    set stay set and the changed ones become set (``save`` writes only those)."""
    data = cfg.model_dump(exclude_unset=True)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        model: Any = WorkspaceConfig
        for p in parents:
            field_info = model.model_fields.get(p) if model is not None else None
            model = getattr(field_info, "annotation", None) if field_info else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError(f"{CONFIG_NAME}: {dotted}: unknown key")
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(data)


def explicit(cfg: WorkspaceConfig) -> dict[str, Any]:
    """The values ``cfg`` was given (its TOML file's uncommented keys), nested by section."""
    return cfg.model_dump(exclude_unset=True)


def leaves(data: dict[str, Any], model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, Any]:
    """``data`` (nested by section) flattened to dotted keys; a dict-valued setting stays one leaf."""
    model = model or WorkspaceConfig
    out: dict[str, Any] = {}
    for key, value in data.items():
        info = model.model_fields.get(key)
        sub = getattr(info, "annotation", None)
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out.update(leaves(value, sub, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve(layers: list[tuple[str, dict[str, Any]]]) -> tuple[WorkspaceConfig, dict[str, str]]:
    """The config from the defaults and ``layers`` (label, nested values), each laid over the ones before
    it, validated; and the source of every setting: "default" or the label of the last layer that set it."""
    data: dict[str, Any] = {}
    sources = dict.fromkeys(leaves(WorkspaceConfig().model_dump()), "default")
    for label, values in layers:
        data = merge(data, values)
        for key in leaves(values):
            sources[key] = label
    return validate(data, " + ".join(label for label, values in layers if values) or CONFIG_NAME), sources


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, table by table (a new dict; the inputs are not changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
