"""``python -m lora_analysis spectra`` and ``similarity``: what an adapter learned, from its files alone.

    spectra ADAPTER_DIR [--base MODEL_OR_WEIGHTS] [--json] [--html report.html]
    similarity ADAPTER_A ADAPTER_B [--side A|input|output] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pandas as pd

from . import help_for
from ..analysis import registry
from ..analysis.similarity import adapter_similarity, similarity_summary_frame
from ..analysis.sources import load_updates

NEEDS_BASE = ("amplification and intruder dimensions were skipped: both compare ΔW with the base weights W0, "
              "which an adapter does not contain; pass --base MODEL_DIR_OR_WEIGHTS.safetensors to include them")
# the registry's entries this command shows, with their registered defaults
SPECTRA, AMPLIFICATION, INTRUDERS = (registry.get(n) for n in ("spectra", "amplification", "intruders"))
DEFAULT_K, DEFAULT_EPSILON = INTRUDERS.param("k").default, INTRUDERS.param("epsilon").default
JSON_COLUMNS = ["name", "kind", "shape", "rank", "scaling", "singular_values", "fro_norm", "spectral_norm",
                "stable_rank", "effective_rank", "rank_90", "rank_99", "numerical_rank"]
TABLE_COLUMNS = ["name", "out_features", "in_features", "rank", "scaling", "fro_norm", "spectral_norm",
                 "stable_rank", "effective_rank", "rank_90", "rank_99"]

SPECTRA_EXAMPLES = """\
examples:
  %(prog)s path/to/adapter
      per-module singular values, norms and ranks of ΔW, from the adapter's two files alone
  %(prog)s path/to/adapter --base path/to/base-model --html spectra.html
      also amplification and intruder dimensions against the base weights W0, and an offline HTML report
  %(prog)s ~/.local/share/lora-analysis/runs/RUN_ID/adapter --json
      a run of the run store, as one JSON object (lora-analysis runs show RUN_ID prints its folder)"""
SIMILARITY_EXAMPLES = """\
examples:
  %(prog)s runs/rank8/adapter runs/rank64/adapter
      how much of rank 8's top directions rank 64 also learned (the LoRA paper's Figure 3)
  %(prog)s adapter_seed0 adapter_seed1 --side output --json
      two seeds of one setting, compared by ΔW's output directions, as JSON"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spectra", help=help_for("spectra"), epilog=SPECTRA_EXAMPLES,
                       description="Analyse a PEFT LoRA adapter directory: the singular spectrum of ΔW = s·B·A per "
                                   "module (computed factored, never dense), norms, stable/effective rank, "
                                   "rank for 90/99 percent energy; with --base also amplification (LoRA paper "
                                   "Table 7) and intruder dimensions.")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None,
                   help="base weights: a .safetensors file (keys <module>.weight) or a Hugging Face model "
                        "directory / hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (works offline)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"intruders: top-k singular vectors (default {DEFAULT_K})")
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help=f"intruders: cosine threshold (default {DEFAULT_EPSILON})")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where W0's SVDs run (default auto: a GPU when present); each module's base SVD is "
                        "cached on disk, so a second adapter on the same base skips it")
    p.set_defaults(func=run_spectra)

    s = sub.add_parser("similarity", help=help_for("similarity"), epilog=SIMILARITY_EXAMPLES,
                       description="φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) per module both adapters share. "
                                   "Side A (default, as in the paper): right-singular vectors of the A matrices; "
                                   "input / output: ΔW's right / left singular vectors.")
    s.add_argument("adapter_a", help="first adapter directory")
    s.add_argument("adapter_b", help="second adapter directory")
    s.add_argument("--side", choices=("A", "input", "output"), default="A", help="which directions (default A)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.set_defaults(func=run_similarity)


def _clean(value):
    """JSON-safe: inf/nan become strings (JSON has no such numbers), numpy scalars plain Python."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        return _clean(value.item())
    return value


def _records(frame: pd.DataFrame, columns: list[str] | None = None) -> list[dict]:
    frame = frame if columns is None else frame[columns]
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def run_spectra(args: argparse.Namespace) -> int:
    adapter, updates = load_updates(args.adapter)      # the factors only: W0 is streamed module by module below
    inputs = registry.Inputs.from_updates({str(args.adapter): updates})
    results = [SPECTRA.run(inputs)]
    frame = results[0].value
    amp = intr = norms = source = None
    if args.base is not None:
        from ..analysis.against_base import analyse_against_base
        from ..analysis.sources import iter_updates, open_base

        source = open_base(args.base)
        base = analyse_against_base(iter_updates(adapter, source), k=args.k, epsilon=args.epsilon,
                                    device=args.device, progress=sys.stderr.isatty(), total=len(adapter.modules))
        amp, intr, norms = base.amplification, base.intruders, base.norms
        if args.html:     # the report's sections come from the registry, which holds every W0 at once
            _, with_w0 = load_updates(args.adapter, source)
            full = registry.Inputs.from_updates({str(args.adapter): with_w0})
            results += [AMPLIFICATION.run(full), INTRUDERS.run(full, k=args.k, epsilon=args.epsilon)]
    if args.html:
        _write_html(args, results)
    if args.json:
        out = {"adapter": str(adapter.path), "base": args.base, "modules": _records(frame, JSON_COLUMNS),
               "base_read": None if source is None else source.describe(),
               "base_revision": None if source is None else source.revision,
               "relative_norms": None if norms is None else _records(norms),
               "amplification": None if amp is None else _records(amp),
               "intruders": None if intr is None else {"k": args.k, "epsilon": args.epsilon,
                                                       "total": int(intr["intruders"].sum()),
                                                       "modules": _records(intr)},
               "skipped": {} if amp is not None else {"amplification": NEEDS_BASE, "intruders": NEEDS_BASE}}
        if amp is None:
            print(NEEDS_BASE, file=sys.stderr)   # stdout holds exactly one JSON object
        print(json.dumps(out, indent=2))
        return 0
    print(f"{adapter.path}: {len(frame)} adapted modules, ΔW = scaling·B·A (spectra computed factored)")
    print(frame[TABLE_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if amp is None:
        print(f"\n{NEEDS_BASE}")
    else:
        print("\nAmplification (LoRA paper Table 7): ‖ΔW‖_F / ‖UᵀW0V‖_F, U, V = ΔW's top-r singular vectors")
        print(amp.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"\nIntruder dimensions (top-{args.k} left singular vectors of W0+ΔW with max |cos| < {args.epsilon} "
              f"against W0's): {int(intr['intruders'].sum())} in total")
        print(intr.drop(columns=["intruder_indices"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.html:
        print(f"\nreport written to {args.html}")
    return 0


def _write_html(args: argparse.Namespace, results: list) -> None:
    from ..report import Section, write_report

    sections = [r.section() for r in results]
    if len(results) == 1:
        sections.append(Section("Amplification and intruder dimensions", NEEDS_BASE))
    write_report(args.html, f"LoRA spectra: {args.adapter}", sections,
                 configs={"adapter": str(args.adapter), "base": args.base,
                          "analyses": {r.name: r.params for r in results}})


def run_similarity(args: argparse.Namespace) -> int:
    _, first = load_updates(args.adapter_a)
    _, second = load_updates(args.adapter_b)
    results = adapter_similarity(first, second, side=args.side)
    summary = similarity_summary_frame(results)
    if args.json:
        out = {"adapter_a": args.adapter_a, "adapter_b": args.adapter_b, "side": args.side,
               "modules": {name: {"phi": r.phi.tolist(), "d": r.d, **{k: _clean(v) for k, v in r.summary().items()
                                                                      if k not in ("name",)}}
                           for name, r in results.items()},
               "summary": {"modules": len(results), "phi_top1_mean": float(summary["phi_top1"].mean()),
                           "phi_mean": float(summary["phi_mean"].mean()),
                           "baseline_mean": float(summary["baseline_mean"].mean())}}
        print(json.dumps(out, indent=2))
        return 0
    print(f"φ between {args.adapter_a} and {args.adapter_b} (side {args.side}); random subspaces give "
          "about max(i, j)/d")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
