"""One look for every figure: colours by method, a clean template."""

from __future__ import annotations

import plotly.graph_objects as go

# LoRA in blue, full fine-tuning in orange, the frozen base in grey: the same on every chart.
COLORS = {"lora": "#1f77b4", "full": "#ff7f0e", "base": "#7f7f7f", "frozen": "#c7c7c7", "merged": "#2ca02c",
          "random": "#9467bd", "rslora": "#d62728"}

# A sequence for several LoRA ranks/runs on one chart (light to dark blue, then other hues).
SEQUENCE = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b", "#17becf", "#bcbd22", "#8c564b"]


def apply_style(fig: go.Figure, title: str | None = None) -> go.Figure:
    """Apply the house template and a title; returns the same figure."""
    fig.update_layout(template="plotly_white", title={"text": title, "x": 0.01} if title else None,
                      font={"family": "Inter, Helvetica, Arial, sans-serif", "size": 13},
                      legend={"font": {"size": 11}, "tracegroupgap": 2},
                      margin={"l": 60, "r": 20, "t": 70, "b": 50} if fig.layout.margin.l is None else None,
                      hoverlabel={"font_size": 12})
    return fig
