"""The analysis report of a set of runs: the same figures the dashboard shows, as report sections.

    sections = report_sections(runs, include=("training", "spectra", "subspaces", "merge"))
    write_report("report.html", "LoRA analysis", sections, configs=run_configs(runs))
"""

from __future__ import annotations

import pandas as pd

from . import runstore
from .analysis.amplification import amplification_frame
from .analysis.intruders import intruder_sweep
from .analysis.merge_check import merge_check
from .analysis.similarity import adapter_similarity, similarity_summary_frame
from .analysis.spectra import spectra_frame
from .plots.analysis import (plot_amplification_table, plot_intruders_vs_epsilon, plot_merge_errors,
                             plot_rank_sweep_spectra, plot_similarity_heatmap, spectra_figures)
from .plots.training import plot_efficiency_frontier, plot_loss_curves, plot_metric_vs_rank
from .report import Section

PARTS = ("training", "spectra", "subspaces", "merge")
SPECTRA_COLUMNS = ["name", "shape", "rank", "fro_norm", "spectral_norm", "stable_rank", "effective_rank", "rank_90",
                   "rank_99"]


def _metric(frame: pd.DataFrame) -> str:
    return next((m for m in ("val_accuracy", "val_perplexity", "val_loss") if m in frame and frame[m].notna().any()),
                "val_loss")


def run_configs(runs: list[runstore.Run]) -> dict:
    return {r.id: {"name": r.name, "config": r.config, "environment": r.environment} for r in runs}


def report_sections(runs: list[runstore.Run], include: tuple[str, ...] = PARTS) -> list[Section]:
    """Report sections for completed ``runs``; ``include`` picks among training, spectra, subspaces, merge."""
    unknown = [p for p in include if p not in PARTS]
    if unknown:
        raise ValueError(f"report part(s) {unknown} are not known: choose from {', '.join(PARTS)}")
    runs = [r for r in runs if r.status == "completed"]
    if not runs:
        raise ValueError("no completed run to report on")
    frame = runstore.runs_frame(runs=runs)
    metric = _metric(frame)
    updates = {r.id: runstore.load_updates(r) for r in runs}
    sections = []
    if "training" in include:
        summary = frame[[c for c in ["name", "model", "method", "rank", "alpha", "rslora", "targets", "steps", metric,
                                     "trainable_params", "train_seconds"] if c in frame.columns]]
        figures = [plot_loss_curves(runstore.load_metrics(runs), "train_loss", smooth=5)]
        if (frame["method"] == "lora").any():
            figures += [plot_metric_vs_rank(frame, metric), plot_efficiency_frontier(frame, metric)]
        sections.append(Section("Training runs", f"{len(runs)} runs; final {metric} per run.", figures,
                                [("Runs", summary)]))
    if "spectra" in include:
        spectra = {r.id: spectra_frame(updates[r.id]) for r in runs}
        common = sorted(set.intersection(*(set(s["name"]) for s in spectra.values())))
        figures, tables = [], []
        if common:
            module = max(common, key=lambda n: max(float(s.loc[s["name"] == n, "fro_norm"].iloc[0])
                                                   for s in spectra.values()))
            rows = [{"label": r.name, "kind": spectra[r.id].loc[spectra[r.id]["name"] == module, "kind"].iloc[0],
                     **spectra[r.id].loc[spectra[r.id]["name"] == module, ["singular_values", "rank_90"]].iloc[0]}
                    for r in runs]
            figures.append(plot_rank_sweep_spectra(pd.DataFrame(rows),
                                                   title=f"Spectra of ΔW in {module} across runs"))
        for r in runs:
            figures += spectra_figures(spectra[r.id])[:2] if len(runs) <= 3 else []
            tables.append((r.name, spectra[r.id][SPECTRA_COLUMNS]))
        sections.append(Section("Singular spectra of ΔW", "Per module: norms, stable and effective rank, and the "
                                "ranks holding 90%/99% of Σσ².", figures, tables))
    if "subspaces" in include:
        figures, tables = [], []
        by_model: dict[str, list] = {}
        for r in runs:
            if r.method == "lora":
                by_model.setdefault(r.model, []).append(r)
        # φ compares two adapters of the same model: the two highest ranks of the model with most LoRA runs
        lora = sorted(max(by_model.values(), key=len, default=[]), key=lambda r: r.config.get("rank") or 0)
        if len(lora) >= 2:
            a, b = lora[-1], lora[-2]
            results = adapter_similarity(updates[a.id], updates[b.id], "A")
            name = next(iter(results))
            figures.append(plot_similarity_heatmap(results[name].phi, results[name].d,
                                                   title=f"φ between A matrices of {a.name} and {b.name} ({name})"))
            tables.append((f"φ summary, {a.name} vs {b.name}", similarity_summary_frame(results)))
        sweep = pd.concat([intruder_sweep(updates[r.id], [round(0.1 * i, 1) for i in range(1, 10)], (10,),
                                          label=r.name) for r in runs], ignore_index=True)
        figures.append(plot_intruders_vs_epsilon(sweep, 10))
        for r in runs[:4]:
            if all(u.w0 is not None for u in updates[r.id].values()):
                figures.append(plot_amplification_table(amplification_frame(updates[r.id]),
                                                        title=f"Amplification, {r.name}"))
        sections.append(Section("Subspaces, amplification and intruder dimensions", "", figures, tables))
    if "merge" in include:
        from .training.restore import restore_run

        lora = [r for r in runs if r.method == "lora"]
        if lora:
            restored = restore_run(lora[0])
            check = merge_check(restored.model, restored.held_out_inputs())
            fp32 = check.errors[(check.errors["dtype"] == "float32") & (check.errors["variant"] == "merged")]
            worst = float(fp32["max_abs"].iloc[0]) if len(fp32) else float("nan")
            sections.append(Section(f"Merge equivalence ({lora[0].name})",
                                    f"Max |merged − unmerged| in float32: {worst:.3g}.",
                                    [plot_merge_errors(check.errors)],
                                    [("Errors", check.errors), ("Unmerge round trip", check.roundtrip),
                                     ("Parameters", check.params)]))
    return sections

