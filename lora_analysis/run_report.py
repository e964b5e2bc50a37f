"""The analysis report of a set of runs: every registered analysis that applies, as the dashboard shows it.

    sections = report_sections(runs)                          # every analysis, at its registered defaults
    sections = report_sections(runs, include=("spectra", "intruders"))   # groups or analysis names
    write_report("report.html", "LoRA analysis", sections, configs=run_configs(runs))

Nothing here knows an analysis: each section comes from :mod:`lora_analysis.analysis.registry`, so a newly
registered analysis appears in the report without a change here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from . import runstore
from .analysis import registry as analyses
from .analysis.registry import Inputs, Registry
from .report import Section

# The report parts of the first version, still accepted by --parts: they are the registry's groups.
PARTS = ("training", "spectra", "subspaces", "merge")


def run_configs(runs: list[runstore.Run]) -> dict:
    return {r.id: {"name": r.name, "config": r.config, "environment": r.environment} for r in runs}


def report_sections(runs: Sequence[runstore.Run] | Inputs, include: Sequence[str] | None = None,
                    params: Mapping[str, Mapping] | None = None, registry: Registry | None = None) -> list[Section]:
    """One section per registered analysis (per choice of its ``each`` parameter) for the completed
    ``runs``, in registry order.

    ``include`` names analyses or groups (default: all); ``params`` overrides defaults per analysis
    (``{"intruders": {"k": 5}}``). An analysis that does not apply to these runs (no base weights, a
    single run where two are compared, ...) or that fails on them with a user error gets a short section
    saying why, so the reader sees what is missing. ``registry`` defaults to the analyses registered now.
    """
    registry = analyses.ANALYSES if registry is None else registry
    if isinstance(runs, Inputs):
        inputs = runs
    else:
        done = [r for r in runs if r.status == "completed"]
        if not done:
            raise ValueError("no completed run to report on")
        inputs = Inputs.from_runs(done)
    chosen = registry.select(None if include is None else list(include))
    params = dict(params or {})
    unknown = sorted(set(params) - {a.name for a in chosen})
    if unknown:
        raise ValueError(f"parameters given for {unknown}, which the report does not include")
    sections = []
    for analysis in chosen:
        reason = analysis.skip_reason(inputs)
        if reason:
            sections.append(Section(analysis.title, f"Not shown: {reason}."))
            continue
        try:
            results = analysis.runs_over(inputs, **params.get(analysis.name, {}))
        except ValueError as exc:     # a user error on these runs: say it where the section would be
            sections.append(Section(analysis.title, f"Not shown: {exc}"))
            continue
        for result in results:
            sections.append(result.section(analysis.each if len(results) > 1 else None))
    return sections
