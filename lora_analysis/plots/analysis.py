"""Figures for the analyses (``lora_analysis.analysis``): DataFrames in, ``plotly.graph_objects.Figure`` out.

Colours follow :mod:`.style`: LoRA blue, full fine-tuning orange, the base grey, random purple, merged green.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import (COLORS, SPECTRUM_FLOOR, apply_style, bounded_axis, finite, fit_range, log_ticks,
                    reference_line, run_colors, safe_label)

# A longer qualitative palette for many modules on one chart.
MODULE_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)(?:\.|$)")
_ANY_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def parse_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, module type) from a module path.

    ``blocks.3.attn.q_proj`` → (3, "attn.q_proj"), ``model.layers.3.self_attn.q_proj`` → (3, "self_attn.q_proj"),
    ``transformer.h.0.attn.c_attn`` → (0, "attn.c_attn"). Without a layer-like part, the first numeric part
    is the layer (``0`` in ``0.fc``); with none at all, (None, name).
    """
    m = _LAYER.search(name) or _ANY_INDEX.search(name)
    if not m:
        return None, name
    rest = name[m.end():]
    return int(m.group(1)), rest or name


def _short(name, limit: int = 40) -> str:
    """A name cut to ``limit`` characters (its end kept) and escaped for plotly: user text, shown as text."""
    name = str(name)
    return safe_label(name if len(name) <= limit else "…" + name[-(limit - 1):])


def _above_floor(s: np.ndarray) -> np.ndarray:
    """Which singular values are drawn: those above :data:`SPECTRUM_FLOOR` × σ₁ (below it, float32 noise)."""
    return s > SPECTRUM_FLOOR * (float(s.max()) if len(s) else 0.0)


def _floor_note(cut: int) -> str | None:
    floor = f"{SPECTRUM_FLOOR:.0e}".replace("e-0", "e-")
    return f"{cut} singular value(s) below {floor}·σ₁ not drawn (numerical zeros)" if cut else None


def plot_singular_values(spectra: pd.DataFrame, normalized: bool = False, max_modules: int = 16,
                         title: str | None = None) -> go.Figure:
    """Singular values σ_k of ΔW per module against k (log y).

    ``spectra``: :func:`lora_analysis.analysis.spectra_frame` (name, singular_values; normalized_spectrum when
    ``normalized``). At most ``max_modules`` modules, largest ‖ΔW‖_F first. Zero singular values are left
    out (a log axis cannot show them), and so are those below :data:`SPECTRUM_FLOOR` × σ₁ (numerical zeros
    of a float32 ΔW; the subtitle says how many).
    """
    column = "normalized_spectrum" if normalized else "singular_values"
    rows = spectra.sort_values("fro_norm", ascending=False).head(max_modules) if "fro_norm" in spectra else \
        spectra.head(max_modules)
    fig = go.Figure()
    cut, ks, ys = 0, [], []
    for i, (_, row) in enumerate(rows.iterrows()):
        s = np.asarray(row[column], dtype=float)
        keep = _above_floor(s)
        cut += int(np.sum(s > 0) - np.sum(keep))
        k = np.arange(1, len(s) + 1)[keep]
        ks += list(k)
        ys += list(s[keep])
        name, full_name = _short(row["name"]), safe_label(row["name"])
        fig.add_trace(go.Scatter(x=k, y=s[keep], mode="lines+markers", name=name,
                                 line={"color": MODULE_PALETTE[i % len(MODULE_PALETTE)]}, marker={"size": 5},
                                 hovertemplate=f"{full_name}<br>k=%{{x}}<br>σ=%{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title="singular value index k", range=fit_range(ks), dtick=1 if ks and max(ks) <= 10 else None)
    fig.update_yaxes(type="log", title="σₖ / σ₁" if normalized else "singular value σₖ of ΔW",
                     range=fit_range(ys, log=True))
    return apply_style(fig, title or ("Normalised singular spectrum of ΔW" if normalized
                                      else "Singular spectrum of ΔW per module"), _floor_note(cut))


def plot_cumulative_energy(spectra: pd.DataFrame, max_modules: int = 16, title: str = "Cumulative energy of ΔW"
                           ) -> go.Figure:
    """Share of Σσ² held by the top-k directions per module (from k = 0, where it is 0 %), with the 90 % and
    99 % lines."""
    rows = spectra.sort_values("fro_norm", ascending=False).head(max_modules) if "fro_norm" in spectra else \
        spectra.head(max_modules)
    fig = go.Figure()
    for i, (_, row) in enumerate(rows.iterrows()):
        s = np.asarray(row["singular_values"], dtype=float)
        total = float(np.sum(s**2))
        cum = np.cumsum(s**2) / total if total > 0 else np.zeros_like(s)
        fig.add_trace(go.Scatter(x=np.arange(0, len(s) + 1), y=np.concatenate([[0.0], cum * 100]),
                                 mode="lines+markers", name=_short(row["name"]), marker={"size": 4},
                                 line={"color": MODULE_PALETTE[i % len(MODULE_PALETTE)]},
                                 hovertemplate=f"{safe_label(row['name'])}<br>top %{{x}}: %{{y:.1f}}%<extra></extra>"))
    for level in (90, 99):
        fig.add_hline(y=level, line={"color": COLORS["base"], "dash": "dot", "width": 1},
                      annotation_text=f"{level}%", annotation_position="bottom right")
    fig.update_xaxes(title="number of top singular directions k")
    fig.update_yaxes(title="share of Σσ² (%)")
    bounded_axis(fig, "y", 0.0, 100.0, pad=0.01)
    return apply_style(fig, title)


def rank_grid(spectra: pd.DataFrame, metric: str = "effective_rank") -> pd.DataFrame:
    """``metric`` as a layers × module-type table (index layer, columns type); names without a layer index
    go in a row labelled "—"."""
    if metric not in spectra:
        raise ValueError(f"metric={metric!r} is not a column of the spectra table: choose one of "
                         f"{[c for c in spectra.columns if spectra[c].dtype.kind in 'fi']}")
    parsed = [parse_module_name(str(n)) for n in spectra["name"]]
    frame = pd.DataFrame({"layer": ["—" if layer is None else layer for layer, _ in parsed],
                          "type": [t for _, t in parsed], "value": spectra[metric].astype(float).to_numpy()})
    grid = frame.pivot_table(index="layer", columns="type", values="value", aggfunc="mean", sort=False)
    numeric = sorted((i for i in grid.index if i != "—"), key=int)
    return grid.reindex(numeric + [i for i in grid.index if i == "—"])


RANK_METRICS = ("effective_rank", "stable_rank", "rank_90", "rank_99", "numerical_rank")
# Below this share of the colour scale, differences between modules are called negligible.
NEGLIGIBLE = 0.02


def max_rank(spectra: pd.DataFrame) -> float | None:
    """The largest rank any module's ΔW can have: its LoRA rank r, else min(out, in) (full fine-tuning)."""
    caps = []
    for _, row in spectra.iterrows():
        r = row.get("rank")
        if r is not None and pd.notna(r) and r > 0:
            caps.append(float(r))
        elif "out_features" in row and pd.notna(row.get("out_features")) and pd.notna(row.get("in_features")):
            caps.append(float(min(row["out_features"], row["in_features"])))
    return max(caps) if caps else None


def _rank_scale(spectra: pd.DataFrame, metric: str,
                values: np.ndarray) -> tuple[float | None, float | None, str | None]:
    """(zmin, zmax, note): rank metrics on a fixed 0 … max-rank scale, so a spread of 7.90–7.95 looks as
    small as it is, and a note giving the spread (saying "negligible" when it is under 2 % of the scale)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return None, None, None
    label = metric.replace("_", " ")
    top = max_rank(spectra) if metric in RANK_METRICS else None
    zmax = max(top, float(v.max())) if top else None
    zmin = 0.0 if metric in RANK_METRICS or metric == "fro_norm" else None
    scale = (zmax if zmax else float(v.max())) - (zmin or 0.0)
    spread = float(v.max() - v.min())
    note = f"{label} {v.min():.3g}–{v.max():.3g}" + (f" of at most {zmax:g}" if zmax else "")
    if len(v) > 1 and scale > 0 and spread < NEGLIGIBLE * scale:
        note += ": the modules differ negligibly"
    return zmin, zmax, note


def plot_rank_heatmap(spectra: pd.DataFrame, metric: str = "effective_rank", title: str | None = None) -> go.Figure:
    """Heatmap of a per-module metric (effective_rank, stable_rank, rank_90, ...) with layers as rows and
    module types (q_proj, v_proj, ...) as columns; for a model without layers (no module name has a layer
    index, e.g. ``fc1``, ``fc2``) a bar chart by module instead.

    Rank metrics use a fixed colour (or bar) scale from 0 to the largest rank a module can have (its LoRA r,
    or min(out, in)), and the subtitle gives the spread, saying when the modules differ negligibly.
    """
    grid = rank_grid(spectra, metric)
    label = metric.replace("_", " ")
    values = spectra[metric].astype(float).to_numpy()
    zmin, zmax, note = _rank_scale(spectra, metric, values)
    if list(grid.index) == ["—"]:
        names = [_short(n, 30) for n in spectra["name"]]
        kinds = spectra["kind"] if "kind" in spectra.columns else ["lora"] * len(spectra)
        fig = go.Figure(go.Bar(x=names, y=values, marker_color=[COLORS.get(k, COLORS["lora"]) for k in kinds],
                               text=[f"{v:.3g}" for v in values], textposition="outside",
                               hovertemplate="%{x}<br>" + label + " = %{y:.3g}<extra></extra>"))
        fig.update_xaxes(title="module", type="category")
        # bars from 0 already show how small a spread is; the room above is for the value labels
        top = float(np.nanmax(values)) if np.isfinite(values).any() and np.nanmax(values) > 0 else 1.0
        fig.update_yaxes(title=label, range=[0, top * 1.15])
        return apply_style(fig, title or f"{label.capitalize()} of ΔW by module", note)
    rows = ["no layer" if i == "—" else str(i) for i in grid.index]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[_short(c, 30) for c in grid.columns], y=rows,
                               zmin=zmin, zmax=zmax, colorscale="Blues", colorbar={"title": label},
                               hovertemplate="layer %{y}<br>%{x}<br>" + label + " = %{z:.3g}<extra></extra>"))
    fig.update_xaxes(title="module type", type="category")
    fig.update_yaxes(title="layer", autorange="reversed", type="category")
    return apply_style(fig, title or f"{label.capitalize()} of ΔW by layer and module", note)


def plot_rank_sweep_spectra(runs: pd.DataFrame, normalized: bool = True,
                            title: str = "Spectra across ranks versus full fine-tuning") -> go.Figure:
    """One module's ΔW spectrum for several runs (a rank sweep) and full fine-tuning on one chart.

    ``runs``: one row per run with ``label`` (e.g. "r=8"), ``kind`` ("lora"/"full"), ``singular_values`` and
    optionally ``rank_90``. LoRA runs use the blue sequence, full fine-tuning orange with its rank_90 marked
    by a vertical line. ``normalized`` divides each spectrum by its σ₁ so runs of different scale compare.
    Each run keeps its colour on every page as far as the other runs shown allow (:func:`.style.run_colors`
    of ``run_id`` when the frame has it, else of ``label``: two runs never share a colour). Values below
    :data:`.style.SPECTRUM_FLOOR` × σ₁ are rounding noise: not drawn. Both axes are fitted to the data, so
    the index axis ends at the largest k drawn.
    """
    fig = go.Figure()
    cut, ks, ys = 0, [], []

    def key_of(row):
        return row["run_id"] if "run_id" in row and isinstance(row["run_id"], str) and row["run_id"] else row["label"]

    colors = run_colors([key_of(row) for _, row in runs.iterrows()],
                        ["full" if row.get("kind") == "full" else None for _, row in runs.iterrows()])
    for _, row in runs.iterrows():
        s = np.asarray(row["singular_values"], dtype=float)
        top = float(s.max()) if len(s) else 0.0
        if normalized and top > 0:
            s = s / top
        keep = _above_floor(s)
        cut += int(np.sum(s > 0) - np.sum(keep))
        is_full = row.get("kind") == "full"
        key = key_of(row)
        k = np.arange(1, len(s) + 1)[keep]
        ks += list(k)
        ys += list(s[keep])
        label = _short(row["label"], 60)
        fig.add_trace(go.Scatter(x=k, y=s[keep], mode="lines" if len(k) > 1 else "markers",
                                 name=label, line={"color": colors[key],
                                                   "width": 3 if is_full else 2},
                                 hovertemplate=f"{label}<br>k=%{{x}}<br>σ=%{{y:.4g}}<extra></extra>"))
        if is_full and "rank_90" in row and pd.notna(row["rank_90"]) and row["rank_90"] > 0:
            reference_line(fig, int(row["rank_90"]), f"full FT rank_90 = {int(row['rank_90'])}", axis="x",
                           log=True, line={"color": COLORS["full"], "dash": "dash"})
            ks.append(int(row["rank_90"]))
    fig.update_xaxes(type="log", title="singular value index k", range=fit_range(ks, log=True, pad=0.015))
    fig.update_yaxes(type="log", title="σₖ / σ₁" if normalized else "singular value σₖ",
                     range=fit_range(ys, log=True))
    return apply_style(fig, title, _floor_note(cut))


def plot_similarity_heatmap(phi, d: int | None = None, title: str = "Subspace similarity φ(i, j)",
                            x_label: str = "j (second subspace)", y_label: str = "i (first subspace)") -> go.Figure:
    """Heatmap of φ(i, j) (array or DataFrame, ``phi[i-1, j-1]``), 0 to 1. With ``d`` (the dimension of the
    space) the random-subspace expectation max(i, j)/d is in the hover and the title."""
    z = np.asarray(phi, dtype=float)
    ii, jj = np.meshgrid(np.arange(1, z.shape[0] + 1), np.arange(1, z.shape[1] + 1), indexing="ij")
    hover = "i=%{y}, j=%{x}<br>φ=%{z:.3f}"
    custom = None
    if d:
        custom = np.maximum(ii, jj) / d
        hover += "<br>random baseline max(i,j)/d=%{customdata:.3g}"
    subtitle = f"random subspaces: φ ≈ max(i, j)/d = {1 / d:.2g} … {custom.max():.2g} (d = {d})" if d else None
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(1, z.shape[1] + 1), y=np.arange(1, z.shape[0] + 1),
                               zmin=0, zmax=1, colorscale="Blues", customdata=custom, colorbar={"title": "φ"},
                               hovertemplate=hover + "<extra></extra>"))
    # the labels often name runs (user text): escaped
    fig.update_xaxes(title=safe_label(x_label), dtick=max(1, z.shape[1] // 8))
    fig.update_yaxes(title=safe_label(y_label), autorange="reversed", dtick=max(1, z.shape[0] // 8))
    return apply_style(fig, title, subtitle)


def plot_amplification(amp: pd.DataFrame, title: str = "Frobenius norm ‖UᵀW0V‖: W0 projected on r directions"
                       ) -> go.Figure:
    """Grouped bars per module of ‖Uᵀ·W0·V‖_F for U, V from ΔW, W0's own top-r and random, plus ‖ΔW‖_F
    (LoRA Table 7); the amplification factor ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F is printed on the ΔW bars. Log y, with
    distinct tick labels (:func:`.style.log_ticks`). The labels write the norms without "_F" (all are
    Frobenius norms, the y axis says so): an underscore may be read as markup where the text is shown.

    ``amp``: :func:`lora_analysis.analysis.amplification_frame`.
    """
    names = [_short(n, 30) for n in amp["name"]]
    fig = go.Figure()
    series = [("proj_delta", "U, V from ΔW", COLORS["lora"]), ("proj_w0", "U, V from W0 (top-r)", COLORS["base"]),
              ("proj_random", "random U, V", COLORS["random"]), ("delta_fro", "‖ΔW‖", COLORS["merged"])]
    for col, label, color in series:
        text = [f"×{a:.3g}" for a in amp["amplification"]] if col == "proj_delta" else None
        fig.add_trace(go.Bar(x=names, y=amp[col], name=label, marker_color=color, text=text, textposition="outside",
                             customdata=np.stack([amp["r"], amp["amplification"]], axis=1),
                             hovertemplate=label + ": %{y:.4g}<br>r=%{customdata[0]}<br>amplification ×"
                             "%{customdata[1]:.3g}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="module")
    values = finite(np.concatenate([amp[col].to_numpy(dtype=float) for col, _, _ in series])) if len(amp) else []
    values = [v for v in values if v > 0]
    # room above the tallest bar for the "×a" labels drawn outside the bars
    y_range = fit_range(values, log=True, pad=0.12)
    fig.update_yaxes(type="log", title="Frobenius norm", range=y_range)
    log_ticks(fig, "y", values)
    return apply_style(fig, title)


# The amplification table's geometry (px): plotly draws a table at the figure's height whatever its rows, so
# :func:`plot_amplification_table` sizes the figure from these (a gap below the table, or a scroll bar, else).
TABLE_HEADER_PX = 44          # two lines: "layer 0" over "self_attn.q_proj"
TABLE_ROW_PX = 26
TABLE_MARGIN = {"l": 10, "r": 10, "t": 60, "b": 10}


def table_height(n_rows: int, margin: dict = TABLE_MARGIN) -> int:
    """The figure height (px) that shows a header and ``n_rows`` rows of a table trace with
    :data:`TABLE_HEADER_PX` / :data:`TABLE_ROW_PX`, in ``margin``, without a gap or a scroll bar."""
    return int(margin["t"] + margin["b"] + TABLE_HEADER_PX + TABLE_ROW_PX * n_rows + 4)


def _module_header(name) -> str:
    """A module's name as a narrow two-line column header: "layer 3" over its type ("self_attn.q_proj"), or
    the name cut to 24 characters when it has no layer index. Escaped (user text)."""
    layer, kind = parse_module_name(str(name))
    if layer is None:
        return _short(name, 24)
    return f"layer {layer}<br>{_short(kind, 24)}"


def plot_amplification_table(amp: pd.DataFrame, title: str = "Amplification (LoRA paper, Table 7)") -> go.Figure:
    """The Table 7 numbers as a plotly table, one column per module (headed "layer i" over the module's
    type). The figure's height fits the table's rows (:func:`table_height`); the row labels are plain text
    (‖UᵀW0V‖, no "_F": all are Frobenius norms, as the label column's header says)."""
    # short labels: plotly wraps a cell's text at spaces when its column is narrow, and a wrapped row is
    # taller than TABLE_ROW_PX (the last row would be cut off)
    rows = [("r", "r", "{:d}"), ("‖UᵀW0V‖, ΔW's U, V", "proj_delta", "{:.3g}"),
            ("‖UᵀW0V‖, W0's U, V", "proj_w0", "{:.3g}"), ("‖UᵀW0V‖, random U, V", "proj_random", "{:.3g}"),
            ("‖W0‖", "w0_fro", "{:.3g}"), ("‖ΔW‖", "delta_fro", "{:.3g}"),
            ("amplification ‖ΔW‖/‖UᵀW0V‖", "amplification", "{:.3g}")]
    cells = [[label for label, _, _ in rows]]
    for _, rec in amp.iterrows():
        cells.append([fmt.format(int(rec[c]) if fmt == "{:d}" else float(rec[c])) for _, c, fmt in rows])
    # the label column wider than a module's, about a third of the table with many modules: its labels stay
    # on one line
    fig = go.Figure(go.Table(columnwidth=[max(1.8, 0.45 * len(amp))] + [1] * len(amp),
                             header={"values": ["Frobenius norms"] + [_module_header(n) for n in amp["name"]],
                                     "fill_color": "#f3f6fa", "align": "left", "height": TABLE_HEADER_PX},
                             cells={"values": cells, "align": ["left"] + ["right"] * len(amp),
                                    "height": TABLE_ROW_PX}))
    fig.update_layout(height=table_height(len(rows)), margin=TABLE_MARGIN)
    return apply_style(fig, title)


def plot_intruders_vs_epsilon(sweep: pd.DataFrame, k: int | None = None,
                              title: str = "Intruder dimensions versus threshold ε") -> go.Figure:
    """Total intruder count (summed over modules) against ε, one line per label (LoRA runs vs full FT).

    ``sweep``: :func:`lora_analysis.analysis.intruder_sweep` rows (concatenate several for several runs);
    ``k`` picks one k when the sweep has several (default: the largest).
    """
    k = int(sweep["k"].max()) if k is None else k
    part = sweep[sweep["k"] == k]
    totals = part.groupby(["label", "kind", "epsilon"], as_index=False, sort=False)["intruders"].sum()
    fig = go.Figure()
    pairs = list(totals.groupby(["label", "kind"], sort=False).groups)
    colors = run_colors([label for label, _ in pairs], [kind for _, kind in pairs])
    for (label, kind), grp in totals.groupby(["label", "kind"], sort=False):
        grp = grp.sort_values("epsilon")
        name = _short(label, 60)
        fig.add_trace(go.Scatter(x=grp["epsilon"], y=grp["intruders"], mode="lines+markers", name=name,
                                 line={"color": colors[label], "dash": "dash" if kind == "full" else "solid"},
                                 hovertemplate=f"{name}<br>ε=%{{x}}<br>%{{y}} intruders<extra></extra>"))
    fig.update_xaxes(title="ε (max |cosine| with W0's singular vectors below which a direction is an intruder)")
    fig.update_yaxes(title=f"intruders among top-{k} singular vectors (all modules)", rangemode="tozero")
    if len(totals) and not totals["intruders"].any():     # no intruder at any ε: keep a 0…k scale, not plotly's ±1
        bounded_axis(fig, "y", 0, k)
    return apply_style(fig, title)


def plot_merge_errors(errors: pd.DataFrame, reference: str = "same dtype",
                      title: str = "Merge error per dtype") -> go.Figure:
    """Grouped bars of max |y − y_ref| per setup (base dtype · LoRA factor dtype), one bar per merge variant
    (log y).

    ``errors``: ``MergeCheck.errors`` (frames without a ``setup`` column are grouped by ``dtype``).
    ``reference`` "same dtype" compares with the unmerged output of the same setup (what merging itself
    changes), "fp32" with the unmerged float32 output. A log axis has no 0: exact zeros are drawn at a tenth
    of the smallest nonzero error on the chart (1e-12 when all are 0), with the text "0" on the bar and in
    the hover.
    """
    col = "max_abs" if reference == "same dtype" else "max_abs_vs_fp32"
    if reference not in ("same dtype", "fp32"):
        raise ValueError(f"reference={reference!r} is not allowed: choose 'same dtype' or 'fp32'")
    colors = {"unmerged": COLORS["lora"], "merged": COLORS["merged"], "merged_unmerged": "#98df8a",
              "merge_and_unload": "#17becf", "naive_merge": COLORS["rslora"]}
    group = "setup" if "setup" in errors.columns else "dtype"
    variants = [v for v in errors["variant"].unique() if not (reference == "same dtype" and v == "unmerged")]
    shown = errors[errors["variant"].isin(variants)][col].astype(float).to_numpy()
    nonzero = shown[shown > 0]
    floor = float(nonzero.min()) / 10 if len(nonzero) else 1e-12
    fig = go.Figure()
    for variant in variants:
        part = errors[errors["variant"] == variant]
        values = part[col].astype(float).to_numpy()
        fig.add_trace(go.Bar(x=[safe_label(g) for g in part[group]], y=np.where(values > 0, values, floor),
                             name=safe_label(variant.replace("_", " ")),
                             marker_color=colors.get(variant, COLORS["base"]), customdata=values,
                             text=["0" if v == 0 else "" for v in values], textposition="outside",
                             hovertemplate=safe_label(variant) + " (%{x}): max abs error %{customdata:.3g}"
                             "<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="base dtype · LoRA factor dtype" if group == "setup" else "dtype")
    fig.update_yaxes(type="log", title="max |output − reference| (output units)")
    return apply_style(fig, f"{title} (reference: unmerged, {reference})")


def plot_latency(latency: pd.DataFrame, title: str = "Forward latency: base, unmerged LoRA, merged") -> go.Figure:
    """Bars of median forward time per variant, grouped by device, with the spread over the repeats as
    error bars (first to third quartile, when the frame has ``q1_ms``/``q3_ms``); hover shows min, the
    quartiles and the ratio to base.

    ``latency``: :func:`lora_analysis.analysis.latency_check`.
    """
    colors = {"base": COLORS["base"], "unmerged": COLORS["lora"], "merged": COLORS["merged"]}
    spread = {"q1_ms", "q3_ms"} <= set(latency.columns)
    fig = go.Figure()
    for variant in latency["variant"].unique():
        part = latency[latency["variant"] == variant]
        name = safe_label(variant)
        median = part["median_ms"].astype(float)
        q1 = part["q1_ms"].astype(float) if spread else median
        q3 = part["q3_ms"].astype(float) if spread else median
        error = {"type": "data", "symmetric": False, "array": (q3 - median).clip(lower=0),
                 "arrayminus": (median - q1).clip(lower=0), "thickness": 1.2, "width": 4} if spread else None
        fig.add_trace(go.Bar(x=[safe_label(d) for d in part["device"]], y=median, name=name, error_y=error,
                             marker_color=colors.get(variant, COLORS["random"]),
                             customdata=np.stack([part["min_ms"], part["relative"], q1, q3], axis=1),
                             text=[f"{r:.2f}×" for r in part["relative"]], textposition="outside",
                             hovertemplate=name + " on %{x}: median %{y:.3f} ms<br>min %{customdata[0]:.3f} ms"
                             + ("<br>quartiles %{customdata[2]:.3f} … %{customdata[3]:.3f} ms" if spread else "")
                             + "<br>%{customdata[1]:.2f}× base<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="device")
    fig.update_yaxes(title="median forward time (ms)" + (", bars: quartiles over the repeats" if spread else ""),
                     rangemode="tozero")
    return apply_style(fig, title)


def spectra_figures(spectra: pd.DataFrame) -> list[go.Figure]:
    """The standard set for one adapter: spectrum, cumulative energy, effective and stable rank heatmaps."""
    return [plot_singular_values(spectra), plot_cumulative_energy(spectra),
            plot_rank_heatmap(spectra, "effective_rank"), plot_rank_heatmap(spectra, "stable_rank")]


__all__: Sequence[str] = ["parse_module_name", "plot_amplification", "plot_amplification_table",
                          "plot_cumulative_energy", "plot_intruders_vs_epsilon", "plot_latency", "plot_merge_errors",
                          "plot_base_overlap", "plot_rank_heatmap", "max_rank", "plot_rank_sweep_spectra",
                          "plot_similarity_heatmap",
                          "plot_singular_values", "rank_grid", "spectra_figures"]


def plot_base_overlap(overlap: pd.DataFrame, title: str = "How much ΔW's top directions lie in W0's") -> go.Figure:
    """φ between ΔW's and W0's top-k singular directions against k, output side (U) and input side (V),
    with the random-subspace baselines k/d dotted. ``overlap``: :func:`lora_analysis.analysis.base_overlap`."""
    fig = go.Figure()
    for side, color in (("output", COLORS["lora"]), ("input", COLORS["merged"])):
        fig.add_trace(go.Scatter(x=overlap["k"], y=overlap[f"phi_{side}"], mode="lines+markers", name=f"{side} side",
                                 line={"color": color}, hovertemplate="k=%{x}<br>φ=%{y:.3f}<extra>" + side + "</extra>"))
        fig.add_trace(go.Scatter(x=overlap["k"], y=overlap[f"baseline_{side}"], mode="lines",
                                 name=f"random ({side})", line={"color": color, "dash": "dot", "width": 1},
                                 hovertemplate="random baseline k/d = %{y:.3g}<extra></extra>"))
    ks = list(overlap["k"])
    fig.update_xaxes(title="top-k directions of ΔW and of W0", range=fit_range(ks),
                     dtick=1 if ks and max(ks) - min(ks) <= 10 else None)
    fig.update_yaxes(title="φ(k, k) (1: the same directions)")
    bounded_axis(fig, "y", 0.0, 1.0)
    return apply_style(fig, title)
