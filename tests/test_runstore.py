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
from lora_analysis.training import TrainConfig, train
from lora_analysis.training.trainer import task_for


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def lora_run(lora_home):
    task = task_for(TrainConfig(model="mlp-digits"))
    return train(TrainConfig(model="mlp-digits", rank=2, alpha=4, steps=12, eval_every=6), task=task)


def test_runs_root_follows_the_env_var_and_the_argument(lora_home, tmp_path):
    assert runstore.runs_root() == lora_home / "runs"
    assert runstore.runs_root(tmp_path / "x") == tmp_path / "x"


def test_a_run_directory_holds_record_metrics_and_adapter(lora_run):
    run = runstore.load_run(lora_run.run_id)
    assert run.status == "completed" and run.finished >= run.created
    assert run.config["rank"] == 2 and run.config["seed"] == 0 and run.environment["torch"] == torch.__version__
    assert run.environment["device"] == "cpu" and run.record["pid"] == os.getpid()
    assert run.record["pid_start_time"] == pytest.approx(__import__("psutil").Process().create_time(), abs=1.0)
    frame = run.metrics_frame()
    assert frame["step"].tolist() == list(range(13))
    assert frame["val_accuracy"].notna().tolist() == [s in (0, 6, 12) for s in range(13)]
    assert run.metrics["val_accuracy"] == pytest.approx(frame["val_accuracy"].iloc[-1])
    names = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*") if p.is_file())
    assert names == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base_weights.safetensors",
                     "metrics.csv", "run.json", "spectra_history.csv"]
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
    # damaged directories: no run.json (old, and young: a run being created), garbled run.json
    (root / "20200101-000000-deadbeef").mkdir()
    os.utime(root / "20200101-000000-deadbeef", (time.time() - 3600, time.time() - 3600))
    (root / "20200101-000002-creating").mkdir()
    (root / "20200101-000001-garbled0").mkdir()
    (root / "20200101-000001-garbled0" / "run.json").write_text('{"id": "half')
    runs = {r.name: r for r in runstore.list_runs()}
    assert set(runs) == {"killed", "live", "stale", runstore.load_run(lora_run.run_id).name,
                         "20200101-000000-deadbeef", "20200101-000001-garbled0"}
    garbled, empty = runs["20200101-000001-garbled0"], runs["20200101-000000-deadbeef"]
    assert garbled.status == "damaged" and "not valid JSON" in garbled.error
    assert empty.status == "damaged" and "has no run.json" in empty.error
    runstore.delete_run("20200101-000001-garbled0")          # a damaged run can be deleted
    assert runs["killed"].status == "interrupted" and runs["stale"].status == "interrupted"
    assert runs["live"].status == "running"
    assert runs["killed"].metrics_frame()["train_loss"].tolist() == [2.0]
    frame = runstore.runs_frame()
    assert sorted(frame["status"]) == ["completed", "damaged", "interrupted", "interrupted", "running"]
    with pytest.raises(ValueError, match="still running"):
        runstore.delete_run(live.dir)
    runstore.delete_run(writer.id)
    assert not writer.dir.exists()


def test_concurrent_runs_in_threads_never_clobber_each_other(lora_home):
    task = task_for(TrainConfig(model="mlp-digits"))
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
                                         "base_weights.safetensors", "metrics.csv", "run.json",
                                         "spectra_history.csv"]
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
    # ...yet it is the same run (issue 14): one origin, kept through every copy, and listings dedupe by it
    assert lora_run.run_id == runstore.load_run(lora_run.run_id).origin == imported.origin == again.origin
    third = runstore.import_run(runstore.export_run(again, tmp_path / "again"), other)
    assert third.origin == lora_run.run_id
    listed = runstore.list_runs(other)
    assert len(listed) == 3 and [r.id for r in runstore.unique_runs(listed)] == [imported.id]
    runstore.delete_run(imported.id, other)
    assert [r.id for r in runstore.unique_runs(runstore.list_runs(other))] == [again.id]   # the first import left


def _zip(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


RUN_JSON = json.dumps({"id": "x", "config": {"method": "lora"}, "status": "completed",
                       "created": 1.7e9}).encode()


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
    assert not list(lora_home.rglob("evil.json")) and not (tmp_path / "evil.json").exists()


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


# ---- metrics are appended (defect 5) -------------------------------------------------------------------

def test_flush_appends_only_the_new_rows_and_the_csv_reads_back_equal(lora_home):
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora"}, name="append")
    path = writer.dir / runstore.METRICS_FILE
    logged = [{"step": 0, "train_loss": float("nan"), "val_loss": 2.5, "val_accuracy": 0.1}]
    writer.log(logged[0])
    for step in range(1, 1001):
        row = {"step": step, "train_loss": 1.0 / step, "lr": 0.01}
        if step % 100 == 0:
            row |= {"val_loss": 1.0 / step, "val_accuracy": step / 1000}
        logged.append(row)
        writer.log(row)
    writer.flush()
    before, inode = path.read_bytes(), path.stat().st_ino
    logged.append({"step": 1001, "train_loss": 0.5, "lr": 0.01})
    writer.log(logged[-1])
    writer.flush()
    after = path.read_bytes()
    # the flush wrote one short line after 1001 rows: the file was appended to, not rewritten
    assert path.stat().st_ino == inode and after.startswith(before)
    assert after[len(before):] == b"1001,0.5,,,0.01\n"
    # a column that appears late rewrites the file once, with the new header
    logged.append({"step": 1002, "train_loss": 0.4, "lr": 0.01, "grad_norm": 3.0})
    writer.log(logged[-1])
    writer.finish("completed", {})
    expected = pd.DataFrame(logged)
    got = runstore.load_run(writer.id).metrics_frame()
    pd.testing.assert_frame_equal(got[expected.columns], expected, check_dtype=False)
    assert not list(writer.dir.glob(".*"))


# ---- liveness by pid and start time (defect 7) -------------------------------------------------------------

def test_a_run_whose_pid_was_reused_reads_as_interrupted(lora_home):
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora"}, name="reused")
    record = json.loads((writer.dir / "run.json").read_text())
    assert record["pid"] == os.getpid() and runstore.load_run(writer.id).status == "running"
    # the pid is alive (it is this test's process) but it is not the process that wrote the run
    record["pid_start_time"] = __import__("psutil").Process().create_time() - 1000.0
    (writer.dir / "run.json").write_text(json.dumps(record))
    assert runstore.load_run(writer.id).status == "interrupted"
    runstore.delete_run(writer.id)          # an interrupted run can be deleted


# ---- leftovers are cleaned (defect 12) ----------------------------------------------------------------------

def test_leftovers_of_deletes_and_of_dead_imports_are_cleaned(lora_home, monkeypatch):
    import psutil
    import shutil

    root = lora_home / "runs"
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora"}, name="doomed")
    writer.finish("completed", {})
    real_rmtree = shutil.rmtree

    def crash(path, *args, **kwargs):      # the deleting process dies half way
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        runstore.delete_run(writer.id)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name.startswith(".deleting-") for p in root.iterdir()] == [True]
    me = psutil.Process()
    dead = root / f".import-{_dead_pid()}-{int(me.create_time() * 1000)}-abcd"
    live = root / f".import-{os.getpid()}-{int(me.create_time() * 1000)}-ef01"   # an import in progress
    for d in (dead, live):
        d.mkdir()
        (d / "metrics.csv").write_text("step\n")
    assert runstore.list_runs() == []
    assert sorted(p.name for p in root.iterdir()) == [live.name]


# ---- old run folders (format 1) still load -------------------------------------------------------------------

def _v1_run(root, run_id, status, pid, with_adapter=True):
    """A run folder exactly as version 1 wrote it: run.json without a process start time, metrics.csv with
    every row rewritten under one header, the adapter and W0 keyed by module name."""
    import csv
    import io

    from safetensors.torch import save_file
    from torch import nn

    from lora_analysis.lora import apply_lora, save_adapter

    directory = root / run_id
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    w0 = base[0].weight.detach().clone()
    model = apply_lora(base, ["0"], rank=2, alpha=2.0)
    nn.init.normal_(model[0].lora_B.weight)
    if with_adapter:
        save_adapter(model, directory / "adapter")
        save_file({"0": w0}, str(directory / "base_weights.safetensors"), metadata={"format": "pt"})
    record = {"format_version": 1, "id": run_id, "name": f"v1 {status}", "sweep_id": None, "status": status,
              "created": 1700000000.0, "heartbeat": time.time(), "finished": None if status == "running" else 1.0,
              "pid": pid, "host": __import__("socket").gethostname(),
              "config": {"model": "mlp-digits", "method": "lora", "rank": 2, "alpha": 2.0},
              "task": {"model": "mlp-digits"}, "environment": {"torch": "2.5"}, "metrics": {"val_loss": 0.5},
              "error": None}
    (directory / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["step", "train_loss", "lr", "elapsed_s", "val_loss"], extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    w.writerows([{"step": 0, "train_loss": float("nan"), "lr": 0.1, "elapsed_s": 0.0, "val_loss": 1.0},
                 {"step": 1, "train_loss": 0.9, "lr": 0.1, "elapsed_s": 0.1}])
    (directory / "metrics.csv").write_text(out.getvalue())
    return directory, model, w0


def test_a_format_1_run_folder_still_loads(lora_home):
    root = lora_home / "runs"
    directory, model, w0 = _v1_run(root, "20240101-000000-00000001", "completed", pid=_dead_pid())
    _v1_run(root, "20240101-000000-00000002", "running", pid=_dead_pid(), with_adapter=False)
    _v1_run(root, "20240101-000000-00000003", "running", pid=os.getpid(), with_adapter=False)
    runs = {r.id[-1]: r for r in runstore.list_runs()}
    assert {k: r.status for k, r in runs.items()} == {"1": "completed", "2": "interrupted", "3": "running"}
    frame = runs["1"].metrics_frame()
    assert frame["step"].tolist() == [0, 1] and frame["val_loss"].tolist()[0] == 1.0
    assert pd.isna(frame["val_loss"].tolist()[1])
    [update] = runstore.load_updates(runs["1"]).values()
    assert torch.equal(update.w0, w0)
    torch.testing.assert_close(update.dense_delta(), model[0].delta_weight())


def test_reading_tensors_turns_only_file_errors_into_value_errors(tmp_path, monkeypatch):
    import safetensors.torch

    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        runstore._read_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        runstore._read_tensors(tmp_path / "missing.safetensors")

    def bug(path):
        raise KeyError("a programming error")

    monkeypatch.setattr(safetensors.torch, "load_file", bug)
    with pytest.raises(KeyError, match="a programming error"):           # a bug shows as a bug
        runstore._read_tensors(tmp_path / "bad.safetensors")


def test_a_run_killed_while_its_base_loads_lists_as_interrupted(lora_home):
    """Issue 13: run.json is written before the base is loaded or pretrained, so kill -9 at that moment
    leaves an "interrupted" run with its settings, not an empty folder."""
    script = ("import time\n"
              "from lora_analysis.training import TrainConfig, trainer\n"
              "def slow(config, progress=None):\n"
              "    time.sleep(600)\n"
              "trainer.task_for = slow\n"
              "trainer.train(TrainConfig(model='mlp-digits', rank=3, steps=5))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    try:
        root, deadline = lora_home / "runs", time.time() + 120
        while time.time() < deadline and not list(root.glob("*/run.json")):
            assert proc.poll() is None, "the training process ended early"
            time.sleep(0.1)
        [run] = runstore.list_runs()
        assert run.status == "running" and run.config["rank"] == 3
    finally:
        proc.kill()
        proc.wait()
    [run] = runstore.list_runs()
    assert run.status == "interrupted" and run.config["rank"] == 3 and run.name.startswith("mlp-digits LoRA r=3")


def test_stale_hidden_folders_are_removed_when_a_run_starts(lora_home):
    """What a killed import or delete left is removed when the next run claims its folder, and never
    matched by a run id."""
    root = lora_home / "runs"
    root.mkdir(parents=True)
    dead = root / f".import-{_dead_pid()}-{int(time.time() * 1000)}-abcd"
    (dead / "adapter").mkdir(parents=True)
    (root / ".deleting-20260101-000000-abcd-123456").mkdir()
    with pytest.raises(ValueError, match="never start with"):
        runstore.delete_run(".imp")
    writer = runstore.create_run({"model": "mlp-digits", "method": "lora"})
    assert [p.name for p in root.iterdir()] == [writer.id]
