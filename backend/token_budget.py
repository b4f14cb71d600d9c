"""Token lengths of preference pairs, as the train job will see them, without processing every image.

A pair's length is its prompt (chat template, question and the image's feature tokens) plus its longer
answer (capped at ``train.max_completion_length``, chat template included), exactly as TRL's
``DataCollatorForVisionPreference`` builds the sequence. The image's tokens depend only on the image's
size for every family in ``backend.families`` (LLaVA: fixed; LLaVA-OneVision: the anyres grid chosen from
the size; Qwen2-VL: the resized size; Idefics3: the tile count), so the processor runs once per distinct
size on a blank image and every other token is counted by the tokenizer: thousands of pairs measure in
about a second. ``tests/test_token_budget.py`` checks the figures against the collator's, per family.

The pairs step reports the longest pair and how many pairs would not fit ``train.max_length``; the train
job skips exactly those (it measures again with the collator itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.trl_format import answer_messages, prompt_messages


def cap_answer(tokenizer, text: str, cap: int) -> tuple[str, bool]:
    """``text`` cut to its first ``cap`` tokens, and whether it was cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= cap:
        return text, False
    return tokenizer.decode(ids[:cap], skip_special_tokens=False), True


@dataclass
class Budget:
    """The lengths of a round's pairs against ``train.max_length``."""

    limit: int | None
    """``train.max_length`` (None for ``auto``: every pair fits)."""
    lengths: list[int] = field(default_factory=list)
    """Each pair's length in tokens (prompt with image tokens + longer capped answer), in input order."""
    longest_prompt: int = 0
    """The longest prompt, image tokens included."""

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    @property
    def too_long(self) -> int:
        return 0 if self.limit is None else sum(n > self.limit for n in self.lengths)

    @property
    def fitting(self) -> int:
        return len(self.lengths) - self.too_long

    def summary(self) -> dict:
        return {"longest_pair": self.longest, "longest_prompt": self.longest_prompt,
                "too_long": self.too_long, "max_length": self.limit if self.limit is not None else "auto"}


class Measurer:
    """Measures pairs with one model's processor (``backend.models.load_processor``)."""

    def __init__(self, processor, max_completion_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cap = max_completion_length
        self._image_tokens: dict[tuple[int, int], int] = {}

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def image_tokens(self, size: tuple[int, int], rendered_prompt: str) -> int:
        """Tokens the processor adds to a rendered prompt for one image of ``size`` (width, height)."""
        if size not in self._image_tokens:
            from PIL import Image

            enc = self.processor(images=[Image.new("RGB", size)], text=[rendered_prompt],
                                 add_special_tokens=False)
            self._image_tokens[size] = len(enc["input_ids"][0]) - self._count(rendered_prompt)
        return self._image_tokens[size]

    def pair(self, size: tuple[int, int], question: str, chosen: str, rejected: str) -> tuple[int, int]:
        """(prompt tokens with the image's, prompt + longer capped answer) for an image of ``size``."""
        chosen, _ = cap_answer(self.tokenizer, chosen, self.cap)
        rejected, _ = cap_answer(self.tokenizer, rejected, self.cap)
        from backend.dpo import render_example

        rendered = render_example(self.processor, {"prompt": prompt_messages(question), "chosen": answer_messages(chosen),
                                 "rejected": answer_messages(rejected)})
        prompt = self._count(rendered["prompt"]) + self.image_tokens(size, rendered["prompt"])
        return prompt, prompt + max(self._count(rendered["chosen"]), self._count(rendered["rejected"]))

    def measure(self, rows: list[dict], limit: int | None) -> Budget:
        """A Budget for rows with image_path, question, chosen_text, rejected_text."""
        from PIL import Image

        budget = Budget(limit=limit)
        sizes: dict[str, tuple[int, int]] = {}
        for row in rows:
            path = row["image_path"]
            if path not in sizes:
                with Image.open(Path(path)) as img:  # reads the header only
                    sizes[path] = img.size
            prompt, total = self.pair(sizes[path], row["question"], row["chosen_text"], row["rejected_text"])
            budget.lengths.append(total)
            budget.longest_prompt = max(budget.longest_prompt, prompt)
        return budget


def limit_of(max_length: int | str) -> int | None:
    """``train.max_length`` as a limit: None for ``auto``."""
    return None if max_length == "auto" else int(max_length)
