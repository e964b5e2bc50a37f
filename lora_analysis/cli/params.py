"""``python -m lora_analysis params``: how many parameters LoRA trains, for a preset, a config or a matrix."""

from __future__ import annotations

import argparse
import json

import pandas as pd

from . import help_for
from ..lora.config import ALL_LINEAR, format_targets, parse_targets
from ..params import (DEFAULT_TARGETS, PRESETS, adapter_file_size, build_from_config, build_preset,
                      estimate_training_memory, lora_parameter_count, matrix_count, parse_shape)

EXAMPLES = """\
examples:
  %(prog)s --preset llama-2-7b --rank 8
      LoRA on LLaMA-2-7B's q_proj and v_proj: per-module counts, the adapter file and training memory
  %(prog)s --preset roberta-base --rank 16 --targets all-linear
      every linear layer of RoBERTa-base at rank 16
  %(prog)s --config path/to/model/config.json --rank 4 --json
      any Hugging Face config.json (nothing is downloaded; no weights are read), as one JSON object
  %(prog)s --shape 4096x4096 --rank 8
      one 4096x4096 matrix: r*(d+k) values instead of d*k"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help=help_for("params"), epilog=EXAMPLES,
                       description="Count LoRA's trainable parameters for a preset architecture, any Hugging "
                                   "Face config.json, or a single OUTxIN matrix, against full fine-tuning; "
                                   "with the adapter's file size and the training memory of both.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="architecture by shape only (no download)")
    src.add_argument("--config", help="path to a Hugging Face config.json (or a directory holding one)")
    src.add_argument("--shape", help="a single matrix, OUTxIN (e.g. 1000x1000)")
    p.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default=None,
                   help="comma-separated module-name suffixes, re:REGEX (matched against the whole module "
                        "name), or all-linear (default: the preset's attention query/value modules; "
                        "all-linear for --config)")
    p.add_argument("--dtype", default="bfloat16", help="training dtype for the memory estimate (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.shape:
        count, source, targets = matrix_count(*parse_shape(args.shape), args.rank), args.shape, None
    else:
        if args.preset:
            model, source, default_targets = build_preset(args.preset), args.preset, DEFAULT_TARGETS[args.preset]
        else:
            model, source, default_targets = build_from_config(args.config), args.config, ALL_LINEAR
        targets = parse_targets(args.targets) or default_targets
        count = lora_parameter_count(model, targets, args.rank, args.alpha, args.rslora)
    memory = estimate_training_memory(count.total - count.lora_params, count.lora_params, args.dtype)
    file_size = adapter_file_size(count.modules)
    if args.json:
        # one schema in every mode: a single matrix is reported as a model with one bias-free module
        full = count.full_params_of_targets
        out = {"source": source, "shape": count.to_dict()["modules"][0]["shape"] if args.shape else None,
               "rank": args.rank, "alpha": args.alpha if args.alpha is not None else args.rank,
               "rslora": args.rslora, "targets": targets, **count.to_dict(),
               "full_params": full, "ratio": full / count.lora_params,
               "percent_fewer": 100.0 * (1 - count.lora_params / full),
               "adapter_file_bytes": file_size,
               "memory_bytes": {"dtype": args.dtype, "full": memory.full_total, "lora": memory.lora_total,
                                "by_part": memory.table.to_dict(orient="index")}}
        print(json.dumps(out, indent=2))
        return 0
    if args.shape:
        row = count.modules.iloc[0]
        print(f"{row['out_features']}x{row['in_features']} matrix: full fine-tuning trains {row['full_params']:,} "
              f"values; LoRA at r={row['rank']} trains r*(d+k) = {row['lora_params']:,} ({row['ratio']:.4g}x "
              f"fewer, {100.0 * (1 - row['lora_params'] / row['full_params']):.1f}% fewer)")
        return 0
    table = count.modules.copy()
    shown = table if len(table) <= 12 else pd.concat([table.head(6), table.tail(6)])
    print(f"{source}: LoRA r={args.rank} on {format_targets(targets)}")
    print(shown.to_string(index=False, formatters={"ratio": "{:.1f}x".format, "full_params": "{:,}".format,
                                                   "lora_params": "{:,}".format}))
    if len(table) > 12:
        print(f"... {len(table)} modules in all")
    print(f"\ntrainable params: {count.trainable:,} || all params: {count.total:,} || "
          f"trainable%: {count.trainable_percent:.4f}")
    print(f"adapter file: {file_size / 2**20:.2f} MiB (fp32 safetensors)")
    gib = 2**30
    print(f"training memory ({args.dtype}, AdamW, activations excluded): full fine-tuning "
          f"{memory.full_total / gib:.1f} GiB vs LoRA {memory.lora_total / gib:.1f} GiB ({memory.ratio:.1f}x less)")
    return 0
