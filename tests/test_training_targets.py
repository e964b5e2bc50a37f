"""Defect 8: one text form of targets, one meaning: "re:PATTERN" is a regex matched against the whole
module name, "a,b" are module-name suffixes, everywhere (library, sweeps, CLI, dashboard)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_analysis import jobs, runstore
from lora_analysis.cli import main
from lora_analysis.lora import lora_layers, read_adapter
from lora_analysis.training import TrainConfig, prepare_task, sweep_settings, train

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
COMMON = dict(pretrain_steps=30, steps=1)


def _modules(config: TrainConfig, task) -> list[str]:
    return sorted(lora_layers(train(config, task=task, save=False).model))


def _page_spec(text: str, monkeypatch) -> dict:
    """The sweep spec the Fine-tune page hands to the background job for the target text ``text``."""
    launched = []

    def start_job(kind, spec, home=None):
        launched.append(spec)
        raise ValueError("not started in this test")

    monkeypatch.setattr(jobs, "start_job", start_job)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/finetune.py").run()
    at.multiselect(key="ft_methods").set_value(["LoRA"])
    at.multiselect(key="ft_ranks").set_value([2])
    at.text_input(key="ft_targets").set_value(text)
    at.button(key="FormSubmitter:finetune_form-Launch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [spec] = launched
    return spec


@pytest.mark.parametrize("text, chosen", [("re:fc[12]", ["fc1", "fc2"]), ("fc1,fc2", ["fc1", "fc2"]),
                                          ("re:.*3", ["fc3"]), ("all-linear", ["fc1", "fc2", "fc3"])])
def test_a_target_text_selects_the_same_modules_everywhere(lora_home, monkeypatch, text, chosen):
    task = prepare_task("mlp-digits", pretrain_steps=30)
    assert _modules(TrainConfig(targets=text, rank=2, **COMMON), task) == chosen
    [(_, swept)] = sweep_settings(ranks=[2], alphas=[4], targets=[text], full_ft=False, **COMMON)
    assert _modules(swept, task) == chosen
    [(_, one)] = sweep_settings(ranks=[2], alphas=[4], targets=text, full_ft=False, **COMMON)
    assert _modules(one, task) == chosen
    assert main(["train", "--targets", text, "--rank", "2", "--steps", "1", "--pretrain-steps", "30", "-q"]) == 0
    assert main(["sweep", "--targets", text, "--ranks", "2", "--steps", "1", "--pretrain-steps", "30", "-q"]) == 0
    for run in runstore.list_runs():
        assert sorted(read_adapter(run.dir / "adapter").modules) == chosen, run.name
    spec = _page_spec(text, monkeypatch)
    [(_, paged)] = sweep_settings(**spec)
    assert _modules(paged, task) == chosen


def test_a_bare_string_is_a_suffix_not_a_regex(lora_home):
    """"fc[12]" without "re:" names a module called fc[12]: none exists, and the error says so."""
    task = prepare_task("mlp-digits", pretrain_steps=30)
    with pytest.raises(ValueError, match=r"matched no Linear/Conv1D module"):
        train(TrainConfig(targets="fc[12]", **COMMON), task=task, save=False)
    with pytest.raises(ValueError, match=r"fc\[12"):
        TrainConfig(targets="re:fc[12", **COMMON).validate()
