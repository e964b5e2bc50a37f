"""Pages built on the analysis registry show what the HTML report shows, at the parameters the page chose
(not only at the defaults): the Merge page (analysis ``merge``) and the Fine-tune page's loss curves
(analysis ``loss_curves``). AppTest on the small store of tests/test_dashboard_merge.py (two LoRA runs of
mlp-digits).
"""

from __future__ import annotations

import json

import pytest

import lora_analysis.analysis.merge_check as mc
from lora_analysis import runstore
from lora_analysis.analysis import registry
from lora_analysis.run_report import report_sections
from tests.test_dashboard_merge import home, store  # noqa: F401  (fixtures)
from tests.test_dashboard_pages import TIMED, chart, clean, frame_with, label_of, open_page, specs, title


def section_of(runs, name: str, params: dict):
    (section,) = report_sections(runs, [name], params={name: params})
    return section


def assert_same_figures(at, section) -> None:
    """Every figure of the report section is on the page with the same data and layout (timings: the same
    traces and x values, their measured values differ between two runs)."""
    shown = {title(s): s for s in specs(at)}
    assert section.figures
    for fig in section.figures:
        spec = json.loads(fig.to_json())
        assert title(spec) in shown, (title(spec), list(shown))
        page = shown[title(spec)]
        if title(spec).startswith(TIMED):
            assert [(d["name"], d["x"]) for d in page["data"]] == [(d["name"], d["x"]) for d in spec["data"]]
        else:
            assert page["data"] == spec["data"] and page["layout"] == spec["layout"], title(spec)


def test_merge_page_shows_the_report_section_of_the_run_and_reference_chosen(home, monkeypatch):
    checks = []
    real = mc.merge_check
    monkeypatch.setattr(mc, "merge_check", lambda *a, **k: checks.append(1) or real(*a, **k))
    at = open_page("merge")
    default = at.selectbox(key="merge_run").value
    other = label_of(at, "merge_run", "r=2" if "r=4" in default else "r=4")
    at.selectbox(key="merge_run").set_value(other).run()
    at.radio(key="merge_ref").set_value("fp32").run()
    clean(at)
    assert len(checks) == 2           # one check per run: the reference only redraws the cached result
    params = at.session_state["params:merge"]
    assert (params["run"], params["reference"]) == (other, "fp32")
    assert "reference: unmerged, fp32" in title(chart(at, "Merge error"))
    runs = [r for r in runstore.list_runs() if r.status == "completed"]
    section = section_of(runs, "merge", {"run": other, "reference": "fp32"})
    assert_same_figures(at, section)
    tables = dict(section.tables)
    for column, caption in (("who", "Setups checked: base weights · LoRA factors, and who runs each"),
                            ("allclose", "Merge errors")):
        assert frame_with(at, column).to_dict("list") == tables[caption].to_dict("list"), caption
    task = frame_with(at, "variant")
    assert task.to_dict("list") == tables["Task metric"].to_dict("list")
    run = {registry.run_label(r): r for r in runs}[other]
    assert task.set_index("variant").loc["LoRA (unmerged)", "val_accuracy"] == pytest.approx(
        run.metrics["val_accuracy"])


def test_finetune_loss_curves_are_the_report_section_at_the_smoothing_chosen(home):
    at = open_page("finetune")
    chosen = at.multiselect(key="ft_compare").value
    assert len(chosen) == 2
    at.number_input(key="ft_smooth").set_value(2).run()
    clean(at)
    runs = {registry.run_label(r): r for r in runstore.list_runs()}
    section = section_of([runs[label] for label in chosen], "loss_curves", {"smooth": 2})
    assert_same_figures(at, section)
    default = section_of([runs[label] for label in chosen], "loss_curves", {})
    # the smoothing reaches the chart: at the default the training curves differ
    assert chart(at, "Training loss")["data"] != json.loads(default.figures[0].to_json())["data"]
