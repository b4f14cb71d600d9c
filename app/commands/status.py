"""prefloop status: the workspace at a glance."""

from __future__ import annotations

import argparse
import json

from backend.models import torch_build
from storage import rounds
from storage.workspace import open_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    with open_workspace(args.workspace, command="prefloop status") as ws:
        cur = ws.cursor()
        info = {
            "workspace": str(ws.root),
            "policy_model": ws.config.policy.model,
            "torch": torch_build(),
            "counts": rounds.table_counts(cur),
            "rounds": [{k: (str(v) if v is not None else None) for k, v in r.items() if k != "config"}
                       for r in rounds.list_rounds(cur)],
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"workspace  {info['workspace']}")
    print(f"model      {info['policy_model']}")
    t = info["torch"]
    gpu_note = "" if t["cuda"] else "  (no GPU build: the vllm engine and bf16 need a CUDA build of torch)"
    print(f"torch      {t['version']} {t['build']} build{gpu_note}")
    print("counts     " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()))
    for r in info["rounds"]:
        print(f"round {r['round_id']:>3}  {r['status']:<11} step {r['step'] or '-':<9} policy {r['policy_checkpoint_id']}")
    return 0
