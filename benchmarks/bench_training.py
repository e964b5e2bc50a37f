"""The fine-tuning engine end to end, and LoRA versus full fine-tuning side by side.

Measures, in one run:
  1. the mlp-digits sweep (ranks 1..32 at α=16 plus full fine-tuning) end to end, base preparation
     included (target: < 30 s on 2 CPU cores), with each run's accuracy;
  2. the tiny-gpt LoRA demo once its pretrained base is cached (target: < 60 s), and full fine-tuning on the
     same steps, with perplexities (the base's pretraining, if not cached yet, is timed separately);
  3. LoRA versus full fine-tuning on tiny-gpt: steps/s and training memory (params + grads + AdamW states;
     CUDA: peak allocated), the two methods alternated so machine noise hits both alike.

    python -m benchmarks.bench_training [--device cpu|cuda] [--ratio-steps 40] [--repeats 3]

Writes benchmarks/results/training.json. Runs go to a temporary folder; the pretrained bases use the normal
cache ($LORA_ANALYSIS_HOME/cache or the user cache folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_analysis.training import TrainConfig, prepare_task, train
from lora_analysis.training.sweep import run_sweep, sweep_settings

RESULTS = Path(__file__).parent / "results"


def digits_sweep(runs_dir: Path, device: str) -> dict:
    t0 = time.perf_counter()
    settings = sweep_settings(model="mlp-digits", ranks=[1, 2, 4, 8, 16, 32], alphas=[16], full_ft=True,
                              device=device)
    result = run_sweep(settings, runs_dir=runs_dir)
    seconds = time.perf_counter() - t0
    frame = result.frame
    return {"seconds_end_to_end": round(seconds, 2), "target_seconds": 30,
            "base_val_accuracy": float(frame["base_val_accuracy"].iloc[0]),
            "runs": [{"name": r["name"], "trainable_params": int(r["trainable_params"]),
                      "val_accuracy": round(float(r["val_accuracy"]), 4),
                      "train_seconds": r["train_seconds"]} for _, r in frame.iterrows()]}


def gpt_demo(runs_dir: Path, device: str) -> dict:
    task = prepare_task("tiny-gpt")
    pretrain = task.info["pretrain"]
    out = {"base_was_cached": pretrain["cache_hit"], "pretrain_seconds": pretrain["seconds"],
           "pretrain_source_val_perplexity": pretrain["metrics"]["source_val_perplexity"]}
    t0 = time.perf_counter()   # the demo as a user runs it: load the cached base and data, fine-tune
    lora = train(TrainConfig(model="tiny-gpt", method="lora", rank=8, device=device),
                 task=prepare_task("tiny-gpt"), runs_dir=runs_dir)
    out["lora_demo_seconds"] = round(time.perf_counter() - t0, 2)
    out["target_seconds"] = 60
    full = train(TrainConfig(model="tiny-gpt", method="full", device=device), task=task, runs_dir=runs_dir)
    out.update(steps=lora.config.steps, base_val_perplexity=round(lora.metrics["base_val_perplexity"], 3),
               lora_val_perplexity=round(lora.metrics["val_perplexity"], 3),
               full_val_perplexity=round(full.metrics["val_perplexity"], 3),
               lora_trainable_params=lora.metrics["trainable_params"],
               full_trainable_params=full.metrics["trainable_params"])
    return out


def ratio(device: str, steps: int, repeats: int) -> dict:
    """Alternate LoRA and full fine-tuning runs of ``steps`` steps; medians of their steps/s."""
    task = prepare_task("tiny-gpt")
    speed = {"lora": [], "full": []}
    memory = {}
    for _ in range(repeats):
        for method in ("lora", "full"):
            r = train(TrainConfig(model="tiny-gpt", method=method, rank=8, steps=steps, eval_every=10**6,
                                  device=device), task=task, save=False, keep_model=False)
            speed[method].append(r.metrics["steps_per_s"])
            memory[method] = r.metrics.get("cuda_max_memory_allocated_bytes") or r.metrics["training_state_bytes"]
    med = {m: statistics.median(v) for m, v in speed.items()}
    return {"steps": steps, "repeats": repeats, "lora_steps_per_s": round(med["lora"], 3),
            "full_steps_per_s": round(med["full"], 3), "speed_ratio_lora_over_full": round(med["lora"] / med["full"], 3),
            "memory_kind": "cuda_max_memory_allocated" if device == "cuda" else "params+grads+optimizer states",
            "lora_memory_bytes": memory["lora"], "full_memory_bytes": memory["full"],
            "memory_ratio_full_over_lora": round(memory["full"] / memory["lora"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ratio-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        runs_dir = Path(tmp)
        if not prepare_task("tiny-gpt").info["pretrain"]["cache_hit"]:
            print("(the tiny-gpt base was pretrained now and cached)")
        results = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
                   "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                   "mlp_digits_sweep": digits_sweep(runs_dir, args.device),
                   "tiny_gpt_demo": gpt_demo(runs_dir, args.device),
                   "tiny_gpt_lora_vs_full": ratio(args.device, args.ratio_steps, args.repeats)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(results, indent=2) + "\n")

    s, g, r = results["mlp_digits_sweep"], results["tiny_gpt_demo"], results["tiny_gpt_lora_vs_full"]
    print(f"mlp-digits sweep (6 ranks + full FT), end to end: {s['seconds_end_to_end']:.1f} s (target < 30 s)")
    print(f"  frozen base accuracy on rotated digits: {s['base_val_accuracy']:.3f}")
    print(f"  {'run':<16}{'trainable':>10}{'val acc':>9}{'train s':>9}")
    for row in s["runs"]:
        print(f"  {row['name']:<16}{row['trainable_params']:>10,}{row['val_accuracy']:>9.3f}{row['train_seconds']:>9.2f}")
    print(f"tiny-gpt LoRA demo (r=8 on q_proj,v_proj, {g['steps']} steps, cached base): {g['lora_demo_seconds']:.1f} s "
          f"(target < 60 s)")
    print(f"  Python-source perplexity: base {g['base_val_perplexity']:.2f}, LoRA {g['lora_val_perplexity']:.2f} "
          f"({g['lora_trainable_params']:,} params), full FT {g['full_val_perplexity']:.2f} "
          f"({g['full_trainable_params']:,} params)")
    print(f"tiny-gpt LoRA vs full FT ({r['steps']} steps x {r['repeats']}, alternated): steps/s {r['lora_steps_per_s']:.2f} "
          f"vs {r['full_steps_per_s']:.2f} (LoRA/full {r['speed_ratio_lora_over_full']:.2f}x); training memory "
          f"({r['memory_kind']}) full/LoRA {r['memory_ratio_full_over_lora']:.2f}x")
    print(f"wrote {RESULTS / 'training.json'}")


if __name__ == "__main__":
    main()
