"""The same sweep in this process and on Ray (a local Ray on this machine): wall time and overhead per trial.

The sweep: mlp-digits, ranks 1..64 at α=16 plus full fine-tuning (8 runs, the model's default steps), on a
base prepared (and cached) before any timing. Measured:
  - local: ``run_sweep`` with the local executor (the runs one after another in this process);
  - Ray start: ``ray.init(num_cpus=N)`` on this machine;
  - Ray, cold: the first sweep on that Ray (its workers start and import torch);
  - Ray, warm: the same sweep again (workers reused), ``--repeats`` times, median.
Overhead per trial = (wall time × slots − the trials' own time) / runs, where slots is 1 locally and N on
Ray, and a trial's own time is its run's ``wall_seconds`` (training steps + evaluations): the slot time a
trial spends on anything but training (loading the base, writing the run, scheduling, progress, sending
the run back). Both Ray transfers are timed: "shared" (workers write in place) and "bytes" (each run
travels back as a bundle and is imported here).

    python -m benchmarks.bench_ray [--cpus 2] [--repeats 3]

Writes benchmarks/results/ray.json. Runs go to a temporary folder; the base uses the normal cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_analysis.training import prepare_task
from lora_analysis.training.sweep import run_sweep, sweep_settings

RESULTS = Path(__file__).parent / "results"
RANKS = [1, 2, 4, 8, 16, 32, 64]


def timed(settings, runs_dir: Path, executor=None) -> dict:
    t0 = time.perf_counter()
    result = run_sweep(settings, runs_dir=runs_dir, executor=executor)
    wall = time.perf_counter() - t0
    frame = result.frame
    assert (frame["status"] == "completed").all(), frame[["name", "status", "error"]]
    return {"wall_s": wall, "trial_s": float(frame["wall_seconds"].sum()),
            "val_accuracy": [round(float(v), 4) for v in frame["val_accuracy"]]}


def summary(runs: list[dict], slots: int, count: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    trial = statistics.median(r["trial_s"] for r in runs)
    return {"wall_s": round(wall, 3), "trials_own_s": round(trial, 3),
            "overhead_per_trial_s": round((wall * slots - trial) / count, 3), "repeats": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (= trials at once)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from lora_analysis.training.ray_executor import RayExecutor, local_runtime_env

    settings = sweep_settings(model="mlp-digits", ranks=RANKS, alphas=[16], full_ft=True, device="cpu")
    count = len(settings)
    task = prepare_task("mlp-digits")           # cached before any timing
    out: dict = {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                 "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                 "sweep": {"model": "mlp-digits", "runs": count, "ranks": RANKS, "full_ft": True,
                           "steps": task.defaults["steps"]}}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        runs_dir = Path(tmp)
        local = [timed(settings, runs_dir) for _ in range(args.repeats)]
        out["local"] = {**summary(local, 1, count), "torch_threads": torch.get_num_threads()}

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env=local_runtime_env(env={"OMP_NUM_THREADS": "1"}))
        out["ray_init_s"] = round(time.perf_counter() - t0, 3)
        try:
            cold = timed(settings, runs_dir, RayExecutor())
            out["ray_cold"] = summary([cold], args.cpus, count)
            for transfer in ("shared", "bytes"):
                warm = [timed(settings, runs_dir, RayExecutor(transfer=transfer)) for _ in range(args.repeats)]
                out[f"ray_warm_{transfer}"] = {**summary(warm, args.cpus, count), "torch_threads_per_trial": 1,
                                               "same_accuracy_as_local": all(
                                                   w["val_accuracy"] == local[0]["val_accuracy"] for w in warm)}
            out["same_accuracy_as_local"] = cold["val_accuracy"] == local[0]["val_accuracy"] and all(
                out[f"ray_warm_{t}"]["same_accuracy_as_local"] for t in ("shared", "bytes"))
        finally:
            ray.shutdown()
    out["speedup_warm_shared_over_local"] = round(out["local"]["wall_s"] / out["ray_warm_shared"]["wall_s"], 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(out, indent=2) + "\n")

    print(f"mlp-digits sweep, {count} runs x {out['sweep']['steps']} steps, on {os.cpu_count()} CPUs "
          f"(1-minute load average {out['load_avg_1m']:.1f} when it started)")
    print(f"  {'':<26}{'wall s':>9}{'trials s':>10}{'overhead/trial s':>18}")
    for key, label in (("local", "local (in this process)"), ("ray_cold", f"Ray, {args.cpus} CPUs, cold"),
                       ("ray_warm_shared", "Ray, warm, shared folder"), ("ray_warm_bytes", "Ray, warm, runs as bytes")):
        r = out[key]
        print(f"  {label:<26}{r['wall_s']:>9.2f}{r['trials_own_s']:>10.2f}{r['overhead_per_trial_s']:>18.3f}")
    print(f"  ray.init: {out['ray_init_s']:.1f} s; same accuracies as local: {out['same_accuracy_as_local']}; "
          f"warm Ray / local speedup {out['speedup_warm_shared_over_local']:.2f}x")
    print(f"wrote {RESULTS / 'ray.json'}")


if __name__ == "__main__":
    main()
