"""Training figures: DataFrame in, plotly Figure out, with the numbers where they belong."""

from __future__ import annotations

import pandas as pd
import pytest

from lora_analysis.plots.training import (pareto_front, plot_cost_comparison, plot_efficiency_frontier,
                                          plot_loss_curves, plot_metric_vs_alpha, plot_metric_vs_rank)


@pytest.fixture
def runs() -> pd.DataFrame:
    rows = [{"name": f"LoRA r={r}", "method": "lora", "status": "completed", "rank": r, "alpha": 16.0,
             "rslora": False, "targets": "all-linear", "val_accuracy": acc, "base_val_accuracy": 0.1,
             "trainable_params": 842 * r, "train_seconds": 0.2, "training_state_bytes": 200_000 + 10_000 * r}
            for r, acc in ((1, 0.6), (4, 0.9), (16, 0.88))]
    rows.append({"name": "full FT", "method": "full", "status": "completed", "rank": None, "alpha": None,
                 "rslora": False, "targets": None, "val_accuracy": 0.97, "base_val_accuracy": 0.1,
                 "trainable_params": 43914, "train_seconds": 0.25, "training_state_bytes": 700_000})
    rows.append({**rows[0], "name": "LoRA r=2 failed", "status": "failed", "rank": 2, "val_accuracy": None})
    return pd.DataFrame(rows)


def test_metric_vs_rank_has_lora_line_and_reference_lines(runs):
    fig = plot_metric_vs_rank(runs)
    (line,) = fig.data
    assert list(line.x) == [1, 4, 16] and list(line.y) == [0.6, 0.9, 0.88]
    assert sorted(s.y0 for s in fig.layout.shapes) == [0.1, 0.97]        # frozen base and full FT
    assert fig.layout.xaxis.type == "log"


def test_metric_vs_alpha_groups_by_rank(runs):
    frame = pd.concat([runs, runs.iloc[:3].assign(alpha=32.0, val_accuracy=[0.7, 0.92, 0.9])])
    fig = plot_metric_vs_alpha(frame)
    assert [t.name for t in fig.data] == ["LoRA r=1", "LoRA r=4", "LoRA r=16"]
    assert list(fig.data[1].x) == [16.0, 32.0] and list(fig.data[1].y) == [0.9, 0.92]


def test_efficiency_frontier(runs):
    front = pareto_front(runs[runs["status"] == "completed"], "trainable_params", "val_accuracy")
    assert front["name"].tolist() == ["LoRA r=1", "LoRA r=4", "full FT"]     # r=16 is dominated by r=4
    fig = plot_efficiency_frontier(runs)
    assert [t.name for t in fig.data] == ["LoRA", "full fine-tuning", "frontier"]
    assert list(fig.data[2].y) == [0.6, 0.9, 0.97]
    assert list(pareto_front(runs.assign(val_loss=[0.5, 0.2, 0.3, 0.1, None]), "trainable_params",
                             "val_loss")["name"]) == ["LoRA r=1", "LoRA r=4", "full FT"]


def test_loss_curves_and_costs(runs):
    metrics = pd.DataFrame({"name": ["a"] * 3 + ["full"] * 3, "method": ["lora"] * 3 + ["full"] * 3,
                            "step": [0, 1, 2] * 2, "train_loss": [None, 2.0, 1.0, None, 2.0, 0.5]})
    fig = plot_loss_curves(metrics)
    assert [t.name for t in fig.data] == ["a", "full"] and list(fig.data[1].y) == [2.0, 0.5]
    costs = plot_cost_comparison(runs)
    assert len(costs.data) == 2 and list(costs.data[0].x) == ["LoRA r=1", "LoRA r=4", "LoRA r=16", "full FT"]
    assert costs.data[0].y[-1] == pytest.approx(700_000 / 2**10)              # 684 KiB, not 0.67 MiB
    assert costs.layout.annotations[0].text == "params + grads + optimizer states (KiB)"
    with pytest.raises(ValueError, match="needs the column"):
        plot_metric_vs_rank(runs.drop(columns=["rank"]))


def test_loss_axis_is_log_only_when_it_helps():
    steps = list(range(6))
    falling = pd.DataFrame({"name": "a", "method": "lora", "step": steps,
                            "val_loss": [16.6, 5.0, 3.4, 3.2, 3.1, 3.05]})           # the base's 16.6 at step 0
    fig = plot_loss_curves(falling, "val_loss", log_y=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.tickformat == "~g"   # 0.7, 0.8 … not 7, 8 …
    lo, hi = fig.layout.yaxis.range                                                  # log10 values
    assert 10 ** lo < 3.05 and 16.6 < 10 ** hi < 25
    flat = falling.assign(val_loss=[10.4, 10.3, 10.2, 10.2, 10.1, 10.1])
    assert plot_loss_curves(flat, "val_loss", log_y=True).layout.yaxis.type == "linear"
    assert plot_loss_curves(falling, "val_loss").layout.yaxis.type == "linear"       # log only when asked
    # each run has its own colour, its legend name is text
    two = pd.concat([falling.assign(run_id="20261130-000000-aaaaaaaa"),
                     falling.assign(run_id="20261130-000000-bbbbbbbb", name="b", method="full")])
    fig = plot_loss_curves(two, "val_loss")
    assert [t.name for t in fig.data] == ["a", "b"] and fig.data[1].line.width == 2.5


def test_memory_in_human_units():
    from lora_analysis.plots.params import plot_memory
    from lora_analysis.plots.style import byte_unit

    assert byte_unit([600 * 2**10]) == (2**10, "KiB") and byte_unit([3 * 2**30, 5]) == (2**30, "GiB")
    assert byte_unit([512]) == (1.0, "B") and byte_unit([]) == (1.0, "B")
    small = pd.DataFrame({"full": [400_000.0, 200_000.0], "lora": [400_000.0, 1000.0]},
                         index=["weights", "gradients"])
    fig = plot_memory(small)
    assert fig.layout.yaxis.title.text == "KiB" and fig.data[0].y[0] == pytest.approx(400_000 / 1024)
    big = plot_memory(small * 2**20)
    assert big.layout.yaxis.title.text == "GiB"


def test_reference_lines_and_single_values_fit(runs):
    one = runs[runs["rank"].isin([4]) | (runs["method"] == "full")]
    fig = plot_metric_vs_alpha(one)                                   # one alpha: 16
    lo, hi = fig.layout.xaxis.range
    assert 10 ** lo < 16 < 10 ** hi and hi - lo < 0.5                # not plotly's 1.6 … 160
    assert list(fig.layout.xaxis.tickvals) == [16.0]


def test_margins_a_plot_sets_survive_the_house_style(runs):
    # the cost bars need room under rotated run names; the house style must not reset it
    assert plot_cost_comparison(runs).layout.margin.b == 120
    assert plot_loss_curves(pd.DataFrame({"name": "a", "step": [1, 2], "train_loss": [2.0, 1.0]})).layout.margin.l == 60


def test_a_running_run_without_a_planned_count_still_says_it_runs():
    metrics = pd.DataFrame({"run_id": "r1", "name": "a", "step": [1, 2], "train_loss": [2.0, 1.9]})
    fig = plot_loss_curves(metrics, runs=pd.DataFrame({"id": ["r1"], "name": ["a"], "status": ["running"],
                                                       "steps": [None]}))
    assert [a.text for a in fig.layout.annotations] == ["run in progress: step 2"]
    assert [t.name for t in fig.data] == ["a"]                       # no planned end to draw
    done = plot_loss_curves(metrics, runs=pd.DataFrame({"id": ["r1"], "status": ["completed"], "steps": [50]}))
    assert not done.layout.annotations and done.layout.xaxis.range[1] < 3


def _title_boxes(fig) -> list[tuple[float, float]]:
    """(top, bottom) in px from the figure's top of each panel title: its annotation sits on its panel's top
    edge (y in paper units, anchored at its bottom) and is one line of its font high (1.3 × the size)."""
    height, margin = fig.layout.height, fig.layout.margin
    area = height - margin.t - margin.b
    out = []
    for note in fig.layout.annotations:
        assert note.yref == "paper" and note.yanchor == "bottom" and "<br>" not in note.text
        bottom = margin.t + (1 - note.y) * area - (note.yshift or 0)
        out.append((bottom - 1.3 * note.font.size, bottom))
    return out


@pytest.mark.parametrize("costs", [("training_state_bytes", "train_seconds"),
                                   ("training_state_bytes", "train_seconds", "peak_rss_bytes")])
def test_cost_panel_titles_never_collide(runs, costs):
    fig = plot_cost_comparison(runs.assign(peak_rss_bytes=3e8), costs=costs)
    height, margin = fig.layout.height, fig.layout.margin
    area = height - margin.t - margin.b
    boxes = _title_boxes(fig)
    assert len(boxes) == len(costs) == len(fig.data)
    # the chart's title: its baseline in the middle of the top margin, 1.4 × the font size high
    title_bottom = margin.t / 2 + 0.3 * 1.4 * 13
    assert boxes[0][0] > title_bottom
    domains = [fig.layout[f"yaxis{i if i > 1 else ''}"].domain for i in range(1, len(costs) + 1)]
    for i, (top, bottom) in enumerate(boxes):
        assert bottom <= margin.t + (1 - domains[i][1]) * area + 1e-6          # above its own panel
        if i:
            above = margin.t + (1 - domains[i - 1][0]) * area                 # the bottom of the panel above
            assert top > above + 4, (i, top, above)
            assert top > boxes[i - 1][1]                                      # and below the title above
    # the run names are written once, under the last panel (the panels share the run axis)
    shown = [fig.layout[f"xaxis{i if i > 1 else ''}"].showticklabels for i in range(1, len(costs) + 1)]
    assert shown[:-1] == [False] * (len(costs) - 1) and shown[-1] is not False
