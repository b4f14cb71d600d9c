"""Merge a LoRA adapter into full weights: ``python -m backend.jobs.merge --adapter DIR --base PATH --out DIR``.

The train job calls ``merge`` in its own process after a single-process run, and runs this module in a
fresh process after a distributed one (merging inside a ZeRO-3 training process fails). Writes into
``--out`` (created if missing; callers that need atomicity pass a staging folder): the merged model, loadable with
``AutoModelForImageTextToText.from_pretrained``, its processor (the adapter folder's if it has one, else
the base's), and the adapter's ``meta.json`` with ``kind`` set to ``merged``. Exit 0 on success; on
failure one ``error`` event on stdout and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from backend.progress import emit, write_atomic
from core.errors import ModelNotAvailable, PrefloopError

log = logging.getLogger(__name__)


def merge(adapter_dir: Path, base: str, out: Path, dtype: str = "float32") -> Path:
    from peft import PeftModel

    from backend.models import load_model, load_processor

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelNotAvailable(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder")
    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter_dir))
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    has_processor = any((adapter_dir / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    load_processor(adapter_dir if has_processor else base, family_source=merged.config).save_pretrained(out)
    meta_file = adapter_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update({"kind": "merged", "merged_base": str(base), "merged_adapter": str(adapter_dir)})
    write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.stdout = sys.stderr  # keep stdout for job events
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m backend.jobs.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="LoRA adapter folder (peft save_pretrained)")
    parser.add_argument("--base", required=True, help="folder of the model the adapter was trained on")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the merged model into")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    started = time.time()
    try:
        merge(args.adapter, args.base, args.out, args.dtype)
    except PrefloopError as err:
        emit("error", message=str(err))
        return err.exit_code
    except Exception as err:  # the owner needs one line; the traceback goes to stderr
        log.exception("merge failed")
        emit("error", message=f"merging {args.adapter} into {args.base} failed: {type(err).__name__}: {err}")
        return 1
    emit("done", summary={"output_dir": str(args.out), "seconds": round(time.time() - started, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
