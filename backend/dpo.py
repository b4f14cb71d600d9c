"""Everything prefloop asks of TRL's DPO (TRL is pinned exactly): loss registry, DPOConfig, dataset, trainer,
metrics.

``backend.jobs.train`` reads top to bottom and calls these; ``trl`` is imported only here and in
``backend.sft`` (the SFT baselines, which reuse this module's Trainer arguments, LoRA config and metrics).
Our loss names map to TRL's ``loss_type`` list through the ``LOSSES`` registry; precisions map to Trainer
flags through ``PRECISIONS``. Completions are capped here, before TRL sees them, because TRL 1.16 has no
``max_completion_length`` and truncates whole sequences from the end (which would cut the answer, or
for a long prompt the image tokens): a pair that does not fit ``max_length`` is skipped and counted.

Reference log-probs come from ``backend.ref_cache`` when the job has a cache folder: TRL 1.16 refuses
``precompute_ref_log_probs`` for vision data, so ``CachedRefDPOTrainer`` (a thin ``DPOTrainer``
subclass) looks each batch's pairs up, runs TRL's own ``compute_ref_log_probs`` only for a batch with a
miss, and hands the values to TRL's loss through the batch. ``check_trl_internals`` names the TRL
member to revisit if a TRL upgrade changes what the subclass relies on.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.progress import emit, progress
from backend.token_budget import cap_answer, limit_of
from core import names
from core.config import TrainConfig
from core.errors import JobFailed, UsageError
from core.trl_format import trl_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossType:
    trl_name: str
    """The entry of TRL's ``DPOConfig.loss_type`` list."""


LOSSES: dict[str, LossType] = {
    "sigmoid": LossType("sigmoid"),
    "ipo": LossType("ipo"),
    "hinge": LossType("hinge"),
    "robust": LossType("robust"),
    "sft": LossType("sft"),
}
"""Keyed by ``core.names.LOSSES`` (the ``train.loss`` names, checked when the config loads, and their help)."""

PRECISIONS: dict[str, dict[str, bool]] = {
    "float32": {"bf16": False, "fp16": False},
    "bfloat16": {"bf16": True, "fp16": False},
    "float16": {"bf16": False, "fp16": True},
}

def loss_args(train: TrainConfig) -> dict[str, Any]:
    """DPOConfig keyword arguments for the configured loss types, weights and label smoothing."""
    unknown = [name for name in train.loss if name not in LOSSES]
    if unknown:  # only for a TrainConfig built without validation: loading one checks the names
        raise JobFailed(f"train.loss: {names.unknown('loss type', LOSSES, unknown[0])}")
    if not train.loss:
        raise JobFailed(f"train.loss: empty; choose one or more of {', '.join(LOSSES)}")
    if train.loss_weights is not None and len(train.loss_weights) != len(train.loss):
        raise JobFailed(f"train.loss_weights has {len(train.loss_weights)} entries but train.loss has "
                        f"{len(train.loss)}; give one weight per loss type")
    return {"loss_type": [LOSSES[name].trl_name for name in train.loss],
            "loss_weights": list(train.loss_weights) if train.loss_weights is not None else None,
            "label_smoothing": train.label_smoothing}


def trainer_arguments(train: TrainConfig, *, output_dir: Path, device: str, dtype: str, max_steps: int = -1,
                      deepspeed_config: Path | None = None) -> dict[str, Any]:
    """The Trainer arguments every method shares (DPOConfig here, SFTConfig in ``backend.sft``): batch,
    schedule, epochs, seed, precision, device, DeepSpeed and logging; no gradient checkpointing unless asked."""
    if dtype not in PRECISIONS:
        raise JobFailed(f"dtype {dtype!r} is not one of {', '.join(PRECISIONS)}")
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        num_train_epochs=train.epochs,
        max_steps=max_steps,
        learning_rate=train.learning_rate,
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="sequential",  # order is shuffled by build_dataset, the same on every rank
        gradient_checkpointing=train.gradient_checkpointing,
        **PRECISIONS[dtype],
        use_cpu=device == "cpu",
        dataloader_pin_memory=device != "cpu",
        deepspeed=str(deepspeed_config) if deepspeed_config else None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        push_to_hub=False,
    )


def init_cpu_deepspeed(args, deepspeed_config: Path | None, device: str) -> None:
    """CPU ranks: accelerate has set up a gloo process group (use_cpu=True) but not DeepSpeed's comm layer,
    so ZeRO-3's partitioned loading would see a world of one; hand it the same group."""
    if deepspeed_config and device == "cpu":
        import deepspeed

        deepspeed.init_distributed(dist_backend=args.distributed_state.backend or "gloo")


def dpo_config(train: TrainConfig, *, output_dir: Path, device: str, dtype: str, max_steps: int = -1,
               deepspeed_config: Path | None = None):
    """The full DPOConfig of a run; every TrainConfig field that TRL consumes is set here.

    Building it first matters under ZeRO-3: it registers the DeepSpeed config so that models loaded
    afterwards are partitioned as they load.
    """
    from trl import DPOConfig

    args = DPOConfig(
        **trainer_arguments(train, output_dir=output_dir, device=device, dtype=dtype, max_steps=max_steps,
                            deepspeed_config=deepspeed_config),
        beta=train.beta,
        **loss_args(train),
        max_length=None,  # pairs are pre-filtered to fit train.max_length: TRL never truncates
        # TRL zeroes every nn.Dropout, LoRA's included; keep them when LoRA dropout is asked for
        disable_dropout=not (train.lora and train.lora_dropout > 0),
    )
    init_cpu_deepspeed(args, deepspeed_config, device)
    return args


def lora_config(train: TrainConfig, model):
    """peft LoraConfig from the train section and the model's family (``backend.families``): the target
    regex (``auto``: the family's language-model layers), and the family's projector trained in full
    when asked."""
    from peft import LoraConfig

    from backend.families import family_of, lora_target

    try:
        family = family_of(model.config)
    except UsageError as err:
        if train.lora_target == "auto" or train.train_projector:
            raise JobFailed(f"{err}; for another architecture set train.lora_target to a regex over its "
                            "language model's module names and train.train_projector = false") from None
        return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                          target_modules=train.lora_target)
    modules_to_save = None
    if train.train_projector:
        modules_to_save = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                                  if name.rsplit(".", 1)[-1] in family.projector})
        if not modules_to_save:
            raise JobFailed(f"train.train_projector: no multimodal projector found in {type(model).__name__} "
                            f"(looked for {', '.join(family.projector)}); set train.train_projector = false")
    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=lora_target(family, train.lora_target), modules_to_save=modules_to_save)


def model_part(family, name: str) -> str:
    """Which part of the model a parameter belongs to: projector, vision_tower or language_model (the rest:
    the LM, its embeddings and head)."""
    if any(f".{p}." in f".{name}" for p in family.projector):
        return "projector"
    if re.search(family.vision_tower, name):
        return "vision_tower"
    return "language_model"


def trainable(train: TrainConfig, model):
    """The peft config for LoRA; for a full fine-tune None, after freezing the parts not in
    ``train.full_modules`` (requires_grad off). Logs what trains."""
    if train.lora:
        return lora_config(train, model)
    if set(train.full_modules) == {"language_model", "vision_tower", "projector"}:
        return None
    from backend.families import family_of

    family = family_of(model.config)
    counts = {"train": 0, "frozen": 0}
    for name, param in model.named_parameters():
        param.requires_grad = model_part(family, name) in train.full_modules
        counts["train" if param.requires_grad else "frozen"] += param.numel()
    if counts["train"] == 0:
        raise JobFailed(f"train.full_modules = {train.full_modules}: no parameter of {type(model).__name__} "
                        "belongs to them")
    emit("log", message=f"full fine-tuning of {', '.join(train.full_modules)}: {counts['train']:,} parameters "
                        f"train, {counts['frozen']:,} frozen")
    return None


@dataclass
class PairStats:
    total: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"identical": 0, "too_long": 0})
    truncated_answers: int = 0
    longest: int = 0
    """Longest used sequence (prompt with image tokens + answer), in tokens."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def render_example(processor, example: dict) -> dict:
    """A prompt/chosen/rejected example rendered to text by the chat template, one image in the prompt,
    as ``DataCollatorForVisionPreference`` renders it (``backend.token_budget`` counts its tokens)."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    example = copy.deepcopy(example)
    example["prompt"] = prepare_multimodal_messages(example["prompt"], images=[None])
    for key in ("chosen", "rejected"):
        example[key] = prepare_multimodal_messages(example[key])
    return apply_chat_template(example, processor)


def _sequence_lengths(collator, row: dict) -> tuple[int, int]:
    """(prompt tokens incl. image tokens, longest prompt+answer) exactly as TRL's collator builds them."""
    batch = collator([copy.deepcopy(row)])
    total = batch["attention_mask"].sum(dim=1)
    prompt = total - batch["completion_mask"].sum(dim=1)
    return int(prompt.max()), int(total.max())


REF_KEY = "ref_key"
"""Dataset column (and example key) holding a pair's reference-cache key."""
REF_KEYS = "ref_keys"
"""Batch key holding the list of the batch's reference-cache keys (removed before the model sees the batch)."""

RefKeyFn = Callable[[str, dict], str]
"""(image_path, TRL row as fed) -> the pair's reference-cache key."""


def check_images(paths, what: str, redo: str) -> None:
    """A JobFailed naming the first missing image file of ``paths`` (``what``: "the pairs"; ``redo``: the step)."""
    missing = sorted({p for p in paths if not Path(p).is_file()})
    if missing:
        raise JobFailed(f"{len(missing)} image file(s) of {what} are missing, e.g. {missing[0]}; "
                        f"re-run {redo} or restore the image store")


def to_dataset(rows: list[dict], image_feature, message_columns: tuple[str, ...], extra: dict | None = None):
    """``rows`` as a datasets.Dataset of TRL's conversational vision format (None when there are none)."""
    import datasets

    message = datasets.List({"role": datasets.Value("string"),
                             "content": datasets.List({"type": datasets.Value("string"),
                                                       "text": datasets.Value("string")})})
    features = datasets.Features({"images": datasets.List(image_feature),
                                  **dict.fromkeys(message_columns, message), **(extra or {})})
    return datasets.Dataset.from_list(rows, features=features) if rows else None


def build_dataset(pairs: list[dict], processor, train: TrainConfig, ref_key: RefKeyFn | None = None):
    """TRL vision preference rows for the pairs that fit, in a seeded shuffled order, and the counts.

    ``pairs``: dicts with image_path, question, chosen_text, rejected_text. Answers are capped at
    ``max_completion_length`` tokens; prompts are never cut; a pair still longer than ``max_length``
    (prompt with image tokens + longer answer, chat template included; ``auto``: no limit) is skipped, as is a pair whose
    two answers are the same text. With ``ref_key`` each row also gets its reference-cache key in the
    ``ref_key`` column (computed from the row as fed, i.e. after capping).
    """
    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    check_images((p["image_path"] for p in pairs), "the pairs", "the pairs step")
    stats = PairStats(total=len(pairs))
    limit = limit_of(train.max_length)
    collator = DataCollatorForVisionPreference(processor=processor, max_length=None)
    image_feature = datasets.Image(mode="RGB")
    rows = []
    every = max(1, len(pairs) // 20)
    for i, pair in enumerate(pairs):
        if (i + 1) % every == 0 or i + 1 == len(pairs):
            progress(i + 1, len(pairs), "pairs")
        if pair["chosen_text"].strip() == pair["rejected_text"].strip():
            stats.skipped["identical"] += 1
            continue
        chosen, cut_c = cap_answer(processor.tokenizer, pair["chosen_text"], train.max_completion_length)
        rejected, cut_r = cap_answer(processor.tokenizer, pair["rejected_text"], train.max_completion_length)
        row = trl_row(pair["image_path"], pair["question"], chosen, rejected)
        image = image_feature.decode_example({"path": pair["image_path"], "bytes": None})
        prompt_len, total_len = _sequence_lengths(collator, {**row, "images": [image]})
        if limit is not None and total_len > limit:
            stats.skipped["too_long"] += 1
            log.info("pair %d skipped: %d tokens (prompt %d) > max_length %d", i, total_len, prompt_len, limit)
            continue
        stats.truncated_answers += int(cut_c) + int(cut_r)
        stats.longest = max(stats.longest, total_len)
        if ref_key is not None:
            row[REF_KEY] = ref_key(pair["image_path"], row)
        rows.append(row)
    stats.used = len(rows)
    random.Random(train.seed).shuffle(rows)
    extra = {REF_KEY: datasets.Value("string")} if ref_key is not None else None
    dataset = to_dataset(rows, image_feature, ("prompt", "chosen", "rejected"), extra)
    return dataset, stats


def _metrics_callback_class():
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Streams one ``metrics`` event per logging step and appends it to ``metrics.jsonl`` (rank 0)."""

        def __init__(self, metrics_path: Path):
            self.metrics_path = metrics_path
            self.rows: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "epoch": logs.get("epoch"), "loss": logs["loss"],
                   "rewards_chosen": logs.get("rewards/chosen"), "rewards_rejected": logs.get("rewards/rejected"),
                   "margin": logs.get("rewards/margins"), "accuracy": logs.get("rewards/accuracies"),
                   "lr": logs.get("learning_rate")}
            self.rows.append(row)
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            emit("metrics", **row)

        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps, "steps")

    return MetricsCallback


def metrics_callback(metrics_path: Path):
    """The callback every method's trainer gets: one ``metrics`` event per logging step, appended to
    ``metrics.jsonl`` (the reward columns stay empty for the SFT methods)."""
    return _metrics_callback_class()(metrics_path)


# ---- reference log-prob cache -------------------------------------------------------------------------

# What CachedRefDPOTrainer relies on in TRL 1.16.0, member by member: a parameter list, and source
# fragments that must still be there. check_trl_internals() names the member whose contract changed.
TRL_SIGNATURES: dict[str, tuple[str, ...]] = {
    "DPOTrainer._compute_loss": ("self", "model", "inputs", "return_outputs"),
    "DPOTrainer.compute_ref_log_probs": ("self", "model", "inputs"),
    "DPOTrainer._set_signature_columns_if_needed": ("self",),
}
TRL_SOURCE: dict[str, tuple[str, ...]] = {
    # the loss takes the reference log-probs from the batch when this flag is set, and keeps them out of
    # the model's keyword arguments
    "DPOTrainer._compute_loss": ('if self.precompute_ref_logps:', 'inputs["ref_chosen_logps"]',
                                 'inputs["ref_rejected_logps"]',
                                 '_non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}'),
    # the flag is a plain attribute copied from the config (we set it after __init__); TRL still refuses the
    # config switch for vision data, which is why this subclass exists
    "DPOTrainer.__init__": ("self.precompute_ref_logps = args.precompute_ref_log_probs",
                            "`precompute_ref_log_probs=True` is not supported for vision datasets"),
    # the reference forward the cache replaces: adapter-disabled policy or ref_model, no grad
    "DPOTrainer.compute_ref_log_probs": ("use_adapter(", "torch.no_grad()", "return ref_logps.chunk(2, dim=0)"),
    "DPOTrainer._set_signature_columns_if_needed": ("self._signature_columns = [",),
}


@functools.cache
def check_trl_internals() -> None:
    """Raise JobFailed naming the TRL member whose signature or body no longer matches what
    ``CachedRefDPOTrainer`` overrides or reads (TRL is pinned exactly; this guards an upgrade)."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    def member(dotted: str):
        obj = DPOTrainer
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                raise JobFailed(f"TRL changed: {dotted} no longer exists; backend.dpo.CachedRefDPOTrainer relies on it "
                                "(reference log-prob cache). Re-read trl/trainer/dpo_trainer.py and update it, or "
                                "run without ref_cache_dir")
        return obj

    for dotted, params in TRL_SIGNATURES.items():
        got = tuple(inspect.signature(member(dotted)).parameters)
        if got != params:
            raise JobFailed(f"TRL changed: {dotted}{got} no longer has the parameters {params} that "
                            "backend.dpo.CachedRefDPOTrainer overrides; update it to the new TRL")
    for dotted, needles in TRL_SOURCE.items():
        source = inspect.getsource(member(dotted))
        for needle in needles:
            if needle not in source:
                raise JobFailed(f"TRL changed: {dotted} no longer contains {needle!r}, which "
                                "backend.dpo.CachedRefDPOTrainer relies on; update it to the new TRL")
    if tuple(inspect.signature(DataCollatorForVisionPreference.torch_call).parameters) != ("self", "examples"):
        raise JobFailed("TRL changed: DataCollatorForVisionPreference.torch_call(self, examples) has a new signature; "
                        "backend.dpo.KeyedCollator wraps it")


@dataclass
class KeyedCollator:
    """Wraps TRL's vision collator: takes each example's cache key out and hands the keys on in the batch."""

    inner: Callable

    def __call__(self, examples: list[dict]) -> dict:
        keys = [example.pop(REF_KEY) for example in examples]
        batch = self.inner(examples)
        batch[REF_KEYS] = keys
        return batch


@functools.cache
def _cached_trainer_class():
    import torch
    from trl import DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference log-probs come from a RefLogpCache; only misses run a reference forward.

        Overrides ``_compute_loss`` (fills ``inputs["ref_chosen_logps"/"ref_rejected_logps"]``, then lets
        TRL's loss read them with ``precompute_ref_logps`` on) and ``_set_signature_columns_if_needed``
        (keeps the ``ref_key`` column); wraps ``data_collator`` in KeyedCollator.
        """

        def __init__(self, *args, ref_cache, reference_available: bool, **kwargs):
            check_trl_internals()
            super().__init__(*args, **kwargs)
            self.ref_cache = ref_cache
            self.reference_available = reference_available
            self.data_collator = KeyedCollator(self.data_collator)
            self.precompute_ref_logps = True  # TRL's loss now reads the values we put in the batch

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if REF_KEY not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, REF_KEY]

        def _need_forward(self, missing: int) -> bool:
            """True when any rank misses a pair: under ZeRO-3 a forward is collective, so all ranks run it."""
            if self.accelerator.num_processes == 1:
                return missing > 0
            flag = torch.tensor([missing], device=self.accelerator.device)
            return bool(self.accelerator.reduce(flag, reduction="sum").item())

        def _compute_loss(self, model, inputs, return_outputs):
            keys = inputs.pop(REF_KEYS)
            cache = self.ref_cache
            hits = [cache.get(k) for k in keys]
            missing = sum(h is None for h in hits)
            if self._need_forward(missing):
                if not self.reference_available:
                    raise JobFailed(f"{missing} pair(s) have no cached reference log-probs, but the reference model "
                                    "was not loaded (every pair was cached when the job started); delete "
                                    f"{cache.folder} and retry the train step")
                ref = self.ref_model if self.ref_model is not None else self.model
                chosen, rejected = self.compute_ref_log_probs(ref, inputs)
                cache.stats.ref_forwards += 1
                computed = list(zip(chosen.float().tolist(), rejected.float().tolist()))
                cache.put_many([(k, c, r, {}) for k, (c, r), h in zip(keys, computed, hits) if h is None])
                cache.stats.computed += missing
                hits = [h if h is not None else got for h, got in zip(hits, computed)]
            cache.stats.served += len(keys) - missing
            device = self.accelerator.device
            inputs["ref_chosen_logps"] = torch.tensor([h[0] for h in hits], dtype=torch.float32, device=device)
            inputs["ref_rejected_logps"] = torch.tensor([h[1] for h in hits], dtype=torch.float32, device=device)
            return super()._compute_loss(model, inputs, return_outputs)

    return CachedRefDPOTrainer


NO_REFERENCE = ("the reference model was not loaded because every pair's reference log-probs were cached, "
                "yet a reference forward was asked for")


def no_reference_model(config):
    """A stand-in for the reference model of a full fine-tune whose pairs are all cached: it holds no
    weights, and calling it fails loudly (TRL would otherwise load a second copy of the model)."""
    import torch

    def refuse(module, args):
        raise JobFailed(NO_REFERENCE)

    stand_in = torch.nn.Module()
    stand_in.config = config
    stand_in.forward = lambda *args, **kwargs: refuse(None, args)
    stand_in.register_forward_pre_hook(refuse)
    return stand_in


def build_trainer(model, ref_model, processor, dataset, args, peft_config, metrics_path: Path, ref_cache=None,
                  reference_available: bool = True):
    """The DPOTrainer, with our metrics callback instead of the printing/progress-bar ones.

    With ``ref_cache`` (a ``backend.ref_cache.RefLogpCache``; the dataset then has a ``ref_key`` column)
    it is a CachedRefDPOTrainer. ``reference_available`` is False when the job did not load the
    reference because every pair was cached; a full fine-tune then gets a weightless stand-in.
    """
    from trl import DPOTrainer

    kwargs = {"args": args, "train_dataset": dataset, "processing_class": processor, "peft_config": peft_config}
    if ref_cache is not None:
        if ref_model is None and peft_config is None and not reference_available:
            ref_model = no_reference_model(model.config)
        cls, kwargs = _cached_trainer_class(), {**kwargs, "ref_cache": ref_cache,
                                                 "reference_available": reference_available}
    else:
        cls = DPOTrainer
    return make_trainer(cls, metrics_path, model=model, ref_model=ref_model, **kwargs)


def make_trainer(cls, metrics_path: Path, **kwargs):
    """A TRL trainer ``cls(**kwargs)`` with our metrics callback instead of the printing/progress-bar ones;
    a LoRA target that matches nothing is a JobFailed naming train.lora_target (DPO and SFT share this)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    try:
        trainer = cls(callbacks=[metrics_callback(metrics_path)], **kwargs)
    except ValueError as err:
        if "Target modules" in str(err) or "target_modules" in str(err):
            raise JobFailed(f"train.lora_target matches no module of the model: {err}") from None
        raise
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def final_loss(trainer) -> float | None:
    """Mean training loss of the run (Trainer's ``train_loss``), or None if nothing was logged."""
    for entry in reversed(trainer.state.log_history):
        if "train_loss" in entry:
            value = float(entry["train_loss"])
            return value if math.isfinite(value) else None
    return None
