"""GPU memory a training run needs, per GPU: a small pure estimator (``estimate``) over a model's shape
(``shape_of``, counted on the meta device: no weights are read).

Model states (weights, gradients, optimizer) follow DeepSpeed's own ZeRO estimators
(``estimate_zero2/3_model_states_mem_needs``, bf16/fp16 mixed precision with fp32 Adam, no offload),
applied to the trainable parameters; what they lack is added here:

- frozen weights (LoRA's base model, the vision tower's 16-bit copy): 2 bytes a parameter, replicated on
  every GPU under ZeRO-2, partitioned under ZeRO-3;
- the DPO reference model of a full fine-tune (16-bit, partitioned under ZeRO-3; LoRA's reference is the
  policy with its adapter disabled, so none);
- activations, a documented allowance: per decoder layer and token, 34 x hidden bytes kept for the
  backward pass without gradient checkpointing and 2 x hidden with it (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", 16-bit, attention scores not materialised as with
  SDPA/FlashAttention), times chosen + rejected sequences of the micro-batch, plus the fp32 logits of
  both (tokens x vocabulary x 4 bytes), which dominate for 150k-token vocabularies;
- a fixed allowance for the CUDA context and allocator fragmentation (``OVERHEAD_BYTES``).

The vision tower's activations are not counted (small next to the LM's at these sequence lengths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024 ** 3
OVERHEAD_BYTES = int(1.5 * GIB)
"""CUDA context, NCCL buffers and allocator fragmentation, per GPU."""
ACT_BYTES_PER_LAYER_TOKEN = 34
"""x hidden: activations one decoder layer keeps per token for backward (16-bit, no checkpointing)."""
ACT_BYTES_PER_LAYER_TOKEN_CKPT = 2
"""x hidden: what a checkpointed layer keeps per token (its input), plus one layer's full activations."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (``shape_of`` counts it on the meta device)."""

    total_params: int
    """All parameters (tied embeddings once)."""
    largest_layer_params: int
    """The largest single module's own parameters (ZeRO-3 gathers one at a time)."""
    hidden: int
    """The language model's hidden size."""
    layers: int
    """The language model's decoder layers."""
    vocab: int
    """The vocabulary size (the logits' width)."""
    lora_params_per_rank: int
    """LoRA parameters added per unit of rank on the family's default target (sum of in + out features)."""
    projector_params: int
    """The multimodal projector's parameters (trained in full with LoRA when train_projector is on)."""


@dataclass(frozen=True)
class RunPlan:
    """The training run the estimate is for."""

    lora: bool
    lora_r: int = 8
    train_projector: bool = True
    zero_stage: int = 3
    gpus_per_node: int = 1
    nodes: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    reference_model: bool = True
    """A full fine-tune's DPO reference is a second model (False: every reference log-prob is cached)."""


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU, by part."""

    trainable_params: int
    model_states: int
    """Trainable weights, their gradients and optimizer states (DeepSpeed's estimators)."""
    frozen_weights: int
    reference: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.model_states + self.frozen_weights + self.reference + self.activations + self.overhead

    def gib(self) -> float:
        return round(self.total / GIB, 1)

    def parts_gib(self) -> dict[str, float]:
        return {"model states": self.model_states / GIB, "frozen weights": self.frozen_weights / GIB,
                "reference": self.reference / GIB, "activations": self.activations / GIB,
                "overhead": self.overhead / GIB}


def _model_states(trainable: int, largest_layer: int, plan: RunPlan) -> int:
    """GPU bytes of ``trainable`` parameters' 16-bit weights, gradients and fp32 optimizer states, no offload:
    DeepSpeed's formulas (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_...``, mirrored here so
    that the owner need not import deepspeed; tests/test_doctor.py checks them against DeepSpeed's own)."""
    if trainable == 0:
        return 0
    gpus = plan.gpus_per_node * plan.nodes
    if plan.zero_stage == 3:
        return 4 * min(largest_layer, trainable) + int(18 * trainable / gpus)
    return 2 * trainable + int(18 * trainable / gpus)


def estimate(shape: ModelShape, plan: RunPlan) -> Estimate:
    """Per-GPU memory of a DPO run (see the module docstring for what each part counts)."""
    gpus = plan.gpus_per_node * plan.nodes
    if plan.lora:
        trainable = plan.lora_r * shape.lora_params_per_rank + (shape.projector_params if plan.train_projector else 0)
        frozen = shape.total_params - (shape.projector_params if plan.train_projector else 0)
    else:
        trainable, frozen = shape.total_params, 0
    frozen_bytes = 2 * frozen // (gpus if plan.zero_stage == 3 else 1)
    reference = 0
    if not plan.lora and plan.reference_model:
        reference = 2 * shape.total_params // (gpus if plan.zero_stage == 3 else 1)
    tokens = 2 * plan.micro_batch * plan.seq_len  # chosen and rejected
    if plan.gradient_checkpointing:
        per_token = shape.hidden * (ACT_BYTES_PER_LAYER_TOKEN_CKPT * shape.layers + ACT_BYTES_PER_LAYER_TOKEN)
    else:
        per_token = shape.hidden * ACT_BYTES_PER_LAYER_TOKEN * shape.layers
    activations = tokens * per_token + tokens * shape.vocab * 4
    return Estimate(trainable_params=trainable, model_states=_model_states(trainable, shape.largest_layer_params, plan),
                    frozen_weights=frozen_bytes, reference=reference, activations=activations,
                    overhead=OVERHEAD_BYTES)


def shape_of(config) -> ModelShape:
    """A model config's shape, counted on the meta device (no weights are read or allocated)."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForImageTextToText

    from backend.families import family_of

    family = family_of(config)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    target = re.compile(family.lora_target)
    lora = sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and target.fullmatch(name))
    projector = sum(p.numel() for name, p in model.named_parameters()
                    if any(f".{part}." in f".{name}" for part in family.projector))
    text = config.get_text_config()
    return ModelShape(total_params=total, largest_layer_params=largest, hidden=text.hidden_size,
                      layers=text.num_hidden_layers, vocab=text.vocab_size, lora_params_per_rank=lora,
                      projector_params=projector)


def _llava(hidden: int, intermediate: int, layers: int, heads: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)


def _onevision_7b():
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text)


PAPER_MODELS = {
    "llava-1.5-7b": ("LLaVA-1.5-7B", lambda: _llava(4096, 11008, 32, 32)),
    "llava-1.5-13b": ("LLaVA-1.5-13B", lambda: _llava(5120, 13824, 40, 40)),
    "llava-onevision-qwen2-7b": ("LLaVA-OneVision-7B", _onevision_7b),
}
"""The papers' models as configs (their published architectures; no weights): name -> (title, config)."""
