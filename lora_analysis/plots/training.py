"""Figures for fine-tuning runs: loss curves, metric versus rank and alpha, the efficiency frontier and
cost bars. Inputs are the frames of :func:`lora_analysis.runstore.runs_frame` (one row per run: name,
method, rank, alpha, rslora, targets, val_loss, val_accuracy or val_perplexity, base_*, trainable_params,
train_seconds, training_state_bytes, ...) or ``SweepResult.frame``, and of
:func:`lora_analysis.runstore.load_metrics` (one row per step and run) for curves.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import (COLORS, apply_style, byte_unit, finite, fit_range, log_ticks, reference_line, run_colors,
                    safe_label, wants_log)

# Byte columns get their unit from the data (KiB, MiB, GiB: :func:`.style.byte_unit`), not from this table.
LABELS = {"val_accuracy": "validation accuracy", "val_loss": "validation loss", "val_perplexity":
          "validation perplexity", "train_loss": "training loss", "final_train_loss": "final training loss",
          "training_state_bytes": "params + grads + optimizer states", "peak_rss_bytes": "peak RSS",
          "train_seconds": "training time (s)", "samples_per_s": "samples / s", "steps_per_s": "steps / s",
          "cuda_max_memory_allocated_bytes": "CUDA peak memory", "trainable_params": "trainable parameters"}
# How far outside the runs' values a reference (the frozen base) may lie before it is marked at the chart's
# edge instead of stretching the axis: the axis would otherwise be more than this many times the runs' span.
FLATTEN = 3.0


def higher_is_better(metric: str) -> bool:
    return "accuracy" in metric or metric.endswith("_per_s")


def _label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


def _need(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs the column(s) {', '.join(missing)}; the frame has {', '.join(map(str, frame.columns))}")


def _lora_groups(runs: pd.DataFrame, by: list[str]):
    lora = runs[(runs["method"] == "lora")]
    if "status" in lora.columns:
        lora = lora[lora["status"] == "completed"]
    by = [c for c in by if c in lora.columns and lora[c].nunique(dropna=False) > 1]
    if not by:
        yield "LoRA", lora
        return
    for key, group in lora.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        parts = []
        for col, value in zip(by, key):
            if col == "rslora":
                parts.append("α/√r" if value else "α/r")
            elif col == "alpha":
                parts.append(f"α={value:g}")
            elif col == "rank":
                parts.append(f"r={int(value)}")
            else:
                parts.append(str(value))
        yield "LoRA " + " ".join(parts), group


def _group_key(label: str, group: pd.DataFrame) -> str:
    """What colours a line: the run's id for a line of one run (its colour on every page, as far as the
    figure allows), else the line's label (a rank sweep at one alpha)."""
    if len(group) == 1 and "id" in group.columns and isinstance(group["id"].iloc[0], str):
        return group["id"].iloc[0]
    return label


def _group_colors(groups: list[tuple[str, pd.DataFrame]]) -> list[str]:
    """One colour per line of :func:`_lora_groups`, distinct within the figure (:func:`.style.run_colors`)."""
    keys = [_group_key(label, group) for label, group in groups]
    colors = run_colors(keys)
    return [colors[k] for k in keys]


def _full_rows(runs: pd.DataFrame) -> pd.DataFrame:
    full = runs[runs["method"] == "full"]
    return full[full["status"] == "completed"] if "status" in full.columns else full


def _in_progress(runs: pd.DataFrame | None, key: str) -> dict:
    """{run key: planned steps, None when unknown} of the runs still running (``runs``:
    :func:`lora_analysis.runstore.runs_frame`)."""
    if runs is None or not len(runs) or "status" not in runs.columns:
        return {}
    id_col = "id" if key == "run_id" and "id" in runs.columns else "name"
    if id_col not in runs.columns:
        return {}
    out = {}
    for _, row in runs[runs["status"] == "running"].iterrows():
        steps = pd.to_numeric(pd.Series([row.get("steps")]), errors="coerce").iloc[0]
        out[row[id_col]] = int(steps) if pd.notna(steps) and steps > 0 else None
    return out


def plot_loss_curves(metrics: pd.DataFrame, y: str = "train_loss", title: str | None = None,
                     smooth: int = 1, log_y: bool = False, runs: pd.DataFrame | None = None) -> go.Figure:
    """One line per run of ``y`` against step. ``metrics``: long frame with name (or run_id), method, step
    and ``y`` (rows where ``y`` is missing, e.g. val_* between evaluations, are dropped). ``smooth`` > 1
    draws a centred rolling mean over that many steps.

    ``log_y``: a log axis when the values span at least :data:`.style.LOG_MIN_RATIO` (max/min); a flat or
    young curve stays linear (a log axis over a narrow span has unreadable ticks). A single point is a
    marker. ``runs`` (:func:`lora_analysis.runstore.runs_frame`: id or name, status, steps): runs still
    running show their planned end (a dotted line at the planned step count, the x axis reaching it) and a
    note "run in progress: step i of n". Each run keeps its colour on every page as far as the other runs
    drawn allow; two runs never share one (:func:`.style.run_colors`).
    """
    key = "run_id" if "run_id" in metrics.columns else "name"
    _need(metrics, [key, "step", y], "plot_loss_curves")
    fig = go.Figure()
    names = metrics.groupby(key, sort=False)["name"].first() if "name" in metrics.columns else None
    repeated = set(names[names.duplicated()]) if names is not None else set()
    running = _in_progress(runs, key)
    data = metrics.dropna(subset=[y])
    values = finite(data[y])
    log = bool(log_y) and wants_log(values)
    steps, ys, notes = list(finite(data["step"])), [], []
    kinds = data.groupby(key, sort=False)["method"].first() if "method" in data.columns else None
    colors = run_colors(list(kinds.index), ["full" if m == "full" else None for m in kinds]) if kinds is not None \
        else run_colors(data[key].unique())
    for run_key, group in data.groupby(key, sort=False):
        # runs of different sweeps often share a name ("full FT"): tell them apart by their id
        name = run_key if names is None else names[run_key]
        name = f"{name} · {str(run_key)[-6:]}" if name in repeated else name
        name = safe_label(name)
        group = group.sort_values("step")
        values = group[y].rolling(smooth, min_periods=1, center=True).mean() if smooth > 1 else group[y]
        ys += list(finite(values))
        method = group["method"].iloc[0] if "method" in group.columns else "lora"
        color = colors[run_key]
        fig.add_trace(go.Scatter(x=group["step"], y=values, mode="lines" if len(group) > 1 else "markers",
                                 name=name, line={"color": color, "width": 2.5 if method == "full" else 1.8},
                                 marker={"color": color, "size": 8 if len(group) == 1 else 6},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>{_label(y)} %{{y:.4f}}<extra></extra>"))
        if run_key in running:
            last = metrics.loc[metrics[key] == run_key, "step"].max()
            notes.append((int(last) if pd.notna(last) else 0, running[run_key]))
    y_range = fit_range(ys, log=log)
    for planned in sorted({n for _, n in notes if n}):
        # the planned end is part of what the chart says: drawn as data, so the x axis reaches it
        edge = [10 ** v for v in y_range] if log and y_range else (y_range or [0, 1])
        fig.add_trace(go.Scatter(x=[planned, planned], y=edge, mode="lines", name=f"planned end: step {planned}",
                                 line={"color": COLORS["base"], "dash": "dot", "width": 1}, hoverinfo="skip"))
        steps.append(planned)
    if notes:
        steps_text = [f"step {i} of {n}" if n else f"step {i}" for i, n in notes]
        text = (f"run in progress: {steps_text[0]}" if len(notes) == 1 else
                f"{len(notes)} runs in progress: " + ", ".join(steps_text))
        fig.add_annotation(x=0.01, xref="x domain", y=0.99, yref="y domain", text=text, showarrow=False,
                           xanchor="left", yanchor="top", bgcolor="rgba(255,255,255,0.8)")
    x_range = fit_range(steps, pad=0.02)
    fig.update_xaxes(title="step", range=x_range,
                     dtick=1 if x_range and x_range[1] - x_range[0] <= 10 else None, tickformat="d")
    fig.update_yaxes(title=_label(y), type="log" if log else "linear", range=y_range)
    if log:
        log_ticks(fig, "y", ys)
    return apply_style(fig, title or f"{_label(y).capitalize()} per step")


def _reference_lines(fig: go.Figure, runs: pd.DataFrame, metric: str, values: list[float]) -> None:
    """Full fine-tuning (dashed) and the frozen base (dotted) as horizontal lines.

    Full fine-tuning is what LoRA is compared with: always drawn. The base is context: when it lies so far
    from the runs' ``values`` and full fine-tuning's that the axis would grow over :data:`FLATTEN` times
    their span (e.g. the base's loss of 16.6 beside runs at 3.1–3.4), it is not drawn as a line that
    flattens them; it is named at the chart's top or bottom edge, saying which way it lies, and the y range
    is fitted to the runs.
    """
    shown = list(finite(values))
    for _, row in _full_rows(runs).iterrows():
        if pd.notna(row.get(metric)):
            value = float(row[metric])
            reference_line(fig, value, f"full fine-tuning {value:.4g}", line={"color": COLORS["full"], "dash": "dash"})
            shown.append(value)
            break
    base = f"base_{metric}"
    if base not in runs.columns or not runs[base].notna().any():
        return
    value = float(runs[base].dropna().iloc[0])
    if shown:
        lo, hi = min(shown), max(shown)
        own = max(hi - lo, 0.05 * max(abs(hi), abs(lo)))
        if own > 0 and max(hi, value) - min(lo, value) > FLATTEN * own:
            up = value > hi
            fig.update_yaxes(range=fit_range(shown, pad=0.08))
            fig.add_annotation(x=1, xref="x domain", y=1 if up else 0, yref="y domain", showarrow=False,
                               xanchor="right", yanchor="top" if up else "bottom", font={"color": COLORS["base"]},
                               text=f"frozen base {value:.4g} {'↑ above' if up else '↓ below'} the chart")
            return
    reference_line(fig, value, f"frozen base {value:.4g}", line={"color": COLORS["base"], "dash": "dot"}, below=True)


def plot_metric_vs_rank(runs: pd.DataFrame, metric: str = "val_accuracy", title: str | None = None) -> go.Figure:
    """Final ``metric`` of LoRA runs against rank (log₂ axis), one line per alpha / scaling / targets
    group, with full fine-tuning (dashed) and the frozen base (dotted) as horizontal lines."""
    _need(runs, ["method", "rank", metric], "plot_metric_vs_rank")
    fig = go.Figure()
    values = []
    groups = list(_lora_groups(runs, ["alpha", "rslora", "targets"]))
    for color, (label, group) in zip(_group_colors(groups), groups):
        group = group.dropna(subset=["rank", metric]).sort_values("rank")
        values += list(group[metric])
        label = safe_label(label)
        fig.add_trace(go.Scatter(x=group["rank"], y=group[metric], mode="lines+markers", name=label,
                                 line={"color": color},
                                 hovertemplate="r=%{x}<br>" + _label(metric) + " %{y:.4f}<extra>" + label + "</extra>"))
    _reference_lines(fig, runs, metric, values)
    ranks = sorted(runs.loc[runs["method"] == "lora", "rank"].dropna().unique())
    fig.update_xaxes(type="log", title="rank r", tickvals=ranks, ticktext=[str(int(r)) for r in ranks],
                     range=fit_range(ranks, log=True, pad=0.1))
    fig.update_yaxes(title=_label(metric))
    return apply_style(fig, title or f"{_label(metric).capitalize()} versus LoRA rank")


def plot_metric_vs_alpha(runs: pd.DataFrame, metric: str = "val_accuracy", title: str | None = None) -> go.Figure:
    """Final ``metric`` against alpha (log axis), one line per rank (and scaling), full FT dashed."""
    _need(runs, ["method", "alpha", metric], "plot_metric_vs_alpha")
    fig = go.Figure()
    values, alphas = [], []
    groups = list(_lora_groups(runs, ["rank", "rslora", "targets"]))
    for color, (label, group) in zip(_group_colors(groups), groups):
        group = group.dropna(subset=["alpha", metric]).sort_values("alpha")
        values += list(group[metric])
        alphas += list(group["alpha"])
        label = safe_label(label)
        fig.add_trace(go.Scatter(x=group["alpha"], y=group[metric], mode="lines+markers", name=label,
                                 line={"color": color},
                                 hovertemplate="α=%{x:g}<br>" + _label(metric) + " %{y:.4f}<extra>" + label + "</extra>"))
    _reference_lines(fig, runs, metric, values)
    alphas = sorted(set(finite(alphas)))
    fig.update_xaxes(type="log", title="alpha α (scaling α/r, or α/√r with rsLoRA)",
                     range=fit_range(alphas, log=True, pad=0.1),
                     tickvals=alphas if len(alphas) <= 8 else None,
                     ticktext=[f"{a:g}" for a in alphas] if len(alphas) <= 8 else None)
    fig.update_yaxes(title=_label(metric))
    return apply_style(fig, title or f"{_label(metric).capitalize()} versus alpha")


def pareto_front(frame: pd.DataFrame, cost: str, metric: str) -> pd.DataFrame:
    """Rows no other row beats on both cost (lower is better) and metric, sorted by cost."""
    better_high = higher_is_better(metric)
    rows = frame.dropna(subset=[cost, metric]).sort_values([cost, metric], ascending=[True, not better_high])
    front, best = [], -math.inf if better_high else math.inf
    for idx, row in rows.iterrows():
        value = row[metric]
        if (value > best) if better_high else (value < best):
            front.append(idx)
            best = value
    return rows.loc[front]


def plot_efficiency_frontier(runs: pd.DataFrame, metric: str = "val_accuracy",
                             title: str | None = None) -> go.Figure:
    """Trainable parameters (log axis) against ``metric`` for every completed run, LoRA in blue and full
    fine-tuning in orange, with the Pareto frontier (the best metric for its parameter budget) drawn."""
    _need(runs, ["method", "trainable_params", metric], "plot_efficiency_frontier")
    done = runs[runs["status"] == "completed"] if "status" in runs.columns else runs
    fig = go.Figure()
    for method, label in (("lora", "LoRA"), ("full", "full fine-tuning")):
        part = done[done["method"] == method]
        if not len(part):
            continue
        names = [safe_label(n) for n in (part["name"] if "name" in part.columns else part["method"])]
        fig.add_trace(go.Scatter(x=part["trainable_params"], y=part[metric], mode="markers", name=label,
                                 marker={"color": COLORS[method], "size": 11 if method == "full" else 9,
                                         "symbol": "diamond" if method == "full" else "circle"},
                                 text=names, hovertemplate="%{text}<br>%{x:,} trainable<br>" + _label(metric)
                                 + " %{y:.4f}<extra></extra>"))
    front = pareto_front(done, "trainable_params", metric)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["trainable_params"], y=front[metric], mode="lines", name="frontier",
                                 line={"color": COLORS["base"], "dash": "dot"}, hoverinfo="skip"))
    params = finite(done["trainable_params"])
    fig.update_xaxes(type="log", title="trainable parameters", range=fit_range(params[params > 0], log=True, pad=0.1))
    fig.update_yaxes(title=_label(metric), range=fit_range(done[metric], pad=0.1))
    return apply_style(fig, title or f"Efficiency: {_label(metric)} per trainable parameter")


# The cost chart's panels (px): each panel's height, and the band between panels that holds the next panel's
# title (one line of COST_TITLE_FONT px text with room to spare).
COST_PANEL_PX = 170
COST_GAP_PX = 44
COST_TITLE_FONT = 13


def plot_cost_comparison(runs: pd.DataFrame, costs: tuple[str, ...] = ("training_state_bytes", "train_seconds"),
                         title: str = "Training cost per run") -> go.Figure:
    """Bars per run of each cost, one panel per cost stacked top to bottom over the shared run axis (memory
    columns ending in ``_bytes`` in the unit that suits their size: KiB, MiB or GiB). Each panel's title sits
    in its own band above it (:data:`COST_PANEL_PX`, :data:`COST_GAP_PX`), so titles never overlap each
    other, the chart's title or the bars, whatever the chart's width (side-by-side panels collided when the
    chart was half a page wide). Runs sharing a name are told apart by the end of their id; each run has its
    colour (:func:`.style.run_colors`: its own on every page as far as the other runs allow, never another
    run's)."""
    present = [c for c in costs if c in runs.columns]
    if not present:
        raise ValueError(f"plot_cost_comparison needs one of the columns {', '.join(costs)}")
    done = runs[runs["status"] == "completed"] if "status" in runs.columns else runs
    names = (done["name"] if "name" in done.columns else done.index.to_series()).astype(str)
    ids = done["id"].astype(str) if "id" in done.columns else names
    if "id" in done.columns:
        names = pd.Series([f"{n} · {i[-6:]}" if dup else n
                           for n, i, dup in zip(names, ids, names.duplicated(keep=False))], index=names.index)
    shown = [safe_label(n) for n in names]
    methods = done["method"] if "method" in done.columns else ["lora"] * len(done)
    kinds = ["full" if m == "full" else None for m in methods]
    by_run = run_colors(list(ids), kinds)
    colors = [by_run[i] for i in ids]
    titles, columns = [], []
    for cost in present:
        if cost.endswith("_bytes"):
            divisor, unit = byte_unit(done[cost])
            titles.append(f"{_label(cost)} ({unit})")
            columns.append(done[cost] / divisor)
        else:
            titles.append(_label(cost))
            columns.append(done[cost])
    n = len(present)
    margin = {"l": 60, "r": 20, "t": 90, "b": 120}
    height = margin["t"] + margin["b"] + n * COST_PANEL_PX + (n - 1) * COST_GAP_PX
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=COST_GAP_PX / (height - margin["t"] - margin["b"]) if n > 1 else 0.0)
    for row, (values, label) in enumerate(zip(columns, titles), start=1):
        fig.add_trace(go.Bar(x=shown, y=values, marker_color=colors, showlegend=False, name=label,
                             hovertemplate="%{x}<br>%{y:.3g}<extra></extra>"), row=row, col=1)
    # the panel titles: left-aligned over their panel, in the chart's font size
    fig.update_annotations(font={"size": COST_TITLE_FONT}, x=0, xanchor="left", yshift=2)
    fig.update_layout(height=height, margin=margin)
    return apply_style(fig, title)


def plot_update_norm(norms: pd.DataFrame, x: str = "alpha", title: str | None = None) -> go.Figure:
    """‖ΔW‖_F (all adapted modules together) of each run against ``x`` ("alpha" or "rank"), one line per
    rank or alpha (and scaling), full fine-tuning as a dashed line. ``norms``: one row per run with method,
    rank, alpha, rslora and ``delta_norm`` (√ of the sum of the modules' ‖ΔW‖_F²)."""
    _need(norms, ["method", x, "delta_norm"], "plot_update_norm")
    other = "rank" if x == "alpha" else "alpha"
    fig = go.Figure()
    xs, ys = [], []
    groups = list(_lora_groups(norms, [other, "rslora"]))
    for color, (label, group) in zip(_group_colors(groups), groups):
        group = group.dropna(subset=[x]).sort_values(x)
        group = group[group["delta_norm"] > 0]
        xs += list(group[x])
        ys += list(group["delta_norm"])
        label = safe_label(label)
        fig.add_trace(go.Scatter(x=group[x], y=group["delta_norm"], mode="lines+markers", name=label,
                                 line={"color": color},
                                 hovertemplate=f"{x}=%{{x:g}}<br>‖ΔW‖ %{{y:.4g}}<extra>{label}</extra>"))
    full = norms[(norms["method"] == "full") & (norms["delta_norm"] > 0)]
    if len(full):
        value = float(full["delta_norm"].iloc[0])
        reference_line(fig, value, f"full fine-tuning {value:.3g}", log=True,
                       line={"color": COLORS["full"], "dash": "dash"})
        ys.append(value)
    xs = sorted(set(finite(xs)))
    fig.update_xaxes(type="log", title="alpha α" if x == "alpha" else "rank r", range=fit_range(xs, log=True, pad=0.1),
                     tickvals=xs if len(xs) <= 8 else None, ticktext=[f"{v:g}" for v in xs] if len(xs) <= 8 else None)
    fig.update_yaxes(type="log", title="‖ΔW‖ (Frobenius) over all adapted modules",
                     range=fit_range(ys, log=True, pad=0.1))
    log_ticks(fig, "y", ys)
    return apply_style(fig, title or f"Size of the learned update versus {'alpha' if x == 'alpha' else 'rank'}")


def plot_task_metrics(table: pd.DataFrame, metric: str = "val_accuracy",
                      title: str | None = None) -> go.Figure:
    """Bars of the task metric per model variant (frozen base, LoRA unmerged, LoRA merged, full
    fine-tuning). ``table``: one row per variant with ``variant`` and ``metric``."""
    _need(table, ["variant", metric], "plot_task_metrics")
    colors = {"frozen base": COLORS["base"], "LoRA (unmerged)": COLORS["lora"], "LoRA (merged)": COLORS["merged"],
              "full fine-tuning": COLORS["full"]}
    fig = go.Figure(go.Bar(x=[safe_label(v) for v in table["variant"]], y=table[metric],
                           text=[f"{v:.4g}" for v in table[metric]], textposition="outside",
                           marker_color=[colors.get(v, COLORS["random"]) for v in table["variant"]],
                           hovertemplate="%{x}<br>" + _label(metric) + " %{y:.5g}<extra></extra>"))
    fig.update_yaxes(title=_label(metric), rangemode="tozero")
    return apply_style(fig, title or f"Task metric: base, LoRA and full fine-tuning ({_label(metric)})")


# Lines drawn at most in the spectra-over-training chart when the caller names no modules.
HISTORY_MAX_LINES = 8


def plot_spectra_history(history: pd.DataFrame, modules: list[str] | None = None,
                         title: str | None = None) -> go.Figure:
    """How each module's ΔW grew during training: effective rank (top panel) and ‖ΔW‖_F (bottom panel)
    against step, one line (and colour) per module, both panels sharing the step axis.

    ``history``: :meth:`lora_analysis.store.runs.Run.spectra_history` (step, module, rank, effective_rank,
    norm, ...). ``modules``: the modules to draw (default: the :data:`HISTORY_MAX_LINES` with the largest
    ‖ΔW‖_F at the last step). Step 0 of a fresh LoRA (B = 0) is drawn at 0 on both panels: nothing learned
    yet. A module recorded once is a marker."""
    from ..analysis.history import largest_modules

    _need(history, ["step", "module", "effective_rank", "norm"], "plot_spectra_history")
    if modules is None:
        modules = largest_modules(history, HISTORY_MAX_LINES)
    unknown = [m for m in modules if m not in set(history["module"])]
    if unknown:
        raise ValueError(f"module {unknown[0]!r} is not in the history: choose from "
                         f"{', '.join(sorted(set(history['module']))[:6])}, ...")
    data = history[history["module"].isin(modules)].sort_values("step")
    ranks = sorted({int(r) for r in finite(data["rank"])}) if "rank" in data.columns else []
    rank_text = f" (r = {ranks[0]})" if len(ranks) == 1 else ""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[f"effective rank of ΔW{rank_text}", "‖ΔW‖_F"])
    colors = run_colors(modules)
    for module in modules:
        part = data[data["module"] == module]
        label = safe_label(module)
        mode = "lines+markers" if 1 < len(part) <= 30 else "lines" if len(part) > 30 else "markers"
        for row, column, what in ((1, "effective_rank", "effective rank"), (2, "norm", "‖ΔW‖_F")):
            fig.add_trace(go.Scatter(x=part["step"], y=part[column], mode=mode, name=label, legendgroup=label,
                                     showlegend=row == 1, line={"color": colors[module], "width": 1.8},
                                     marker={"color": colors[module], "size": 5},
                                     hovertemplate=f"{label}<br>step %{{x}}<br>{what} %{{y:.4g}}<extra></extra>"),
                          row=row, col=1)
    steps = finite(data["step"])
    x_range = fit_range(steps, pad=0.02)
    fig.update_xaxes(range=x_range, tickformat="d", dtick=1 if x_range and x_range[1] - x_range[0] <= 10 else None)
    fig.update_xaxes(title="step", row=2, col=1)
    fig.update_yaxes(title="effective rank", range=fit_range(data["effective_rank"]), row=1, col=1)
    fig.update_yaxes(title="‖ΔW‖_F", range=fit_range(data["norm"]), row=2, col=1)
    fig.update_layout(height=560)
    shown = f"{len(modules)} of {history['module'].nunique()} modules"
    return apply_style(fig, title or "How the spectrum of ΔW grew during training", subtitle=shown)
