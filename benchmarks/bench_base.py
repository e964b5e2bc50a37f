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

``--llama-7b``: the issue's benchmark at Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads, vocab 32000;
``--layers`` of its 32 layers, default 1, since W0's dense SVDs dominate: on one core a 4096×4096 float32 SVD
takes about 40 s and an 11008×4096 one about 80 s, some 6.5 min a layer), written under ``--tmp`` (deleted at
the end). Each step is the real command in a fresh process, its wall time and peak RSS taken from
the launcher's ``RUSAGE_CHILDREN``; the shards are dropped from the page cache before each step.
Steps: baseline (imports only),
floor (safe_open reads of the adapted modules' tensors), ``spectra ADAPTER --json`` (adapter only),
``spectra ADAPTER --base DIR --json`` with an empty base-SVD cache (cold) and again (cached), the SVDs alone
(W0's exact SVD once per distinct (out, in) shape, in CPU seconds, the top-k of W0 + ΔW per module, and
which method the top-k took), and
``AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)``. Writes
benchmarks/results/bench_base_7b.json and prints a markdown table:

    OMP_NUM_THREADS=1 python -m benchmarks.bench_base --llama-7b --layers 1 --tmp /tmp
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


def write_base(folder: Path, hidden: int, layers: int, gaussian: bool, vocab: int = 32000,
               heads: int | None = None) -> int:
    """The sharded bf16 checkpoint, written shard by shard: the embeddings, one shard per layer, then the
    final norm and the head, each shard built, saved with ``safetensors.torch.save_file`` and dropped before
    the next, so at most one shard (one layer: 386 MiB at Llama-2-7B's widths) is in memory, never the model.
    The index and config.json are those of a Hugging Face Llama folder."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sh = shapes(hidden)
    heads = hidden // 128 if heads is None else heads
    LlamaConfig(hidden_size=hidden, intermediate_size=sh["gate_proj"][0], num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(folder)

    def shard_states():
        yield {"model.embed_tokens.weight": (0.02 * torch.randn(vocab, hidden, generator=g)).bfloat16()}
        for i in range(layers):
            state = {}
            for m in MODULES:
                part = "self_attn" if m in MODULES[:4] else "mlp"
                state[f"model.layers.{i}.{part}.{m}.weight"] = _weight(*sh[m], g, gaussian)
            state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            yield state
        yield {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               "lm_head.weight": (0.02 * torch.randn(vocab, hidden, generator=g)).bfloat16()}

    weight_map, total, n_shards = {}, 0, layers + 2
    for j, state in enumerate(shard_states()):
        name = f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(state, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update({k: name for k in state})
        del state
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


# ---- Llama-2-7B-shaped: the real CLI, each step its own process ---------------------------------------------

LLAMA_2_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000, "layers": 32}
STEPS_7B = {   # step: what it measures (each a fresh process; wall time and peak RSS of that process)
    "baseline": "python + torch + pandas + the spectra CLI's modules imported, nothing read",
    "floor": "read the adapted modules' tensors from the shards with safe_open, one at a time, nothing else",
    "adapter_only": "spectra ADAPTER --json (factored spectra, no base)",
    "cold": "spectra ADAPTER --base DIR --json, fresh LORA_ANALYSIS_HOME (every base SVD computed)",
    "cached": "the same command again (every base SVD read from the cache)",
    "svd": "the SVDs alone, CPU s: W0's exact SVD (once per distinct (out, in) shape, × its modules) "
           "+ top-k of W0+ΔW",
    "transformers": "AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)",
}


def _adapter_base_keys(adapter: Path) -> list[str]:
    """The base checkpoint keys of the adapter's modules (PEFT names, prefix and lora_A removed)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
                      for k in f.keys() if k.endswith(".lora_A.weight"))


def child_7b(mode: str, adapter: Path, base: Path) -> dict:
    """The in-process part of the steps that are not a CLI command (run by :func:`run_7b_step`)."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    out: dict = {}
    if mode == "baseline":
        import pandas  # noqa: F401

        import lora_analysis.analysis.against_base  # noqa: F401
        import lora_analysis.cli.spectra  # noqa: F401
    elif mode == "floor":
        weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        nbytes = 0
        for key in _adapter_base_keys(adapter):
            with safe_open(str(base / weight_map[key]), framework="pt") as f:
                w = f.get_tensor(key)
            nbytes += w.numel() * w.element_size()
            del w
        out["bytes_read"] = nbytes
    elif mode in ("svd", "svd_all"):
        # W0's exact SVD timed as base_svd computes it (same dtype), once per distinct shape ("svd": the cost is
        # the shape's, not the values') or for every module ("svd_all"); the top-k of W0 + ΔW for every module,
        # started as the CLI starts it, from W0's U (read from the cache the cold run filled)
        from lora_analysis.analysis.base_svd import base_svd, top_left_singular
        from lora_analysis.analysis.intruders import DEFAULT_K
        from lora_analysis.analysis.sources import iter_updates

        rows, by_shape = [], {}
        for u in iter_updates(adapter, base):
            shape = tuple(u.shape)      # W and Wᵀ are timed apart: LAPACK's tall and wide paths differ
            t_base = by_shape.get(shape)
            timed = t_base is None or mode == "svd_all"
            if timed:     # CPU seconds (one thread): a shared machine's load changes wall time, not these
                t = time.process_time()
                base_svd(u.w0, device="cpu", cache=False)       # as the CLI computes it (a wide W0 through Wᵀ)
                t_base = by_shape[shape] = time.process_time() - t
            svd = base_svd(u.w0, device="cpu")
            t = time.process_time()
            top = top_left_singular(u, DEFAULT_K, device="cpu", base_u=svd.U, cache=False)   # computed, not read
            rows.append({"name": u.name, "shape": list(u.shape), "base_svd_cpu_s": t_base, "base_svd_timed": timed,
                         "base_svd_was_cached": svd.cached, "topk_cpu_s": time.process_time() - t,
                         "topk_method": top.method, "topk_iterations": top.iterations})
            del u, svd, top
        out["modules"] = rows
        out["base_svd_cpu_seconds"] = sum(r["base_svd_cpu_s"] for r in rows)
        out["topk_cpu_seconds"] = sum(r["topk_cpu_s"] for r in rows)
        out["topk_methods"] = {m: sum(r["topk_method"] == m for r in rows) for m in ("truncated", "exact")}
    elif mode == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["dtype"] = str(next(model.parameters()).dtype)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out["in_process_seconds"] = time.perf_counter() - t0
    return out


def _evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (POSIX_FADV_DONTNEED), so the next process reads them
    from disk as a first visit would; only these files, nothing system-wide."""
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# A small launcher between this process and each measured one: a child's ru_maxrss starts at its parent's
# RSS at fork (Linux carries the pre-exec high-water mark over exec), so a command forked from this process,
# which held a shard while writing, would report this process's peak instead of its own. The launcher is a
# bare interpreter (about 10 MiB): its RUSAGE_CHILDREN is the measured command's own peak.
LAUNCHER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.call(sys.argv[2:]); "
            "s = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'seconds': s, 'maxrss_kib': u.ru_maxrss, "
            "'user_s': u.ru_utime, 'system_s': u.ru_stime}))")


def run_7b_step(cmd: list[str], env: dict, workdir: Path, name: str) -> dict:
    """Run ``cmd`` as a fresh process (through :data:`LAUNCHER`): its wall time and peak RSS (ru_maxrss of
    RUSAGE_CHILDREN in the launcher, KiB on Linux), user/system CPU seconds, its stdout parsed as JSON."""
    out_path, err_path, usage_path = (workdir / f"{name}.{x}" for x in ("out", "err", "usage.json"))
    with open(out_path, "w") as out, open(err_path, "w") as err:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_path)] + cmd, stdout=out, stderr=err, env=env,
                       cwd=ROOT, check=False)
    usage = json.loads(usage_path.read_text()) if usage_path.is_file() else {"rc": "no usage written"}
    if usage["rc"]:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{err_path.read_text()[-3000:]}")
    return {"seconds": usage["seconds"], "peak_rss_mib": usage["maxrss_kib"] / 2**10,
            "user_s": usage["user_s"], "system_s": usage["system_s"], "stdout": json.loads(out_path.read_text())}


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), None)
    import safetensors
    import transformers

    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def _summary_7b(runs: dict) -> dict:
    """What the JSON keeps of each step's stdout (the CLI's JSON is large)."""
    keep = {}
    for step, r in runs.items():
        got = r["stdout"]
        row = {k: v for k, v in r.items() if k != "stdout"}
        if step in ("cold", "cached", "adapter_only"):
            row["modules"] = len(got["modules"])
            if got.get("intruders"):
                row["intruders_total"] = got["intruders"]["total"]
                row["intruders_per_module"] = [m["intruders"] for m in got["intruders"]["modules"]]
                row["base_svd_cached"] = sum(bool(m["base_svd_cached"]) for m in got["relative_norms"])
                row["relative_norm_mean"] = sum(m["relative"] for m in got["relative_norms"]) / row["modules"]
        else:
            row.update(got)
        keep[step] = row
    return keep


def markdown_7b(result: dict) -> str:
    runs, base_rss = result["runs"], result["runs"].get("baseline", {}).get("peak_rss_mib")
    largest = result["setup"]["largest_module_mib_fp32"]
    lines = ["| step | what | wall s (process) | CPU s (process) | in-process s | peak RSS MiB "
             "| RSS above baseline MiB "
             "| (above baseline) / largest fp32 module |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for step, r in runs.items():
        above = None if base_rss is None or step == "floor" else r["peak_rss_mib"] - base_rss   # floor: no pandas
        inner = r.get("in_process_seconds")
        if step == "svd":
            inner = r["base_svd_cpu_seconds"] + r["topk_cpu_seconds"]
        lines.append(f"| {step} | {STEPS_7B[step]} | {r['seconds']:.1f} | {r['user_s'] + r['system_s']:.1f} | "
                     + ("–" if inner is None else f"{inner:.1f}") + f" | {r['peak_rss_mib']:.0f} | "
                     + ("–" if above is None or step == "baseline" else f"{above:.0f}") + " | "
                     + ("–" if above is None or step == "baseline" else f"{above / largest:.2f}") + " |")
    lines.append("")
    lines += [f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def main_7b(args: argparse.Namespace) -> None:
    """The issue's benchmark: a Llama-2-7B-shaped base (``args.layers`` of its 32 layers, full widths)."""
    spec = LLAMA_2_7B
    layers = args.layers
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    load_start = os.getloadavg()
    started = time.time()
    sh = shapes(spec["hidden"])
    assert sh["gate_proj"] == (spec["intermediate"], spec["hidden"])
    largest = max(o * i for o, i in sh.values())
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_base_7b_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        base_bytes = write_base(tmp / "base", spec["hidden"], layers, args.gaussian, spec["vocab"], spec["heads"])
        adapter_bytes = write_adapter(tmp / "adapter", spec["hidden"], layers, args.rank)
        write_s = time.perf_counter() - t
        print(f"wrote {base_bytes / 2**30:.2f} GiB of bf16 shards + a {adapter_bytes / 2**20:.1f} MiB adapter "
              f"in {write_s:.0f} s under {tmp}", flush=True)
        work = tmp / "logs"
        work.mkdir()
        adapter, base = str(tmp / "adapter"), str(tmp / "base")
        py = [sys.executable, "-m"]
        child = py + ["benchmarks.bench_base", "--child-7b"]
        cli = py + ["lora_analysis", "spectra", adapter]
        commands = {"baseline": child + ["baseline", adapter, base], "floor": child + ["floor", adapter, base],
                    "adapter_only": cli + ["--json"],
                    "cold": cli + ["--base", base, "--json", "--device", "cpu"],
                    "cached": cli + ["--base", base, "--json", "--device", "cpu"],
                    "svd": child + ["svd_all" if args.svd_all else "svd", adapter, base],
                    "transformers": child + ["transformers", adapter, base]}
        runs = {}
        for step, cmd in commands.items():
            if step in args.skip:
                continue
            home = tmp / "home"          # one fresh home: empty for "cold", filled by it for "cached"
            _evict(tmp / "base")
            runs[step] = run_7b_step(cmd, {**env, "LORA_ANALYSIS_HOME": str(home)}, work, step)
            if args.partial:
                Path(args.partial).write_text(json.dumps(runs, indent=1))
            print(f"{step:>13}: {runs[step]['seconds']:8.1f} s, peak RSS {runs[step]['peak_rss_mib']:7.0f} MiB  "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
        cache_mib = sum(f.stat().st_size for f in (tmp / "home").rglob("*.safetensors")) / 2**20
        commands_text = {k: " ".join(v).replace(str(tmp), "$TMP") for k, v in commands.items()}
    runs = _summary_7b(runs)
    floor, svd = runs.get("floor"), runs.get("svd")
    base_rss = runs.get("baseline", {}).get("peak_rss_mib")
    largest_mib = largest * 4 / 2**20

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    svd_s = None if svd is None else svd["base_svd_cpu_seconds"] + svd["topk_cpu_seconds"]
    cold_s, cached_s = runs.get("cold", {}).get("seconds"), runs.get("cached", {}).get("seconds")
    def cpu(step):
        return None if step not in runs else runs[step]["user_s"] + runs[step]["system_s"]

    ratios = {   # CPU seconds (user + system; one thread) where the machine's load would distort wall time
        "cold_cpu_over_floor_cpu_plus_svds_cpu": ratio(cpu("cold"), None if floor is None or svd_s is None
                                                       else cpu("floor") + svd_s),
        "cold_wall_over_floor_wall_plus_svds_cpu": ratio(cold_s, None if floor is None or svd_s is None
                                                         else floor["seconds"] + svd_s),
        "cached_cpu_over_adapter_only_cpu": ratio(cpu("cached"), cpu("adapter_only")),
        "cached_cpu_minus_adapter_only_cpu_over_topk_cpu": ratio(
            None if cpu("cached") is None or cpu("adapter_only") is None else cpu("cached") - cpu("adapter_only"),
            None if svd is None else svd["topk_cpu_seconds"]),
        "cold_over_floor": ratio(cold_s, None if floor is None else floor["seconds"]),
        "cached_over_adapter_only": ratio(cached_s, runs.get("adapter_only", {}).get("seconds")),
        "cached_over_cold": ratio(cached_s, cold_s),
        "transformers_over_cold": ratio(runs.get("transformers", {}).get("seconds"), cold_s),
        "cold_peak_rss_over_largest_fp32": ratio(runs.get("cold", {}).get("peak_rss_mib"), largest_mib),
        "cold_rss_above_baseline_over_largest_fp32": ratio(
            None if base_rss is None or "cold" not in runs else runs["cold"]["peak_rss_mib"] - base_rss, largest_mib),
        "transformers_rss_above_baseline_over_largest_fp32": ratio(
            None if base_rss is None or "transformers" not in runs else runs["transformers"]["peak_rss_mib"] - base_rss,
            largest_mib),
    }
    if "cold" in runs and "cached" in runs:
        ratios["cached_same_intruders_as_cold"] = runs["cold"].get("intruders_per_module") == \
            runs["cached"].get("intruders_per_module")
    n_mod = 7 * layers
    per_layer = {k: runs[k]["seconds"] / layers for k in ("cold", "cached") if k in runs}
    result = {
        "setup": {"shape": "Llama-2-7B widths", **{k: spec[k] for k in ("hidden", "intermediate", "heads", "vocab")},
                  "layers": layers, "layers_of_llama_2_7b": spec["layers"], "rank": args.rank,
                  "adapted_modules": n_mod, "targets": list(MODULES),
                  "w0": "gaussian" if args.gaussian else "gaussian bulk + 48 decaying strong directions",
                  "dtype_on_disk": "bfloat16", "shards": layers + 2, "base_gib_on_disk": base_bytes / 2**30,
                  "adapter_mib": adapter_bytes / 2**20, "largest_module_mib_fp32": largest_mib,
                  "base_svd_cache_mib": cache_mib, "write_seconds": write_s,
                  "page_cache": "the shards' pages dropped (posix_fadvise DONTNEED) before every step"},
        "commands": commands_text,
        "runs": runs,
        "ratios": ratios,
        "projection_32_layers": {
            "note": "per-layer cost × 32 (every layer has the same shapes); not measured",
            **{f"{k}_minutes": 32 * v / 60 for k, v in per_layer.items()},
            "transformers_float32_gib": (32 * sum(o * i for o, i in sh.values()) + 2 * spec["vocab"] * spec["hidden"])
            * 4 / 2**30},
        "environment": {**_machine(), "omp_num_threads": threads,
                        "load_average_before": list(load_start), "load_average_after": list(os.getloadavg()),
                        "wall_minutes": (time.time() - started) / 60},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown_7b(result))
    print(f"\nload average before {load_start[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"OMP_NUM_THREADS={threads}; written to {RESULTS / args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=None, help="default 2 (1 with --llama-7b)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gaussian", action="store_true", help="pure Gaussian W0 (worst case for truncation)")
    parser.add_argument("--skip", nargs="*", default=[], help="modes to skip (e.g. dict transformers)")
    parser.add_argument("--out", default=None, help="file name under benchmarks/results/ (default base.json)")
    parser.add_argument("--llama-7b", action="store_true",
                        help="the Llama-2-7B-shaped benchmark (hidden 4096, MLP 11008, 32 heads, vocab 32000; "
                             "--layers of its 32 layers, default 1): the real CLI in child processes, "
                             "written to --out (default bench_base_7b.json)")
    parser.add_argument("--svd-all", action="store_true",
                        help="with --llama-7b: time W0's SVD for every module, not once per distinct shape")
    parser.add_argument("--partial", default=None, help=argparse.SUPPRESS)   # each step's result as it comes
    parser.add_argument("--tmp", default=None, help="where the checkpoint is written (default: the system's temp)")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-7b", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_7b:
        mode, adapter, base = args.child_7b
        print(json.dumps(child_7b(mode, Path(adapter), Path(base))))
        return
    if args.llama_7b:
        if args.layers is None:
            args.layers = 1
        if args.out is None:
            args.out = "bench_base_7b.json"
        main_7b(args)
        return
    args.layers = 2 if args.layers is None else args.layers
    args.out = "base.json" if args.out is None else args.out
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
