"""The fake ``vllm.lora`` package (see ``vllm/__init__.py``)."""
