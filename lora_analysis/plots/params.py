"""Figures for parameter savings and the LoRA picture."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from .style import COLORS, apply_style, byte_unit, fit_range, log_ticks, safe_label


def plot_trainable_vs_rank(table: pd.DataFrame, title: str = "Trainable parameters versus rank") -> go.Figure:
    """Log-log chart of LoRA's trainable parameters per rank, against full fine-tuning's count.

    ``table``: rows from :func:`lora_analysis.params.rank_table` (rank, trainable_params, base_params,
    trainable_percent).
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=table["rank"], y=table["trainable_params"], mode="lines+markers", name="LoRA",
                             line={"color": COLORS["lora"]}, customdata=table["trainable_percent"],
                             hovertemplate="r=%{x}<br>%{y:,} trainable<br>%{customdata:.4f}% of all<extra></extra>"))
    full = int(table["base_params"].iloc[0]) if len(table) else 0
    fig.add_trace(go.Scatter(x=table["rank"], y=[full] * len(table), mode="lines", name="full fine-tuning",
                             line={"color": COLORS["full"], "dash": "dash"},
                             hovertemplate="full fine-tuning: %{y:,}<extra></extra>"))
    fig.update_xaxes(type="log", title="rank r", tickvals=list(table["rank"]),
                     ticktext=[f"{r:g}" for r in table["rank"]], range=fit_range(table["rank"], log=True))
    fig.update_yaxes(type="log", title="trainable parameters",
                     range=fit_range(list(table["trainable_params"]) + [full], log=True))
    return apply_style(fig, title)


def plot_percent_vs_rank(table: pd.DataFrame, title: str = "Trainable share of all parameters") -> go.Figure:
    """Trainable % (LoRA / all parameters, LoRA included) per rank, log axes."""
    fig = go.Figure(go.Scatter(x=table["rank"], y=table["trainable_percent"], mode="lines+markers",
                               line={"color": COLORS["lora"]}, name="LoRA",
                               hovertemplate="r=%{x}<br>%{y:.4f}%<extra></extra>"))
    fig.update_xaxes(type="log", title="rank r", tickvals=list(table["rank"]),
                     ticktext=[f"{r:g}" for r in table["rank"]], range=fit_range(table["rank"], log=True))
    fig.update_yaxes(type="log", title="trainable % of all parameters",
                     range=fit_range(table["trainable_percent"], log=True))
    log_ticks(fig, "y", table["trainable_percent"])
    return apply_style(fig, title)


def plot_memory(table: pd.DataFrame, title: str = "Training memory (activations excluded)") -> go.Figure:
    """Stacked bars of training memory by part for full fine-tuning and LoRA.

    ``table``: index = part (weights, gradients, optimizer states, fp32 master weights), columns full and
    lora, in bytes (``MemoryEstimate.table``).
    The unit (KiB, MiB, GiB, TiB) is chosen from the larger total, so small models read "600 KiB", never
    "0.00057 GiB".
    """
    fig = go.Figure()
    palette = ["#4c78a8", "#f58518", "#54a24b", "#b279a2"]
    divisor, unit = byte_unit([table["full"].sum(), table["lora"].sum()])
    for color, (part, row) in zip(palette, table.iterrows()):
        part = safe_label(part)
        fig.add_trace(go.Bar(x=["full fine-tuning", "LoRA"], y=[row["full"] / divisor, row["lora"] / divisor],
                             name=part, marker_color=color,
                             hovertemplate=f"{part}: " + "%{y:.3g} " + unit + "<extra></extra>"))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title=unit, tickformat="~g")
    return apply_style(fig, title)


def plot_lora_diagram(out_features: int, in_features: int, rank: int) -> go.Figure:
    """The LoRA picture with real shapes: frozen W (d×k) beside the trainable B (d×r) · A (r×k).

    W is drawn as a square-ish block with the true d:k aspect; B and A are drawn thin, their thickness
    growing with log r, so the picture stays readable for any rank. The numbers are exact.
    """
    d, k, r = out_features, in_features, rank
    height = 2.0
    width = max(0.6, min(4.0, height * k / d))
    thin = min(0.12 + 0.06 * math.log2(r), 0.6) if r > 1 else 0.12
    fig = go.Figure()

    def box(x0, y0, w, h, color):
        fig.add_shape(type="rect", x0=x0, y0=y0, x1=x0 + w, y1=y0 + h, fillcolor=color, opacity=0.9,
                      line={"color": "#444", "width": 1})

    def label(x, y, text, anchor="center"):
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, xanchor=anchor, font={"size": 13})

    box(0, 0, width, height, COLORS["frozen"])
    label(width / 2, height / 2, f"<b>W</b> (frozen)<br>{d:,} × {k:,}<br>{d * k:,} values")
    label(width + 0.35, height / 2, "<b>+</b>")
    x_b = width + 0.7
    box(x_b, 0, thin, height, COLORS["lora"])
    label(x_b + thin / 2, -0.22, f"<b>B</b><br>{d:,} × {r}")
    x_a = x_b + thin + 0.25
    box(x_a, height - thin, width, thin, COLORS["lora"])
    label(x_a + width / 2, height + 0.3, f"<b>A</b>  {r} × {k:,}")
    lora = r * (d + k)
    label(x_a + width / 2, height / 2 - 0.25,
          f"trainable: r·(d+k)<br><b>{lora:,}</b> values<br>{d * k / lora:,.1f}× fewer than d·k")
    fig.update_xaxes(visible=False, range=[-0.2, x_a + width + 0.2])
    fig.update_yaxes(visible=False, range=[-0.7, height + 0.6], scaleanchor="x")
    fig.update_layout(height=440, margin={"l": 10, "r": 10, "t": 50, "b": 10}, showlegend=False)
    return apply_style(fig, f"h = W·x + (α/r)·B·A·x   with r = {r}")
