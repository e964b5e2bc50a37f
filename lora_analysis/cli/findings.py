"""``python -m lora_analysis findings``: the published claims about LoRA, checked on the runs of the run store.

    findings [--model M] [--runs-dir DIR] [--json]
    findings --model tiny-gpt --run-preset        # first run the research preset's sweep (minutes), then check

Each claim (Hu et al. 2021; Shuttleworth et al. 2024; Biderman et al. 2024) gets the paper's number, the
number measured on the runs, and a verdict computed by a rule written in code
(:mod:`lora_analysis.analysis.findings`).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time

from . import add_runs_dir, help_for, store_hint

EXAMPLES = """\
examples:
  %(prog)s
      the claims checked on the newest model's runs in the run store: claim, paper, measured, verdict
  %(prog)s --model mlp-digits --run-preset
      first run the research preset (LoRA r=1…64 and full fine-tuning, two seeds; a few minutes on a
      CPU), then check the claims on it
  %(prog)s --model tiny-gpt --runs-dir shared/runs --json
      another run store, as one JSON object (claims, numbers, verdicts, rules)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("findings", help=help_for("findings"), epilog=EXAMPLES,
                       description="Check published claims about LoRA on the runs of one model: the top direction "
                                   "shared between ranks (Hu et al. 2021), amplification falling with rank (Hu et "
                                   "al. 2021), intruder dimensions (Shuttleworth et al. 2024), full fine-tuning's "
                                   "high-rank ΔW and learns less / forgets less (Biderman et al. 2024). Each gets "
                                   "the paper's number, the measured number and a verdict by a rule in the code.")
    p.add_argument("--model", default=None,
                   help="the model whose runs are checked (default: the newest completed run's model)")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--run-preset", action="store_true",
                   help="first run the research preset of --model (a built-in model: LoRA r=1…64 and full "
                        "fine-tuning, two seeds) into the run store, then check the claims")
    p.set_defaults(func=run)


def _print_preset_progress(**p) -> None:
    if p.get("finished") is not None:
        print(f"  {p.get('label')}: {p['finished']}" + (f" ({p['error']})" if p.get("error") else ""), flush=True)


def run_preset(model: str, runs_dir: str | None) -> float:
    """Run the research preset of ``model`` in this process; returns the seconds it took."""
    from ..analysis.findings import preset_specs, preset_text
    from ..training import run_sweep, sweep_settings

    print(f"running the research preset: {preset_text(model)}", flush=True)
    t0 = time.perf_counter()
    for spec in preset_specs(model):
        run_sweep(sweep_settings(**spec), runs_dir=runs_dir, progress=_print_preset_progress)
    seconds = time.perf_counter() - t0
    print(f"the preset took {seconds / 60:.1f} min", flush=True)
    return seconds


def format_table(result) -> str:
    """The findings as text: one block per claim (title and verdict, the paper's and the measured number)."""
    lines = [f"Findings on {result.model} ({len(result.runs)} runs)", ""]
    width = 100
    for i, f in enumerate(result.findings, 1):
        head = f"({i}) {f.title}"
        lines.append(f"{head} {'.' * max(2, 64 - len(head))} {f.verdict.upper()}")
        for label, text in (("claim", f.claim), ("paper", f.paper), ("measured", f.measured)):
            lines += textwrap.wrap(text, width, initial_indent=f"    {label + ':':<10}", subsequent_indent=" " * 14)
        lines.append("")
    lines += textwrap.wrap(result.note, width)
    lines += ["", "Each verdict's rule: --json (\"rule\"), or the Findings page of the dashboard."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .. import runstore
    from ..analysis.findings import findings

    if args.run_preset:
        from ..analysis.findings import RESEARCH_PRESETS

        if args.model not in RESEARCH_PRESETS:
            raise ValueError(f"--run-preset needs --model with a research preset: one of {', '.join(RESEARCH_PRESETS)} "
                             f"(got {args.model!r})")
        run_preset(args.model, args.runs_dir)
    runs = runstore.list_runs(args.runs_dir)
    if not any(r.status == "completed" for r in runs):
        raise ValueError(f"the run store {runstore.runs_root(args.runs_dir)} has no completed runs: run a sweep, or "
                         f"findings --model mlp-digits --run-preset{store_hint(args.runs_dir)}")
    result = findings(runs, args.model)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_table(result))
    return 0
