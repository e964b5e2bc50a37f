"""The report of a sweep, from the CLI: every part present, offline, and clear errors."""

import pytest

from lora_analysis.cli import main
from lora_analysis.training import run_sweep, sweep_settings


@pytest.fixture
def sweep(lora_home):
    return run_sweep(sweep_settings(model="mlp-digits", ranks=[2, 4], alphas=[8], full_ft=True, steps=20,
                                    pretrain_steps=60))


def test_report_of_latest_sweep(sweep, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--html", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out
    page = out.read_text()
    for title in ("Training runs", "Singular spectra of ΔW", "Subspaces, amplification and intruder dimensions",
                  "Merge equivalence (LoRA r="):
        assert title in page, title
    assert page.count("class=\"plotly-graph-div\"") >= 6
    assert "full FT" in page and "LoRA r=4 α=8" in page


def test_report_of_chosen_runs_and_parts(sweep, tmp_path):
    run_id = sweep.results[0].run_id
    out = tmp_path / "one.html"
    assert main(["report", run_id, "--parts", "spectra", "--html", str(out)]) == 0
    page = out.read_text()
    assert "Singular spectra of ΔW" in page and "Training runs" not in page


def test_report_errors(lora_home, tmp_path, capsys):
    assert main(["report", "--html", str(tmp_path / "x.html")]) == 2
    assert "has no completed runs" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_report_over_runs_of_two_models(lora_home, tmp_path):
    from lora_analysis import runstore
    from lora_analysis.run_report import report_sections

    run_sweep(sweep_settings(model="mlp-digits", ranks=[2, 4], alphas=[8], full_ft=False, steps=5, pretrain_steps=30))
    run_sweep(sweep_settings(model="tiny-gpt", ranks=[2], alphas=[4], full_ft=False, steps=3, pretrain_steps=20))
    sections = report_sections(runstore.list_runs(), ("spectra", "subspaces"))
    titles = [f.layout.title.text or "" for s in sections for f in s.figures]
    assert any("φ between A matrices of LoRA r=4" in t for t in titles)      # the same-model pair
