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


def scope_note(chosen: Sequence[runstore.Run], available: Sequence[runstore.Run]) -> str:
    """One sentence saying which runs a report or page covers when it is not all of them: e.g. "Only the
    newest sweep (3 runs, sweep 20261130-…) is shown; 5 other completed runs in the store are not." ("" when
    ``chosen`` covers every completed run of ``available``)."""
    done = [r for r in available if r.status == "completed"]
    ids = {r.id for r in chosen}
    others = [r for r in done if r.id not in ids]
    if not others:
        return ""
    sweeps = {r.sweep_id for r in chosen}
    n = len(chosen)
    if len(sweeps) == 1 and None not in sweeps:
        head = f"Only the newest sweep ({n} run{'s' * (n != 1)}, sweep {next(iter(sweeps))}) is shown"
    else:
        head = f"{n} chosen run{'s' * (n != 1)} are shown"
    m = len(others)
    return f"{head}; {m} other completed run{'s' * (m != 1)} in the store {'is' if m == 1 else 'are'} not."


def _runs_read(inputs: Inputs, result) -> list[str]:
    """Ids of the runs a result read: those named by its parameters (run, first, second, ...), the runs of
    its model for a per-model result, else every run of the inputs."""
    named = [inputs.run(v).id for v in result.params.values()
             if isinstance(v, str) and v in inputs.labels and inputs.run(v) is not None]
    if named:
        return list(dict.fromkeys(named))
    if "model" in result.params:
        return [r.id for r in inputs.runs if r.model == result.params["model"]]
    return [r.id for r in inputs.runs]


def report_sections(runs: Sequence[runstore.Run] | Inputs, include: Sequence[str] | None = None,
                    params: Mapping[str, Mapping] | None = None, registry: Registry | None = None,
                    note: str = "") -> list[Section]:
    """One section per registered analysis (per choice of its ``each`` parameter) for the completed
    ``runs``, in registry order.

    ``include`` names analyses or groups (default: all); ``params`` overrides defaults per analysis
    (``{"intruders": {"k": 5}}``). An analysis that does not apply to these runs (no base weights, a
    single run where two are compared, ...) or that fails on them with a user error gets a short section
    saying why, so the reader sees what is missing. ``registry`` defaults to the analyses registered now.
    ``note`` (e.g. :func:`scope_note`: only the newest sweep is shown) opens the report in a "Runs" section,
    with the runs left out as copies of others (the same run imported again).
    """
    registry = analyses.ANALYSES if registry is None else registry
    if isinstance(runs, Inputs):
        inputs = runs
    else:
        done = [r for r in runs if r.status == "completed"]
        if not done:
            raise ValueError("no completed run to report on")
        inputs = Inputs.from_runs(done)
    with_findings = include is None or "findings" in include
    chosen = registry.select(None if include is None else [p for p in include if p != "findings"] or [])
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
            section = result.section(analysis.each if len(results) > 1 else None)
            section.runs = _runs_read(inputs, result)
            sections.append(section)
    if with_findings and inputs.runs:
        # the published claims checked on these runs (the intervention, which rebuilds models, is on the
        # Findings page and `lora-analysis findings`)
        from .analysis.findings import findings_report_section
        sections += findings_report_section(list(inputs.runs), intervention=False)
    copies = (f"Left out as copies of runs already included (the same run imported again): "
              f"{', '.join(inputs.duplicates)}." if inputs.duplicates else "")
    if note or copies:
        sections.insert(0, Section("Runs", " ".join(t for t in (note, copies) if t)))
    return sections
