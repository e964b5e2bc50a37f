"""Analysis figures: asserted on their data (traces, values), not pixels."""

import numpy as np
import pandas as pd
import pytest
import torch

from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruder_sweep
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.plots.analysis import (parse_module_name, plot_amplification, plot_amplification_table,
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
    np.testing.assert_allclose(first.y, np.cumsum(s**2) / np.sum(s**2) * 100)
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
