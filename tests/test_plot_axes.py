"""Every figure's axes fit its data (issue 8, defect 15: the Spectra page's rank-sweep chart ran its log
index axis out to 1e12 for a 256-wide module, an annotation at x = rank_90 read as log10 on a log axis).

Without kaleido (``fig.full_figure_for_display()`` needs it) the check works on the figure itself:
plotly's autorange covers the traces, the shapes and the annotations placed in data coordinates, so each of
those must lie within the axis' data. On a log axis a shape's x0/y0 is a data value, but an annotation's x/y
and an explicit ``range`` are log10 values. Explicit ranges must show all the data (and, on a log axis, not
run more than a decade past it). Log axes must not be handed values ≤ 0 (plotly drops them silently).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from lora_analysis import apply_lora
from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruder_sweep
from lora_analysis.analysis.merge_check import latency_check, merge_check
from lora_analysis.analysis.similarity import a_similarity, base_overlap
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.plots import analysis as A
from lora_analysis.plots import params as P
from lora_analysis.plots import training as T
from lora_analysis.weights import ModuleUpdate


# ---- the check ----------------------------------------------------------------------------------------------

def _numbers(values) -> list[float]:
    if values is None:
        return []
    flat = np.asarray(values, dtype=object).ravel()
    out = []
    for v in flat:
        if isinstance(v, (list, tuple, np.ndarray)):
            out += _numbers(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _layout_key(ref: str) -> str:
    """"x" → "xaxis", "y2" → "yaxis2"."""
    return f"{ref[0]}axis{ref[1:]}"


def _trace_values(fig: go.Figure) -> dict[str, list[float]]:
    """Numeric data per axis reference ("x", "y2", ...); a bar's baseline 0 counts on its value axis."""
    found: dict[str, list[float]] = {}
    for trace in fig.data:
        if "xaxis" not in trace:                     # tables
            continue
        for letter in ("x", "y"):
            ref = getattr(trace, f"{letter}axis") or letter
            values = _numbers(getattr(trace, letter, None))
            value_axis = "y" if getattr(trace, "orientation", None) != "h" else "x"
            if trace.type == "bar" and letter == value_axis and values and fig.layout[_layout_key(ref)].type != "log":
                values.append(0.0)              # bars start at 0 on a linear axis (a log axis has no 0)
            found.setdefault(ref, []).extend(values)
    return found


def _shape_positions(fig: go.Figure, ref: str) -> list[float]:
    letter = ref[0]
    out = []
    for shape in fig.layout.shapes:
        if (getattr(shape, f"{letter}ref") or letter) == ref:
            out += _numbers([getattr(shape, f"{letter}0"), getattr(shape, f"{letter}1")])
    return out


def axis_problems(fig: go.Figure) -> list[str]:
    """What plotly would draw wrong or far too wide on each numeric axis (empty when all is well)."""
    problems = []
    data = _trace_values(fig)
    refs = set(data) | {getattr(s, f"{c}ref") for s in fig.layout.shapes for c in "xy"} | \
        {getattr(a, f"{c}ref") for a in fig.layout.annotations for c in "xy"}
    refs = {r for r in refs if r and r[0] in "xy" and "domain" not in r and r != "paper"}
    for ref in sorted(refs):
        axis = fig.layout[_layout_key(ref)]
        log = axis.type == "log"
        if axis.type == "category":
            continue
        values = data.get(ref, [])
        if log:
            bad = [v for v in values if v <= 0]
            if bad:
                problems.append(f"{ref}: {len(bad)} value(s) ≤ 0 on a log axis (not drawn)")
            values = [v for v in values if v > 0]
        shapes = _shape_positions(fig, ref)
        if log and any(v <= 0 for v in shapes):
            problems.append(f"{ref}: a shape at ≤ 0 on a log axis")
        content = values + [v for v in shapes if v > 0 or not log]
        explicit = axis.range is not None and None not in axis.range
        if explicit:
            lo, hi = sorted(10 ** r if log else r for r in axis.range)
            if values and (min(values) < lo * (1 - 1e-9) - 1e-12 or max(values) > hi * (1 + 1e-9) + 1e-12):
                problems.append(f"{ref}: explicit range [{lo:.3g}, {hi:.3g}] clips the data "
                                f"[{min(values):.3g}, {max(values):.3g}]")
            if log and values and (hi > 10 * max(values) or lo < min(values) / 10):
                problems.append(f"{ref}: explicit log range [{lo:.3g}, {hi:.3g}] runs over a decade past the "
                                f"data [{min(values):.3g}, {max(values):.3g}]")
        elif content:
            lo, hi = min(content), max(content)
        else:
            continue
        for note in fig.layout.annotations:
            if (getattr(note, f"{ref[0]}ref") or ref[0]) != ref:
                continue
            pos = getattr(note, ref[0])
            if pos is None:
                continue
            where = 10 ** pos if log else pos
            slack = (hi / lo) ** 0.05 if log and lo > 0 else None
            inside = (lo / slack <= where <= hi * slack) if slack else \
                (lo - 0.05 * (hi - lo) - 1e-12 <= where <= hi + 0.05 * (hi - lo) + 1e-12)
            if not inside:
                problems.append(f"{ref}: annotation {note.text!r} at {where:.3g} (axis value {pos!r}) is outside "
                                f"the data [{lo:.3g}, {hi:.3g}]{' (log axis: annotation x is log10)' if log else ''}")
    return problems


# ---- small real data ------------------------------------------------------------------------------------------

def _updates(n_layers=2, rank=3, out_f=12, in_f=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = {}
    for layer in range(n_layers):
        for kind in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{kind}"
            ups[name] = ModuleUpdate(name, w0=torch.randn(out_f, in_f, generator=g),
                                     lora_A=torch.randn(rank, in_f, generator=g),
                                     lora_B=torch.randn(out_f, rank, generator=g), scaling=0.5)
    return ups


def _full(updates, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: ModuleUpdate(n, w0=u.w0, w_ft=u.w0 + u.dense_delta() + scale * 0.01 * torch.randn(
        u.w0.shape, generator=g)) for n, u in updates.items()}


def _sweep_rows(width=256):
    """One 256-wide module as the Spectra page compares it: LoRA r=4 and r=16, and full fine-tuning."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(width, width, generator=g) / width**0.5
    rows = []
    for r in (4, 16):
        u = ModuleUpdate("blocks.0.fc", w0=w0, lora_A=torch.randn(r, width, generator=g) / width**0.5,
                         lora_B=0.1 * torch.randn(width, r, generator=g), scaling=16 / r)
        rows.append(("lora", f"r={r}", r, u))
    full = ModuleUpdate("blocks.0.fc", w0=w0, w_ft=w0 + 0.01 * torch.randn(width, width, generator=g))
    rows.append(("full", "full FT", None, full))
    out = []
    for kind, label, r, u in rows:
        row = spectra_frame([u]).iloc[0]
        out.append({"label": label, "kind": kind, "rank": r, "singular_values": row["singular_values"],
                    "rank_90": row["rank_90"]})
    return pd.DataFrame(out)


def _merge_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    apply_lora(model, ["0", "2"], rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_(std=0.5)
    return model, torch.randn(10, 16, generator=torch.Generator().manual_seed(1))


def _runs() -> pd.DataFrame:
    rows = [{"name": f"LoRA r={r} α={a:g}", "method": "lora", "status": "completed", "rank": r, "alpha": a,
             "rslora": False, "targets": "all-linear", "val_accuracy": acc, "base_val_accuracy": 0.1,
             "val_loss": 2.0 - acc, "trainable_params": 842 * r, "train_seconds": 0.2 + 0.01 * r,
             "training_state_bytes": 200_000 + 10_000 * r}
            for r, a, acc in ((1, 16.0, 0.6), (4, 16.0, 0.9), (16, 16.0, 0.88), (4, 64.0, 0.93))]
    rows.append({"name": "full FT", "method": "full", "status": "completed", "rank": None, "alpha": None,
                 "rslora": False, "targets": None, "val_accuracy": 0.97, "base_val_accuracy": 0.1, "val_loss": 1.0,
                 "trainable_params": 43914, "train_seconds": 0.25, "training_state_bytes": 700_000})
    return pd.DataFrame(rows)


def _norms() -> pd.DataFrame:
    rows = [{"method": "lora", "rank": r, "alpha": a, "rslora": False, "delta_norm": 0.5 * a / 16 * r**0.5}
            for r in (1, 4, 16) for a in (8.0, 16.0, 64.0)]
    rows.append({"method": "full", "rank": None, "alpha": None, "rslora": False, "delta_norm": 3.0})
    return pd.DataFrame(rows)


def _metrics() -> pd.DataFrame:
    steps = np.arange(0, 50)
    frames = [pd.DataFrame({"name": name, "method": method, "step": steps, "train_loss": 2.3 * np.exp(-steps / k) + 0.1,
                            "val_loss": np.where(steps % 10 == 0, 2.3 * np.exp(-steps / k) + 0.2, np.nan)})
              for name, method, k in (("LoRA r=4", "lora", 20), ("full FT", "full", 10))]
    return pd.concat(frames, ignore_index=True)


def _figures() -> dict[str, go.Figure]:
    ups = _updates()
    frame = spectra_frame({**ups, **{f"{n}.full": u for n, u in _full(ups).items()}})
    sweep = _sweep_rows()
    model, x = _merge_model()
    check = merge_check(model, x, dtypes=["float32", "bfloat16"])
    one = next(iter(ups.values()))
    intr = pd.concat([intruder_sweep(ups, epsilons=(0.3, 0.6, 0.9), label="LoRA r=3"),
                      intruder_sweep(_full(ups), epsilons=(0.3, 0.6, 0.9), label="full FT")])
    table = pd.DataFrame({"rank": [1, 2, 4, 8, 16], "trainable_params": [842 * r for r in (1, 2, 4, 8, 16)],
                          "base_params": 43914, "trainable_percent": [100 * 842 * r / (43914 + 842 * r)
                                                                      for r in (1, 2, 4, 8, 16)]})
    memory = pd.DataFrame({"full": [2e9, 2e9, 4e9], "lora": [2e9, 1e7, 2e7]},
                          index=["weights", "gradients", "optimizer states"])
    task = pd.DataFrame({"variant": ["frozen base", "LoRA (unmerged)", "LoRA (merged)", "full fine-tuning"],
                         "val_accuracy": [0.1, 0.9, 0.9, 0.97]})
    return {
        "singular_values": A.plot_singular_values(frame),
        "singular_values_normalized": A.plot_singular_values(frame, normalized=True),
        "cumulative_energy": A.plot_cumulative_energy(frame),
        "rank_heatmap": A.plot_rank_heatmap(frame, "effective_rank"),
        "rank_sweep_spectra": A.plot_rank_sweep_spectra(sweep),
        "rank_sweep_spectra_raw": A.plot_rank_sweep_spectra(sweep, normalized=False),
        "similarity_heatmap": A.plot_similarity_heatmap(a_similarity(one, one).phi, d=10),
        "amplification": A.plot_amplification(amplification_frame(ups)),
        "amplification_table": A.plot_amplification_table(amplification_frame(ups)),
        "intruders_vs_epsilon": A.plot_intruders_vs_epsilon(intr),
        "merge_errors": A.plot_merge_errors(check.errors),
        "merge_errors_fp32": A.plot_merge_errors(check.errors, reference="fp32"),
        "latency": A.plot_latency(latency_check(model, x, repeats=2, warmup=0, devices=["cpu"])),
        "base_overlap": A.plot_base_overlap(base_overlap(one, k=5)),
        "loss_curves": T.plot_loss_curves(_metrics()),
        "loss_curves_log": T.plot_loss_curves(_metrics(), "val_loss", log_y=True),
        "metric_vs_rank": T.plot_metric_vs_rank(_runs()),
        "metric_vs_alpha": T.plot_metric_vs_alpha(_runs()),
        "loss_vs_rank": T.plot_metric_vs_rank(_runs(), "val_loss"),
        "efficiency_frontier": T.plot_efficiency_frontier(_runs()),
        "cost_comparison": T.plot_cost_comparison(_runs()),
        "update_norm_alpha": T.plot_update_norm(_norms(), "alpha"),
        "update_norm_rank": T.plot_update_norm(_norms(), "rank"),
        "task_metrics": T.plot_task_metrics(task),
        "trainable_vs_rank": P.plot_trainable_vs_rank(table),
        "percent_vs_rank": P.plot_percent_vs_rank(table),
        "memory": P.plot_memory(memory),
        "lora_diagram": P.plot_lora_diagram(256, 1024, 8),
        "lora_diagram_square": P.plot_lora_diagram(4096, 4096, 64),
    }


FIGURES = _figures()


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_axis_fits_its_data(name):
    assert axis_problems(FIGURES[name]) == []


def test_every_plot_function_is_checked():
    functions = sorted(n.removeprefix("plot_") for m in (A, T, P) for n in dir(m) if n.startswith("plot_"))
    missing = [f for f in functions if not any(name.startswith(f) for name in FIGURES)]
    assert len(functions) >= 20 and missing == []


# ---- the check itself catches what it is for --------------------------------------------------------------

def test_the_check_catches_a_log_axis_annotation_in_data_units():
    fig = go.Figure(go.Scatter(x=[1, 2, 10, 100], y=[1, 0.5, 0.1, 0.01]))
    fig.update_xaxes(type="log")
    fig.add_vline(x=12, annotation_text="rank_90 = 12")               # the annotation lands at 1e12
    assert any("1e+12" in p for p in axis_problems(fig))
    ok = go.Figure(go.Scatter(x=[1, 2, 10, 100], y=[1, 0.5, 0.1, 0.01]))
    ok.update_xaxes(type="log")
    ok.add_vline(x=12)
    ok.add_annotation(x=math.log10(12), y=1, yref="y domain", text="rank_90 = 12")
    assert axis_problems(ok) == []


def test_the_check_catches_clipping_and_non_positive_log_values():
    clipped = go.Figure(go.Scatter(x=[0, 1], y=[0, 5]))
    clipped.update_yaxes(range=[0, 1])
    assert any("clips" in p for p in axis_problems(clipped))
    zero = go.Figure(go.Scatter(x=[1, 2], y=[0.0, 1.0]))
    zero.update_yaxes(type="log")
    assert any("≤ 0" in p for p in axis_problems(zero))
    hline = go.Figure(go.Scatter(x=[1, 2], y=[0.5, 1.0]))
    hline.update_yaxes(type="log")
    hline.add_hline(y=3.0, annotation_text="full FT 3")                # annotation y=3 means 1e3 here
    assert any("1e+03" in p for p in axis_problems(hline))
