"""One look for every figure: colours by method and by run, a clean template, safe labels, honest axes."""

from __future__ import annotations

import html
import math
import re
import zlib
from typing import Iterable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

# LoRA in blue, full fine-tuning in orange, the frozen base in grey: the same on every chart.
COLORS = {"lora": "#1f77b4", "full": "#ff7f0e", "base": "#7f7f7f", "frozen": "#c7c7c7", "merged": "#2ca02c",
          "random": "#9467bd", "rslora": "#d62728"}

# A sequence for several LoRA ranks/runs on one chart (light to dark blue, then other hues).
SEQUENCE = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b", "#17becf", "#bcbd22", "#8c564b"]

# Colours a run can get (:func:`run_color`): LoRA-like runs from the cool and neutral hues, full fine-tuning
# from the oranges, so the method stays readable while each run keeps its own colour everywhere.
RUN_PALETTE = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#08519c", "#8c564b", "#e377c2", "#bcbd22",
               "#6baed6", "#393b79", "#637939", "#d62728"]
FULL_PALETTE = ["#ff7f0e", "#d95f02", "#fdae6b", "#a63603", "#fd8d3c", "#e6550d"]

# Singular values below this fraction of σ₁ are left off spectrum charts: in a float32 ΔW (W_ft − W0, or the
# factored B·A) they are rounding noise, and a log axis would stretch down to 1e-16 to show them.
SPECTRUM_FLOOR = 1e-6

# A loss/metric axis is logarithmic only when its data span at least this ratio (max/min): below it a log
# axis adds nothing and its ticks read badly.
LOG_MIN_RATIO = 4.0

_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6,}")


def safe_label(value) -> str:
    """``value`` as text plotly shows literally, never as markup.

    Plotly renders a subset of HTML in every text it draws (titles, legends, hover labels, annotations, tick
    labels, table cells: ``<b>``, ``<br>``, ``<a href>``...) and decodes entities, so user text (run names,
    module names, config values) is HTML-escaped; ``%{`` is escaped too, so a name cannot pull values into a
    hover template. Escape once, where user text enters a figure (escaping twice shows ``&amp;lt;``).
    """
    return html.escape(str(value), quote=False).replace("%{", "%&#123;")


def run_key(key) -> str:
    """What identifies a run for its colour: the id's last 6 characters, whether ``key`` is a run id
    (``20261130-122332-832c2e63``) or a label that ends in them (``"LoRA r=4 · 2c2e63"``, as
    :func:`lora_analysis.analysis.registry.run_label` writes); any other text is its own key."""
    text = str(key)
    if _RUN_ID.fullmatch(text):
        return text[-6:]
    if " · " in text:
        tail = text.rsplit(" · ", 1)[1].strip()
        if re.fullmatch(r"[0-9a-f]{6}", tail):
            return tail
    return text


def _preferred_slot(key, palette: list[str]) -> int:
    return zlib.crc32(run_key(key).encode("utf-8")) % len(palette)


def run_color(key, kind: str | None = None) -> str:
    """The preferred colour of one run, the same on every page and in the report: a stable hash of
    :func:`run_key` (CRC-32, not Python's salted ``hash``) into :data:`RUN_PALETTE`, or :data:`FULL_PALETTE`
    for ``kind="full"``. Two runs can share a preferred colour: a figure with several runs takes its colours
    from :func:`run_colors`, which never gives two runs of one figure the same colour."""
    palette = FULL_PALETTE if kind == "full" else RUN_PALETTE
    return palette[_preferred_slot(key, palette)]


def run_colors(keys: Iterable, kinds: Iterable | None = None) -> dict:
    """{key: colour} for the runs drawn in ONE figure: distinct runs get distinct colours (as long as the
    palette has room: 12 LoRA-like colours, 6 orange shades for full fine-tuning), and each run keeps its
    :func:`run_color` whenever no other run of the figure claims that colour first.

    ``keys``: run ids or labels (:func:`run_key` decides which are the same run; the same run gets the same
    colour), ``kinds``: parallel method names ("full" takes the orange palette). Runs are taken in the
    order of their sorted :func:`run_key`: first every run whose preferred colour no earlier run holds keeps
    it, then the others probe to the next free slot of the palette. So a colour depends only on the set of
    runs in the figure, never on the order they are drawn in.
    """
    keys = list(keys)
    kinds = [None] * len(keys) if kinds is None else list(kinds)
    if len(kinds) != len(keys):
        raise ValueError(f"run_colors got {len(keys)} keys but {len(kinds)} kinds: give one kind per key")
    groups: dict[bool, set[str]] = {False: set(), True: set()}
    for key, kind in zip(keys, kinds):
        groups[kind == "full"].add(run_key(key))
    chosen: dict[tuple[bool, str], str] = {}
    for full, members in groups.items():
        palette = FULL_PALETTE if full else RUN_PALETTE
        taken: dict[int, str] = {}
        waiting = []
        for member in sorted(members):
            slot = _preferred_slot(member, palette)
            if slot in taken:
                waiting.append(member)
            else:
                taken[slot] = member
        for slot, member in taken.items():
            chosen[(full, member)] = palette[slot]
        for member in waiting:
            slot = _preferred_slot(member, palette)
            n = len(palette)
            free = next(((slot + step) % n for step in range(1, n) if (slot + step) % n not in taken), None)
            if free is not None:          # else the palette is used up: the run keeps its preferred colour
                taken[free] = member
                slot = free
            chosen[(full, member)] = palette[slot]
    return {key: chosen[(kind == "full", run_key(key))] for key, kind in zip(keys, kinds)}


# The house template: plotly_white with our font, legend and hover label, registered once under this name.
TEMPLATE = "lora_analysis"


def _register_template() -> go.layout.Template:
    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.update(font={"family": "Inter, Helvetica, Arial, sans-serif", "size": 13},
                           legend={"font": {"size": 11}, "tracegroupgap": 2}, hoverlabel={"font_size": 12},
                           title={"x": 0.01})
    pio.templates[TEMPLATE] = template
    return template


_TEMPLATE = _register_template()


def _set_template(fig: go.Figure) -> None:
    """``fig.layout.template = TEMPLATE``, cheaply. Plotly validates an assigned template property by
    property (about 10 ms a figure, most of apply_style's time); our template is built and validated once,
    so it is set the way plotly sets its default template on every new figure (validation off for that one
    assignment). Where plotly's internals differ, the plain (validated) assignment is used."""
    layout = getattr(fig, "_layout_obj", None)
    if layout is None or not hasattr(layout, "_validate") or not getattr(fig, "_allow_disable_validation", False):
        fig.update_layout(template=TEMPLATE)
        return
    before = layout._validate
    layout._validate = False
    try:
        layout.template = _TEMPLATE
    finally:
        layout._validate = before


def apply_style(fig: go.Figure, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Apply the house template (:data:`TEMPLATE`) and a title; returns the same figure. Every log axis
    without tick positions of its own gets labelled ticks (:func:`log_ticks`: never the repeated digits of
    plotly's own log ticks).

    ``title`` and ``subtitle`` are plain text (they may carry user text, e.g. a module name): they are
    escaped here, so pass them unescaped. The subtitle is drawn small under the title.
    """
    text = None
    if title:
        text = safe_label(title) + (f"<br><sup>{safe_label(subtitle)}</sup>" if subtitle else "")
    elif subtitle:
        text = f"<sup>{safe_label(subtitle)}</sup>"
    layout = {"title": {"text": text, "x": 0.01} if text else None}
    if fig.layout.margin.l is None:       # margins a plot function set (room for long tick labels) are kept
        layout["margin"] = {"l": 60, "r": 20, "t": 70, "b": 50}
    _label_log_axes(fig, layout)
    fig.update_layout(layout)             # one update, before the template (updates after it cost more)
    _set_template(fig)
    return fig


def reference_line(fig: go.Figure, value: float, text: str, axis: str = "y", log: bool = False,
                   line: dict | None = None, below: bool = False) -> go.Figure:
    """A horizontal (``axis="y"``) or vertical (``axis="x"``) line at ``value`` with its label.

    ``log``: the axis is logarithmic. A shape's position is a data value on any axis, but an annotation's
    is log10(value) on a log axis (plotly's rule); ``fig.add_hline(..., annotation_text=...)`` ignores that
    and puts the label, and the autorange, at 10^value. The label sits at the line's start (y lines, above
    the line or ``below`` it) or top (x lines). ``text`` is plain text (escaped here).
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis={axis!r} is not allowed: choose 'x' or 'y'")
    if log and not value > 0:
        raise ValueError(f"value={value!r} cannot be drawn on a log axis: it must be > 0")
    at = math.log10(value) if log else value
    if axis == "y":
        fig.add_hline(y=value, line=line)
        fig.add_annotation(x=0, xref="x domain", y=at, yref="y", text=safe_label(text), showarrow=False,
                           xanchor="left", yanchor="top" if below else "bottom")
    else:
        fig.add_vline(x=value, line=line)
        fig.add_annotation(x=at, xref="x", y=1, yref="y domain", text=safe_label(text), showarrow=False,
                           xanchor="left", yanchor="top")
    return fig


def bounded_axis(fig: go.Figure, axis: str, lo: float, hi: float, pad: float = 0.02) -> go.Figure:
    """Show the whole natural range [lo, hi] of a bounded quantity on ``axis`` ("x", "y", "y2"): φ in
    [0, 1], a share in [0, 100] %. Values near 0 then read as small, not as the top of an autoranged axis.
    The bounds are recorded in ``layout.meta["bounds"]`` so :mod:`.checks` counts them as data."""
    key = f"{axis[0]}axis{axis[1:]}"
    span = hi - lo
    fig.update_layout({key: {"range": [lo - pad * span, hi + pad * span]}})
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta["bounds"] = {**meta.get("bounds", {}), key: [lo, hi]}
    fig.update_layout(meta=meta)
    return fig


def finite(values: Iterable) -> np.ndarray:
    """The finite numbers among ``values`` (None, NaN, inf and non-numbers dropped), as floats."""
    out = []
    for v in np.asarray(list(values), dtype=object).ravel():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=float)


def wants_log(values: Iterable, min_ratio: float = LOG_MIN_RATIO) -> bool:
    """Whether ``values`` are worth a log axis: all > 0 and spanning at least ``min_ratio`` (max/min)."""
    v = finite(values)
    return bool(len(v) and v.min() > 0 and v.max() / v.min() >= min_ratio)


def fit_range(values: Iterable, log: bool = False, pad: float = 0.05) -> list[float] | None:
    """An explicit axis range that shows ``values`` with a margin of ``pad`` × their span (in log10 units on
    a log axis, where the range is given as log10 values, plotly's rule). One distinct value gets ``pad`` ×
    a decade (log) or × |value| (linear; 1 for 0) either side, never plotly's invented ±1. None without data.
    """
    v = finite(values)
    if log:
        v = np.log10(v[v > 0]) if len(v) else v
    if not len(v):
        return None
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else (1.0 if log else (abs(hi) or 1.0))
    return [lo - pad * span, hi + pad * span]


# At most this many labelled ticks on a log axis (:func:`log_tick_values`).
LOG_MAX_TICKS = 8
_MANTISSAS = ([1], [1, 2, 5], [1, 2, 3, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9])


def _nice_step(raw: float) -> float:
    exponent = math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * 10.0 ** exponent >= raw:
            return float(f"{m}e{exponent}")
    return 10.0 ** (exponent + 1)


def log_tick_values(lo: float, hi: float, max_ticks: int = LOG_MAX_TICKS) -> list[float]:
    """Tick positions (data units) for a log axis showing [lo, hi] (both > 0): powers of ten, then 1-2-5,
    1-2-3-5 or every digit of each decade, the finest of these with at most ``max_ticks`` ticks in range;
    every k-th power of ten over a wide span; evenly spaced round numbers over a span too narrow for three
    of them."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"a log axis needs 0 < lo ≤ hi, finite; got lo={lo!r}, hi={hi!r}")
    lo, hi = min(lo, hi), max(lo, hi)
    a, b = math.log10(lo), math.log10(hi)
    k0, k1 = math.floor(a), math.ceil(b)
    tol = 1e-9

    def within(v: float) -> bool:
        return lo * (1 - tol) <= v <= hi * (1 + tol)

    best: list[float] = []
    for mantissas in _MANTISSAS:
        values = [v for k in range(k0, k1 + 1) for m in mantissas if within(v := float(f"{m}e{k}"))]
        if len(values) > max_ticks:
            if mantissas == [1]:          # a wide span: every k-th decade
                step = math.ceil(len(values) / max_ticks)          # 1 = 10^0 among them
                return [float(f"1e{k}") for k in range(math.ceil(a - tol), math.floor(b + tol) + 1) if k % step == 0]
            break
        best = values
    if len(best) >= 3:
        return best
    step = _nice_step((hi - lo) / 4) if hi > lo else _nice_step(lo / 10)
    first = math.ceil(lo / step - tol)
    values = [float(f"{(first + i) * step:.12g}") for i in range(int((hi - lo) / step + tol) + 2)]
    values = [v for v in values if within(v) and v > 0]
    return values or best or [lo]


def _number(v: float, digits: int) -> str:
    """``v`` with ``digits`` significant digits, short: 0.05, 300, 20k, 1.5M, 2e-8 (SI prefixes as plotly's)."""
    a = abs(v)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e4:
        return np.format_float_positional(v, precision=digits, unique=False, fractional=False, trim="-")
    if a >= 1e4:
        for suffix, power in (("T", 12), ("G", 9), ("M", 6), ("k", 3)):
            if a >= 10.0 ** power:
                return np.format_float_positional(v / 10.0 ** power, precision=digits, unique=False,
                                                  fractional=False, trim="-") + suffix
    mantissa, exponent = f"{v:.{max(digits - 1, 0)}e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def tick_labels(values: Iterable[float]) -> list[str]:
    """Labels for tick ``values``: each the shortest form of its value that is exact to 9 digits, so two
    different values never share a label (plotly's own log ticks label 2, 20 and 200 all "2")."""
    values = [float(v) for v in values]
    for digits in range(1, 16):
        exact = all(math.isclose(float(f"{v:.{digits - 1}e}"), v, rel_tol=1e-9, abs_tol=0) for v in values)
        if exact:
            labels = [_number(v, digits) for v in values]
            if len(set(labels)) == len(labels):
                return labels
    return [repr(v) for v in values]


def _axis_key(axis: str) -> str:
    return axis if "axis" in axis else f"{axis[0]}axis{axis[1:]}"


def _log_axis_ticks(ax, values: Iterable | None) -> dict | None:
    """The tick settings :func:`log_ticks` gives the log axis ``ax`` (None without positive data)."""
    if ax.range is not None and len(ax.range) == 2 and None not in ax.range:
        lo, hi = sorted(10.0 ** float(r) for r in ax.range)
    else:
        v = finite(values if values is not None else [])
        v = v[v > 0]
        if not len(v):
            return None
        lo, hi = float(v.min()), float(v.max())
        if hi > lo:                       # plotly's autorange pads the data a little
            pad = 0.05 * (math.log10(hi) - math.log10(lo))
            lo, hi = lo / 10 ** pad, hi * 10 ** pad
    ticks = log_tick_values(lo, hi)
    return {"tickmode": "array", "tickvals": ticks, "ticktext": tick_labels(ticks), "tickformat": "~g"}


def log_ticks(fig: go.Figure, axis: str, values: Iterable | None = None) -> None:
    """Readable, distinct tick labels on the log axis ``axis`` ("x", "y2", or a layout key "yaxis2"):
    explicit tick positions (:func:`log_tick_values`) over the axis' explicit range, else over ``values``
    (the data it shows), labelled as full numbers (0.2, 0.5, 1, 2, 20k, 2e-8: :func:`tick_labels`), never
    the bare, repeating digits (2, 5, 1, 2, 5) of plotly's own log ticks. Does nothing without positive data.
    :func:`apply_style` does this for every log axis left without tick positions."""
    key = _axis_key(axis)
    ticks = _log_axis_ticks(fig.layout[key], values)
    if ticks:
        fig.update_layout({key: ticks})


def _label_log_axes(fig: go.Figure, layout: dict) -> None:
    """Into ``layout`` (an update for ``fig``): :func:`log_ticks`' settings for every log axis of ``fig``
    that has no tick positions of its own, over the range it shows (its explicit range, else its data,
    shapes and annotations: :func:`.checks.axis_overreach`)."""
    axes = {k: ax for k, ax in _axes(fig) if ax.type == "log" and ax.tickvals is None and ax.dtick is None}
    if not axes:
        return
    reach = None
    for key, ax in axes.items():
        explicit = ax.range is not None and len(ax.range) == 2 and None not in ax.range
        if not explicit and reach is None:
            from .checks import axis_overreach

            reach = axis_overreach(fig)
        shown = None if explicit else (reach[key].shown if key in reach else None)
        ticks = _log_axis_ticks(ax, shown)
        if ticks:
            layout[key] = {**layout.get(key, {}), **ticks}


def _axes(fig: go.Figure):
    """(layout key, axis) of every x and y axis the figure's layout holds."""
    names = [k for k in (fig.layout._props or {}) if re.fullmatch(r"[xy]axis\d*", k)] \
        if isinstance(getattr(fig.layout, "_props", None), dict) else None
    if names is None:
        return [(ax.plotly_name, ax) for letter in "xy" for ax in getattr(fig, f"select_{letter}axes")()]
    return [(k, fig.layout[k]) for k in sorted(names)]


def byte_unit(values: Iterable) -> tuple[float, str]:
    """(divisor, unit) for showing byte counts: the largest of B, KiB, MiB, GiB, TiB in which the largest
    value is at least 1 (so 600 KiB reads "600 KiB", never "0.00057 GiB")."""
    v = finite(values)
    top = float(np.abs(v).max()) if len(v) else 0.0
    unit, divisor = "B", 1.0
    for i, name in enumerate(("KiB", "MiB", "GiB", "TiB"), start=1):
        if top >= 2 ** (10 * i):
            unit, divisor = name, float(2 ** (10 * i))
    return divisor, unit
