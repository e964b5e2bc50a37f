"""Hostile inputs seen through the dashboard (issue 13): a damaged run never breaks a page, and a shared
run's name is shown as text, never as markdown."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from lora_analysis import runstore
from tests.test_dashboard_pages import open_page

RECORD = {"format_version": 1, "id": "20250101-000000-abcdef01", "name": "shared", "sweep_id": None,
          "status": "failed", "created": 1.7e9, "finished": 1.7e9 + 5, "config": {"model": "mlp-digits",
          "method": "lora", "rank": 2, "alpha": 4.0, "targets": ["fc1"]}, "metrics": {"val_loss": 0.5},
          "error": "diverged"}
MARKDOWN_NAME = "![x](http://example.invalid/pixel.png) :red[big]"


def _bundle(record: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("run.json", json.dumps(record))
        zf.writestr("metrics.csv", "step,train_loss\n0,1.0\n1,0.5\n")
    return out.getvalue()


def test_an_imported_name_is_shown_as_text_not_markdown(lora_home):
    at = open_page("reports")
    upload = ("shared.zip", _bundle({**RECORD, "name": MARKDOWN_NAME}), "application/zip")
    at.file_uploader(key="rep_import").set_value(upload).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    message = at.success[0].value
    assert "![x](" not in message and ":red[" not in message
    assert "\\!\\[x\\]\\(http" in message
    assert [r.name for r in runstore.list_runs()] == [MARKDOWN_NAME]


@pytest.mark.parametrize("page", ["finetune", "rank_alpha"])
def test_a_damaged_run_in_the_store_never_breaks_aopen_page(lora_home, page):
    runstore.import_run(_write(lora_home / "ok.zip", _bundle(RECORD)))
    root = lora_home / "runs"
    for i, change in enumerate([{"metrics": [1, 2]}, {"config": {"targets": 5}}, {"created": 1e300}]):
        d = root / f"20240101-00000{i}-bad0000{i}"
        d.mkdir()
        (d / "run.json").write_text(json.dumps({**RECORD, "id": d.name, "status": "completed", **change}))
    at = open_page(page)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    if page == "finetune":
        table = at.dataframe[0].value
        assert sorted(table["status"]) == ["damaged", "damaged", "damaged", "failed"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
