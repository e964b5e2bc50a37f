"""The run store: layout, crash safety, concurrency, zip bundles (round trip and hostile zips)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile

import pandas as pd
import pytest
import torch

from lora_analysis import runstore
from lora_analysis.training import TrainConfig, prepare_task, train


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def lora_run(lora_home):
    task = prepare_task("mlp-digits")
    return train(TrainConfig(model="mlp-digits", rank=2, alpha=4, steps=12, eval_every=6), task=task)


def test_runs_root_follows_the_env_var_and_the_argument(lora_home, tmp_path):
    assert runstore.runs_root() == lora_home / "runs"
    assert runstore.runs_root(tmp_path / "x") == tmp_path / "x"


def test_a_run_directory_holds_record_metrics_and_adapter(lora_run):
    run = runstore.load_run(lora_run.run_id)
    assert run.status == "completed" and run.finished >= run.created
    assert run.config["rank"] == 2 and run.config["seed"] == 0 and run.environment["torch"] == torch.__version__
    assert run.environment["device"] == "cpu" and run.record["pid"] == os.getpid()
    frame = run.metrics_frame()
    assert frame["step"].tolist() == list(range(13))
    assert frame["val_accuracy"].notna().tolist() == [s in (0, 6, 12) for s in range(13)]
    assert run.metrics["val_accuracy"] == pytest.approx(frame["val_accuracy"].iloc[-1])
    names = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*") if p.is_file())
    assert names == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base_weights.safetensors",
                     "metrics.csv", "run.json"]
    assert not list(run.dir.rglob("*.tmp"))
    table = runstore.runs_frame()
    assert table.loc[0, "id"] == run.id and table.loc[0, "rank"] == 2 and table.loc[0, "val_accuracy"] > 0
    assert runstore.load_run(run.id[:-3]).id == run.id          # a unique prefix works


def test_killed_mid_write_lists_as_interrupted_and_leftovers_are_ignored(lora_home, lora_run):
    root = lora_home / "runs"
    # a run whose process died while "running", with a temp file it never renamed
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora", "rank": 4}, name="killed")
    writer.log({"step": 1, "train_loss": 2.0})
    writer.flush()
    record = json.loads((writer.dir / "run.json").read_text())
    record["pid"] = _dead_pid()
    (writer.dir / "run.json").write_text(json.dumps(record))
    (writer.dir / ".metrics.csv.123.456.abc.tmp").write_text("step,train_loss\n1,2.0\n2,1.")
    # a live "running" run in this process stays running
    live = runstore.create_run({"model": "mlp-digits", "method": "lora"}, name="live")
    # a run on another host whose heartbeat went stale
    stale = runstore.create_run({"model": "mlp-digits", "method": "full"}, name="stale")
    rec = json.loads((stale.dir / "run.json").read_text())
    rec.update(host="elsewhere", heartbeat=time.time() - 2 * runstore.HEARTBEAT_STALE_S)
    (stale.dir / "run.json").write_text(json.dumps(rec))
    # damaged directories: no run.json, garbled run.json
    (root / "20200101-000000-deadbeef").mkdir()
    (root / "20200101-000001-garbled0").mkdir()
    (root / "20200101-000001-garbled0" / "run.json").write_text('{"id": "half')
    with pytest.warns(UserWarning, match="skipping run directory"):
        runs = {r.name: r for r in runstore.list_runs()}
    assert set(runs) == {"killed", "live", "stale", runstore.load_run(lora_run.run_id).name}
    assert runs["killed"].status == "interrupted" and runs["stale"].status == "interrupted"
    assert runs["live"].status == "running"
    assert runs["killed"].metrics_frame()["train_loss"].tolist() == [2.0]
    with pytest.warns(UserWarning):
        frame = runstore.runs_frame()
    assert sorted(frame["status"]) == ["completed", "interrupted", "interrupted", "running"]
    with pytest.raises(ValueError, match="still running"):
        runstore.delete_run(live.dir)
    runstore.delete_run(writer.id)
    assert not writer.dir.exists()


def test_concurrent_runs_in_threads_never_clobber_each_other(lora_home):
    task = prepare_task("mlp-digits")
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = train(TrainConfig(model="mlp-digits", rank=2, steps=15, seed=seed), task=task)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = {r.run_id for r in results.values()}
    assert len(ids) == 4
    runs = runstore.list_runs()
    assert {r.id for r in runs} == ids and all(r.status == "completed" for r in runs)
    for seed, result in results.items():
        run = runstore.load_run(result.run_id)
        assert run.config["seed"] == seed
        assert run.metrics_frame()["train_loss"].tolist()[1:] == pytest.approx(result.history["train_loss"].tolist()[1:])


def test_export_import_round_trip(lora_run, tmp_path):
    bundle = runstore.export_run(lora_run.run_id, tmp_path / "out")
    assert bundle.name == f"{lora_run.run_id}.zip"
    with zipfile.ZipFile(bundle) as zf:
        assert sorted(zf.namelist()) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                         "base_weights.safetensors", "metrics.csv", "run.json"]
    other = tmp_path / "other-store"
    imported = runstore.import_run(bundle, other)
    assert imported.id == lora_run.run_id and imported.status == "completed"
    a, b = runstore.load_updates(lora_run.run_id), runstore.load_updates(imported.id, other)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].lora_B, b[name].lora_B) and torch.equal(a[name].w0, b[name].w0)
    pd.testing.assert_frame_equal(runstore.load_run(lora_run.run_id).metrics_frame(), imported.metrics_frame())
    again = runstore.import_run(bundle, other)          # the id is taken there: a new one
    assert again.id != imported.id and again.record["imported_as_new_id_of"] == imported.id


def _zip(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


RUN_JSON = json.dumps({"id": "x", "config": {"method": "lora"}, "status": "completed"}).encode()


@pytest.mark.parametrize("entries, message", [
    ({"run.json": RUN_JSON, "../evil.json": b"{}"}, "path is not allowed"),
    ({"run.json": RUN_JSON, "/etc/evil.json": b"{}"}, "path is not allowed"),
    ({"run.json": RUN_JSON, "adapter/model.pkl": b"\x80\x04"}, "only .json, .csv, .safetensors, .txt"),
    ({"run.json": RUN_JSON, "hook.py": b"import os"}, "only .json"),
    ({"metrics.csv": b"step\n"}, "no run.json"),
    ({"run.json": b"{not json"}, "not valid JSON"),
    ({"run.json": RUN_JSON, "base_weights.safetensors": b"garbage"}, "not a valid safetensors"),
])
def test_hostile_or_broken_zips_are_refused(lora_home, tmp_path, entries, message):
    bundle = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(ValueError, match=message):
        runstore.import_run(bundle)
    root = lora_home / "runs"
    assert not root.exists() or not list(root.iterdir())      # nothing left behind, not even staging
    assert not (tmp_path / "evil.json").exists()


def test_zip_size_limit_and_symlinks_and_non_zips(lora_home, tmp_path):
    bundle = _zip(tmp_path / "big.zip", {"run.json": RUN_JSON, "metrics.csv": b"0" * 5000})
    with pytest.raises(ValueError, match="unpacks to more than"):
        runstore.import_run(bundle, max_bytes=1000)
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        zf.writestr("run.json", RUN_JSON)
        info = zipfile.ZipInfo("adapter.json")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        runstore.import_run(link)
    (tmp_path / "not.zip").write_bytes(b"hello")
    with pytest.raises(ValueError, match="is not a zip file"):
        runstore.import_run(tmp_path / "not.zip")


def test_load_updates_refuses_unfinished_runs(lora_home):
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora"})
    writer.finish("failed", error="loss became NaN at step 3: lower the learning rate")
    with pytest.raises(ValueError, match="is failed: only completed runs"):
        runstore.load_updates(writer.id)
    with pytest.raises(ValueError, match="not found"):
        runstore.load_run("no-such-run")
