"""The job panel: a finished job's failed (NaN) runs show as errors that say what to do."""

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from lora_analysis import jobs
from tests.test_dashboard_pages import values
from tests.test_jobs import SPEC, wait

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def test_nan_run_is_reported_on_the_page(lora_home):
    job = wait(jobs.start_job("sweep", SPEC | {"lr": 1e6, "full_ft": False}))
    assert job.status in ("completed", "empty")
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["home_job"] = job.id
    at.run()
    assert not at.exception
    # no completed run: never a green "Done", but a warning that says so
    assert not [s for s in at.success if "Done" in s.value]
    assert any("ended without a completed run" in w.value for w in at.warning)
    [error] = at.error
    assert "failed: " in error.value and "lower the learning rate" in error.value


def test_rank_alpha_keeps_runs_of_different_settings_apart(lora_home):
    from lora_analysis.training import run_sweep, sweep_settings

    run_sweep(sweep_settings(model="mlp-digits", ranks=[1, 2], alphas=[4], full_ft=False, steps=5, pretrain_steps=30))
    run_sweep(sweep_settings(model="mlp-digits", ranks=[4], alphas=[4], full_ft=False, steps=8, pretrain_steps=30))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/rank_alpha.py").run()
    assert not at.exception and not at.error
    choice = at.selectbox(key="ra_settings")
    # one choice per setting (the label may add a run count): steps=5 holds r=1, 2; steps=8 holds r=4
    by_steps = {option.split(", ")[1]: option for option in choice.options}
    assert sorted(by_steps) == ["steps=5", "steps=8"] and all(o.startswith("data=default, ") for o in by_steps.values())
    for steps, ranks in (("steps=5", [1, 2]), ("steps=8", [4])):
        choice.set_value(by_steps[steps]).run()
        spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                    if "versus LoRA rank" in json.loads(c.proto.spec)["layout"]["title"]["text"])
        assert values(spec["data"][0]["x"]) == ranks
        choice = at.selectbox(key="ra_settings")
