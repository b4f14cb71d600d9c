"""``prefloop doctor --smoke``: the GPU paths in a few minutes, on whatever accelerator is present.

A tiny family model (random weights, built here) goes through the real jobs: generation with the ``hf``
engine (and ``vllm`` when it is installed and a GPU is seen), one LoRA DPO step in one process with the
merge, and one step on 2 DeepSpeed ranks when 2 GPUs are seen. Each step is a row of a table: what ran,
where (device, dtype, ranks), how long, and ok / failed / skipped with the reason. It is what to run first
on a new GPU box; on CPU the same steps run (the 2-rank step is skipped) and are tested.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend import launch
from backend.job_runner import Job, python_module
from backend.jobs.configs import GenerateJobConfig, TrainJobConfig
from backend.models import default_device, materialize, resolve_dtype
from core.config import GenerationConfig, PolicyConfig, TrainConfig
from core.errors import PrefloopError

MODEL = "tiny-qwen2-vl"
"""The family the smoke run uses (Qwen2-VL: native-resolution patches, M-RoPE, the most GPU-specific code)."""


@dataclass(frozen=True)
class SmokeRow:
    step: str
    where: str
    """Device, dtype, engine or ranks."""
    status: str
    """ok, failed or skipped."""
    seconds: float
    detail: str


def _photos(folder: Path, n: int = 2) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(["astronaut", "coffee", "rocket", "chelsea"][:n]):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 96)).save(path)
        out.append(path)
    return out


def _write(run_dir: Path, config, table: str, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.model_dump()), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), run_dir / table)
    return run_dir


def _run(step: str, where: str, argv: list[str], run_dir: Path, processes: int = 1,
         check: Callable[[dict], str] | None = None) -> SmokeRow:
    try:
        result = Job(argv, run_dir, processes=processes).wait()
    except PrefloopError as err:
        return SmokeRow(step, where, "failed", 0.0, f"{err} (log: {run_dir / 'job.log'})")
    detail = check(result.summary) if check else ""
    return SmokeRow(step, where, "ok", round(result.seconds, 1), detail)


def run_smoke(root: Path, on_row: Callable[[SmokeRow], None] = lambda r: None) -> list[SmokeRow]:
    """Run the smoke steps in ``root`` (created); each finished row also goes to ``on_row``."""
    rows: list[SmokeRow] = []

    def add(row: SmokeRow) -> None:
        rows.append(row)
        on_row(row)

    root = Path(root)
    device = default_device()
    dtype = resolve_dtype("auto", device)
    gpus = launch.visible_gpus()
    model = materialize(MODEL, root / "model")
    images = _photos(root / "images")
    prompts = [{"prompt_id": f"p{i}", "image_path": str(p), "question": "What is in the image?"}
               for i, p in enumerate(images)]
    gen = GenerationConfig(k=2, max_new_tokens=8, views=["original"], batch_size=2)
    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") and gpus else [])
    for engine in engines:
        config = GenerateJobConfig(model_path=str(model), device=device, round_id=1, checkpoint_id="c0",
                                   policy=PolicyConfig(model=MODEL, engine=engine, dtype=dtype), generation=gen)
        run_dir = _write(root / f"generate-{engine}", config, "prompts.parquet", prompts)
        add(_run(f"generate ({engine})", f"{device}, {dtype}", python_module("backend.jobs.generate", str(run_dir)),
                 run_dir, check=lambda s: f"{s.get('candidates', '?')} candidates"))
    if len(engines) == 1:
        why = "vllm is not installed (the gpu extra)" if not importlib.util.find_spec("vllm") else "no GPU seen"
        add(SmokeRow("generate (vllm)", "-", "skipped", 0.0, why))

    pairs = [{"prompt_id": p["prompt_id"], "chosen_id": f"{p['prompt_id']}-c", "rejected_id": f"{p['prompt_id']}-r",
              "image_path": p["image_path"], "question": p["question"],
              "chosen_text": "A photo with a clear subject in the middle.", "rejected_text": "A red car at night."}
             for p in prompts]
    runs = [("train + merge (1 process)", TrainConfig(lora=True, lora_r=4, lora_alpha=8, batch_size=2,
                                                      launcher="local", num_processes=1), 1)]
    if gpus >= 2:
        runs.append(("train + merge (2 ranks, ZeRO-3)", TrainConfig(lora=True, lora_r=4, lora_alpha=8, batch_size=1,
                                                                    launcher="deepspeed", num_processes=2), 2))
    for i, (step, train, ranks) in enumerate(runs):
        config = TrainJobConfig(model_path=str(model), output_dir=str(root / f"checkpoint-{i}"), checkpoint_id=f"s{i}",
                                base_model=MODEL, device="cuda" if device == "cuda" else "cpu", dtype=dtype,
                                max_steps=1, train=train)
        run_dir = _write(root / f"train-{i}", config, "pairs.parquet", pairs)
        add(_run(step, f"{device}, {dtype}, {ranks} rank(s)", launch.train_command(run_dir, train), run_dir,
                 processes=ranks, check=lambda s: f"{s.get('steps')} step(s), {s.get('kind')} weights"))
    if gpus < 2:
        add(SmokeRow("train + merge (2 ranks, ZeRO-3)", "-", "skipped", 0.0, f"{gpus} GPU(s) seen, 2 needed"))
    return rows


def table(rows: list[SmokeRow]) -> str:
    width = max(len(r.step) for r in rows)
    where = max(len(r.where) for r in rows)
    return "\n".join(f"{r.status.upper():<7} {r.step:<{width}}  {r.where:<{where}}  {r.seconds:>6.1f} s  {r.detail}"
                     for r in rows)
