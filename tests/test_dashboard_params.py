"""AppTest of the Parameter savings page: its numbers are the library's reference numbers."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/params.py").run()
    assert not at.exception
    return at


def metrics(at):
    return {m.label: m.value for m in at.metric}


def test_default_is_llama_reference(app):
    assert metrics(app)["Trainable (LoRA)"] == "4,194,304"
    assert metrics(app)["All parameters"] == "6,742,609,920"
    assert len(app.get("plotly_chart")) == 3


def test_targets_and_rank_change_the_numbers(app):
    app.multiselect(key="params_targets:llama-2-7b").set_value(["q_proj", "k_proj", "v_proj", "o_proj"]).run()
    assert metrics(app)["Trainable (LoRA)"] == "8,388,608"
    app.select_slider(key="params_rank").set_value(1).run()
    assert metrics(app)["Trainable (LoRA)"] == "1,048,576"


def test_gpt3_preset(app):
    app.selectbox(key="params_preset").set_value("gpt3-175b").run()
    app.select_slider(key="params_rank").set_value(1).run()
    assert metrics(app)["Trainable (LoRA)"] == "4,718,592"


def test_matrix_mode_reproduces_seed_example(app):
    app.radio(key="params_mode").set_value("One matrix").run()
    app.number_input(key="params_d").set_value(1000).run()
    app.number_input(key="params_r").set_value(2).run()
    m = metrics(app)
    assert m["LoRA (r·(d+k))"] == "4,000" and m["Fewer values"] == "250×"
    app.number_input(key="params_r").set_value(5000).run()
    assert app.error and "rank=5000 is not allowed" in app.error[0].value
    assert not app.exception


def test_empty_selection_warns_instead_of_failing(app):
    app.multiselect(key="params_targets:llama-2-7b").set_value([]).run()
    assert app.warning and "at least one target" in app.warning[0].value


def test_switching_preset_uses_that_models_defaults(app):
    app.selectbox(key="params_preset").set_value("gpt2").run()
    assert app.multiselect(key="params_targets:gpt2").value == ["c_attn"]
    assert metrics(app)["Trainable (LoRA)"] == "294,912"


def test_a_runs_model_counts_like_the_trainer(lora_home):
    from lora_analysis.training import TrainConfig, train

    result = train(TrainConfig(model="mlp-digits", rank=4, alpha=8, steps=3, pretrain_steps=30))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/params.py").run()
    at.radio(key="params_mode").set_value("A run's model").run()
    assert not at.exception and not at.error
    # the page opens on the run's rank (4, not the usual 8): all-linear on 64-128-256-10, what the run trained
    assert at.select_slider(key=f"params_rank:run:{result.run_dir.name}").value == 4
    assert metrics(at)["Trainable (LoRA)"] == f"{result.metrics['trainable_params']:,}"
    assert result.metrics["trainable_params"] == 4 * (64 + 128) + 4 * (128 + 256) + 4 * (256 + 10)
