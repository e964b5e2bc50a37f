"""Analysis figures: asserted on their data (traces, values), not pixels."""

import numpy as np
import pandas as pd
import pytest
import torch

from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruder_sweep
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.plots.analysis import (max_rank, parse_module_name, plot_amplification, plot_amplification_table,
                                          plot_cumulative_energy, plot_intruders_vs_epsilon, plot_latency,
                                          plot_merge_errors, plot_rank_heatmap, plot_rank_sweep_spectra,
                                          plot_similarity_heatmap, plot_singular_values, rank_grid)
from lora_analysis.plots.style import COLORS
from lora_analysis.weights import ModuleUpdate


@pytest.mark.parametrize("name, want", [
    ("blocks.3.attn.q_proj", (3, "attn.q_proj")),
    ("model.layers.12.self_attn.v_proj", (12, "self_attn.v_proj")),
    ("transformer.h.0.mlp.c_fc", (0, "mlp.c_fc")),
    ("0", (0, "0")),
    ("encoder.fc", (None, "encoder.fc")),
])
def test_parse_module_name(name, want):
    assert parse_module_name(name) == want


def _updates(n_layers=2, rank=3):
    g = torch.Generator().manual_seed(0)
    ups = {}
    for layer in range(n_layers):
        for kind in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{kind}"
            ups[name] = ModuleUpdate(name, w0=torch.randn(12, 10, generator=g),
                                     lora_A=torch.randn(rank, 10, generator=g),
                                     lora_B=torch.randn(12, rank, generator=g), scaling=0.5)
    return ups


def test_singular_values_and_energy_figures_carry_the_spectra():
    frame = spectra_frame(_updates())
    fig = plot_singular_values(frame)
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"
    by_name = {row["name"]: row["singular_values"] for _, row in frame.iterrows()}
    for trace in fig.data:
        np.testing.assert_allclose(trace.y, by_name[trace.name])
        assert list(trace.x) == [1, 2, 3]
    energy = plot_cumulative_energy(frame)
    s = np.asarray(frame.loc[0, "singular_values"])
    first = [t for t in energy.data if t.name == frame.loc[0, "name"]][0]
    np.testing.assert_allclose(first.y, np.concatenate([[0.0], np.cumsum(s**2) / np.sum(s**2) * 100]))
    assert list(first.x) == [0, 1, 2, 3]                     # the top-0 directions hold 0 %
    assert first.y[-1] == pytest.approx(100.0)


def test_zero_singular_values_are_left_off_the_log_axis():
    frame = pd.DataFrame({"name": ["m"], "fro_norm": [1.0], "singular_values": [[1.0, 0.5, 0.0]]})
    assert list(plot_singular_values(frame).data[0].y) == [1.0, 0.5]


def test_rank_heatmap_grid():
    frame = spectra_frame(_updates())
    grid = rank_grid(frame, "effective_rank")
    assert list(grid.index) == [0, 1] and list(grid.columns) == ["self_attn.q_proj", "self_attn.v_proj"]
    fig = plot_rank_heatmap(frame, "effective_rank")
    want = frame.set_index("name").loc["model.layers.1.self_attn.v_proj", "effective_rank"]
    assert fig.data[0].z[1][1] == pytest.approx(want)
    with pytest.raises(ValueError, match="metric='nope'"):
        plot_rank_heatmap(frame, "nope")
    # names without layers still draw
    flat = pd.DataFrame({"name": ["fc1", "fc2"], "stable_rank": [1.0, 2.0]})
    assert list(rank_grid(flat, "stable_rank").index) == ["—"]


def test_rank_sweep_marks_full_rank_90():
    runs = pd.DataFrame({"label": ["r=4", "r=16", "full FT"], "kind": ["lora", "lora", "full"],
                         "singular_values": [[2.0, 1.0, 0.5, 0.1], [4.0, 2.0] + [0.5] * 14, list(np.linspace(3, 0.1, 30))],
                         "rank_90": [3, 5, 21]})
    fig = plot_rank_sweep_spectra(runs)
    assert [t.name for t in fig.data] == ["r=4", "r=16", "full FT"]
    assert fig.data[2].line.color == COLORS["full"]
    assert fig.data[0].y[0] == 1.0 and fig.data[0].y[1] == 0.5      # normalised by σ₁
    assert any(s.x0 == 21 for s in fig.layout.shapes)          # a shape's x is a data value on a log axis
    (note,) = [a for a in fig.layout.annotations if "rank_90" in a.text]
    assert note.text == "full FT rank_90 = 21" and note.x == pytest.approx(np.log10(21))   # an annotation's is log10


def test_similarity_heatmap_has_baseline():
    phi = np.array([[1.0, 0.6], [0.5, 0.4]])
    fig = plot_similarity_heatmap(phi, d=64)
    np.testing.assert_allclose(fig.data[0].z, phi)
    np.testing.assert_allclose(fig.data[0].customdata, [[1 / 64, 2 / 64], [2 / 64, 2 / 64]])
    assert "max(i, j)/d" in fig.layout.title.text and "d = 64" in fig.layout.title.text


def test_amplification_figures():
    amp = amplification_frame(_updates(1))
    fig = plot_amplification(amp)
    assert [t.name for t in fig.data][:3] == ["U, V from ΔW", "U, V from W0 (top-r)", "random U, V"]
    np.testing.assert_allclose(fig.data[0].y, amp["proj_delta"])
    assert fig.data[0].text[0] == f"×{amp.loc[0, 'amplification']:.3g}"
    table = plot_amplification_table(amp)
    assert table.data[0].cells.values[1][-1] == f"{amp.loc[0, 'amplification']:.3g}"


def test_intruders_vs_epsilon_sums_modules():
    ups = _updates()
    lora = intruder_sweep(ups, epsilons=(0.3, 0.6, 0.9), label="LoRA r=3")
    full = intruder_sweep({n: ModuleUpdate(n, w0=u.w0, w_ft=u.w0 + u.dense_delta()) for n, u in ups.items()},
                          epsilons=(0.3, 0.6, 0.9), label="full FT")
    fig = plot_intruders_vs_epsilon(pd.concat([lora, full]))
    assert [t.name for t in fig.data] == ["LoRA r=3", "full FT"]
    totals = lora.groupby("epsilon")["intruders"].sum().tolist()
    assert list(fig.data[0].y) == totals
    assert fig.data[1].line.dash == "dash"


def test_merge_error_and_latency_bars():
    errors = pd.DataFrame({"dtype": ["float32", "float32", "bfloat16", "bfloat16"],
                           "variant": ["unmerged", "merged", "unmerged", "merged"],
                           "max_abs": [0.0, 0.0, 0.0, 3e-3], "max_rel": [0, 0, 0, 1e-3],
                           "max_abs_vs_fp32": [0.0, 1e-7, 2e-3, 4e-3], "max_rel_vs_fp32": [0, 0, 0, 0]})
    fig = plot_merge_errors(errors)
    assert [t.name for t in fig.data] == ["merged"]              # unmerged vs itself is left out
    # an exact 0 is drawn a decade below the smallest error shown, labelled "0"
    assert list(fig.data[0].y) == pytest.approx([3e-4, 3e-3]) and list(fig.data[0].customdata) == [0.0, 3e-3]
    assert list(fig.data[0].text) == ["0", ""] and list(fig.data[0].x) == ["float32", "bfloat16"]
    fp32 = plot_merge_errors(errors, reference="fp32")
    assert [t.name for t in fp32.data] == ["unmerged", "merged"]
    assert list(fp32.data[0].y) == pytest.approx([1e-8, 2e-3])        # floor: 1e-7 / 10
    assert list(plot_merge_errors(errors.assign(max_abs=0.0)).data[0].y) == [1e-12, 1e-12]
    with pytest.raises(ValueError, match="reference='bf16'"):
        plot_merge_errors(errors, reference="bf16")
    # with setups, bars are grouped by base dtype · factor dtype
    setups = errors.assign(setup=["float32 · float32 LoRA"] * 2 + ["bfloat16 · float32 LoRA"] * 2)
    assert list(plot_merge_errors(setups).data[0].x) == ["float32 · float32 LoRA", "bfloat16 · float32 LoRA"]
    latency = pd.DataFrame({"device": ["cpu"] * 3, "variant": ["base", "unmerged", "merged"],
                            "median_ms": [1.0, 1.4, 1.01], "min_ms": [0.9, 1.3, 0.95], "repeats": 5,
                            "relative": [1.0, 1.4, 1.01]})
    lat = plot_latency(latency)
    assert [t.name for t in lat.data] == ["base", "unmerged", "merged"]
    assert lat.data[1].y[0] == 1.4 and lat.data[1].text[0] == "1.40×"


def test_rank_heatmap_scale_and_models_without_layers():
    frame = spectra_frame(_updates())                               # LoRA r=3 on 2 layers × 2 types
    heat = plot_rank_heatmap(frame, "effective_rank")
    assert heat.data[0].type == "heatmap" and (heat.data[0].zmin, heat.data[0].zmax) == (0.0, 3.0)
    values = frame["effective_rank"]
    assert f"{values.min():.3g}–{values.max():.3g} of at most 3" in heat.layout.title.text
    # a model without layers (mlp-digits: fc1, fc2, fc3): bars by module, no unnamed "—" row
    flat = pd.DataFrame({"name": ["fc1", "fc2", "fc3"], "kind": ["lora"] * 3, "rank": 8.0, "out_features": 64,
                         "in_features": 64, "effective_rank": [7.90, 7.95, 7.93]})
    bars = plot_rank_heatmap(flat, "effective_rank")
    (bar,) = bars.data
    assert bar.type == "bar" and list(bar.x) == ["fc1", "fc2", "fc3"] and list(bar.y) == [7.90, 7.95, 7.93]
    assert "by module" in bars.layout.title.text and "the modules differ negligibly" in bars.layout.title.text
    assert bars.layout.yaxis.range[0] == 0                          # from 0: 7.90 and 7.95 look alike
    spread = plot_rank_heatmap(flat.assign(effective_rank=[2.0, 7.9, 5.0]), "effective_rank")
    assert "negligibly" not in spread.layout.title.text
    # full fine-tuning's cap is min(out, in)
    full = flat.assign(kind="full", rank=np.nan, out_features=[64, 32, 10])
    assert max_rank(full) == 64.0


def test_spectra_drop_numerical_zeros_and_fit_the_index_axis():
    s = [1.0, 0.5, 1e-3, 3e-7, 1e-15]                                 # the last two are float32 noise
    frame = pd.DataFrame({"name": ["m"], "fro_norm": [1.0], "singular_values": [s]})
    fig = plot_singular_values(frame)
    assert list(fig.data[0].y) == [1.0, 0.5, 1e-3] and list(fig.data[0].x) == [1, 2, 3]
    assert "2 singular value(s) below 1e-6·σ₁ not drawn" in fig.layout.title.text
    assert 10 ** fig.layout.yaxis.range[0] > 1e-4                     # never down to 1e-15
    # the rank sweep's index axis ends at the largest k drawn (a 256-wide module: 256, never 1e12)
    runs = pd.DataFrame({"label": ["r=4", "full FT"], "kind": ["lora", "full"],
                         "singular_values": [[2.0, 1.0, 0.5, 0.1], list(np.linspace(3, 0.01, 256)) + [1e-12] * 4],
                         "rank_90": [3, 120]})
    sweep = plot_rank_sweep_spectra(runs)
    lo, hi = sweep.layout.xaxis.range
    assert 10 ** lo <= 1 and 256 <= 10 ** hi < 300
    assert len(sweep.data[1].x) == 256 and "4 singular value(s)" in sweep.layout.title.text


def test_cumulative_energy_and_overlap_use_their_natural_ranges():
    frame = spectra_frame(_updates())
    energy = plot_cumulative_energy(frame)
    assert energy.layout.meta["bounds"] == {"yaxis": [0.0, 100.0]}
    lo, hi = energy.layout.yaxis.range
    assert -2 < lo <= 0 and 100 <= hi < 102
    # φ lives in [0, 1]: a φ of 0.02 reads as small, not as the top of an autoranged axis
    from lora_analysis.plots.analysis import plot_base_overlap

    overlap = pd.DataFrame({"k": [1, 2], "phi_output": [0.01, 0.02], "baseline_output": [0.01, 0.02],
                            "phi_input": [0.01, 0.03], "baseline_input": [0.01, 0.02]})
    fig = plot_base_overlap(overlap)
    assert fig.layout.meta["bounds"] == {"yaxis": [0.0, 1.0]} and fig.layout.yaxis.range[1] >= 1.0


def test_latency_bars_show_the_spread_over_repeats():
    latency = pd.DataFrame({"device": ["cpu"] * 2, "variant": ["base", "merged"], "median_ms": [1.0, 1.1],
                            "min_ms": [0.9, 0.95], "q1_ms": [0.95, 0.9], "q3_ms": [1.2, 1.4], "relative": [1.0, 1.1]})
    fig = plot_latency(latency)
    merged = fig.data[1]
    assert list(merged.error_y.array) == pytest.approx([0.3])
    assert list(merged.error_y.arrayminus) == pytest.approx([0.2])
    assert "quartiles" in merged.hovertemplate and "quartiles" in fig.layout.yaxis.title.text
    assert plot_latency(latency.drop(columns=["q1_ms", "q3_ms"])).data[0].error_y.array is None


def test_amplification_table_sizes_itself_and_labels_are_plain_text():
    from lora_analysis.plots.analysis import TABLE_HEADER_PX, TABLE_ROW_PX, table_height

    for n_layers in (1, 3):                                    # one column per module: the height is the rows'
        amp = amplification_frame(_updates(n_layers))
        table = plot_amplification_table(amp)
        (trace,) = table.data
        rows = len(trace.cells.values[0])
        margin = table.layout.margin
        assert rows == 7 and trace.cells.height == TABLE_ROW_PX and trace.header.height == TABLE_HEADER_PX
        assert table.layout.height == table_height(rows) == margin.t + margin.b + TABLE_HEADER_PX + rows * TABLE_ROW_PX + 4
        # no "_F": the labels are plain text wherever they are shown (the Subspaces table read "‖UᵀW0V‖ F")
        texts = list(trace.cells.values[0]) + list(trace.header.values) + [table.layout.title.text]
        assert not [t for t in texts if "_F" in t] and "‖UᵀW0V‖, ΔW's U, V" in texts
    assert table_height(10) - table_height(7) == 3 * TABLE_ROW_PX
    bars = plot_amplification(amp)
    names = [t.name for t in bars.data] + [bars.layout.title.text]
    assert not [t for t in names if "_F" in t]


def test_amplification_bars_label_their_log_axis_once():
    from lora_analysis.plots.checks import axis_problems, log_tick_problems

    fig = plot_amplification(amplification_frame(_updates(2)))
    labels = list(fig.layout.yaxis.ticktext)
    assert fig.layout.yaxis.type == "log" and len(labels) == len(set(labels)) >= 2    # never "10, 9 … 1, 9 …"
    assert log_tick_problems(fig) == [] and axis_problems(fig) == []


def test_apply_style_uses_the_registered_house_template():
    import plotly.graph_objects as go
    import plotly.io as pio

    from lora_analysis.plots.style import TEMPLATE, apply_style

    assert TEMPLATE in pio.templates
    figs = [go.Figure(go.Scatter(x=[1, 2], y=[1, 2])) for _ in range(2)]
    for fig in figs:
        apply_style(fig, "t")
    a, b = figs[0], figs[1]
    template = a.layout.template.layout
    assert template.font.family.startswith("Inter") and template.font.size == 13 and template.legend.tracegroupgap == 2
    assert template.plot_bgcolor == pio.templates["plotly_white"].layout.plot_bgcolor     # plotly_white underneath
    assert a.layout.title.text == "t" and a.layout.title.x == 0.01 and a.layout.margin.t == 70
    a.layout.template.layout.font.size = 20                    # each figure holds its own copy
    assert b.layout.template.layout.font.size == 13 and pio.templates[TEMPLATE].layout.font.size == 13
    assert '"family":"Inter' in b.to_json().replace(" ", "")
    # (its speed, against a template set by name, is measured in benchmarks, never asserted in a test)
    kept = apply_style(go.Figure(layout={"margin": {"l": 200}}))
    assert kept.layout.margin.l == 200 and kept.layout.margin.t is None
