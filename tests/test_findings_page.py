"""AppTest of the Findings page (dashboard/views/findings.py): on a small sweep every claim shows its verdict,
the paper's and the measured number, the rule in an expander and the evidence; a claim the runs cannot
measure offers the research preset, whose button starts one background sweep per preset spec; an empty
run store offers the preset too."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_analysis import jobs
from lora_analysis.analysis import findings as F

PAGE = str(Path(__file__).resolve().parents[1] / "dashboard" / "views" / "findings.py")


@pytest.fixture(autouse=True)
def _one_thread():
    """The project's thread rule for the toy built-ins, which every model and matrix here is."""
    from lora_analysis.training.runtime import threads_scope

    with threads_scope("mlp-digits"):
        yield


@pytest.fixture
def sweep_home(small_sweep_home):
    """A LORA_ANALYSIS_HOME with a small mlp-digits sweep: LoRA r=1 and r=8, full fine-tuning."""
    return small_sweep_home


def _open() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def test_every_claim_shows_its_verdict_numbers_rule_and_evidence(sweep_home, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(sweep_home))
    at = _open()
    assert at.title[0].value == "Findings: published claims about LoRA"
    table = at.dataframe[0].value
    assert table["claim"].tolist() == [c.title for c in F.CLAIMS]
    assert set(table["verdict"]) <= set(F.VERDICTS)
    assert [s.value for s in at.subheader] == [f"({i}) {c.title}" for i, c in enumerate(F.CLAIMS, 1)]
    badges = _texts(at.success) + _texts(at.warning) + _texts(at.error) + _texts(at.info)
    for verdict in table["verdict"]:
        assert f"**{verdict.capitalize()}**" in badges
    assert "**Not measurable**" in _texts(at.info)          # ranks 1 and 8: φ needs a smaller rank ≥ 2
    rules = [e for e in at.expander if e.label == "The rule that gives the verdict"]
    assert len(rules) == len(F.CLAIMS) and "def phi_verdict(" in _texts(at.code)
    assert [c.key for c in at.get("plotly_chart")] == [     # the evidence of the four measurable claims
        "finding_amplification_0", "finding_intruders_0", "finding_energy_rank_0", "finding_forgetting_0",
        "finding_forgetting_1"]
    assert at.button(key="preset_phi_run").label == "Run the research preset on mlp-digits"
    assert "‖ΔW‖" in _texts(at.warning) + _texts(at.caption)


def test_the_preset_button_starts_one_sweep_per_spec(sweep_home, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(sweep_home))
    started = []

    def fake_start(kind, spec, home=None):
        started.append((kind, spec))
        return jobs.Job(id=f"job-{len(started)}", dir=Path("/nonexistent"), kind=kind, spec=spec, status="completed",
                        pid=None, started=0.0)

    def fake_read(directory):
        watched.append(Path(directory).name)
        return jobs.Job(id=Path(directory).name, dir=Path(directory), kind="sweep", spec={}, status="completed",
                        pid=None, started=0.0)

    watched: list[str] = []
    monkeypatch.setattr(jobs, "start_job", fake_start)
    monkeypatch.setattr(jobs, "read_job", fake_read)
    at = _open()
    at.button(key="preset_phi_run").click().run()
    assert not at.exception
    assert started == [("sweep", spec) for spec in F.preset_specs("mlp-digits")]
    assert [j for j in watched if j.startswith("job-")] == ["job-1", "job-2", "job-3", "job-4"]   # one panel each


def test_an_empty_store_offers_the_preset(lora_home):
    at = _open()
    assert "no completed runs yet" in _texts(at.info)
    assert at.selectbox(key="preset_empty_model").options == list(F.RESEARCH_PRESETS)
    at.selectbox(key="preset_empty_model").select("tiny-gpt").run()
    assert at.button(key="preset_empty_run").label == "Run the research preset on tiny-gpt"
    assert "tiny-gpt: LoRA at r=1, 2, 4" in _texts(at.caption).replace("\\", "")
    assert not at.get("plotly_chart")


def test_the_intervention_chart_follows_the_chosen_run(sweep_home, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(sweep_home))
    at = _open()
    choice = at.selectbox(key="findings_intervention_run")
    assert choice.options[0].startswith("r=1 · seed 0") and choice.options[-1].startswith("full FT")
    assert not [c for c in at.get("plotly_chart") if c.key == "findings_intervention_chart"]
    at.button(key="findings_intervention").click().run()
    assert not at.exception and "Could not" not in _texts(at.error)     # (st.error also shows "not reproduced")
    frame = next(d.value for d in at.dataframe if "factor" in d.value)
    assert frame["factor"].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and "source_accuracy" in frame
    assert [c for c in at.get("plotly_chart") if c.key == "findings_intervention_chart"]
