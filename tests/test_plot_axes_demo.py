"""Every chart every page draws on the demo data fits its axes (issue 8, defect 15), checked on the figure
the browser receives: the page's plotly JSON, rebuilt as a Figure, through ``axis_problems``.

The demo store is the one tests/test_dashboard_pages.py builds (a tiny-gpt LoRA run; an mlp-digits sweep of
LoRA r=1, r=4 and full fine-tuning).
"""

from __future__ import annotations

import base64

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.test_dashboard_pages import demo, demo_home, open_page  # noqa: F401  (fixtures)
from tests.test_plot_axes import axis_problems

PAGES = ["home", "params", "finetune", "spectra", "rank_alpha", "subspaces", "merge"]


def _decode(value):
    """plotly ships numeric arrays as {"dtype", "bdata"(, "shape")}: back to nested lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array.tolist()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def page_figures(at) -> list[go.Figure]:
    import json

    return [go.Figure(_decode(json.loads(c.proto.spec)), skip_invalid=True) for c in at.get("plotly_chart")]


@pytest.mark.parametrize("name", PAGES)
def test_every_chart_on_the_demo_data_fits_its_axes(demo, name):  # noqa: F811
    at = open_page(name)
    figures = page_figures(at)
    assert figures, f"{name} shows no chart on the demo data"
    problems = {str(fig.layout.title.text): axis_problems(fig) for fig in figures}
    assert {t: p for t, p in problems.items() if p} == {}
