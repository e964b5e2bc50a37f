"""The one atomic writer: a failed write leaves the old file and no temporary file; every file the store and
the jobs write goes through it (so each one is fsynced), and metrics are appended, not rewritten."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lora_analysis import jobs, runstore
from lora_analysis.store import files


@pytest.mark.parametrize("writer", ["text", "tensors", "callback"])
def test_a_writer_that_raises_leaves_the_old_file_and_no_temp(tmp_path, writer, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        if writer == "text":
            monkeypatch.setattr(files, "_fsync_file", lambda p: half_then_fail(p))
            files.atomic_write_text(path, "new content")
        elif writer == "tensors":
            import safetensors.torch
            monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, tmp, metadata: half_then_fail(tmp))
            files.atomic_save_tensors(path, {"a": torch.ones(2)})
        else:
            files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_append_text_appends_and_undoes_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    files.atomic_write_text(path, "a,b\n")
    files.append_text(path, "1,2\n")
    inode = path.stat().st_ino
    real_write = os.write

    def short_then_fail(fd, data):
        real_write(fd, data[:2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", short_then_fail)
    with pytest.raises(OSError, match="No space"):
        files.append_text(path, "3,4\n")
    monkeypatch.undo()
    assert path.read_text() == "a,b\n1,2\n" and path.stat().st_ino == inode


def test_every_file_the_store_and_jobs_write_is_fsynced(lora_home, tmp_path, monkeypatch):
    synced = []
    real = files._fsync_file
    monkeypatch.setattr(files, "_fsync_file", lambda p: (synced.append(os.path.basename(p)), real(p)))
    writer = runstore.create_run({"model": "mlp-digits", "method": "full"})
    writer.log({"step": 0, "train_loss": 1.0})
    writer.save_tensors(runstore.FULL_WEIGHTS, {"fc": torch.ones(2, 2)})
    writer.finish("completed", {"val_loss": 1.0})
    assert any(".run.json." in s for s in synced) and any(".full_weights.safetensors." in s for s in synced)
    synced.clear()
    bundle = runstore.export_run(writer.id, tmp_path / "out")
    assert any(f".{bundle.name}." in s for s in synced)
    synced.clear()
    runstore.import_run(bundle, tmp_path / "other")
    assert {s.split(".")[1] for s in synced} >= {"run", "metrics", "full_weights"}
    synced.clear()
    jobs._write_json(tmp_path / "job.json", {"id": "x"})
    assert synced and ".job.json." in synced[0]
    assert json.loads((tmp_path / "job.json").read_text()) == {"id": "x"}
