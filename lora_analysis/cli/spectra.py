"""``python -m lora_analysis spectra`` and ``similarity``: what an adapter learned, from its files alone.

    spectra RUN_OR_ADAPTER [--base MODEL_OR_WEIGHTS] [--device cuda] [--alpha A] [--json] [--html report.html]
    similarity RUN_OR_ADAPTER RUN_OR_ADAPTER [--side A|input|output] [--json] [--runs-dir DIR]

RUN_OR_ADAPTER: a run of the run store (id, unique id prefix, name, or its folder), a PEFT adapter folder, or
one adapter .safetensors file in the kohya / diffusers / loralib format (:mod:`.subjects`,
:mod:`lora_analysis.lora.formats`). A run brings its own base weights when it kept them (the built-in models do).

With a base, ``--json`` gives per module the adapter's metrics and, beside them, ``w0_fro``, ``relative_norm``
(‖ΔW‖_F/‖W0‖_F), ``amplification`` and the intruder test at ``--k``/``--epsilon`` (``intruders``,
``intruder_indices``, ``min_max_cos``), all from one streamed pass (one module's W0 at a time); the frames
``relative_norms``, ``amplification`` and ``intruders`` hold the full rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pandas as pd

from . import add_runs_dir, default_runs_root, help_for
from ..analysis import registry
from ..analysis.similarity import adapter_similarity, similarity_summary_frame
from ..analysis.sources import load_updates
from .subjects import Subject, load_subject_updates, resolve

NEEDS_BASE = ("amplification and intruder dimensions were skipped: both compare ΔW with the base weights W0, "
              "which an adapter does not contain; pass --base MODEL_DIR_OR_WEIGHTS.safetensors to include them")
KOHYA_BASE = (" (kohya module names such as lora_unet_... / lora_te_... name no Hugging Face model: give the "
              "UNet's or the text encoder's own .safetensors file or folder, whose keys are matched by their path "
              "with dots read as underscores)")
# the registry's entries this command shows, with their registered defaults
SPECTRA, AMPLIFICATION, INTRUDERS = (registry.get(n) for n in ("spectra", "amplification", "intruders"))
DEFAULT_K, DEFAULT_EPSILON = INTRUDERS.param("k").default, INTRUDERS.param("epsilon").default
JSON_COLUMNS = ["name", "kind", "shape", "rank", "scaling", "singular_values", "fro_norm", "spectral_norm",
                "stable_rank", "effective_rank", "rank_90", "rank_99", "numerical_rank"]
TABLE_COLUMNS = ["name", "out_features", "in_features", "rank", "scaling", "fro_norm", "spectral_norm",
                 "stable_rank", "effective_rank", "rank_90", "rank_99"]

SPECTRA_EXAMPLES = """\
examples:
  %(prog)s r8
      a run of the run store, by name (train --name r8), id or unique id prefix: per-module singular
      values, norms and ranks of ΔW; with the run's own base weights W0 (the built-in models keep them)
      also amplification and intruder dimensions
  %(prog)s r8 --html spectra.html
      the same, plus an offline HTML report
  %(prog)s path/to/adapter --base path/to/base-model --json
      any PEFT adapter folder (adapter_config.json + adapter_model.safetensors), with the base model's
      folder, a hub id in the local cache or a .safetensors file of W0, as one JSON object
  %(prog)s my_lora.safetensors --base unet/diffusion_pytorch_model.safetensors
      a kohya / diffusers Stable-Diffusion LoRA file (lora_down/lora_up/alpha), against the UNet's weights
  %(prog)s loralib_state.safetensors --alpha 16
      a loralib state dict (lora_A/lora_B): it stores no alpha, so say the one it was trained with
where runs keep their files (lora-analysis runs show RUN prints them):
  {root}/RUN_ID/adapter                    the LoRA adapter, PEFT format
  {root}/RUN_ID/base_weights.safetensors   W0 of the adapted modules (small models)
  {root}/RUN_ID/full_weights.safetensors   W_ft of a full fine-tuning run"""
SIMILARITY_EXAMPLES = """\
examples:
  %(prog)s r8 r32
      how much of rank 8's top directions rank 32 also learned (the LoRA paper's Figure 3); runs by name,
      id or id prefix
  %(prog)s path/to/adapter_seed0 path/to/adapter_seed1 --side output --json
      two PEFT adapter folders, compared by ΔW's output directions, as JSON"""

RUN_OR_ADAPTER = ("a run of the run store (its id, a unique id prefix, its name or its folder), a PEFT adapter "
                  "folder (adapter_config.json + adapter_model.safetensors), or one adapter .safetensors file "
                  "(kohya/diffusers lora_down/lora_up, PEFT-style lora_A/lora_B keys, or loralib lora_A/lora_B)")


def _examples(text: str) -> str:
    return text.replace("{root}", str(default_runs_root()).replace("%", "%%"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spectra", help=help_for("spectra"), epilog=_examples(SPECTRA_EXAMPLES),
                       description="Analyse a LoRA adapter (a PEFT folder, or a kohya/diffusers/loralib "
                                   ".safetensors file): the singular spectrum of ΔW = s·B·A per "
                                   "module (computed factored, never dense), norms, stable/effective rank, "
                                   "rank for 90/99 percent energy; with --base also amplification (LoRA paper "
                                   "Table 7) and intruder dimensions.")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER", help=RUN_OR_ADAPTER)
    p.add_argument("--base", default=None,
                   help="base weights: a .safetensors file (keys <module>.weight) or a Hugging Face model "
                        "directory / hub id (default for a run: the base weights it kept, if any)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (works offline)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"intruders: top-k singular vectors (default {DEFAULT_K})")
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help=f"intruders: cosine threshold (default {DEFAULT_EPSILON})")
    p.add_argument("--alpha", type=float, default=None,
                   help="for an adapter file that stores no alpha (loralib; kohya/diffusers files without "
                        "'.alpha' tensors): the alpha it was trained with, scaling alpha/r (default: alpha = r, "
                        "scaling 1, said in the output)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where W0's SVDs run (default auto: a GPU when present); each module's base SVD is "
                        "cached on disk, so a second adapter on the same base skips it")
    add_runs_dir(p)
    p.set_defaults(func=run_spectra)

    s = sub.add_parser("similarity", help=help_for("similarity"), epilog=_examples(SIMILARITY_EXAMPLES),
                       description="φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) per module both adapters share. "
                                   "Side A (default, as in the paper): right-singular vectors of the A matrices; "
                                   "input / output: ΔW's right / left singular vectors.")
    s.add_argument("adapter_a", metavar="FIRST", help=f"the first: {RUN_OR_ADAPTER}")
    s.add_argument("adapter_b", metavar="SECOND", help="the second, the same way")
    s.add_argument("--side", choices=("A", "input", "output"), default="A", help="which directions (default A)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_runs_dir(s)
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


BASE_FIELDS = {"norms": ["w0_fro", "relative"], "amplification": ["amplification"],
               "intruders": ["intruders", "intruder_indices", "min_max_cos"]}


def _module_records(frame: pd.DataFrame, norms, amp, intr) -> list[dict]:
    """One record per module: the adapter metrics, plus (with a base) ‖W0‖_F, ‖ΔW‖_F/‖W0‖_F, amplification and
    the intruder test beside them."""
    records = _records(frame, JSON_COLUMNS)
    if norms is None:
        return records
    by_name = {}
    for what, table in (("norms", norms), ("amplification", amp), ("intruders", intr)):
        for row in _records(table[["name"] + BASE_FIELDS[what]]):
            by_name.setdefault(row.pop("name"), {}).update(row)
    for record in records:
        extra = by_name.get(record["name"], {})
        record.update({"w0_fro": extra.get("w0_fro"), "relative_norm": extra.get("relative"),
                       **{k: extra.get(k) for k in ("amplification", "intruders", "intruder_indices", "min_max_cos")}})
    return records


def _base_for(subject: Subject, args: argparse.Namespace):
    """The base weights to compare with: ``--base`` when given, else the run's own W0 file, else None."""
    if args.base is not None:
        return args.base
    return None if subject.base_weights is None else str(subject.base_weights)


def run_spectra(args: argparse.Namespace) -> int:
    subject = resolve(args.adapter, args.runs_dir)
    base_spec = _base_for(subject, args)
    amp = intr = norms = source = None
    label = subject.label
    if args.alpha is not None and subject.run is not None:
        raise ValueError(f"--alpha is for adapter files that store no alpha; run {subject.run.id}'s adapter "
                         "states its own")
    if subject.adapter is not None:     # LoRA: the factors only; W0 is streamed module by module below
        adapter, updates = load_updates(subject.adapter, alpha=args.alpha)
        count = len(adapter.modules)
    else:                                # a full fine-tuning run: ΔW = W_ft − W0, W0 needed to form it
        adapter, updates = None, load_subject_updates(subject, args.base)
        count = len(updates)
    inputs = registry.Inputs.from_updates({label: updates})
    results = [SPECTRA.run(inputs)]
    frame = results[0].value
    if base_spec is not None or adapter is None:
        from ..analysis.against_base import analyse_against_base
        from ..analysis.sources import iter_updates, open_base

        if adapter is not None:
            source = open_base(base_spec)
            stream = iter_updates(adapter, source)
        else:
            stream = updates
        base = analyse_against_base(stream, k=args.k, epsilon=args.epsilon, device=args.device,
                                    progress=sys.stderr.isatty(), total=count)
        amp, intr, norms = base.amplification, base.intruders, base.norms
        if args.html:     # the report's sections: the registry's entries, W0 streamed again module by module
            from ..analysis.sources import StreamedUpdates

            with_w0 = StreamedUpdates(adapter, source) if adapter is not None else updates
            full = registry.Inputs.from_updates({label: with_w0})
            results += [AMPLIFICATION.run(full), INTRUDERS.run(full, k=args.k, epsilon=args.epsilon)]
    base_read = (None if base_spec is None and adapter is not None else
                 f"the run's own base weights: file {subject.base_weights}" if args.base is None else
                 source.describe() if source is not None else str(args.base))
    needs_base = NEEDS_BASE + _recorded_base_hint(subject) + (KOHYA_BASE if adapter is not None and
                                                               adapter.format == "kohya" else "")
    if args.html:
        _write_html(args, label, base_spec, results, needs_base)
    if args.json:
        out = {"adapter": None if adapter is None else str(adapter.path), "base": base_spec,
               "run": None if subject.run is None else subject.run.id,
               "format": None if adapter is None else adapter.format,
               "dtype": None if adapter is None else adapter.dtype,
               "notes": [] if adapter is None else adapter.notes,
               "modules": _module_records(frame, norms, amp, intr), "base_read": base_read,
               "base_revision": None if source is None else source.revision,
               "relative_norms": None if norms is None else _records(norms),
               "amplification": None if amp is None else _records(amp),
               "intruders": None if intr is None else {"k": args.k, "epsilon": args.epsilon,
                                                       "total": int(intr["intruders"].sum()),
                                                       "modules": _records(intr)},
               "skipped": {} if amp is not None else {"amplification": needs_base, "intruders": needs_base}}
        if amp is None:
            print(needs_base, file=sys.stderr)   # stdout holds exactly one JSON object
        print(json.dumps(out, indent=2))
        return 0
    if subject.run is not None:
        print(subject.describe())
    what = "ΔW = scaling·B·A (spectra computed factored)" if adapter is not None else "ΔW = W_ft − W0"
    print(f"{adapter.path if adapter is not None else label}: {len(frame)} "
          f"{'adapted modules' if adapter is not None else 'fine-tuned modules'}, {what}")
    if adapter is not None and (adapter.format != "peft" or adapter.notes):
        print(f"read as the {adapter.format} format, factors stored in {adapter.dtype}")
        for note in adapter.notes:
            print(f"  note: {note}")
    print(frame[TABLE_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if amp is None:
        print(f"\n{needs_base}")
    else:
        print(f"\nW0 read from {base_read}")
        print("Amplification (LoRA paper Table 7): ‖ΔW‖_F / ‖UᵀW0V‖_F, U, V = ΔW's top-r singular vectors")
        print(amp.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"\nIntruder dimensions (top-{args.k} left singular vectors of W0+ΔW with max |cos| < {args.epsilon} "
              f"against W0's): {int(intr['intruders'].sum())} in total")
        print(intr.drop(columns=["intruder_indices"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.html:
        print(f"\nreport written to {args.html}")
    return 0


def _recorded_base_hint(subject: Subject) -> str:
    """For a run that kept no W0: the base model it names, as the --base to pass."""
    if subject.run is None:
        return ""
    from .. import runstore
    base = runstore.recorded_base(subject.run)
    return f" (this run's base model: --base {base})" if base else ""


def _write_html(args: argparse.Namespace, label: str, base, results: list, needs_base: str) -> None:
    from ..report import Section, write_report

    sections = [r.section() for r in results]
    if len(results) == 1:
        sections.append(Section("Amplification and intruder dimensions", needs_base))
    write_report(args.html, f"LoRA spectra: {label}", sections,
                 configs={"adapter": str(args.adapter), "base": base,
                          "analyses": {r.name: r.params for r in results}})


def run_similarity(args: argparse.Namespace) -> int:
    subjects = [resolve(text, args.runs_dir) for text in (args.adapter_a, args.adapter_b)]
    if args.side == "A":
        for subject in subjects:
            if subject.adapter is None:
                raise ValueError(f"{subject.text!r} is a full fine-tuning run: it has no LoRA A matrix to compare "
                                 "(side A); compare ΔW's directions with --side input or --side output")
    first, second = (load_updates(s.adapter)[1] if s.adapter is not None else load_subject_updates(s)
                     for s in subjects)
    results = adapter_similarity(first, second, side=args.side)
    summary = similarity_summary_frame(results)
    if args.json:
        out = {"adapter_a": args.adapter_a, "adapter_b": args.adapter_b, "side": args.side,
               "sources": [s.describe() for s in subjects],
               "modules": {name: {"phi": r.phi.tolist(), "d": r.d, **{k: _clean(v) for k, v in r.summary().items()
                                                                      if k not in ("name",)}}
                           for name, r in results.items()},
               "summary": {"modules": len(results), "phi_top1_mean": float(summary["phi_top1"].mean()),
                           "phi_mean": float(summary["phi_mean"].mean()),
                           "baseline_mean": float(summary["baseline_mean"].mean())}}
        print(json.dumps(out, indent=2))
        return 0
    for s in subjects:
        if s.run is not None:
            print(s.describe())
    print(f"φ between {args.adapter_a} and {args.adapter_b} (side {args.side}); random subspaces give "
          "about max(i, j)/d")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
