"""Every chart on the demo data fits its axes and shows user text as text (issue 8, defect 15; issues 13
and 14): the figures every page draws (the page's plotly JSON, as the browser receives it) and the figures
every registered analysis produces for each demo model, checked by :mod:`lora_analysis.plots.checks` (and
every log axis among them labels each tick once: ``log_tick_problems``).

The demo store is the one tests/test_dashboard_pages.py builds (a tiny-gpt LoRA run; an mlp-digits sweep of
LoRA r=1, r=4 and full fine-tuning).
"""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from lora_analysis.plots.checks import (as_figure, axis_overreach, axis_problems, log_tick_labels, log_tick_problems,
                                        raw_markup)
from tests.test_dashboard_pages import demo, demo_home, open_page  # noqa: F401  (fixtures)

PAGES = ["home", "params", "finetune", "spectra", "rank_alpha", "subspaces", "merge"]
# The merge analysis times forward passes (seconds a model); the Merge page above checks its figures.
SLOW = {"merge"}


def page_figures(at) -> list[go.Figure]:
    """The figures a page shows, rebuilt from the plotly JSON the browser receives."""
    return [as_figure(json.loads(c.proto.spec)) for c in at.get("plotly_chart")]


@pytest.mark.parametrize("name", PAGES)
def test_every_chart_on_the_demo_data_fits_its_axes(demo, name):  # noqa: F811
    at = open_page(name)
    figures = page_figures(at)
    assert figures, f"{name} shows no chart on the demo data"
    # log axes label each tick once (the amplification bars read "10, 9 … 1, 9 …" with plotly's own ticks)
    problems = {str(fig.layout.title.text): axis_problems(fig) + raw_markup(fig) + log_tick_problems(fig)
                for fig in figures}
    assert {t: p for t, p in problems.items() if p} == {}


def test_every_registered_figure_on_the_demo_data_fits_its_axes(demo):  # noqa: F811
    from lora_analysis import runstore
    from lora_analysis.analysis import registry

    runs = [r for r in runstore.list_runs() if r.status == "completed"]
    models = sorted({r.model for r in runs})
    assert models == ["mlp-digits", "tiny-gpt"]
    problems, checked, reach, log_axes = {}, 0, {}, 0
    for model in models:
        inputs = registry.Inputs.from_runs([r for r in runs if r.model == model])
        for entry in registry.ANALYSES:
            if entry.name in SLOW or entry.skip_reason(inputs):
                continue
            for result in entry.runs_over(inputs):
                for i, fig in enumerate(result.figures):
                    key = f"{model} · {entry.name} · {i}: {fig.layout.title.text}"
                    problems[key] = axis_problems(fig) + raw_markup(fig) + log_tick_problems(fig)
                    reach[key] = axis_overreach(fig)
                    log_axes += len(log_tick_labels(fig))
                    checked += 1
    assert checked >= 25, checked
    assert log_axes >= 5, log_axes                       # spectra, amplification, update size, merge errors …
    assert {k: p for k, p in problems.items() if p} == {}
    # the charts issue 14 saw stretched: the rank sweep's index axis and the update size's axis
    sweep = [r for k, r in reach.items() if k.startswith("mlp-digits · spectra_sweep")]
    assert sweep and sweep[0]["xaxis"].log and sweep[0]["xaxis"].shown[1] < 200     # fc1..fc3 are ≤ 128 wide
    norms = [r for k, r in reach.items() if "rank_alpha" in k and "Size of the learned update" in k]
    assert norms and all(r["yaxis"].over <= 0.25 for r in norms)
