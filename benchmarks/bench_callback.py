"""The per-call overhead of recording spectra during training, on a Llama-2-7B-shaped adapter.

A model skeleton with Llama-2-7B's LoRA modules (32 layers × q,k,v,o 4096×4096, gate and up 4096→11008,
down 11008→4096; r=16; 224 modules) whose base weights live on the meta device (no 7B weights in memory)
and whose factors A, B are random tensors in memory, in float32 and in bfloat16. Measured in this process:

  - one recording as the callback does it (:meth:`SpectraRecorder.record`: read the factors, factored
    singular values of every module in batches, one append to spectra_history.csv with fsync), median of
    ``--repeats``, seconds per call and per module;
  - the computation alone (:func:`spectra_rows`), and the one-module-at-a-time route
    (:func:`lora_analysis.analysis.spectra.factored_svd` per module, with vectors) for the batching's gain;
  - the dense reference: forming ΔW = s·B·A and its singular values (``torch.linalg.svdvals``, float32) on
    a 4096×4096 and an 11008×4096 module (down_proj's 4096×11008 counted as its transpose), extrapolated to
    all 224 modules: the cost per call the factored route avoids;
  - the largest singular value's agreement between the two routes.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_callback [--layers 32] [--rank 16] [--repeats 5]

Writes benchmarks/results/bench_callback.json and prints a table.
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
from torch import nn

from lora_analysis.analysis.history import lora_factors, spectra_rows
from lora_analysis.analysis.spectra import factored_svd
from lora_analysis.lora import LoRALinear
from lora_analysis.training.callback import SpectraRecorder

RESULTS = Path(__file__).parent / "results"
LLAMA2_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def skeleton(layers: int, rank: int, dtype: torch.dtype) -> nn.Module:
    """``model.layers.<i>.{self_attn,mlp}.<proj>`` LoRA layers over meta-device bases, factors in memory:
    A ~ Kaiming-like (r, in), B small random (out, r): a LoRA some steps into training."""
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        for name, (out_f, in_f) in LLAMA2_7B.items():
            layer = LoRALinear(nn.Linear(in_f, out_f, bias=False, device="meta"), rank, 2 * rank)
            layer.lora_A.weight = nn.Parameter((torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(dtype))
            layer.lora_B.weight = nn.Parameter((torch.randn(out_f, rank, generator=g) * 1e-3).to(dtype))
            setattr(block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, name, layer)
        model.layers.append(block)
    return model


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def dense_reference(rank: int) -> dict:
    """Seconds to form ΔW and take its singular values (float32, one run each: minutes on one core) for a
    4096×4096 and an 11008×4096 module; a 4096×11008 module (down_proj) is counted at the 11008×4096 time
    (the σ of ΔWᵀ, its faster orientation)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        a, b = torch.randn(rank, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, rank, generator=g) * 1e-3
        t0 = time.perf_counter()
        dense = torch.linalg.svdvals(2.0 * (b @ a))
        seconds = time.perf_counter() - t0
        factored = factored_svd(a, b, 2.0).S
        rel = float((dense[:rank].double() - factored).abs().max() / factored[0])
        out[f"{out_f}x{in_f}"] = {"seconds": seconds, "max_rel_diff_vs_factored": rel}
    out["4096x11008"] = {**out["11008x4096"], "note": "counted as its transpose, 11008x4096"}
    return out


def measure(layers: int, rank: int, dtype: torch.dtype, repeats: int, runs_dir: Path) -> dict:
    model = skeleton(layers, rank, dtype)
    factors = lora_factors(model)
    recorder = SpectraRecorder(model, every=1, runs_dir=runs_dir, start_step=None, keep_base_weights=False,
                               name=f"bench {dtype}")
    step = iter(range(1, 10**6))
    recorder.record(0)                       # warm-up (first write of the file)
    record = timed(lambda: recorder.record(next(step)), repeats)
    compute = timed(lambda: spectra_rows(factors, 0), repeats)
    one_by_one = timed(lambda: [factored_svd(f.lora_A, f.lora_B, f.scaling) for f in factors.values()], 1)
    recorder.close("cancelled", error="benchmark")
    n = len(factors)
    bytes_history = (recorder.run_dir / "spectra_history.csv").stat().st_size
    return {"modules": n, "record_seconds_median": statistics.median(record),
            "record_seconds_per_module": statistics.median(record) / n,
            "compute_seconds_median": statistics.median(compute),
            "one_module_at_a_time_seconds": one_by_one[0],
            "history_bytes_per_recording": bytes_history / (repeats + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        by_dtype = {str(d).removeprefix("torch."): measure(args.layers, args.rank, d, args.repeats, Path(tmp))
                    for d in (torch.float32, torch.bfloat16)}
    dense = dense_reference(args.rank)
    per_shape = {f"{o}x{i}": sum(1 for s in LLAMA2_7B.values() if s == (o, i)) * args.layers
                 for o, i in set(LLAMA2_7B.values())}
    dense_call = sum(dense[k]["seconds"] * count for k, count in per_shape.items())
    f32 = by_dtype["float32"]
    result = {
        "adapter": {"shape": "Llama-2-7B", "layers": args.layers, "rank": args.rank, "modules": f32["modules"]},
        "per_call": by_dtype,
        "dense_reference": {"per_module": dense, "modules_per_shape": per_shape,
                            "seconds_per_call_extrapolated": dense_call,
                            "ratio_dense_over_factored_record": dense_call / f32["record_seconds_median"]},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "load_average_start_end": [load_start[0], os.getloadavg()[0]],
                        "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_callback.json").write_text(json.dumps(result, indent=2) + "\n")

    rows = [("Llama-2-7B-shaped adapter", f"{f32['modules']} modules, r={args.rank}")]
    for name, m in by_dtype.items():
        per_module = m["record_seconds_per_module"] * 1e3
        rows += [(f"one recording, {name} factors (median)",
                  f"{m['record_seconds_median'] * 1e3:.0f} ms ({per_module:.2f} ms/module)"),
                 (f"  computation alone, {name}", f"{m['compute_seconds_median'] * 1e3:.0f} ms"),
                 (f"  one module at a time (factored_svd), {name}",
                  f"{m['one_module_at_a_time_seconds'] * 1e3:.0f} ms")]
    for shape, d in dense.items():
        rows.append((f"dense ΔW + svdvals, {shape} fp32", f"{d['seconds']:.2f} s (σ agree to "
                                                           f"{d['max_rel_diff_vs_factored']:.0e})"))
    rows += [("dense, all modules (extrapolated)", f"{dense_call:.0f} s per call"),
             ("dense / factored recording", f"{result['dense_reference']['ratio_dense_over_factored_record']:.0f}x"),
             ("history written per recording", f"{f32['history_bytes_per_recording'] / 1024:.0f} KiB")]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"\nwritten to {RESULTS / 'bench_callback.json'} (threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
