"""Figures for the analyses (``lora_analysis.analysis``): DataFrames in, ``plotly.graph_objects.Figure`` out.

Colours follow :mod:`.style`: LoRA blue, full fine-tuning orange, the base grey, random purple, merged green.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import COLORS, SEQUENCE, apply_style, reference_line

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


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_singular_values(spectra: pd.DataFrame, normalized: bool = False, max_modules: int = 16,
                         title: str | None = None) -> go.Figure:
    """Singular values σ_k of ΔW per module against k (log y).

    ``spectra``: :func:`lora_analysis.analysis.spectra_frame` (name, singular_values; normalized_spectrum when
    ``normalized``). At most ``max_modules`` modules, largest ‖ΔW‖_F first. Zero singular values are left
    out (a log axis cannot show them).
    """
    column = "normalized_spectrum" if normalized else "singular_values"
    rows = spectra.sort_values("fro_norm", ascending=False).head(max_modules) if "fro_norm" in spectra else \
        spectra.head(max_modules)
    fig = go.Figure()
    for i, (_, row) in enumerate(rows.iterrows()):
        s = np.asarray(row[column], dtype=float)
        keep = s > 0
        k = np.arange(1, len(s) + 1)[keep]
        fig.add_trace(go.Scatter(x=k, y=s[keep], mode="lines+markers", name=_short(str(row["name"])),
                                 line={"color": MODULE_PALETTE[i % len(MODULE_PALETTE)]}, marker={"size": 5},
                                 hovertemplate=f"{row['name']}<br>k=%{{x}}<br>σ=%{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title="singular value index k")
    fig.update_yaxes(type="log", title="σ_k / σ_1" if normalized else "singular value σ_k of ΔW")
    return apply_style(fig, title or ("Normalised singular spectrum of ΔW" if normalized
                                      else "Singular spectrum of ΔW per module"))


def plot_cumulative_energy(spectra: pd.DataFrame, max_modules: int = 16, title: str = "Cumulative energy of ΔW"
                           ) -> go.Figure:
    """Share of Σσ² held by the top-k directions per module, with the 90 % and 99 % lines."""
    rows = spectra.sort_values("fro_norm", ascending=False).head(max_modules) if "fro_norm" in spectra else \
        spectra.head(max_modules)
    fig = go.Figure()
    for i, (_, row) in enumerate(rows.iterrows()):
        s = np.asarray(row["singular_values"], dtype=float)
        total = float(np.sum(s**2))
        cum = np.cumsum(s**2) / total if total > 0 else np.zeros_like(s)
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=cum * 100, mode="lines+markers",
                                 name=_short(str(row["name"])), marker={"size": 4},
                                 line={"color": MODULE_PALETTE[i % len(MODULE_PALETTE)]},
                                 hovertemplate=f"{row['name']}<br>top %{{x}}: %{{y:.1f}}%<extra></extra>"))
    for level in (90, 99):
        fig.add_hline(y=level, line={"color": COLORS["base"], "dash": "dot", "width": 1},
                      annotation_text=f"{level}%", annotation_position="bottom right")
    fig.update_xaxes(title="number of top singular directions k")
    fig.update_yaxes(title="share of Σσ² (%)", range=[0, 101])
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


def plot_rank_heatmap(spectra: pd.DataFrame, metric: str = "effective_rank", title: str | None = None) -> go.Figure:
    """Heatmap of a per-module metric (effective_rank, stable_rank, rank_90, ...) with layers as rows and
    module types (q_proj, v_proj, ...) as columns."""
    grid = rank_grid(spectra, metric)
    label = metric.replace("_", " ")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index],
                               colorscale="Blues", colorbar={"title": label},
                               hovertemplate="layer %{y}<br>%{x}<br>" + label + " = %{z:.3g}<extra></extra>"))
    fig.update_xaxes(title="module type")
    fig.update_yaxes(title="layer", autorange="reversed", type="category")
    return apply_style(fig, title or f"{label.capitalize()} of ΔW by layer and module")


def plot_rank_sweep_spectra(runs: pd.DataFrame, normalized: bool = True,
                            title: str = "Spectra across ranks versus full fine-tuning") -> go.Figure:
    """One module's ΔW spectrum for several runs (a rank sweep) and full fine-tuning on one chart.

    ``runs``: one row per run with ``label`` (e.g. "r=8"), ``kind`` ("lora"/"full"), ``singular_values`` and
    optionally ``rank_90``. LoRA runs use the blue sequence, full fine-tuning orange with its rank_90 marked
    by a vertical line. ``normalized`` divides each spectrum by its σ₁ so runs of different scale compare.
    """
    fig = go.Figure()
    lora_i = 0
    for _, row in runs.iterrows():
        s = np.asarray(row["singular_values"], dtype=float)
        top = s[0] if len(s) else 0.0
        if normalized and top > 0:
            s = s / top
        # below 1e-6·σ₁ a float32 ΔW = W_ft − W0 holds only rounding noise: not drawn
        keep = s > 1e-6 * (s[0] if len(s) else 0.0)
        is_full = row.get("kind") == "full"
        color = COLORS["full"] if is_full else SEQUENCE[lora_i % len(SEQUENCE)]
        lora_i += 0 if is_full else 1
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1)[keep], y=s[keep], mode="lines",
                                 name=str(row["label"]), line={"color": color, "width": 3 if is_full else 2},
                                 hovertemplate=f"{row['label']}<br>k=%{{x}}<br>σ=%{{y:.4g}}<extra></extra>"))
        if is_full and "rank_90" in row and pd.notna(row["rank_90"]) and row["rank_90"] > 0:
            reference_line(fig, int(row["rank_90"]), f"full FT rank_90 = {int(row['rank_90'])}", axis="x",
                           log=True, line={"color": COLORS["full"], "dash": "dash"})
    fig.update_xaxes(type="log", title="singular value index k")
    fig.update_yaxes(type="log", title="σ_k / σ_1" if normalized else "singular value σ_k")
    return apply_style(fig, title)


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
        title = f"{title}<br><sup>random subspaces: φ ≈ max(i, j)/d = {1 / d:.2g} … {custom.max():.2g} (d = {d})</sup>"
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(1, z.shape[1] + 1), y=np.arange(1, z.shape[0] + 1),
                               zmin=0, zmax=1, colorscale="Blues", customdata=custom, colorbar={"title": "φ"},
                               hovertemplate=hover + "<extra></extra>"))
    fig.update_xaxes(title=x_label, dtick=max(1, z.shape[1] // 8))
    fig.update_yaxes(title=y_label, autorange="reversed", dtick=max(1, z.shape[0] // 8))
    return apply_style(fig, title)


def plot_amplification(amp: pd.DataFrame, title: str = "‖Uᵀ W0 V‖_F: W0 projected on r directions") -> go.Figure:
    """Grouped bars per module of ‖Uᵀ·W0·V‖_F for U, V from ΔW, W0's own top-r and random, plus ‖ΔW‖_F
    (LoRA Table 7); the amplification factor ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F is printed on the ΔW bars. Log y.

    ``amp``: :func:`lora_analysis.analysis.amplification_frame`.
    """
    names = [_short(str(n), 30) for n in amp["name"]]
    fig = go.Figure()
    series = [("proj_delta", "U, V from ΔW", COLORS["lora"]), ("proj_w0", "U, V from W0 (top-r)", COLORS["base"]),
              ("proj_random", "random U, V", COLORS["random"]), ("delta_fro", "‖ΔW‖_F", COLORS["merged"])]
    for col, label, color in series:
        text = [f"×{a:.3g}" for a in amp["amplification"]] if col == "proj_delta" else None
        fig.add_trace(go.Bar(x=names, y=amp[col], name=label, marker_color=color, text=text, textposition="outside",
                             customdata=np.stack([amp["r"], amp["amplification"]], axis=1),
                             hovertemplate=label + ": %{y:.4g}<br>r=%{customdata[0]}<br>amplification ×"
                             "%{customdata[1]:.3g}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="module")
    fig.update_yaxes(type="log", title="Frobenius norm")
    return apply_style(fig, title)


def plot_amplification_table(amp: pd.DataFrame, title: str = "Amplification (LoRA paper, Table 7)") -> go.Figure:
    """The Table 7 numbers as a plotly table, one column per module."""
    rows = [("r", "r", "{:d}"), ("‖UᵀW0V‖_F, U,V of ΔW", "proj_delta", "{:.3g}"),
            ("‖UᵀW0V‖_F, U,V of W0", "proj_w0", "{:.3g}"), ("‖UᵀW0V‖_F, random", "proj_random", "{:.3g}"),
            ("‖W0‖_F", "w0_fro", "{:.3g}"), ("‖ΔW‖_F", "delta_fro", "{:.3g}"),
            ("amplification ‖ΔW‖/‖UᵀW0V‖", "amplification", "{:.3g}")]
    cells = [[label for label, _, _ in rows]]
    for _, rec in amp.iterrows():
        cells.append([fmt.format(int(rec[c]) if fmt == "{:d}" else float(rec[c])) for _, c, fmt in rows])
    fig = go.Figure(go.Table(header={"values": [""] + [_short(str(n), 30) for n in amp["name"]],
                                     "fill_color": "#f3f6fa", "align": "left"},
                             cells={"values": cells, "align": ["left"] + ["right"] * len(amp)}))
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
    lora_i = 0
    for (label, kind), grp in totals.groupby(["label", "kind"], sort=False):
        color = COLORS["full"] if kind == "full" else SEQUENCE[(3 + lora_i) % len(SEQUENCE)]
        lora_i += kind != "full"
        grp = grp.sort_values("epsilon")
        fig.add_trace(go.Scatter(x=grp["epsilon"], y=grp["intruders"], mode="lines+markers", name=str(label),
                                 line={"color": color, "dash": "dash" if kind == "full" else "solid"},
                                 hovertemplate=f"{label}<br>ε=%{{x}}<br>%{{y}} intruders<extra></extra>"))
    fig.update_xaxes(title="ε (max |cosine| with W0's singular vectors below which a direction is an intruder)")
    fig.update_yaxes(title=f"intruders among top-{k} singular vectors (all modules)", rangemode="tozero")
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
        fig.add_trace(go.Bar(x=part[group], y=np.where(values > 0, values, floor), name=variant.replace("_", " "),
                             marker_color=colors.get(variant, COLORS["base"]), customdata=values,
                             text=["0" if v == 0 else "" for v in values], textposition="outside",
                             hovertemplate=variant + " (%{x}): max abs error %{customdata:.3g}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="base dtype · LoRA factor dtype" if group == "setup" else "dtype")
    fig.update_yaxes(type="log", title="max |output − reference| (output units)")
    return apply_style(fig, f"{title} (reference: unmerged, {reference})")


def plot_latency(latency: pd.DataFrame, title: str = "Forward latency: base, unmerged LoRA, merged") -> go.Figure:
    """Bars of median forward time per variant, grouped by device; hover shows min and ratio to base.

    ``latency``: :func:`lora_analysis.analysis.latency_check`.
    """
    colors = {"base": COLORS["base"], "unmerged": COLORS["lora"], "merged": COLORS["merged"]}
    fig = go.Figure()
    for variant in latency["variant"].unique():
        part = latency[latency["variant"] == variant]
        fig.add_trace(go.Bar(x=part["device"], y=part["median_ms"], name=variant,
                             marker_color=colors.get(variant, COLORS["random"]),
                             customdata=np.stack([part["min_ms"], part["relative"]], axis=1),
                             text=[f"{r:.2f}×" for r in part["relative"]], textposition="outside",
                             hovertemplate=variant + " on %{x}: median %{y:.3f} ms<br>min %{customdata[0]:.3f} ms"
                             "<br>%{customdata[1]:.2f}× base<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="device")
    fig.update_yaxes(title="median forward time (ms)", rangemode="tozero")
    return apply_style(fig, title)


def spectra_figures(spectra: pd.DataFrame) -> list[go.Figure]:
    """The standard set for one adapter: spectrum, cumulative energy, effective and stable rank heatmaps."""
    return [plot_singular_values(spectra), plot_cumulative_energy(spectra),
            plot_rank_heatmap(spectra, "effective_rank"), plot_rank_heatmap(spectra, "stable_rank")]


__all__: Sequence[str] = ["parse_module_name", "plot_amplification", "plot_amplification_table",
                          "plot_cumulative_energy", "plot_intruders_vs_epsilon", "plot_latency", "plot_merge_errors",
                          "plot_base_overlap", "plot_rank_heatmap", "plot_rank_sweep_spectra", "plot_similarity_heatmap",
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
    fig.update_xaxes(title="top-k directions of ΔW and of W0")
    fig.update_yaxes(title="φ(k, k)", range=[0, 1.02])
    return apply_style(fig, title)
