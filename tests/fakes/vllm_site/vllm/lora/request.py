"""The fake ``vllm.lora.request`` (see ``vllm/__init__.py``)."""

from types import SimpleNamespace


def LoRARequest(name, id_, path):
    """vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path): its arguments as attributes."""
    return SimpleNamespace(name=name, id=id_, path=path)
