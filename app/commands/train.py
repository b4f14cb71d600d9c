"""prefloop train: one training round (DPO, or the sft / steerlm baselines) on the current round's pairs
(frozen from now on)."""

from __future__ import annotations

import argparse

from app.progress import TerminalEvents
from backend.steps.train import run_train
from core import names
from storage.workspace import open_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=list(names.TRAIN_METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in names.TRAIN_METHODS.items()) + " (default: train.method)")
    p.add_argument("--loss", type=lambda s: [x.strip() for x in s.split(",")],
                   help="loss types, comma-separated: sigmoid, ipo, hinge, robust, sft (default: train.loss)")
    p.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    p.add_argument("--learning-rate", type=float, dest="learning_rate", help="peak learning rate")
    p.add_argument("--epochs", type=float, help="epochs over the pairs (default 1)")
    p.add_argument("--full", action="store_const", const=False, dest="lora", help="full fine-tuning instead of LoRA")
    p.add_argument("--reference", choices=["previous", "initial"], help="reference policy (default: train.reference)")
    p.add_argument("--launcher", choices=["local", "deepspeed"], help="one process, or the deepspeed launcher")
    p.add_argument("--num-processes", type=lambda s: s if s == "auto" else int(s), dest="num_processes",
                   help='ranks per node for deepspeed: a number, or "auto" for the GPUs seen (default)')
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k, None) for k in ("method", "loss", "beta", "learning_rate", "epochs", "lora",
                                                     "reference", "launcher", "num_processes", "full_modules")}
    with open_workspace(args.workspace, command="prefloop train") as ws, \
            TerminalEvents("train", verbose=args.verbose, quiet=args.quiet) as events:
        s = run_train(ws, overrides=overrides, on_event=events)
    print(f"round {s['round_id']}: trained {s['checkpoint_id']} from {s['parent_id']} on {s['pairs']} pairs "
          f"({s.get('pairs_skipped', 0)} skipped) in {s['seconds']} s -> {s.get('output_dir', '')}")
    return 0
