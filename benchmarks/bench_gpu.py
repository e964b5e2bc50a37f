"""Our LoRA against PEFT's on a real-size model, and LoRA against full fine-tuning: step time and peak memory.

A model is built from its config with random weights (no download): GPT-2 124M (``--model gpt2``, the
default; LoRA on ``c_attn``) or a Llama-family 0.5B (``--model llama-0.5b``: Qwen2-0.5B's shape as a
LlamaConfig, 24 layers, hidden 896, GQA 14/2 heads, tied 151,936-token embeddings; LoRA on q_proj,v_proj).
Every variant trains the same weights (one seed) on the same random tokens for the same steps with AdamW,
the same rank, alpha and targets, each in a fresh child process so that no variant inherits another's
allocator state or imports:

* ``full``        every parameter trains;
* ``lora-ours``   :func:`lora_analysis.apply_lora` (what the trainer's ``prepare_model`` calls);
* ``lora-peft``   ``peft.get_peft_model`` with the same ``LoraConfig`` settings;
* ``+bf16``       the same under ``torch.autocast(bfloat16)`` (weights and LoRA factors stay float32);
* ``+gc``         with gradient checkpointing (:func:`lora_analysis.training.runtime.enable_gradient_checkpointing`,
                  Hugging Face's non-reentrant checkpointing, for both implementations).

Step time: the median over the timed steps (after ``--warmup`` untimed ones; CUDA synchronised; with
``--repeats N`` the median over N rounds of all variants, the order rotated each round). Memory:
on CUDA ``torch.cuda.max_memory_allocated`` over the steps (``peak_bytes``: weights + gradients + AdamW
states + activations, what a card must hold) and that minus what was allocated before the first step
(``training_bytes``). On CPU the child's peak resident set size over the steps (Linux ``VmHWM``, reset by
``/proc/self/clear_refs`` just before the first step: ``peak_bytes``, which includes the interpreter and
the libraries, the same in every child) and that minus the RSS at the reset (``training_bytes``: what the
steps themselves added). The LoRA paper's "3× less memory" (GPT-3 175B) counts the optimizer states that
frozen weights no longer need; at 124M parameters the activations weigh more, so expect less.

    python -m benchmarks.bench_gpu --device cuda [--model gpt2|llama-0.5b] [--batch-size 8 --seq-len 512]
    python -m benchmarks.bench_gpu --small        # a tiny GPT-2 on CPU: a smoke run of the same code

Writes benchmarks/results/bench_gpu[_small][_MODEL].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SEED = 0
# no dropout: every variant then computes the same function of the same weights (PEFT draws its A init from
# the global RNG, which would otherwise shift the dropout masks), and the first losses agree
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def model_config(name: str, small: bool):
    """The transformers config of the benchmarked model (random weights are drawn from it)."""
    import transformers
    if small:
        return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128,
                                       bos_token_id=0, eos_token_id=0, **GPT2_NO_DROPOUT)
    if name == "gpt2":
        return transformers.GPT2Config(**GPT2_NO_DROPOUT)     # GPT-2 small: 12 × 768, 124M parameters
    if name == "llama-0.5b":
        return transformers.LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                        max_position_embeddings=2048, tie_word_embeddings=True,
                                        bos_token_id=0, eos_token_id=0)
    raise ValueError(f"model={name!r} is not known here: choose gpt2 or llama-0.5b")


def default_targets(config) -> list[str]:
    return ["c_attn"] if config.model_type == "gpt2" else ["q_proj", "v_proj"]


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ≥ 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(spec: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to call, the Hugging Face model inside it) for one variant, on the CPU, trainable as the
    variant says."""
    import transformers
    from lora_analysis import apply_lora
    from lora_analysis.training.runtime import enable_gradient_checkpointing

    config = model_config(spec["model"], spec["small"])
    torch.manual_seed(SEED)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    targets = spec["targets"]
    if spec["method"] == "full":
        hf.requires_grad_(True)
        model = hf
    elif spec["method"] == "ours":
        apply_lora(hf, targets, rank=spec["rank"], alpha=spec["alpha"], dropout=0.0,
                   generator=torch.Generator().manual_seed(SEED))
        model = hf
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(hf, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                              target_modules=targets, bias="none",
                                              fan_in_fan_out=config.model_type == "gpt2"))
    if spec["gc"]:
        enable_gradient_checkpointing(hf, name=spec["model"])
    return model, hf


def run_variant(spec: dict) -> dict:
    """Train one variant in this (child) process; its step times, memory and losses."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, hf = build(spec)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    steps = spec["warmup"] + spec["steps"]
    tokens = torch.randint(0, hf.config.vocab_size, (steps, spec["batch_size"], spec["seq_len"]),
                           generator=torch.Generator().manual_seed(SEED))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak_reset = True
    else:
        start_bytes = _rss()
        peak_reset = _reset_cpu_peak()
    times, losses = [], []
    for step in range(steps):
        batch = tokens[step].to(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= spec["warmup"]:
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _hwm()
    return {"variant": spec["variant"], "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in hf.parameters()),
            "step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
            "peak_bytes": int(peak), "training_bytes": int(peak - start_bytes), "start_bytes": int(start_bytes),
            "peak_reset": peak_reset, "first_loss": losses[0], "last_loss": losses[-1],
            "attn_implementation": getattr(hf.config, "_attn_implementation", None)}


def median_run(found: list[dict]) -> dict:
    """One variant's repeats as one row: the median of each number (the first run's other fields)."""
    row = dict(found[0])
    for key in ("step_ms", "step_ms_min", "peak_bytes", "training_bytes", "start_bytes"):
        row[key] = statistics.median(r[key] for r in found)
    row["repeats"] = len(found)
    return row


def variants(args) -> list[dict]:
    names = ["full", "lora-ours", "lora-peft"]
    if args.bf16:
        names += ["full+bf16", "lora-ours+bf16", "lora-peft+bf16"]
    if args.gradient_checkpointing:
        names += ["lora-ours+gc", "lora-peft+gc"]
    config = model_config(args.model, args.small)
    targets = args.targets.split(",") if args.targets else default_targets(config)
    out = []
    for name in names:
        base, _, option = name.partition("+")
        out.append({"variant": name, "method": base.removeprefix("lora-"), "bf16": option == "bf16",
                    "gc": option == "gc", "model": args.model, "small": args.small, "targets": targets,
                    "rank": args.rank, "alpha": args.alpha, "batch_size": args.batch_size, "seq_len": args.seq_len,
                    "steps": args.steps, "warmup": args.warmup, "device": args.device, "threads": args.threads})
    return out


def ratios(rows: dict[str, dict]) -> dict:
    """Step time and memory of our LoRA over PEFT's (per option), and full fine-tuning over LoRA."""
    def ratio(a: str, b: str, key: str):
        return round(rows[a][key] / rows[b][key], 3) if a in rows and b in rows and rows[b][key] > 0 else None
    out = {}
    for option in ("", "+bf16", "+gc"):
        ours, peft = f"lora-ours{option}", f"lora-peft{option}"
        if ours in rows and peft in rows:
            out[f"ours_over_peft{option}"] = {k: ratio(ours, peft, k) for k in ("step_ms", "peak_bytes",
                                                                                "training_bytes")}
    for option in ("", "+bf16"):
        if f"full{option}" in rows:
            out[f"full_over_lora{option}"] = {k: ratio(f"full{option}", f"lora-ours{option}", k)
                                              for k in ("step_ms", "peak_bytes", "training_bytes")}
    if "lora-ours+gc" in rows:
        out["gc_over_no_gc"] = {k: ratio("lora-ours+gc", "lora-ours", k) for k in ("step_ms", "peak_bytes",
                                                                                  "training_bytes")}
    return out


def table(result: dict) -> str:
    mb = 2 ** 20
    lines = ["| variant | trainable params | step ms (median) | peak MiB | training MiB | loss first → last |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['step_ms']:.1f} | {r['peak_bytes'] / mb:,.0f} "
                     f"| {r['training_bytes'] / mb:,.0f} | {r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    lines.append("")
    for key, value in result["ratios"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}x" for k, v in value.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["gpt2", "llama-0.5b"], default="gpt2")
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 (2 × 64) for a CPU smoke run")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--targets", default=None, help="comma-separated (default: c_attn / q_proj,v_proj)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (cuda), 4 (small)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (cuda), 64 (small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 10 small)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants, order rotated; medians")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per child (default 1 on cpu)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="add bf16-autocast variants (default: on for cuda)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="add gradient-checkpointing variants (default: on)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu, e.g. with --small)")
    args.batch_size = args.batch_size or (4 if args.small else 8)
    args.seq_len = args.seq_len or (64 if args.small else 512)
    args.steps = args.steps or (10 if args.small else 20)
    args.threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.gradient_checkpointing = True if args.gradient_checkpointing is None else args.gradient_checkpointing

    specs = variants(args)
    runs: dict[str, list[dict]] = {spec["variant"]: [] for spec in specs}
    context = multiprocessing.get_context("spawn")
    for round_ in range(args.repeats):
        # one fresh child per variant, one after the other; the order rotates every round so that machine
        # noise hits all variants alike
        shift = round_ % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                r = pool.submit(run_variant, spec).result()
            runs[spec["variant"]].append(r)
            print(f"  {r['variant']}: {r['step_ms']:.1f} ms/step, peak {r['peak_bytes'] / 2**20:,.0f} MiB", flush=True)
    rows = {name: median_run(found) for name, found in runs.items()}
    first = {round(r["first_loss"], 4) for k, r in rows.items() if "bf16" not in k}
    import peft
    import transformers
    result = {"model": "gpt2-small-test" if args.small else args.model, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
              or platform.machine(),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "python": platform.python_version(), "cpu_threads_per_child": args.threads,
              "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "settings": {**{k: specs[0][k] for k in ("targets", "rank", "alpha", "batch_size", "seq_len", "steps",
                                                      "warmup")}, "repeats": args.repeats},
              "memory_kind": ("torch.cuda.max_memory_allocated" if args.device == "cuda"
                              else "child process peak RSS (VmHWM reset before the first step)"),
              "same_first_loss_fp32": len(first) == 1,
              "runs": list(rows.values()), "ratios": ratios(rows)}
    RESULTS.mkdir(exist_ok=True)
    suffix = "_small" if args.small else ("" if args.model == "gpt2" else f"_{args.model}")
    path = RESULTS / f"bench_gpu{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['model']} on {result['device_name']} ({args.device}), r={args.rank}, α={args.alpha:g}, "
          f"targets {','.join(result['settings']['targets'])}, batch {args.batch_size} × {args.seq_len} tokens, "
          f"{args.steps} timed steps; memory: {result['memory_kind']}\n")
    print(table(result))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
