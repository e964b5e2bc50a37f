"""The job panel: a finished job's failed (NaN) runs show as errors that say what to do."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

from lora_analysis import jobs
from tests.test_jobs import SPEC, wait

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def test_nan_run_is_reported_on_the_page(lora_home):
    job = wait(jobs.start_job("sweep", SPEC | {"lr": 1e6, "full_ft": False}))
    assert job.status == "completed"
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["home_job"] = job.id
    at.run()
    assert not at.exception
    assert any("Done: 0 runs written" in s.value for s in at.success)
    [error] = at.error
    assert "failed: loss became" in error.value and "lower the learning rate" in error.value
