"""Figures for parameter savings and the LoRA picture."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .style import COLORS, apply_style


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
    fig.update_xaxes(type="log", title="rank r", tickvals=list(table["rank"]))
    fig.update_yaxes(type="log", title="trainable parameters")
    return apply_style(fig, title)


def plot_percent_vs_rank(table: pd.DataFrame, title: str = "Trainable share of all parameters") -> go.Figure:
    """Trainable % (LoRA / all parameters, LoRA included) per rank, log axes."""
    fig = go.Figure(go.Scatter(x=table["rank"], y=table["trainable_percent"], mode="lines+markers",
                               line={"color": COLORS["lora"]}, name="LoRA",
                               hovertemplate="r=%{x}<br>%{y:.4f}%<extra></extra>"))
    fig.update_xaxes(type="log", title="rank r", tickvals=list(table["rank"]))
    fig.update_yaxes(type="log", title="trainable % of all parameters")
    return apply_style(fig, title)


def plot_memory(table: pd.DataFrame, title: str = "Training memory (activations excluded)") -> go.Figure:
    """Stacked bars of training memory by part for full fine-tuning and LoRA.

    ``table``: index = part (weights, gradients, optimizer states, fp32 master weights), columns full and
    lora, in bytes (``MemoryEstimate.table``).
    """
    fig = go.Figure()
    palette = ["#4c78a8", "#f58518", "#54a24b", "#b279a2"]
    for color, (part, row) in zip(palette, table.iterrows()):
        fig.add_trace(go.Bar(x=["full fine-tuning", "LoRA"], y=[row["full"] / 2**30, row["lora"] / 2**30],
                             name=str(part), marker_color=color,
                             hovertemplate=f"{part}: " + "%{y:.2f} GiB<extra></extra>"))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title="GiB")
    return apply_style(fig, title)


def plot_lora_diagram(out_features: int, in_features: int, rank: int) -> go.Figure:
    """The LoRA picture with real shapes: frozen W (d×k) beside the trainable B (d×r) · A (r×k).

    Box sizes are drawn to scale on a square-root scale so a small r stays visible.
    """
    d, k, r = out_features, in_features, rank
    scale = 3.0 / max(d, k) ** 0.5
    hd, wk, wr = d**0.5 * scale, k**0.5 * scale, max(r**0.5 * scale, 0.12)
    fig = go.Figure()

    def box(x0, y0, w, h, color, label, sub):
        fig.add_shape(type="rect", x0=x0, y0=y0, x1=x0 + w, y1=y0 + h, fillcolor=color, opacity=0.85,
                      line={"color": "#333", "width": 1})
        fig.add_annotation(x=x0 + w / 2, y=y0 + h + 0.18, text=f"<b>{label}</b><br>{sub}", showarrow=False,
                           font={"size": 12})

    box(0, 0, wk, hd, COLORS["frozen"], "W (frozen)", f"{d:,}×{k:,} = {d * k:,}")
    fig.add_annotation(x=wk + 0.35, y=hd / 2, text="<b>+</b>", showarrow=False, font={"size": 26})
    x_b = wk + 0.7
    box(x_b, 0, wr, hd, COLORS["lora"], "B", f"{d:,}×{r}")
    fig.add_annotation(x=x_b + wr + 0.2, y=hd / 2, text="<b>·</b>", showarrow=False, font={"size": 26})
    x_a = x_b + wr + 0.4
    box(x_a, hd - wr, wk, wr, COLORS["lora"], "A", f"{r}×{k:,}")
    lora = r * (d + k)
    fig.add_annotation(x=(x_b + x_a + wk) / 2, y=-0.35, showarrow=False,
                       text=f"trainable: r·(d+k) = {lora:,} ({d * k / lora:.1f}× fewer than d·k)",
                       font={"size": 12})
    fig.update_xaxes(visible=False, range=[-0.2, x_a + wk + 0.2])
    fig.update_yaxes(visible=False, range=[-0.6, hd + 0.7], scaleanchor="x")
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10}, showlegend=False)
    return apply_style(fig, f"h = W·x + (α/r)·B·A·x   (r = {r})")
