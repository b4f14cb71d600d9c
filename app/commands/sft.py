"""prefloop sft: supervised fine-tuning of the policy on the round's best answers (rejection sampling), as
`prefloop train --method sft`; `--projector-only` trains only the multimodal projector (LLaVA's stage 1)."""

from __future__ import annotations

import argparse

from app.commands import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    train.add_arguments(p)
    p.add_argument("--projector-only", action="store_true", dest="projector_only",
                   help="full fine-tuning of the projector alone, everything else frozen (train.full_modules)")
    p.set_defaults(method="sft")


def run(args: argparse.Namespace) -> int:
    if args.projector_only:
        args.lora, args.full_modules = False, ["projector"]
    return train.run(args)
