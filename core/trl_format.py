"""TRL's vision preference format (conversational): the one shape used by export and training.

A row: ``images`` (list of image paths or bytes), ``prompt`` (user message with an image part and the
question), ``chosen`` and ``rejected`` (one assistant message each). ``datasets.load_dataset("parquet")``
reads it back and ``trl.DPOTrainer`` takes it unchanged.
"""

from __future__ import annotations


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}]


def answer_messages(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_row(image: str | bytes, question: str, chosen: str, rejected: str) -> dict:
    return {"images": [image], "prompt": prompt_messages(question), "chosen": answer_messages(chosen),
            "rejected": answer_messages(rejected)}


def llava_row(pair_id: str, image: str, question: str, chosen: str, rejected: str) -> dict:
    """LLaVA-style record: {"id", "image", "conversations", "chosen", "rejected"}."""
    return {"id": pair_id, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
            "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}
