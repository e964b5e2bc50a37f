"""Every number the README quotes, from one script: regenerate, record, render, embed.

    python -m benchmarks.readme_numbers                    # rerun the demos' results, write the JSON, print the tables
    python -m benchmarks.readme_numbers --write-readme     # ... and rewrite the README's marked blocks
    python -m benchmarks.readme_numbers --render-only --write-readme   # no rerun: render the committed JSON files
    python -m benchmarks.readme_numbers --benchmarks core,training,spectra --suite --write-readme
                                                           # also rerun those benchmark scripts and time the tests

What it measures itself (``benchmarks/results/readme_numbers.json``):
  - the mlp-digits rank sweep with the benchmark's settings (ranks 1..32 at α=16 plus full fine-tuning,
    seed 0, the model's default steps, on the CPU): each run's validation accuracy and trainable
    parameters, the frozen base's accuracy; the sweep is run twice in this process and the two compared
    bit for bit (``repeat_identical``);
  - the tiny-gpt demo (LoRA r=8 on the model's default targets, and full fine-tuning): perplexities;
  - how long ``python -m lora_analysis --help`` takes; with ``--suite``, the test suite's wall time;
  - what the numbers depend on: versions, CPU, thread counts (the process's and each run's, as the runs
    recorded them), deterministic-algorithm setting, BLAS/OpenMP build, the load average before and after,
    the git commit.
The timing rows come from the benchmark scripts' own JSON files in ``benchmarks/results/`` (``--benchmarks``
reruns those scripts first). The README embeds the rendering between ``<!-- readme-numbers:NAME:start -->``
and ``<!-- readme-numbers:NAME:end -->``; ``tests/test_readme.py`` checks the README's blocks equal the
rendering of the committed JSON files, so a number in the README is always one these files hold.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "readme_numbers.json"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- readme-numbers:(?P<name>[a-z-]+):start -->\n)(?P<body>.*?)(<!-- readme-numbers:(?P=name):end -->)",
                   re.S)

DIGITS = {"model": "mlp-digits", "ranks": [1, 2, 4, 8, 16, 32], "alphas": [16], "full_ft": True, "seed": 0,
          "device": "cpu"}
GPT = {"model": "tiny-gpt", "rank": 8, "seed": 0, "device": "cpu"}
# the benchmark scripts whose JSON files the timing rows read, and how each is rerun (--benchmarks)
BENCHMARKS = {
    "core": [["-m", "benchmarks.bench_core"]],
    "training": [["-m", "benchmarks.bench_training"]],
    "spectra": [["-m", "benchmarks.bench_spectra"]],
    "dashboard": [["-m", "benchmarks.bench_dashboard"]],
    "base": [["-m", "benchmarks.bench_base", "--hidden", "2048", "--layers", "2"],
             ["-m", "benchmarks.bench_base", "--hidden", "1024", "--layers", "1", "--out", "base_d1024_L1.json"],
             ["-m", "benchmarks.bench_base", "--hidden", "1024", "--layers", "4", "--out", "base_d1024_L4.json"]],
    "ray": [["-m", "benchmarks.bench_ray"]],
    "base_7b": [["-m", "benchmarks.bench_base", "--llama-7b", "--layers", "1", "--tmp", "/tmp"]],
    "callback": [["-m", "benchmarks.bench_callback"]],
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}        # the benchmarks that share 2 cores between processes ask for it
THREADED = {"base", "base_7b", "ray", "callback"}


# ---- what the numbers depend on ----------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "") or None


def environment() -> dict:
    """Versions, hardware and settings the numbers depend on (beside what each run records itself)."""
    import numpy
    import torch

    from lora_analysis import runstore

    env = runstore.environment("cpu")      # what every run records (versions, CPU, threads, torch's build)
    env.pop("host", None)
    extra = {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
             "numpy": numpy.__version__, "torch_cuda": torch.version.cuda, "threads": torch.get_num_threads(),
             "deterministic": torch.are_deterministic_algorithms_enabled(),
             "torch_parallel": [line.strip() for line in torch.__config__.parallel_info().splitlines()
                                if line.strip() and not set(line.strip()) <= {"-"}]}
    for key, value in extra.items():
        env.setdefault(key, value)
    env["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
                  if k in os.environ}
    env["git_commit"] = _git_commit()
    return env


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ---- measuring ---------------------------------------------------------------------------------------------

def digits_sweep(runs_dir: Path) -> dict:
    from lora_analysis import runstore
    from lora_analysis.training.sweep import run_sweep, sweep_settings

    settings = sweep_settings(**DIGITS)
    t0 = time.perf_counter()
    result = run_sweep(settings, runs_dir=runs_dir)
    seconds = time.perf_counter() - t0
    frame = result.frame
    runs = []
    for r in result.results:
        env = runstore.load_run(r.run_dir).environment
        runs.append({"name": r.metrics.get("label"), "method": r.config.method,
                     "rank": r.config.rank if r.config.method == "lora" else None,
                     "trainable_params": int(r.metrics["trainable_params"]),
                     "val_accuracy": float(r.metrics["val_accuracy"]), "val_loss": float(r.metrics["val_loss"]),
                     "status": r.status, "cpu_threads": env.get("threads", env.get("cpu_threads"))})
    first, full = result.results[0].config, result.results[-1].config      # as resolved for the runs
    return {"settings": {**DIGITS, "steps": first.steps, "lr_lora": first.lr, "lr_full": full.lr,
                         "batch_size": first.batch_size},
            "base_val_accuracy": float(frame["base_val_accuracy"].iloc[0]), "runs": runs,
            "seconds": round(seconds, 2)}


def gpt_demo(runs_dir: Path) -> dict:
    from lora_analysis import runstore
    from lora_analysis.training import TrainConfig, prepare_task, train

    task = prepare_task(GPT["model"])
    pretrain = task.info["pretrain"]
    lora = train(TrainConfig(method="lora", **GPT), task=task, runs_dir=runs_dir)
    full = train(TrainConfig(method="full", model=GPT["model"], seed=GPT["seed"], device=GPT["device"]), task=task,
                 runs_dir=runs_dir)
    envs = [runstore.load_run(r.run_dir).environment for r in (lora, full)]
    threads = {env.get("threads", env.get("cpu_threads")) for env in envs}
    return {"settings": {**GPT, "targets": lora.config.targets, "steps": lora.config.steps},
            "base_val_perplexity": float(lora.metrics["base_val_perplexity"]),
            "lora_val_perplexity": float(lora.metrics["val_perplexity"]),
            "full_val_perplexity": float(full.metrics["val_perplexity"]),
            "lora_trainable_params": int(lora.metrics["trainable_params"]),
            "full_trainable_params": int(full.metrics["trainable_params"]),
            "lora_demo_train_seconds": round(float(lora.metrics.get("train_seconds", 0.0)), 2),
            "pretrain_seconds_when_cached": pretrain.get("seconds"),
            "pretrain_cached_at": _utc(pretrain["created"]) if pretrain.get("created") else None,
            "cpu_threads": sorted(t for t in threads if t)}


def _utc(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def help_seconds(repeats: int = 3) -> float:
    """Median wall time of ``python -m lora_analysis --help`` (a fresh interpreter each time)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lora_analysis", "--help"], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 2)


def test_suite() -> dict:
    """The README's test command, timed: ``python -m pytest -q``."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    tail = lines[-1] if lines else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"seconds": round(seconds, 1), "summary": tail, "exit_code": done.returncode, "failures": failures,
            **counts}


def rerun_benchmarks(names: list[str]) -> None:
    for name in names:
        for argv in BENCHMARKS[name]:
            env = {**os.environ, **(ONE_THREAD if name in THREADED else {})}
            print(f"running python {' '.join(argv)}", file=sys.stderr)
            subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, env=env)


def measure(previous: dict | None, suite: dict | None) -> dict:
    """Rerun what this script measures itself; ``suite``: the test suite's timing, measured before anything
    here changed a results file (else the time kept from ``previous``)."""
    numbers = {"generated": _utc(time.time()),
               "load_average_start": _load(), "environment": environment()}
    with tempfile.TemporaryDirectory(prefix="readme-numbers-") as tmp:
        first = digits_sweep(Path(tmp) / "a")
        again = digits_sweep(Path(tmp) / "b")
        key = [(r["name"], r["val_accuracy"], r["val_loss"]) for r in first["runs"]]
        first["repeat_identical"] = key == [(r["name"], r["val_accuracy"], r["val_loss"]) for r in again["runs"]]
        numbers["mlp_digits"] = first
        numbers["tiny_gpt"] = gpt_demo(Path(tmp) / "gpt")
    numbers["help_seconds"] = help_seconds()
    if suite:
        numbers["test_suite"] = suite
    elif previous and previous.get("test_suite"):
        numbers["test_suite"] = {**previous["test_suite"], "from": previous.get("generated")}
    numbers["load_average_end"] = _load()
    return numbers


# ---- rendering ---------------------------------------------------------------------------------------------

def _read(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _threads(values) -> str:
    """``1 torch thread``, ``1/2 torch threads`` (the distinct counts the runs recorded)."""
    values = sorted({v for v in values if v})
    return f"{'/'.join(map(str, values)) or '?'} torch thread{'' if values == [1] else 's'}"


def render_results(n: dict) -> str:
    env, d, g = n["environment"], n["mlp_digits"], n["tiny_gpt"]
    s = d["settings"]
    commit = env.get("git_commit") or "?"
    commit = commit[:12] + (" plus uncommitted changes" if "uncommitted" in commit else "")
    cpu = env.get("cpu") or env.get("cpu_model", "?")
    lines = [
        f"Regenerated by `python -m benchmarks.readme_numbers` ({n['generated']}, commit {commit}) "
        f"on {env['cpu_count']} CPU cores ({cpu}), Linux {env['machine']}, Python {env['python']}, "
        f"torch {env['torch']}, numpy {env['numpy']}; the small models trained on "
        f"{_threads(r['cpu_threads'] for r in d['runs'])}; 1-minute load "
        f"{n['load_average_start']} before, {n['load_average_end']} after. The JSON "
        "(`benchmarks/results/readme_numbers.json`) records the rest (BLAS/OpenMP build, thread settings).",
        "",
        f"**mlp-digits** (a 3-layer MLP pretrained on upright 8×8 digits, fine-tuned on 90°-rotated ones; 180 "
        f"validation digits, so one digit is 0.006; ranks {', '.join(map(str, s['ranks']))} at α={s['alphas'][0]}, "
        f"{s['steps']} steps, seed {s['seed']}, CPU): the same sweep run twice in one process gave "
        f"{'bit-identical' if d['repeat_identical'] else 'DIFFERENT'} results.",
        "",
        "| run | trainable parameters | validation accuracy |",
        "| --- | ---: | ---: |",
        f"| frozen base | 0 | {d['base_val_accuracy']:.3f} |",
    ]
    lines += [f"| {r['name']} | {r['trainable_params']:,} | {r['val_accuracy']:.3f} |" for r in d["runs"]]
    gs = g["settings"]
    targets = gs["targets"] if isinstance(gs["targets"], str) else ",".join(gs["targets"] or [])
    lines += [
        "",
        f"**tiny-gpt** (a byte-level GPT pretrained on English, fine-tuned on Python source; {gs['steps']} steps, "
        f"seed {gs['seed']}, CPU):",
        "",
        "| run | trainable parameters | validation perplexity |",
        "| --- | ---: | ---: |",
        f"| frozen base | 0 | {g['base_val_perplexity']:.2f} |",
        f"| LoRA r={gs['rank']} on {targets} | {g['lora_trainable_params']:,} | {g['lora_val_perplexity']:.2f} |",
        f"| full fine-tuning | {g['full_trainable_params']:,} | {g['full_val_perplexity']:.2f} |",
        "",
        "| time (wall clock, this machine) | |",
        "| --- | --- |",
    ]
    if g.get("pretrain_seconds_when_cached"):
        when = f", measured when it was cached, {g['pretrain_cached_at']}" if g.get("pretrain_cached_at") else ""
        lines.append(f"| tiny-gpt's first use: pretraining its base (cached afterwards{when}) | "
                     f"{g['pretrain_seconds_when_cached']:.0f} s |")
    lines.append(f"| `python -m lora_analysis --help` | {n['help_seconds']:.2f} s |")
    suite = n.get("test_suite")
    if suite:
        counts = ", ".join(f"{suite[k]} {k}" for k in ("passed", "skipped", "failed") if suite.get(k))
        lines.append(f"| the test suite, `python -m pytest -q` ({counts}) | {suite['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def render_benchmarks() -> str:
    """The timing rows, each from the JSON its benchmark script wrote."""
    rows = []
    core, training, spectra = _read("core.json"), _read("training.json"), _read("spectra.json")
    dashboard, base, ray = _read("dashboard.json"), _read("base.json"), _read("ray.json")
    small = [_read("base_d1024_L1.json"), _read("base_d1024_L4.json")]
    if core:
        t, r = core["train_step_s"], core["ratios"]
        rows += [(f"training step, our LoRA / PEFT ({core['model']})", "`python -m benchmarks.bench_core`",
                  f"**{r['train_step_ours_over_peft']:.2f}** ({t['ours'] * 1e3:.0f} ms vs {t['peft'] * 1e3:.0f} ms)"),
                 ("inference forward (unmerged), ours / PEFT", "same run",
                  f"**{r['inference_unmerged_ours_over_peft']:.2f}**"),
                 ("inference, merged / base model", "same run",
                  f"**{r['inference_merged_over_base']:.3f}** (target within 2%)")]
    if training:
        s, g, r = training["mlp_digits_sweep"], training["tiny_gpt_demo"], training["tiny_gpt_lora_vs_full"]
        rows += [("mlp-digits sweep, 6 ranks + full FT, end to end", "`python -m benchmarks.bench_training`",
                  f"**{s['seconds_end_to_end']:.1f} s** (target < {s['target_seconds']} s)"),
                 ("tiny-gpt LoRA fine-tune demo, base cached", "same run",
                  f"**{g['lora_demo_seconds']:.1f} s** (target < {g['target_seconds']} s)"),
                 ("tiny-gpt LoRA vs full FT: steps/s, training memory (params+grads+AdamW)", "same run",
                  f"LoRA **{r['speed_ratio_lora_over_full']:.2f}×** faster, full FT "
                  f"**{r['memory_ratio_full_over_lora']:.2f}×** more memory")]
    if spectra:
        a, m = spectra["adapter"], spectra["per_matrix_4096_r8"]
        rows += [(f"Llama-2-7B-shaped adapter ({a['modules']} modules, r={a['rank']}, {a['file_mib']:.0f} MiB) "
                  "loaded and analysed", "`python -m benchmarks.bench_spectra`",
                  f"**{a['seconds_end_to_end']:.2f} s**, vs **{m['dense_svd_seconds']:.1f} s** for ONE dense SVD of "
                  "4096×4096"),
                 ("factored vs dense SVD, one 4096×4096 matrix at r=8", "same run",
                  f"**~{round(m['speedup'], -3):,.0f}×** faster; singular values agree to "
                  f"{m['max_rel_diff_singular_values']:.0e}"),
                 ("peak memory growth while analysing that adapter", "same run",
                  f"{a['peak_rss_growth_mib']:.0f} MiB (about the adapter's size)")]
    if dashboard:
        cached = dashboard["page_switch_cached_median_s"].values()
        rows += [("`streamlit run` → Home rendered in Chromium", "`python -m benchmarks.bench_dashboard`",
                  f"**{dashboard['start_to_home_s']:.1f} s**"),
                 ("quick demo click → runs done / → Spectra charts drawn", "same run",
                  f"**{dashboard['quick_demo_runs_s']:.1f} s** / "
                  f"**{dashboard['quick_demo_to_spectra_charts_s']:.1f} s**"),
                 ("page switch on demo data (cached)", "same run",
                  f"**{min(cached):.1f}–{max(cached):.1f} s** per page")]
    if base:
        st, runs, env = base["setup"], base["runs"], base["environment"]
        load = max(env["load_average_start_end"])
        rows += [(f"intruders + amplification streamed from a sharded bf16 base (d={st['hidden']}, {st['layers']} "
                  f"layers, {st['modules']} modules, r={st['rank']}): first visit / base SVDs cached",
                  f"`OMP_NUM_THREADS=1 python -m benchmarks.bench_base --hidden {st['hidden']} --layers {st['layers']}`",
                  f"**{_fmt_s(runs['first']['seconds'])} / {_fmt_s(runs['second']['seconds'])}** "
                  f"({env['cpus']} shared cores, load ~{load:.0f})")]
        tve = base.get("truncated_vs_exact")
        if tve:
            rows.append(("truncated (subspace iteration) vs exact SVD of W0+ΔW", "same run",
                         f"**{base['ratios']['exact_over_second']:.1f}×** faster; intruder counts "
                         f"{'equal' if tve['counts_equal'] else 'DIFFER'}, max-cos within "
                         f"{tve['max_abs_diff_min_max_cos']:.0e}"))
        growth = base["rss_growth_mib"]
        depth = ""
        if all(small):
            depth = (f"; streamed stays flat with depth ({small[0]['rss_growth_mib']['first']:.0f}→"
                     f"{small[1]['rss_growth_mib']['first']:.0f} MiB at {small[0]['setup']['layers']}→"
                     f"{small[1]['setup']['layers']} layers, d={small[0]['setup']['hidden']})")
        if "dict" in growth:
            rows.append(("peak memory growth, W0 streamed vs all W0 at once", "same run",
                         f"**{growth['first']:.0f} MiB vs {growth['dict']:.0f} MiB**{depth}"))
    big = _read("bench_base_7b.json")
    if big:
        st, runs, r, env = big["setup"], big["runs"], big["ratios"], big["environment"]
        load = max(env["load_average_before"][0], env["load_average_after"][0])
        cmd = f"`OMP_NUM_THREADS=1 python -m benchmarks.bench_base --llama-7b --layers {st['layers']}`"
        rows += [(f"`spectra ADAPTER --base DIR --json` on a Llama-2-7B-shaped base ({st['layers']} of "
                  f"{st['layers_of_llama_2_7b']} layers at full width, sharded bf16 safetensors; r={st['rank']} on "
                  f"{st['adapted_modules']} modules): first visit / second visit (cached) / adapter only", cmd,
                  f"**{_fmt_s(runs['cold']['seconds'])} / {_fmt_s(runs['cached']['seconds'])} / "
                  f"{_fmt_s(runs['adapter_only']['seconds'])}** (1 thread, load ~{load:.0f})"),
                 ("the same first visit against its floor: reading the adapted tensors + the SVDs alone (CPU time)",
                  "same run", f"**{r['cold_cpu_over_floor_cpu_plus_svds_cpu']:.2f}×**; second visit "
                  f"**{r['cached_cpu_over_adapter_only_cpu']:.1f}×** the adapter-only time; intruders equal on "
                  f"both visits: {'yes' if r['cached_same_intruders_as_cold'] else 'NO'}"),
                 ("peak RSS of that first visit / of `AutoModelForCausalLM.from_pretrained` in float32, above the "
                  f"interpreter's, in units of the largest module ({st['largest_module_mib_fp32']:.0f} MiB float32)",
                  "same run", f"**{r['cold_rss_above_baseline_over_largest_fp32']:.1f}× / "
                  f"{r['transformers_rss_above_baseline_over_largest_fp32']:.1f}×** (all 32 layers through "
                  f"transformers: {big['projection_32_layers']['transformers_float32_gib']:.1f} GiB, more than this "
                  "machine's memory)")]
    callback = _read("bench_callback.json")
    if callback:
        a, f32, b16 = callback["adapter"], callback["per_call"]["float32"], callback["per_call"]["bfloat16"]
        dense = callback["dense_reference"]
        rows += [(f"training callback: one recording of the spectra of a {a['shape']}-shaped adapter ({a['modules']} "
                  f"modules, r={a['rank']}), float32 / bf16 factors", "`OMP_NUM_THREADS=1 python -m benchmarks.bench_callback`",
                  f"**{f32['record_seconds_median']:.2f} s / {b16['record_seconds_median']:.2f} s** "
                  f"({f32['record_seconds_per_module'] * 1e3:.1f} ms per module; "
                  f"{f32['history_bytes_per_recording'] / 1024:.0f} KiB of history per recording)"),
                 ("the same with dense ΔW SVDs (measured on one module per shape, extrapolated)", "same run",
                  f"**~{dense['seconds_per_call_extrapolated'] / 3600:.1f} h** per recording, "
                  f"{dense['ratio_dense_over_factored_record']:,.0f}× the factored one")]
    if ray:
        rows.append((f"{ray['sweep']['runs']}-run mlp-digits sweep: local / Ray cold / Ray warm (shared folder) / "
                     "Ray warm (runs as bytes)", "`OMP_NUM_THREADS=1 python -m benchmarks.bench_ray`",
                     f"**{_fmt_s(ray['local']['wall_s'])} / {_fmt_s(ray['ray_cold']['wall_s'])} / "
                     f"{_fmt_s(ray['ray_warm_shared']['wall_s'])} / {_fmt_s(ray['ray_warm_bytes']['wall_s'])}** "
                     f"(+{ray['ray_init_s']:.1f} s `ray.init`; load ~{ray['load_avg_1m']:.0f})"))
    lines = ["| what | command | result |", "| --- | --- | --- |"]
    lines += [f"| {what} | {command} | {result} |" for what, command, result in rows]
    return "\n".join(lines) + "\n"


def render_ray() -> str:
    ray = _read("ray.json")
    if not ray:
        return "(no `benchmarks/results/ray.json` yet: run `python -m benchmarks.bench_ray`)\n"
    rows = [("local, in this process", "local"),
            (f"Ray, {ray['cpu_count']} CPUs, first sweep (workers start, import torch)", "ray_cold"),
            ("Ray, warm, shared folder", "ray_warm_shared"), ("Ray, warm, runs sent back as bytes", "ray_warm_bytes")]
    sw = ray["sweep"]
    lines = [f"the same {sw['runs']}-run sweep ({sw['model']}, ranks {sw['ranks'][0]}..{sw['ranks'][-1]} at α=16 "
             f"{'plus full FT' if sw['full_ft'] else ''}, {sw['steps']} steps each), {ray['cpu_count']} CPU cores, one "
             f"torch thread per run, medians of {ray['local']['repeats']} (1-minute load "
             f"~{ray['load_avg_1m']:.0f} while it ran):", "",
             "| executor | wall time | overhead per trial |", "| --- | --- | --- |"]
    lines += [f"| {label} | {_fmt_s(ray[key]['wall_s'])} | {ray[key]['overhead_per_trial_s']:.2f} s |"
              for label, key in rows]
    lines += ["", f"plus {ray['ray_init_s']:.1f} s for `ray.init`; on a warm Ray the {ray['cpu_count']} CPUs give "
                  f"{ray['speedup_warm_shared_over_local']:.1f}× the local speed."]
    return "\n".join(lines) + "\n"


def render(numbers: dict | None = None) -> dict[str, str]:
    """{block name: markdown} of every README block, from ``numbers`` (default: the committed JSON)."""
    numbers = numbers if numbers is not None else json.loads(JSON_PATH.read_text())
    return {"results": render_results(numbers), "benchmarks": render_benchmarks(), "ray": render_ray()}


def readme_blocks(text: str) -> dict[str, str]:
    """{block name: body} of the README's marked blocks."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def write_readme(blocks: dict[str, str], path: Path = README) -> list[str]:
    """Replace each marked block's body in the README; returns the names replaced. A block the README lacks
    is a ``ValueError`` (the markers say where the numbers go)."""
    text = path.read_text()
    missing = set(blocks) - set(readme_blocks(text))
    if missing:
        raise ValueError(f"{path} has no block {sorted(missing)}: add <!-- readme-numbers:NAME:start --> and "
                         "<!-- readme-numbers:NAME:end --> lines where it goes")
    new = BLOCK.sub(lambda m: m.group(1) + blocks.get(m["name"], m["body"]) + m.group(4), text)
    path.write_text(new)
    return sorted(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: render the committed JSON files (with --write-readme: refresh the README)")
    parser.add_argument("--write-readme", action="store_true", help="rewrite the README's marked blocks")
    parser.add_argument("--benchmarks", default="",
                        help=f"comma-separated benchmark scripts to rerun first: {', '.join(BENCHMARKS)} or all")
    parser.add_argument("--suite", action="store_true", help="also time the test suite (python -m pytest -q)")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.benchmarks == "all" else [n for n in args.benchmarks.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: use {', '.join(BENCHMARKS)} or all")
    if args.render_only:
        numbers = json.loads(JSON_PATH.read_text())
    else:
        # the suite first, on the committed files: it checks that the README quotes them exactly, which
        # holds again only once this run has rewritten both
        suite = test_suite() if args.suite else None
        rerun_benchmarks(names)
        previous = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else None
        numbers = measure(previous, suite)
        RESULTS.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(numbers, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {JSON_PATH}", file=sys.stderr)
    blocks = render(numbers)
    for name, body in blocks.items():
        print(f"<!-- {name} -->\n{body}")
    if args.write_readme:
        print(f"rewrote the README's blocks: {', '.join(write_readme(blocks))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
