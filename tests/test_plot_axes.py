"""Every figure's axes fit its data (issue 8, defect 15; issue 14, "axes stretched by annotations": the
Spectra chart's index axis ran to 1e12–1e28 and Rank & alpha's update-size axis to 1e10, labels placed at N
on a log axis landing at 10^N).

The check is :func:`lora_analysis.plots.checks.axis_overreach` / ``axis_problems`` (the page and browser
tests use the same functions): no axis shows more than a margin past its data, no explicit range clips
data, no single value is left to plotly's invented scale, no value ≤ 0 goes to a log axis.
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
from lora_analysis.plots.checks import axis_overreach, axis_problems  # noqa: F401 (axis_problems re-exported)
from lora_analysis.plots.style import bounded_axis, reference_line
from lora_analysis.weights import ModuleUpdate


# ---- the check: lora_analysis.plots.checks (axis_overreach, axis_problems), re-exported for older imports ---

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


def _young() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run 3 steps into 100: a nearly flat training loss, one validation point at step 0."""
    metrics = pd.DataFrame({"run_id": "20261130-120000-0a1b2c3d", "name": "LoRA r=8", "method": "lora",
                            "step": [0, 1, 2, 3], "train_loss": [None, 10.41, 10.38, 10.36],
                            "val_loss": [10.5, None, None, None]})
    runs = pd.DataFrame([{"id": "20261130-120000-0a1b2c3d", "name": "LoRA r=8", "status": "running", "steps": 100}])
    return metrics, runs


def _history() -> pd.DataFrame:
    """Spectra over training of 3 modules, r=4: ΔW = 0 at step 0, then B grows step by step."""
    from lora_analysis.analysis.history import LoRAFactors, spectra_rows

    g = torch.Generator().manual_seed(3)
    a = {m: torch.randn(4, 16, generator=g) for m in ("q", "k", "v")}
    b = {m: torch.randn(12, 4, generator=g) for m in a}
    rows = []
    for step in range(0, 50, 10):
        rows += spectra_rows({m: LoRAFactors(a[m], b[m] * step / 40 * torch.tensor([1.0, 0.5, 0.2, 0.1 * step / 40]),
                                             2.0) for m in a}, step)
    return pd.DataFrame(rows)


def _no_layers() -> pd.DataFrame:
    """Spectra of a model without layers (mlp-digits: fc1, fc2, fc3), effective ranks 7.90–7.95 of 8."""
    return pd.DataFrame({"name": ["fc1", "fc2", "fc3"], "kind": "lora", "rank": 8.0, "out_features": 64,
                         "in_features": 64, "effective_rank": [7.90, 7.95, 7.93], "stable_rank": [3.0, 4.0, 5.0]})


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
    young = _young()
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
        "intruders_vs_epsilon_none": A.plot_intruders_vs_epsilon(intr.assign(intruders=0)),   # seen on MiniLM
        "merge_errors": A.plot_merge_errors(check.errors),
        "merge_errors_fp32": A.plot_merge_errors(check.errors, reference="fp32"),
        "latency": A.plot_latency(latency_check(model, x, repeats=2, warmup=0, devices=["cpu"])),
        "base_overlap": A.plot_base_overlap(base_overlap(one, k=5)),
        "loss_curves": T.plot_loss_curves(_metrics()),
        "loss_curves_young": T.plot_loss_curves(young[0], log_y=True, runs=young[1]),
        "loss_curves_young_val": T.plot_loss_curves(young[0], "val_loss", log_y=True, runs=young[1]),
        "loss_curves_young_no_runs": T.plot_loss_curves(young[0], "val_loss", log_y=True),
        "rank_heatmap_no_layers": A.plot_rank_heatmap(_no_layers()),
        "loss_vs_rank_far_base": T.plot_metric_vs_rank(_runs().assign(
            val_loss=[3.4, 3.1, 3.2, 3.15, 3.0], base_val_loss=16.6), "val_loss"),
        "metric_vs_alpha_one_alpha": T.plot_metric_vs_alpha(_runs()[_runs()["alpha"] != 64.0]),
        "update_norm_one_alpha": T.plot_update_norm(_norms()[_norms()["alpha"].isin([16.0]) |
                                                            (_norms()["method"] == "full")], "alpha"),
        "base_overlap_one_k": A.plot_base_overlap(base_overlap(one, k=1)),
        "loss_curves_log": T.plot_loss_curves(_metrics(), "val_loss", log_y=True),
        "metric_vs_rank": T.plot_metric_vs_rank(_runs()),
        "metric_vs_alpha": T.plot_metric_vs_alpha(_runs()),
        "loss_vs_rank": T.plot_metric_vs_rank(_runs(), "val_loss"),
        "efficiency_frontier": T.plot_efficiency_frontier(_runs()),
        "cost_comparison": T.plot_cost_comparison(_runs()),
        "update_norm_alpha": T.plot_update_norm(_norms(), "alpha"),
        "update_norm_rank": T.plot_update_norm(_norms(), "rank"),
        "task_metrics": T.plot_task_metrics(task),
        "spectra_history": T.plot_spectra_history(_history()),
        "spectra_history_one_step": T.plot_spectra_history(_history().query("step == 40"), ["q"]),
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


def test_axis_overreach_measures_each_axis():
    fig = go.Figure(go.Scatter(x=[1, 2, 10, 100], y=[1.0, 0.5, 0.1, 0.01]))
    fig.update_xaxes(type="log")
    fig.add_vline(x=12, annotation_text="rank_90 = 12")               # the label lands at x = 1e12
    reach = axis_overreach(fig)
    assert set(reach) == {"xaxis", "yaxis"}
    x = reach["xaxis"]
    assert x.log and x.data == (1.0, 100.0) and x.shown == (1.0, 1e12) and not x.explicit
    assert x.over == pytest.approx(5.0)                             # 10 decades past a 2-decade span
    assert reach["yaxis"].over == 0.0
    fixed = go.Figure(fig.data)
    fixed.update_xaxes(type="log")
    reference_line(fixed, 12, "rank_90 = 12", axis="x", log=True)    # the label at log10(12)
    assert axis_overreach(fixed)["xaxis"].over == 0.0 and axis_problems(fixed) == []


def test_explicit_ranges_single_values_and_bounds():
    wide = go.Figure(go.Scatter(x=[0, 1, 2], y=[5.0, 6.0, 7.0]))
    wide.update_yaxes(range=[0, 10])                                 # 5 below a span of 2 (3 above)
    assert axis_overreach(wide)["yaxis"].over == pytest.approx(2.5)
    assert any("past the data" in p for p in axis_problems(wide))
    assert axis_problems(wide, margin=3.0) == []
    one = go.Figure(go.Scatter(x=[0], y=[3.0], mode="markers"))        # plotly would show x in −1…1
    assert sum("one value" in p for p in axis_problems(one)) == 2
    one.update_xaxes(range=[-0.02, 0.02])
    one.update_yaxes(range=[2.9, 3.1])
    assert axis_problems(one) == []
    phi = go.Figure(go.Scatter(x=[1, 2, 3], y=[0.01, 0.02, 0.03]))
    phi.update_yaxes(range=[0, 1.02])
    assert axis_problems(phi)                                        # 0–1 is far wider than 0.01–0.03 ...
    bounded_axis(phi, "y", 0, 1)
    assert axis_problems(phi) == []                                  # ... unless declared φ's natural range
    assert axis_problems(phi.to_json()) == [] and axis_problems(phi.to_plotly_json()) == []


def test_the_check_reads_page_specs_bars_heatmaps_and_subplots():
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2)
    fig.add_trace(go.Bar(x=["a", "b"], y=[3.0, 4.0]), row=1, col=1)
    fig.add_trace(go.Heatmap(z=[[1, 2], [3, 4]], x=[1, 2], y=[10, 20]), row=1, col=2)
    fig.update_yaxes(range=[0, 40], row=1, col=2)                    # the heatmap's rows reach 5 … 25
    reach = axis_overreach(fig.to_json())                            # packed arrays ("bdata") decoded
    assert "xaxis" not in reach                                      # a category axis
    assert reach["yaxis"].data == (0.0, 4.0)                          # bars start at 0
    assert reach["xaxis2"].data == (0.5, 2.5) and reach["yaxis2"].data == (5.0, 25.0)
    assert reach["yaxis2"].over == pytest.approx(0.75)


def test_young_runs_look_like_runs_in_progress():
    train, val = FIGURES["loss_curves_young"], FIGURES["loss_curves_young_val"]
    # a flat loss (10.41 → 10.36) stays on a linear axis: a log axis over 0.5 % has unreadable ticks
    assert train.layout.yaxis.type == "linear"
    assert train.layout.xaxis.range[0] < 1 and 100 <= train.layout.xaxis.range[1] <= 103
    planned = [t for t in train.data if t.name == "planned end: step 100"]
    assert len(planned) == 1 and list(planned[0].x) == [100, 100]
    assert [a.text for a in train.layout.annotations] == ["run in progress: step 3 of 100"]
    # one validation point: a marker on a 0 … 100 step axis, never centred on −1 … 1
    (point,) = [t for t in val.data if t.name == "LoRA r=8"]
    assert point.mode == "markers" and list(point.x) == [0]
    assert val.layout.xaxis.range[0] < 0 < 100 <= val.layout.xaxis.range[1] <= 103
    # without the runs' table the single point still gets a scale fitted to it
    alone = FIGURES["loss_curves_young_no_runs"]
    assert -0.1 <= alone.layout.xaxis.range[0] < 0 < alone.layout.xaxis.range[1] <= 0.1
    assert alone.layout.xaxis.dtick == 1


def test_a_far_reference_is_marked_not_drawn():
    fig = FIGURES["loss_vs_rank_far_base"]
    assert [s.y0 for s in fig.layout.shapes] == [3.0]                 # full fine-tuning, beside the runs
    (edge,) = [a for a in fig.layout.annotations if "frozen base" in a.text]
    assert edge.text == "frozen base 16.6 ↑ above the chart" and edge.yref == "y domain"
    lo, hi = fig.layout.yaxis.range
    assert lo < 3.0 and 3.4 < hi < 3.6                               # the runs fill the chart
    near = T.plot_metric_vs_rank(_runs())                            # accuracy: base 0.1 beside 0.6–0.97
    assert sorted(s.y0 for s in near.layout.shapes) == [0.1, 0.97]


def test_stacked_bars_and_error_bars_count_whole():
    stack = go.Figure([go.Bar(x=["full", "LoRA"], y=[2.0, 2.0]), go.Bar(x=["full", "LoRA"], y=[4.0, 0.1])])
    stack.update_layout(barmode="stack")
    stack.update_yaxes(range=[0, 6.2])                               # the full stack is 6 tall: not clipped
    assert axis_overreach(stack)["yaxis"].data == (0.0, 6.0) and axis_problems(stack) == []
    grouped = go.Figure(stack.data)
    grouped.update_yaxes(range=[0, 6.2])
    assert axis_overreach(grouped)["yaxis"].data == (0.0, 4.0)
    spread = go.Figure(go.Bar(x=["cpu"], y=[1.0], error_y={"type": "data", "array": [0.5], "arrayminus": [0.2],
                                                           "symmetric": False}))
    assert axis_overreach(spread)["yaxis"].data == (0.0, 1.5)


# ---- log axes: tick labels shown once (issue: the amplification bars read "10, 9 … 1, 9 …") ---------------

def _label_value(label: str) -> float:
    """A tick label back to its number: 0.05, 300, 20k, 1.5M, 2e-8."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(label[:-1]) * scale[label[-1]] if label[-1] in scale else float(label)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_log_axis_shows_each_tick_label_once(name):
    from lora_analysis.plots.checks import log_tick_labels, log_tick_problems

    fig = FIGURES[name]
    assert log_tick_problems(fig) == []
    for key, labels in log_tick_labels(fig).items():
        ax = fig.layout[key]
        # explicit ticks (plotly takes tickmode "array" from tickvals), each labelled with its own value
        assert ax.tickmode in (None, "array") and len(ax.tickvals) == len(ax.ticktext) == len(set(ax.ticktext))
        for value, text in zip(ax.tickvals, ax.ticktext):
            assert _label_value(str(text)) == pytest.approx(value, rel=1e-9), (key, text, value)


def test_log_tick_values_and_labels_never_repeat():
    from lora_analysis.plots.style import LOG_MAX_TICKS, log_tick_values, tick_labels

    # spans where plotly's own log ticks label digits alone ("D1"/"D2": 2, 5, 2, 5 …), and wider and narrower
    spans = [(1, 256), (0.7, 3.4), (0.05, 12), (1e-8, 1e-2), (1e3, 1e9), (1e-30, 1), (2.01, 2.3), (3, 3.05),
             (0.9, 1.1), (1e5, 3e5), (1e-5, 2e-5), (12, 12)]
    for lo, hi in spans:
        ticks = log_tick_values(lo, hi)
        labels = tick_labels(ticks)
        assert 1 <= len(ticks) <= LOG_MAX_TICKS and ticks == sorted(ticks), (lo, hi, ticks)
        assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks), (lo, hi, ticks)
        assert len(set(labels)) == len(labels), (lo, hi, labels)
        assert [_label_value(t) for t in labels] == pytest.approx(ticks, rel=1e-9)
        if hi / lo >= 1.2:
            assert len(ticks) >= 3, (lo, hi, ticks)
    assert tick_labels(log_tick_values(1, 256)) == ["1", "2", "5", "10", "20", "50", "100", "200"]
    assert tick_labels(log_tick_values(0.7, 3.4)) == ["0.7", "0.8", "0.9", "1", "2", "3"]
    assert tick_labels(log_tick_values(1e-8, 1e-2)) == ["1e-8", "1e-7", "1e-6", "1e-5", "1e-4", "0.001", "0.01"]
    assert tick_labels([1e4, 2e5, 1.5e6, 3e9]) == ["10k", "200k", "1.5M", "3G"]
    with pytest.raises(ValueError, match="0 < lo"):
        log_tick_values(0, 1)


def test_apply_style_labels_every_log_axis_and_the_check_catches_plotlys_own_ticks():
    from plotly.subplots import make_subplots

    from lora_analysis.plots.checks import log_tick_problems
    from lora_analysis.plots.style import apply_style

    raw = go.Figure(go.Bar(x=["a", "b", "c"], y=[0.02, 1.5, 40.0]))
    raw.update_yaxes(type="log")
    assert log_tick_problems(raw) and "plotly's own" in log_tick_problems(raw)[0]
    fig = make_subplots(rows=1, cols=2)
    fig.add_trace(go.Scatter(x=[1, 2, 3], y=[0.02, 1.5, 40.0]), row=1, col=1)
    fig.add_trace(go.Scatter(x=[1, 2, 3], y=[3e-9, 1e-6, 2e-4]), row=1, col=2)
    fig.update_yaxes(type="log")
    fig.update_yaxes(range=[-9, -3], row=1, col=2)                  # an explicit range: its ticks span it
    apply_style(fig, "two log panels")
    assert log_tick_problems(fig) == []
    assert list(fig.layout.yaxis.ticktext) == ["0.1", "1", "10"]                 # 0.02 … 40: the powers of 10
    assert list(fig.layout.yaxis2.ticktext)[0] == "1e-9" and list(fig.layout.yaxis2.ticktext)[-1] == "0.001"
    # ticks a plot function chose are kept
    own = go.Figure(go.Scatter(x=[1, 4, 16], y=[1, 2, 3]))
    own.update_xaxes(type="log", tickvals=[1, 4, 16], ticktext=["1", "4", "16"])
    assert list(apply_style(own).layout.xaxis.ticktext) == ["1", "4", "16"]
