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

from .style import COLORS, SEQUENCE, apply_style, reference_line

LABELS = {"val_accuracy": "validation accuracy", "val_loss": "validation loss", "val_perplexity":
          "validation perplexity", "train_loss": "training loss", "final_train_loss": "final training loss",
          "training_state_bytes": "params + grads + optimizer states (MiB)", "peak_rss_bytes": "peak RSS (MiB)",
          "train_seconds": "training time (s)", "samples_per_s": "samples / s", "steps_per_s": "steps / s",
          "cuda_max_memory_allocated_bytes": "CUDA peak memory (MiB)", "trainable_params": "trainable parameters"}


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


def _full_rows(runs: pd.DataFrame) -> pd.DataFrame:
    full = runs[runs["method"] == "full"]
    return full[full["status"] == "completed"] if "status" in full.columns else full


def plot_loss_curves(metrics: pd.DataFrame, y: str = "train_loss", title: str | None = None,
                     smooth: int = 1, log_y: bool = False) -> go.Figure:
    """One line per run of ``y`` against step. ``metrics``: long frame with name (or run_id), method, step
    and ``y`` (rows where ``y`` is missing, e.g. val_* between evaluations, are dropped). ``smooth`` > 1
    draws a centred rolling mean over that many steps."""
    key = "run_id" if "run_id" in metrics.columns else "name"
    _need(metrics, [key, "step", y], "plot_loss_curves")
    fig = go.Figure()
    lora_i = 0
    names = metrics.groupby(key, sort=False)["name"].first() if "name" in metrics.columns else None
    repeated = set(names[names.duplicated()]) if names is not None else set()
    for run_key, group in metrics.dropna(subset=[y]).groupby(key, sort=False):
        # runs of different sweeps often share a name ("full FT"): tell them apart by their id
        name = run_key if names is None else names[run_key]
        name = f"{name} · {str(run_key)[-6:]}" if name in repeated else name
        group = group.sort_values("step")
        values = group[y].rolling(smooth, min_periods=1, center=True).mean() if smooth > 1 else group[y]
        method = group["method"].iloc[0] if "method" in group.columns else "lora"
        color = COLORS["full"] if method == "full" else SEQUENCE[lora_i % len(SEQUENCE)]
        lora_i += method != "full"
        fig.add_trace(go.Scatter(x=group["step"], y=values, mode="lines" if len(group) > 1 else "markers",
                                 name=str(name), line={"color": color, "width": 2.5 if method == "full" else 1.8},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>{_label(y)} %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title="step")
    fig.update_yaxes(title=_label(y), type="log" if log_y else None)
    return apply_style(fig, title or f"{_label(y).capitalize()} per step")


def _reference_lines(fig: go.Figure, runs: pd.DataFrame, metric: str) -> None:
    for _, row in _full_rows(runs).iterrows():
        if pd.notna(row.get(metric)):
            reference_line(fig, float(row[metric]), f"full fine-tuning {row[metric]:.4g}",
                           line={"color": COLORS["full"], "dash": "dash"})
            break
    base = f"base_{metric}"
    if base in runs.columns and runs[base].notna().any():
        value = float(runs[base].dropna().iloc[0])
        reference_line(fig, value, f"frozen base {value:.4g}", line={"color": COLORS["base"], "dash": "dot"},
                       below=True)


def plot_metric_vs_rank(runs: pd.DataFrame, metric: str = "val_accuracy", title: str | None = None) -> go.Figure:
    """Final ``metric`` of LoRA runs against rank (log₂ axis), one line per alpha / scaling / targets
    group, with full fine-tuning (dashed) and the frozen base (dotted) as horizontal lines."""
    _need(runs, ["method", "rank", metric], "plot_metric_vs_rank")
    fig = go.Figure()
    for i, (label, group) in enumerate(_lora_groups(runs, ["alpha", "rslora", "targets"])):
        group = group.dropna(subset=["rank", metric]).sort_values("rank")
        fig.add_trace(go.Scatter(x=group["rank"], y=group[metric], mode="lines+markers", name=label,
                                 line={"color": COLORS["lora"] if i == 0 else SEQUENCE[(i + 3) % len(SEQUENCE)]},
                                 hovertemplate="r=%{x}<br>" + _label(metric) + " %{y:.4f}<extra>" + label + "</extra>"))
    _reference_lines(fig, runs, metric)
    ranks = sorted(runs.loc[runs["method"] == "lora", "rank"].dropna().unique())
    fig.update_xaxes(type="log", title="rank r", tickvals=ranks, ticktext=[str(int(r)) for r in ranks])
    fig.update_yaxes(title=_label(metric))
    return apply_style(fig, title or f"{_label(metric).capitalize()} versus LoRA rank")


def plot_metric_vs_alpha(runs: pd.DataFrame, metric: str = "val_accuracy", title: str | None = None) -> go.Figure:
    """Final ``metric`` against alpha (log axis), one line per rank (and scaling), full FT dashed."""
    _need(runs, ["method", "alpha", metric], "plot_metric_vs_alpha")
    fig = go.Figure()
    for i, (label, group) in enumerate(_lora_groups(runs, ["rank", "rslora", "targets"])):
        group = group.dropna(subset=["alpha", metric]).sort_values("alpha")
        fig.add_trace(go.Scatter(x=group["alpha"], y=group[metric], mode="lines+markers", name=label,
                                 line={"color": SEQUENCE[(i + 2) % len(SEQUENCE)]},
                                 hovertemplate="α=%{x:g}<br>" + _label(metric) + " %{y:.4f}<extra>" + label + "</extra>"))
    _reference_lines(fig, runs, metric)
    fig.update_xaxes(type="log", title="alpha α (scaling α/r, or α/√r with rsLoRA)")
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
        names = part["name"] if "name" in part.columns else part["method"]
        fig.add_trace(go.Scatter(x=part["trainable_params"], y=part[metric], mode="markers", name=label,
                                 marker={"color": COLORS[method], "size": 11 if method == "full" else 9,
                                         "symbol": "diamond" if method == "full" else "circle"},
                                 text=names, hovertemplate="%{text}<br>%{x:,} trainable<br>" + _label(metric)
                                 + " %{y:.4f}<extra></extra>"))
    front = pareto_front(done, "trainable_params", metric)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["trainable_params"], y=front[metric], mode="lines", name="frontier",
                                 line={"color": COLORS["base"], "dash": "dot"}, hoverinfo="skip"))
    fig.update_xaxes(type="log", title="trainable parameters")
    fig.update_yaxes(title=_label(metric))
    return apply_style(fig, title or f"Efficiency: {_label(metric)} per trainable parameter")


def plot_cost_comparison(runs: pd.DataFrame, costs: tuple[str, ...] = ("training_state_bytes", "train_seconds"),
                         title: str = "Training cost per run") -> go.Figure:
    """Side-by-side bars per run of each cost (memory columns ending in ``_bytes`` shown in MiB)."""
    present = [c for c in costs if c in runs.columns]
    if not present:
        raise ValueError(f"plot_cost_comparison needs one of the columns {', '.join(costs)}")
    done = runs[runs["status"] == "completed"] if "status" in runs.columns else runs
    names = (done["name"] if "name" in done.columns else done.index.astype(str)).astype(str)
    colors = [COLORS["full"] if m == "full" else COLORS["lora"] for m in done["method"]]
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[_label(c) for c in present])
    for col, cost in enumerate(present, start=1):
        values = done[cost] / 2**20 if cost.endswith("_bytes") else done[cost]
        fig.add_trace(go.Bar(x=names, y=values, marker_color=colors, showlegend=False, name=_label(cost),
                             hovertemplate="%{x}<br>%{y:.3g}<extra></extra>"), row=1, col=col)
    fig.update_layout(margin={"l": 60, "r": 20, "t": 90, "b": 120})
    return apply_style(fig, title)


def plot_update_norm(norms: pd.DataFrame, x: str = "alpha", title: str | None = None) -> go.Figure:
    """‖ΔW‖_F (all adapted modules together) of each run against ``x`` ("alpha" or "rank"), one line per
    rank or alpha (and scaling), full fine-tuning as a dashed line. ``norms``: one row per run with method,
    rank, alpha, rslora and ``delta_norm`` (√ of the sum of the modules' ‖ΔW‖_F²)."""
    _need(norms, ["method", x, "delta_norm"], "plot_update_norm")
    other = "rank" if x == "alpha" else "alpha"
    fig = go.Figure()
    for i, (label, group) in enumerate(_lora_groups(norms, [other, "rslora"])):
        group = group.dropna(subset=[x]).sort_values(x)
        fig.add_trace(go.Scatter(x=group[x], y=group["delta_norm"], mode="lines+markers", name=label,
                                 line={"color": SEQUENCE[(i + 2) % len(SEQUENCE)]},
                                 hovertemplate=f"{x}=%{{x:g}}<br>‖ΔW‖_F %{{y:.4g}}<extra>{label}</extra>"))
    full = norms[(norms["method"] == "full") & (norms["delta_norm"] > 0)]
    if len(full):
        value = float(full["delta_norm"].iloc[0])
        reference_line(fig, value, f"full fine-tuning {value:.3g}", log=True,
                       line={"color": COLORS["full"], "dash": "dash"})
    fig.update_xaxes(type="log", title="alpha α" if x == "alpha" else "rank r")
    fig.update_yaxes(type="log", title="‖ΔW‖_F over all adapted modules")
    return apply_style(fig, title or f"Size of the learned update versus {'alpha' if x == 'alpha' else 'rank'}")


def plot_task_metrics(table: pd.DataFrame, metric: str = "val_accuracy",
                      title: str | None = None) -> go.Figure:
    """Bars of the task metric per model variant (frozen base, LoRA unmerged, LoRA merged, full
    fine-tuning). ``table``: one row per variant with ``variant`` and ``metric``."""
    _need(table, ["variant", metric], "plot_task_metrics")
    colors = {"frozen base": COLORS["base"], "LoRA (unmerged)": COLORS["lora"], "LoRA (merged)": COLORS["merged"],
              "full fine-tuning": COLORS["full"]}
    fig = go.Figure(go.Bar(x=table["variant"], y=table[metric], text=[f"{v:.4g}" for v in table[metric]],
                           textposition="outside", marker_color=[colors.get(v, COLORS["random"]) for v in table["variant"]],
                           hovertemplate="%{x}<br>" + _label(metric) + " %{y:.5g}<extra></extra>"))
    fig.update_yaxes(title=_label(metric), rangemode="tozero")
    return apply_style(fig, title or f"Task metric: base, LoRA and full fine-tuning ({_label(metric)})")
