"""Base-dependent analyses against a real (sharded, bf16) checkpoint, streamed module by module, in one run.

A Llama-shaped base (hidden d, MLP 2.6875·d as Llama-2, ``--layers`` layers, vocab 32000, bf16) is written as
sharded safetensors with model.safetensors.index.json and a config.json, plus an r=16 PEFT adapter on all
seven linear layers of every block. W0 is a Gaussian bulk plus a few dozen strong directions with decaying
strength (trained weights have such a head; a pure Gaussian matrix, the worst case for the truncated SVD,
is available with ``--gaussian``). Each measurement runs in a fresh child process, so its peak RSS (VmHWM)
is its own:

    baseline       python + torch + this package imported, nothing read (peak RSS is measured above it)
    floor          read the adapted modules' tensors from disk, one at a time, nothing else
    adapter only   the adapter's factored spectra (no base)
    first visit    amplification + intruders + ‖ΔW‖/‖W0‖, streamed, empty base-SVD cache
    second visit   the same with the base SVDs cached (a second adapter on the same base, a page revisit)
    exact          the second visit with the exact dense SVD of W0 + ΔW instead of the truncated one
    all at once    the former route: every W0 loaded into a dict, then the analyses (cache warm)
    transformers   AutoModelForCausalLM.from_pretrained of the folder (what the base side used to need)

    OMP_NUM_THREADS=1 python -m benchmarks.bench_base [--hidden 1024] [--layers 2] [--rank 16] [--gaussian]

(one thread: on a shared 2-core machine two OpenMP threads spin against each other and every small product
gets tens of times slower; the ratios, not the seconds, are the result)

Writes benchmarks/results/base.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(hidden: int) -> dict[str, tuple[int, int]]:
    inter = int(round(hidden * 11008 / 4096 / 64)) * 64
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def _weight(out_f: int, in_f: int, g: torch.Generator, gaussian: bool) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    if not gaussian:      # 48 strong directions, strengths 8·j^-0.7, over the bulk (whose top σ is about 2)
        k = 48
        strength = 8.0 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.7
        w += (torch.randn(out_f, k, generator=g) / out_f**0.5 * strength) @ (torch.randn(k, in_f, generator=g)
                                                                           / in_f**0.5)
    return (0.02 * w).to(torch.bfloat16)


def write_base(folder: Path, hidden: int, layers: int, gaussian: bool, vocab: int = 32000) -> int:
    """The sharded bf16 checkpoint (one shard per layer; embeddings in the first, head in the last)."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sh = shapes(hidden)
    LlamaConfig(hidden_size=hidden, intermediate_size=sh["gate_proj"][0], num_hidden_layers=layers,
                num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                torch_dtype="bfloat16").save_pretrained(folder)
    weight_map, total = {}, 0
    for i in range(layers):
        state = {}
        if i == 0:
            state["model.embed_tokens.weight"] = (0.02 * torch.randn(vocab, hidden, generator=g)).bfloat16()
        for m in MODULES:
            part = "self_attn" if m in MODULES[:4] else "mlp"
            state[f"model.layers.{i}.{part}.{m}.weight"] = _weight(*sh[m], g, gaussian)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        if i == layers - 1:
            state["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            state["lm_head.weight"] = (0.02 * torch.randn(vocab, hidden, generator=g)).bfloat16()
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(state, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update({k: name for k in state})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def write_adapter(folder: Path, hidden: int, layers: int, rank: int) -> int:
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(layers):
        for m, (out_f, in_f) in shapes(hidden).items():
            part = "self_attn" if m in MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{m}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            # strengths from weak to strong across modules, so some modules have intruders and some not
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 10 ** (-3.5 + MODULES.index(m) / 3)
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": list(MODULES), "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
              "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return (folder / "adapter_model.safetensors").stat().st_size


# ---- the measurements, each in its own process ------------------------------------------------------------

def rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def child(mode: str, adapter: Path, base: Path) -> dict:
    from lora_analysis.analysis.sources import adapter_shapes, iter_updates, load_updates
    from lora_analysis.lora.adapter_io import read_adapter

    rss0 = rss_mib()
    t0 = time.perf_counter()
    out: dict = {}
    if mode == "baseline":       # the interpreter, torch and this package imported, nothing read
        from lora_analysis.analysis import against_base

        out["imported"] = against_base.__name__
    elif mode == "floor":
        from lora_analysis.store.base_weights import iter_base_weights

        nbytes = 0
        for _, w in iter_base_weights(base, adapter_shapes(read_adapter(adapter))):
            nbytes += w.numel() * w.element_size()
            del w
        out["bytes_read"] = nbytes
    elif mode == "adapter":
        from lora_analysis.analysis.spectra import spectra_frame

        _, updates = load_updates(adapter)
        out["modules"] = len(spectra_frame(updates))
    elif mode in ("first", "second", "exact"):
        from lora_analysis.analysis.against_base import analyse_against_base

        result = analyse_against_base(iter_updates(adapter, base), method="exact" if mode == "exact" else "auto",
                                      device="cpu")
        out["intruders"] = result.intruders["intruders"].tolist()
        out["min_max_cos"] = result.intruders["min_max_cos"].tolist()
        out["names"] = result.intruders["name"].tolist()
        out["cached"] = int(result.norms["base_svd_cached"].sum())
        out["relative_mean"] = float(result.norms["relative"].mean())
    elif mode == "dict":
        from lora_analysis.analysis.amplification import amplification_frame
        from lora_analysis.analysis.intruders import intruders_frame

        _, updates = load_updates(adapter, base)
        amplification_frame(updates, device="cpu")
        out["intruders"] = intruders_frame(updates, device="cpu")["intruders"].tolist()
    elif mode == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base)
        out["dtype"] = str(next(model.parameters()).dtype)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out.update(seconds=time.perf_counter() - t0, peak_rss_mib=rss_mib(), rss_before_mib=rss0)
    return out


def run_child(mode: str, adapter: Path, base: Path, home: Path) -> dict:
    env = {**os.environ, "LORA_ANALYSIS_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_base", "--child", mode, str(adapter), str(base)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gaussian", action="store_true", help="pure Gaussian W0 (worst case for truncation)")
    parser.add_argument("--skip", nargs="*", default=[], help="modes to skip (e.g. dict transformers)")
    parser.add_argument("--out", default="base.json", help="file name under benchmarks/results/")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, adapter, base = args.child
        print(json.dumps(child(mode, Path(adapter), Path(base))))
        return

    load_start = os.getloadavg()
    sh = shapes(args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_bytes = write_base(tmp / "base", args.hidden, args.layers, args.gaussian)
        adapter_bytes = write_adapter(tmp / "adapter", args.hidden, args.layers, args.rank)
        (tmp / "home").mkdir()
        res = {}
        for mode in ("baseline", "floor", "adapter", "first", "second", "exact", "dict", "transformers"):
            if mode in args.skip:
                continue
            res[mode] = run_child(mode, tmp / "adapter", tmp / "base", tmp / "home")
            print(f"{mode:>12}: {res[mode]['seconds']:8.2f} s, peak RSS {res[mode]['peak_rss_mib']:7.0f} MiB",
                  flush=True)
        cache_mib = sum(f.stat().st_size for f in (tmp / "home").rglob("*.safetensors")) / 2**20
    largest = max(o * i for o, i in sh.values())
    agree = None
    if "exact" in res and "second" in res:
        agree = {"counts_equal": res["exact"]["intruders"] == res["second"]["intruders"],
                 "max_abs_diff_min_max_cos": max(abs(a - b) for a, b in zip(res["exact"]["min_max_cos"],
                                                                            res["second"]["min_max_cos"])),
                 "total_intruders": sum(res["second"]["intruders"])}
    result = {
        "setup": {"hidden": args.hidden, "intermediate": sh["gate_proj"][0], "layers": args.layers, "rank": args.rank,
                  "w0": "gaussian" if args.gaussian else "gaussian bulk + 48 decaying strong directions",
                  "modules": 7 * args.layers, "base_mib_on_disk": base_bytes / 2**20,
                  "adapted_modules_mib_bf16": res.get("floor", {}).get("bytes_read", 0) / 2**20,
                  "largest_module_mib_bf16": largest * 2 / 2**20, "largest_module_mib_fp32": largest * 4 / 2**20,
                  "adapter_mib": adapter_bytes / 2**20, "base_svd_cache_mib": cache_mib},
        "runs": res,
        "ratios": {
            "first_over_floor": res["first"]["seconds"] / res["floor"]["seconds"] if "first" in res else None,
            "second_over_first": res["second"]["seconds"] / res["first"]["seconds"] if "second" in res else None,
            "second_over_adapter_only": (res["second"]["seconds"] / res["adapter"]["seconds"]
                                         if "second" in res and "adapter" in res else None),
            "exact_over_second": res["exact"]["seconds"] / res["second"]["seconds"] if "exact" in res else None,
        },
        # peak RSS above the baseline process (python + torch + this package, nothing read), in MiB and in
        # units of the largest module's W0 as float32
        "rss_growth_mib": {m: r["peak_rss_mib"] - res["baseline"]["peak_rss_mib"] for m, r in res.items()
                           if m != "baseline"} if "baseline" in res else None,

        "truncated_vs_exact": agree,
        "environment": {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "load_average_start_end": [load_start[0], os.getloadavg()[0]],
                        "platform": platform.platform(), "python": platform.python_version()},
    }
    if result["rss_growth_mib"]:
        result["rss_growth_in_largest_modules_fp32"] = {m: g / (largest * 4 / 2**20)
                                                        for m, g in result["rss_growth_mib"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("setup", "ratios", "truncated_vs_exact", "rss_growth_mib",
                                                 "rss_growth_in_largest_modules_fp32")}, indent=2))
    print(f"\nwritten to {RESULTS / args.out}")


if __name__ == "__main__":
    main()
