"""``python -m lora_analysis report``: a self-contained HTML report of runs from the run store.

    python -m lora_analysis report --latest-sweep --html report.html
    python -m lora_analysis report RUN_ID [RUN_ID ...] --parts training,spectra --html report.html

Every registered analysis (``lora_analysis.analysis.registry``) that applies to the runs is included, at
the defaults the dashboard uses; ``--parts`` narrows it to analyses or groups.
"""

from __future__ import annotations

import argparse

from . import add_runs_dir, help_for, store_hint

EXAMPLES = """\
examples:
  %(prog)s --html report.html
      every analysis of the newest sweep in the run store, one offline HTML file
  %(prog)s r8 r32 --parts training,spectra --html two-runs.html
      two runs (names, ids or unique id prefixes), training curves and spectra only
  %(prog)s --runs-dir shared/runs --title "rank sweep, digits" --html sweep.html
      the newest sweep of another run store, with a title"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..analysis.registry import ANALYSES

    p = sub.add_parser("report", help=help_for("report"), epilog=EXAMPLES,
                       description="Write one HTML file (plotly.js inlined, works offline) with every registered "
                                   "analysis of the chosen runs (training curves, spectra, subspaces, merge, "
                                   "...), at the dashboard's defaults.")
    p.add_argument("runs", nargs="*", help="runs: ids, unique id prefixes, names or run folders; default: the "
                                           "newest sweep")
    p.add_argument("--html", required=True, help="where to write the report")
    p.add_argument("--parts", default=None,
                   help="comma-separated analyses or groups (default: all). Groups: "
                        f"{', '.join(ANALYSES.groups())}; analyses: {', '.join(ANALYSES.names())}")
    add_runs_dir(p)
    p.add_argument("--title", default="lora-analysis report",
                   help="the report's title (default: lora-analysis report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import runstore
    from ..report import write_report
    from ..run_report import report_sections, run_configs
    from .subjects import find_run

    if args.runs:
        runs = [find_run(r, args.runs_dir) for r in args.runs]
    else:
        runs = runstore.latest_sweep(runstore.list_runs(args.runs_dir))
    if not runs:
        raise ValueError(f"the run store {runstore.runs_root(args.runs_dir)} has no completed runs"
                         f"{store_hint(args.runs_dir)}")
    parts = None if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
    if parts == []:
        raise ValueError("--parts is empty: name analyses or groups, or leave it out for all")
    path = write_report(args.html, args.title, report_sections(runs, parts), configs=run_configs(runs),
                        subtitle=f"{len(runs)} runs: " + ", ".join(r.name for r in runs))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(runs)} runs)")
    return 0
