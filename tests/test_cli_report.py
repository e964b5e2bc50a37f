"""The report of a sweep, from the CLI: every registered analysis that applies, offline, and clear errors."""

import re

import plotly.graph_objects as go
import pytest

from lora_analysis import runstore
from lora_analysis.analysis import registry
from lora_analysis.analysis.registry import ANALYSES, Analysis, Inputs, Param
from lora_analysis.cli import main
from lora_analysis.training import run_sweep, sweep_settings


@pytest.fixture
def sweep(lora_home):
    return run_sweep(sweep_settings(model="mlp-digits", ranks=[2, 4], alphas=[8], full_ft=True, steps=20,
                                    pretrain_steps=60))


def section_titles(page: str) -> list[str]:
    return re.findall(r"<section><h2>(.*?)</h2>", page)


def test_report_of_latest_sweep_has_every_registered_analysis(sweep, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--html", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out
    page = out.read_text()
    titles = section_titles(page)
    runs = runstore.latest_sweep(runstore.list_runs())
    inputs = Inputs.from_runs(runs)
    for analysis in ANALYSES:
        assert analysis.skip_reason(inputs) is None, analysis.name      # on this sweep every analysis applies
        shown = [t for t in titles if t == analysis.title or t.startswith(analysis.title + ": ")]
        expected = len(analysis.options(analysis.each, inputs)) if analysis.each else 1
        assert len(shown) == expected, (analysis.name, titles)
    assert "Not shown" not in page
    # one figure per figure of every result: nothing is dropped on the way to HTML
    figures = sum(len(r.figures) for a in ANALYSES for r in a.runs_over(inputs))
    from lora_analysis.analysis.findings import findings
    figures += sum(len(f.figures) for f in findings(runs).findings)       # then the published claims checked
    assert page.count('class="plotly-graph-div"') == figures
    assert any(t.startswith("Findings: published claims about LoRA") for t in titles)
    assert "full FT" in page and "LoRA r=4 α=8" in page and "Parameters: k=10, epsilon=0.5." in page


def test_report_of_chosen_runs_and_parts(sweep, tmp_path):
    run_id = sweep.results[0].run_id
    out = tmp_path / "one.html"
    assert main(["report", run_id, "--parts", "spectra", "--html", str(out)]) == 0
    titles = section_titles(out.read_text())[:-1]      # the last: configuration and environment
    assert titles == ["LoRA ranks versus full fine-tuning", "Singular spectra of ΔW", "Rank advice"]
    assert main(["report", "--parts", "intruders,loss_curves", "--html", str(out)]) == 0
    assert section_titles(out.read_text())[:-1] == ["Training runs", "Intruder dimensions"]   # registry order


@pytest.fixture
def module_count():
    """A dummy analysis, registered for one test only."""
    def count(inputs, p):
        return [len(inputs.updates(label)) for label in inputs.labels]

    registry.register(Analysis(
        name="module_count", title="Modules per run", question="How many modules were adapted?", group="extra",
        page="dummy", compute=count, text=lambda v, p: f"counts {v}", params=(Param("scale", 7, "a factor", low=1),),
        figures=lambda v, p: [go.Figure(go.Bar(y=[n * p["scale"] for n in v]), layout_title_text="count")]))
    yield
    ANALYSES.unregister("module_count")


def test_a_registered_analysis_appears_in_the_report_without_other_changes(sweep, tmp_path, module_count):
    out = tmp_path / "r.html"
    assert main(["report", "--html", str(out)]) == 0
    page = out.read_text()
    titles = [t for t in section_titles(page) if not t.startswith("Finding")]     # the claims come after
    assert titles[-2] == "Modules per run"          # last in registry order, before the configs
    assert "counts [3, 3, 3]" in page and "Parameters: scale=7." in page
    assert main(["report", "--parts", "extra", "--html", str(out)]) == 0
    assert section_titles(out.read_text())[:-1] == ["Modules per run"]


def test_report_errors(lora_home, tmp_path, capsys):
    assert main(["report", "--html", str(tmp_path / "x.html")]) == 2
    assert "has no completed runs" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_unknown_part_is_a_one_line_error(sweep, tmp_path, capsys):
    assert main(["report", "--parts", "spectra,nonsense", "--html", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "['nonsense'] are not known" in err and "intruders" in err and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_report_over_runs_of_two_models(lora_home):
    from lora_analysis.run_report import report_sections

    run_sweep(sweep_settings(model="mlp-digits", ranks=[2, 4], alphas=[8], full_ft=False, steps=5, pretrain_steps=30))
    run_sweep(sweep_settings(model="tiny-gpt", ranks=[2], alphas=[4], full_ft=False, steps=3, pretrain_steps=20))
    sections = report_sections(runstore.list_runs(), ("spectra", "subspaces"))
    by_title = {s.title: s for s in sections}
    # φ compares the two highest ranks of one model (runs of two models share no module)
    (phi,) = by_title["Subspace similarity φ"].figures
    assert phi.layout.yaxis.title.text.startswith("i (LoRA r=4 α=8") and "j (LoRA r=2 α=8" in phi.layout.xaxis.title.text
    assert by_title["LoRA ranks versus full fine-tuning"].text == \
        "Not shown: the chosen runs share no module (different models)."
    assert by_title["LoRA ranks versus full fine-tuning"].figures == []
