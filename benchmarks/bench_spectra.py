"""Factored spectra versus dense SVD, at Llama-2-7B scale, in one run.

Measures, side by side in the same process:
  - end to end: a Llama-2-7B-shaped PEFT adapter (32 layers; q,k,v,o 4096×4096; gate, up 4096→11008;
    down 11008→4096; r=16; random factors, ~160 MB fp32) written to a temporary directory, then read and
    analysed (``load_updates`` + ``spectra_frame``: every module's singular values, vectors and metrics);
  - ONE dense SVD (``torch.linalg.svd``, float32, with vectors) of a 4096×4096 ΔW formed from r=8 factors;
  - the factored SVD of the same r=8 factors (median of repeats): the per-matrix speed-up;
  - peak resident memory (VmHWM) of the end-to-end analysis (run in a fresh child process, so the
    generation of the adapter does not count), against the adapter's file size.

    python -m benchmarks.bench_spectra [--layers 32] [--rank 16] [--repeats 5]

Writes benchmarks/results/spectra.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_analysis.analysis.sources import load_updates
from lora_analysis.analysis.spectra import factored_svd, spectra_frame

RESULTS = Path(__file__).parent / "results"
LLAMA2_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: VmHWM of /proc/self/status, which starts afresh in a new process image (ru_maxrss would carry
    the parent's peak across fork + exec). Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def write_adapter(directory: Path, layers: int, rank: int) -> int:
    """A random Llama-2-7B-shaped PEFT adapter; returns the safetensors file size in bytes."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        for mod, (out_f, in_f) in LLAMA2_7B.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{mod}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": sorted(LLAMA2_7B), "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return (directory / "adapter_model.safetensors").stat().st_size


def analyse(adapter_dir: Path) -> dict:
    """Read and analyse ``adapter_dir`` end to end; seconds and peak RSS (MiB) before and after."""
    rss_before = rss_mib()
    start = time.perf_counter()
    _, updates = load_updates(adapter_dir)
    frame = spectra_frame(updates)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "modules": len(frame), "rss_before": rss_before, "rss_after": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the factored per-matrix timing")
    parser.add_argument("--analyse", default=None, help=argparse.SUPPRESS)   # child process: analyse one dir
    args = parser.parse_args()
    if args.analyse:
        print(json.dumps(analyse(Path(args.analyse))))
        return

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        file_bytes = write_adapter(adapter_dir, args.layers, args.rank)
        # a fresh process, so its peak RSS covers the analysis only (not the adapter we just generated)
        child = subprocess.run([sys.executable, "-m", "benchmarks.bench_spectra", "--analyse", str(adapter_dir)],
                               capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
        analysed = json.loads(child.stdout.strip().splitlines()[-1])
    end_to_end, rss_before, rss_after = analysed["seconds"], analysed["rss_before"], analysed["rss_after"]
    frame_len = analysed["modules"]

    # per matrix, 4096×4096 at r=8: factored (median of repeats) versus ONE dense SVD of the same ΔW
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 4096, generator=g), torch.randn(4096, 8, generator=g)
    factored = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        spec = factored_svd(a, b, 2.0)
        factored.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    delta = 2.0 * (b @ a)                                    # forming ΔW is part of the dense route
    _, s_dense, _ = torch.linalg.svd(delta, full_matrices=False)
    dense = time.perf_counter() - t0
    max_rel = float(((spec.S.float() - s_dense[:8]).abs() / s_dense[:8]).max())

    result = {
        "adapter": {"layers": args.layers, "rank": args.rank, "modules": frame_len,
                    "file_mib": file_bytes / 2**20, "seconds_end_to_end": end_to_end,
                    "seconds_per_module": end_to_end / frame_len,
                    "peak_rss_mib_before": rss_before, "peak_rss_mib_after": rss_after,
                    "peak_rss_growth_mib": rss_after - rss_before},
        "per_matrix_4096_r8": {"factored_seconds_median": statistics.median(factored),
                               "dense_svd_seconds": dense,
                               "speedup": dense / statistics.median(factored),
                               "max_rel_diff_singular_values": max_rel},
        "whole_adapter_vs_one_dense_svd": end_to_end / dense,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "load_average_start_end": [load_start[0], os.getloadavg()[0]],
                        "platform": platform.platform(), "python": platform.python_version()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "spectra.json").write_text(json.dumps(result, indent=2) + "\n")

    ad, pm = result["adapter"], result["per_matrix_4096_r8"]
    rows = [
        ("Llama-2-7B-shaped adapter", f"{ad['modules']} modules, r={args.rank}, {ad['file_mib']:.0f} MiB"),
        ("  load + factored spectra of all modules", f"{ad['seconds_end_to_end']:.2f} s "
                                                      f"({ad['seconds_per_module'] * 1e3:.1f} ms/module)"),
        ("  peak RSS growth during analysis", f"{ad['peak_rss_growth_mib']:.0f} MiB "
                                              f"(adapter file {ad['file_mib']:.0f} MiB)"),
        ("one dense SVD, 4096x4096 fp32", f"{pm['dense_svd_seconds']:.2f} s"),
        ("factored SVD, 4096x4096 r=8 (median)", f"{pm['factored_seconds_median'] * 1e3:.2f} ms"),
        ("per-matrix speed-up factored vs dense", f"{pm['speedup']:.0f}x"),
        ("whole adapter / one dense SVD", f"{result['whole_adapter_vs_one_dense_svd']:.2f}"),
        ("singular values agree to (max rel)", f"{pm['max_rel_diff_singular_values']:.1e}"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"\nwritten to {RESULTS / 'spectra.json'} (threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
