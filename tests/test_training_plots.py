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
    assert costs.data[0].y[-1] == pytest.approx(700_000 / 2**20)
    with pytest.raises(ValueError, match="needs the column"):
        plot_metric_vs_rank(runs.drop(columns=["rank"]))
