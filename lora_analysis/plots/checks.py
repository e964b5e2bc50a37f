"""Checks that a figure tells the truth at a glance: its axes show its data, not much more, and no user
text in it is markup. Used by the tests of every figure, page and report.

Without a browser (``fig.full_figure_for_display()`` needs kaleido) the checks work on the figure itself.
Plotly's autorange covers the traces, the shapes and the annotations placed in data coordinates, so the
range an axis shows is its explicit ``range`` or the extent of all three. What the axis must show is its
data: the traces' values and the lines (shapes) drawn at values the reader compares them with (full
fine-tuning's metric, a rank_90); labels are not data. On a log axis a shape's x0/y0 is a
data value, but an annotation's x/y and an explicit ``range`` are log10 values (an annotation placed at N
on a log axis lands at 10^N: the bug these checks exist for).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

# How far (a fraction of the data's span; log10 units on log axes) an axis may show past its data.
DEFAULT_MARGIN = 0.25


@dataclass(frozen=True)
class AxisReach:
    """What one numeric axis shows against what its data need.

    axis: the layout key ("xaxis", "yaxis2"). log: a log axis. data: (lo, hi) of the traces' values and of
    the shapes (reference lines) in data coordinates (data units; > 0 only on log axes; a bar's baseline 0
    and ``rangemode="tozero"``'s 0 count).
    shown: (lo, hi) the axis shows: its explicit range, else the extent of data, shapes and annotations
    (data units). explicit: the range is explicit. over: how far ``shown`` runs past ``data`` on the worse
    side, as a fraction of the data's span (log10 units on a log axis; the span of one value is a decade on
    a log axis, |value| or 1 on a linear one); 0 when inside. clipped: the explicit range hides data.
    single: the data hold one value and the range is not explicit (plotly then invents the scale: ±1, or
    a decade either side). nonpositive: values ≤ 0 handed to a log axis (plotly drops them silently).
    """

    axis: str
    log: bool
    data: tuple[float, float]
    shown: tuple[float, float]
    explicit: bool
    over: float
    clipped: bool
    single: bool
    nonpositive: int

    def problems(self, margin: float = DEFAULT_MARGIN) -> list[str]:
        out = []
        ref = self.axis.replace("axis", "")
        if self.nonpositive:
            out.append(f"{ref}: {self.nonpositive} value(s) ≤ 0 on a log axis (not drawn)")
        if self.clipped:
            out.append(f"{ref}: explicit range [{self.shown[0]:.3g}, {self.shown[1]:.3g}] clips the data "
                       f"[{self.data[0]:.3g}, {self.data[1]:.3g}]")
        if self.single:
            out.append(f"{ref}: one value ({self.data[0]:.3g}) and no explicit range: plotly invents the scale")
        if self.over > margin:
            out.append(f"{ref}: shows [{self.shown[0]:.3g}, {self.shown[1]:.3g}], {self.over:.2g}× the data's span "
                       f"past the data [{self.data[0]:.3g}, {self.data[1]:.3g}]"
                       f"{' (log axis: an annotation x/y is log10)' if self.log else ''}")
        return out


def _numbers(values) -> list[float]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)):
        return []
    flat = np.asarray(values, dtype=object).ravel() if not np.isscalar(values) else [values]
    out: list[float] = []
    for v in flat:
        if isinstance(v, (list, tuple, np.ndarray)):
            out += _numbers(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
                and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _has_text(values) -> bool:
    if values is None:
        return False
    flat = np.asarray(values, dtype=object).ravel() if not isinstance(values, str) else [values]
    return any(isinstance(v, str) for v in flat)


def decode_spec(value):
    """A figure's JSON (a page's ``st.plotly_chart`` spec, ``fig.to_json()``) with plotly's packed numeric
    arrays (``{"dtype", "bdata"(, "shape")}``) turned back into nested lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array.tolist()
    if isinstance(value, dict):
        return {k: decode_spec(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_spec(v) for v in value]
    return value


def as_figure(fig: go.Figure | dict | str) -> go.Figure:
    """A Figure from a Figure, its JSON text or its JSON dict (packed arrays decoded)."""
    if isinstance(fig, go.Figure):
        return fig
    if isinstance(fig, str):
        import json

        fig = json.loads(fig)
    return go.Figure(decode_spec(fig), skip_invalid=True)


def bounds(fig: go.Figure) -> dict[str, list[float]]:
    """The natural bounds declared for a figure's axes (:func:`.style.bounded_axis`): {layout key: [lo, hi]}."""
    meta = fig.layout.meta
    return dict(meta.get("bounds", {})) if isinstance(meta, dict) else {}


def _layout_key(ref: str) -> str:
    """"x" → "xaxis", "y2" → "yaxis2"."""
    return f"{ref[0]}axis{ref[1:]}"


def _heatmap_extent(values: list[float], n: int) -> list[float]:
    """A heatmap's cells reach half a step past their first and last centre."""
    if not values:
        values = list(range(n))
    if not values:
        return []
    step = min(np.diff(sorted(set(values)))) if len(set(values)) > 1 else 1.0
    return [min(values) - step / 2, max(values) + step / 2]


def _error_extent(trace, letter: str, values: list[float]) -> list[float]:
    """The ends of a trace's error bars along ``letter`` (plotly's autorange covers them)."""
    error = getattr(trace, f"error_{letter}", None)
    if error is None or error.visible is False or error.type not in (None, "data"):
        return []
    plus = _numbers(decode_spec(error.array))
    minus = _numbers(decode_spec(error.arrayminus)) if error.symmetric is False else plus
    out = [v + e for v, e in zip(values, plus)] + [v - e for v, e in zip(values, minus)]
    return out


def _trace_values(fig: go.Figure) -> tuple[dict[str, list[float]], set[str]]:
    """Numeric data per axis reference ("x", "y2", ...), and the references that hold text (categories).
    Stacked bars (``barmode`` "stack"/"relative") count with their stacked totals, error bars with their
    ends."""
    found: dict[str, list[float]] = {}
    text_refs: set[str] = set()
    stacked = fig.layout.barmode in ("stack", "relative")
    stacks: dict[tuple, list[float]] = {}              # (value axis, category axis, position) → [+sum, −sum]
    for trace in fig.data:
        if "xaxis" not in trace:                     # tables, pies
            continue
        horizontal = getattr(trace, "orientation", None) == "h"
        value_axis = "x" if horizontal else "y"
        for letter in ("x", "y"):
            ref = getattr(trace, f"{letter}axis") or letter
            raw = decode_spec(getattr(trace, letter, None))
            if _has_text(raw):
                text_refs.add(ref)
                continue
            values = _numbers(raw)
            if trace.type == "heatmap":
                z = np.asarray(decode_spec(trace.z) if trace.z is not None else [], dtype=object)
                n = (z.shape[1] if z.ndim > 1 else 0) if letter == "x" else (z.shape[0] if z.ndim else 0)
                values = _heatmap_extent(values, n)
            elif trace.type == "bar" and letter == value_axis and values:
                if stacked:
                    other = "y" if horizontal else "x"
                    where = decode_spec(getattr(trace, other, None))
                    where = list(where) if where is not None else list(range(len(values)))
                    other_ref = getattr(trace, f"{other}axis") or other
                    for at, v in zip(where, values):
                        sums = stacks.setdefault((ref, other_ref, str(at)), [0.0, 0.0])
                        sums[0 if v >= 0 else 1] += v
                    values = []
                if fig.layout[_layout_key(ref)].type != "log":
                    values.append(0.0)          # bars start at 0 on a linear axis (a log axis has no 0)
            if trace.type != "heatmap" and letter == value_axis:
                values += _error_extent(trace, letter, _numbers(raw))
            found.setdefault(ref, []).extend(values)
    for (ref, _, _), (up, down) in stacks.items():
        found.setdefault(ref, []).extend(v for v in (up, down) if v != 0 or fig.layout[_layout_key(ref)].type != "log")
    return found, text_refs


def _shape_positions(fig: go.Figure, ref: str) -> list[float]:
    letter = ref[0]
    out: list[float] = []
    for shape in fig.layout.shapes:
        if (getattr(shape, f"{letter}ref") or letter) == ref:
            out += _numbers([getattr(shape, f"{letter}0"), getattr(shape, f"{letter}1")])
    return out


def _annotation_positions(fig: go.Figure, ref: str, log: bool) -> list[float]:
    out: list[float] = []
    for note in fig.layout.annotations:
        if (getattr(note, f"{ref[0]}ref") or ref[0]) != ref:
            continue
        for p in _numbers([getattr(note, ref[0])]):
            out.append((10 ** p if p < 300 else math.inf) if log else p)
    return out


def axis_overreach(fig: go.Figure | dict | str) -> dict[str, AxisReach]:
    """For each numeric, visible axis of ``fig`` (category, date and hidden axes are skipped): how far the
    range it shows exceeds its data's range, as an :class:`AxisReach` keyed by layout key ("xaxis", "yaxis2").

    The range shown is the axis' explicit ``range`` when set, else the extent of its data together with the
    shapes and annotations placed in its data coordinates (what plotly's autorange covers). Use
    :func:`axis_problems` for the verdict with a margin. A figure may declare an axis' natural bounds (φ in
    [0, 1]: :func:`.style.bounded_axis`); they count as data. ``fig``: a Figure, or its JSON (text or dict,
    e.g. a page's plotly spec).
    """
    fig = as_figure(fig)
    declared = bounds(fig)
    data, text_refs = _trace_values(fig)
    refs = set(data) | {getattr(s, f"{c}ref") or c for s in fig.layout.shapes for c in "xy"} | \
        {getattr(a, f"{c}ref") or c for a in fig.layout.annotations for c in "xy"}
    refs = {r for r in refs if r and r[0] in "xy" and "domain" not in r and r != "paper"}
    out: dict[str, AxisReach] = {}
    for ref in sorted(refs):
        key = _layout_key(ref)
        axis = fig.layout[key]
        if axis.type in ("category", "multicategory", "date") or (axis.type in (None, "-") and ref in text_refs) \
                or axis.visible is False:       # a hidden axis is a drawing's canvas (the LoRA diagram)
            continue
        log = axis.type == "log"
        values = data.get(ref, [])
        if getattr(axis, "rangemode", None) == "tozero" and values and not log:
            values = values + [0.0]
        nonpositive = sum(v <= 0 for v in values) if log else 0
        if log:
            values = [v for v in values if v > 0]
        shapes = _shape_positions(fig, ref)
        if log:
            nonpositive += sum(v <= 0 for v in shapes)
            shapes = [v for v in shapes if v > 0]
        values = values + shapes + [float(v) for v in declared.get(key, []) if not log or v > 0]
        extras = _annotation_positions(fig, ref, log)
        if log:
            extras = [v for v in extras if v > 0]
        if not values and not extras:
            continue
        # an autorange mode set beside a range wins over it in plotly.js
        explicit = axis.range is not None and len(axis.range) == 2 and None not in axis.range and \
            axis.autorange not in (True, "reversed")
        if explicit:
            lo, hi = sorted(10 ** float(r) if log else float(r) for r in axis.range)
        else:
            content = values + extras
            lo, hi = min(content), max(content)
        if values:
            d_lo, d_hi = min(values), max(values)
        else:                                   # only annotations: nothing to measure against
            d_lo, d_hi = lo, hi

        def scale(v: float) -> float:
            return math.log10(v) if log else v

        span = scale(d_hi) - scale(d_lo)
        if span <= 0:
            span = 1.0 if log else (abs(d_hi) or 1.0)
        below = (scale(d_lo) - scale(lo)) / span if lo > 0 or not log else math.inf
        above = (scale(hi) - scale(d_hi)) / span if math.isfinite(hi) else math.inf
        over = max(0.0, below, above)
        tol = 1e-9 * max(abs(d_lo), abs(d_hi), 1e-300)
        clipped = explicit and bool(values) and (d_lo < lo - tol or d_hi > hi + tol)
        single = bool(values) and d_lo == d_hi and not explicit and not extras
        out[key] = AxisReach(key, log, (d_lo, d_hi), (lo, hi), explicit, over, clipped, single, nonpositive)
    return out


def axis_problems(fig: go.Figure | dict | str, margin: float = DEFAULT_MARGIN) -> list[str]:
    """What plotly would draw wrong or far too wide on each numeric axis of ``fig``: an axis that shows
    more than ``margin`` × its data's span past its data (an annotation or line far outside it, or an
    explicit range much wider), an explicit range that clips data, one value left to plotly's invented
    scale, values ≤ 0 on a log axis. Empty when all is well."""
    return [p for reach in axis_overreach(fig).values() for p in reach.problems(margin)]


# ---- markup from user text -------------------------------------------------------------------------------

def text_fields(obj, path: str = "") -> list[tuple[str, str]]:
    """Every string in a figure's JSON (``fig.to_plotly_json()`` or a page's spec) with its path: the texts
    plotly may render (names, titles, hover templates, annotation and table text, category values)."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, str):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k == "template":                  # plotly's own theme
                continue
            out += text_fields(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += text_fields(v, f"{path}[{i}]")
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "OUS":
        out += text_fields(obj.tolist(), path)
    return out


# Tags plotly's text renderer would act on, or a browser would if the text reached HTML: none of ours.
MARKUP = ("<script", "<img", "<a ", "<a>", "<iframe", "<svg", "<style", "<object", "<embed", "<link", "<meta",
          "<form", "<input", "<video", "<audio", "<body", "<html")


def raw_markup(fig: go.Figure | dict, needles: tuple[str, ...] = MARKUP) -> list[str]:
    """Paths of the text fields of ``fig`` that hold a raw tag a user could have smuggled in (``needles``,
    case-insensitive; by default :data:`MARKUP`). Empty when all user text was escaped (``&lt;script``)."""
    spec = fig.to_plotly_json() if isinstance(fig, go.Figure) else decode_spec(fig)
    return [f"{path}: {text[:80]!r}" for path, text in text_fields(spec)
            if any(n in text.lower() for n in needles)]


# ---- tick labels on log axes -------------------------------------------------------------------------------

def log_tick_labels(fig: go.Figure | dict | str) -> dict[str, list[str] | None]:
    """For each numeric, visible log axis of ``fig`` (layout key → labels): the tick labels it shows, those of
    its explicit ticks (``tickvals``/``ticktext``) inside the range it shows (:func:`axis_overreach`); None
    for an axis that leaves its ticks to plotly, whose log ticks label the digits of each decade alone (2, 5,
    2, 5 … over two decades: labels that repeat)."""
    fig = as_figure(fig)
    out: dict[str, list[str] | None] = {}
    for key, reach in axis_overreach(fig).items():
        if not reach.log:
            continue
        axis = fig.layout[key]
        if axis.tickvals is None:
            out[key] = None
            continue
        values = _numbers(list(axis.tickvals))
        texts = list(axis.ticktext) if axis.ticktext is not None else [f"{v:g}" for v in values]
        lo, hi = reach.shown
        tol = 1e-9
        out[key] = [str(t) for v, t in zip(values, texts) if lo * (1 - tol) <= v <= hi * (1 + tol)]
    return out


def log_tick_problems(fig: go.Figure | dict | str, min_ticks: int = 1) -> list[str]:
    """What is wrong with the tick labels of ``fig``'s log axes: an axis leaving its ticks to plotly (labels
    that repeat), labels shown twice, fewer than ``min_ticks`` labels in the range shown. Empty when all is
    well (every figure styled by :func:`.style.apply_style` gets explicit, distinct labels)."""
    out = []
    for key, labels in log_tick_labels(fig).items():
        ref = key.replace("axis", "")
        if labels is None:
            out.append(f"{ref}: log axis with plotly's own tick labels (they repeat: 2, 5, 2, 5 …)")
            continue
        repeated = sorted({t for t in labels if labels.count(t) > 1})
        if repeated:
            out.append(f"{ref}: tick label(s) {', '.join(repeated)} shown more than once: {labels}")
        if len(labels) < min_ticks:
            out.append(f"{ref}: {len(labels)} tick label(s) in the range shown: {labels}")
    return out
