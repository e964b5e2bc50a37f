"""One look for every figure: colours by method, a clean template."""

from __future__ import annotations

import math

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


def reference_line(fig: go.Figure, value: float, text: str, axis: str = "y", log: bool = False,
                   line: dict | None = None, below: bool = False) -> go.Figure:
    """A horizontal (``axis="y"``) or vertical (``axis="x"``) line at ``value`` with its label.

    ``log``: the axis is logarithmic. A shape's position is a data value on any axis, but an annotation's
    is log10(value) on a log axis (plotly's rule); ``fig.add_hline(..., annotation_text=...)`` ignores that
    and puts the label, and the autorange, at 10^value. The label sits at the line's start (y lines, above
    the line or ``below`` it) or top (x lines).
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis={axis!r} is not allowed: choose 'x' or 'y'")
    if log and not value > 0:
        raise ValueError(f"value={value!r} cannot be drawn on a log axis: it must be > 0")
    at = math.log10(value) if log else value
    if axis == "y":
        fig.add_hline(y=value, line=line)
        fig.add_annotation(x=0, xref="x domain", y=at, yref="y", text=text, showarrow=False, xanchor="left",
                           yanchor="top" if below else "bottom")
    else:
        fig.add_vline(x=value, line=line)
        fig.add_annotation(x=at, xref="x", y=1, yref="y domain", text=text, showarrow=False, xanchor="left",
                           yanchor="top")
    return fig
