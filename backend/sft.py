"""What prefloop asks of TRL's ``SFTTrainer``: the Li/Lin/Pei 2024 baselines ``train.method = sft | steerlm``.

- ``sft`` (rejection sampling): one example per prompt, its best answer: the chosen side of the round's pairs
  (the pair strategy's best-rated answer, e.g. best-vs-random's best by helpfulness + correctness + coherence;
  with several chosen answers, the one that wins the most of the prompt's pairs, i.e. the top of a ranking).
- ``steerlm``: every candidate scored by ``pairs.judge`` on the five HelpSteer attributes, its values appended
  to the question (``core.steerlm``).

Rows are TRL's conversational prompt-completion vision format (``images``, ``prompt``, ``completion``), fed to
TRL's ``DataCollatorForVisionLanguageModeling`` with the loss on the completion only. As in ``backend.dpo``
answers are capped at ``max_completion_length`` tokens before TRL sees them, prompts are never cut, an
example longer than ``max_length`` is skipped and counted, and TRL never truncates (``max_length=None``).
The Trainer arguments, LoRA config and metrics callback are ``backend.dpo``'s, so the three methods share
batch, schedule, precision, launcher and ``metrics.jsonl``. ``trl`` is imported only here and in backend.dpo.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import defaultdict
from pathlib import Path

from backend import dpo
from backend.progress import progress
from backend.token_budget import cap_answer, limit_of
from core import steerlm
from core.config import TrainConfig
from core.trl_format import answer_messages, prompt_messages

log = logging.getLogger(__name__)

SCORED_COLUMNS = ("prompt_id", "candidate_id", "image_path", "question", "text", *steerlm.ATTRIBUTES)
"""Columns of a steerlm run's ``scored.parquet``: the round's candidates with their judge's five values."""


def rejection_sampling_examples(pairs: list[dict]) -> list[dict]:
    """One SFT example per prompt from the round's pairs: the chosen answer that wins the most of the prompt's
    pairs (wins minus losses; a tie goes to the first in the pairs' order)."""
    net: dict[str, dict[str, int]] = defaultdict(dict)
    answers: dict[str, dict] = {}
    for p in pairs:
        wins = net[p["prompt_id"]]
        wins[p["chosen_id"]] = wins.get(p["chosen_id"], 0) + 1
        wins[p["rejected_id"]] = wins.get(p["rejected_id"], 0) - 1
        answers.setdefault(p["chosen_id"], p)
    examples = []
    for prompt_id, wins in net.items():
        best = max((c for c in wins if c in answers), key=lambda c: wins[c])  # max keeps the first of a tie
        p = answers[best]
        examples.append({"prompt_id": prompt_id, "candidate_id": best, "image_path": p["image_path"],
                         "question": p["question"], "answer": p["chosen_text"]})
    return examples


def steerlm_examples(rows: list[dict]) -> list[dict]:
    """One SFT example per scored candidate, its question conditioned on the candidate's attribute values."""
    return [{"prompt_id": r["prompt_id"], "candidate_id": r["candidate_id"], "image_path": r["image_path"],
             "question": steerlm.condition(r["question"], r), "answer": r["text"]} for r in rows]


def sft_config(train: TrainConfig, *, output_dir: Path, device: str, dtype: str, max_steps: int = -1,
               deepspeed_config: Path | None = None):
    """The SFTConfig of a run: ``backend.dpo.trainer_arguments`` (the same batch, schedule, precision, device
    and DeepSpeed settings as DPO), loss on the completion only, no truncation by TRL."""
    from trl import SFTConfig

    args = SFTConfig(
        **dpo.trainer_arguments(train, output_dir=output_dir, device=device, dtype=dtype, max_steps=max_steps,
                                deepspeed_config=deepspeed_config),
        max_length=None,  # examples are pre-filtered to fit train.max_length
        completion_only_loss=True,
    )
    dpo.init_cpu_deepspeed(args, deepspeed_config, device)
    return args


def _sequence_lengths(collator, row: dict) -> tuple[int, int]:
    """(prompt tokens incl. image tokens, prompt + answer) exactly as TRL's collator builds them."""
    batch = collator([copy.deepcopy(row)])
    total = int(batch["attention_mask"].sum())
    return total - int((batch["labels"] != -100).sum()), total


def build_dataset(examples: list[dict], processor, train: TrainConfig):
    """TRL vision prompt-completion rows for the examples that fit, in a seeded shuffled order, and the counts
    (``backend.dpo.PairStats``: ``total`` examples offered, ``skipped`` empty answers and too long ones)."""
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    dpo.check_images((e["image_path"] for e in examples), "the training examples", "the train step")
    stats = dpo.PairStats(total=len(examples), skipped={"empty": 0, "too_long": 0})
    limit = limit_of(train.max_length)
    collator = DataCollatorForVisionLanguageModeling(processor=processor, max_length=None, completion_only_loss=True)
    image_feature = datasets.Image(mode="RGB")
    rows = []
    every = max(1, len(examples) // 20)
    for i, example in enumerate(examples):
        if (i + 1) % every == 0 or i + 1 == len(examples):
            progress(i + 1, len(examples), "examples")
        if not example["answer"].strip():
            stats.skipped["empty"] += 1
            continue
        answer, cut = cap_answer(processor.tokenizer, example["answer"], train.max_completion_length)
        row = {"images": [example["image_path"]], "prompt": prompt_messages(example["question"]),
               "completion": answer_messages(answer)}
        image = image_feature.decode_example({"path": example["image_path"], "bytes": None})
        prompt_len, total_len = _sequence_lengths(collator, {**row, "images": [image]})
        if limit is not None and total_len > limit:
            stats.skipped["too_long"] += 1
            log.info("example %d skipped: %d tokens (prompt %d) > max_length %d", i, total_len, prompt_len, limit)
            continue
        stats.truncated_answers += int(cut)
        stats.longest = max(stats.longest, total_len)
        rows.append(row)
    stats.used = len(rows)
    random.Random(train.seed).shuffle(rows)
    dataset = dpo.to_dataset(rows, image_feature, ("prompt", "completion"))
    return dataset, stats


def no_examples_message(stats: dpo.PairStats, train: TrainConfig) -> str:
    return (f"no SFT examples to train on: {stats.total} given, {stats.skipped['empty']} with an empty answer, "
            f"{stats.skipped['too_long']} longer than max_length={train.max_length} tokens "
            "(set train.max_length = \"auto\" or raise it, or lower train.max_completion_length)")


def build_trainer(model, processor, dataset, args, peft_config, metrics_path: Path):
    """TRL's SFTTrainer with the processor as processing class (its vision collator), our metrics callback
    instead of the printing/progress-bar ones."""
    from trl import SFTTrainer

    return dpo.make_trainer(SFTTrainer, metrics_path, model=model, args=args, train_dataset=dataset,
                            processing_class=processor, peft_config=peft_config)
