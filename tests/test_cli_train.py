"""``python -m lora_analysis train | sweep | runs``."""

from __future__ import annotations

import json

import pytest

from lora_analysis import runstore
from lora_analysis.cli import main


def test_train_prints_a_summary_and_writes_a_run(lora_home, capsys):
    assert main(["train", "--model", "mlp-digits", "--rank", "4", "--alpha", "16", "--steps", "60", "-q"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "val_accuracy: frozen base" in out and "trainable params: 3,368" in out
    (run,) = runstore.list_runs()
    assert run.config["rank"] == 4 and run.status == "completed"


def test_train_json_and_failure_exit_code(lora_home, capsys):
    assert main(["train", "--method", "full", "--lr", "1e12", "--steps", "50", "-q", "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "failed" and "lower the learning rate" in record["error"]


def test_bad_inputs_are_one_line_errors(lora_home, capsys, tmp_path):
    assert main(["train", "--model", "mlp-digit", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'mlp-digit' is not known") and err.count("\n") == 1
    assert main(["train", "--lr", "0", "-q"]) == 2
    assert "lr=0.0 is not allowed" in capsys.readouterr().err
    assert main(["train", "--model", "tiny-gpt", "--data", str(tmp_path / "none.txt"), "-q"]) == 2
    assert "none.txt' does not exist" in capsys.readouterr().err
    assert not (lora_home / "runs").exists()


def test_sweep_and_runs_commands(lora_home, capsys, tmp_path):
    out_dir = tmp_path / "runs"
    assert main(["sweep", "--ranks", "1,4", "--alphas", "16", "--full-ft", "--steps", "20", "--out", str(out_dir),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "LoRA r=4 α=16" in out and "full FT" in out
    assert len(runstore.list_runs(out_dir)) == 3
    # written elsewhere than the default store: the sweep says how to read it
    assert f"not in the default run store ({lora_home / 'runs'})" in out
    assert f"runs list --runs-dir {out_dir}\n" in out and f"report --runs-dir {out_dir} --html" in out
    assert main(["runs", "list", "--runs-dir", str(out_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in rows) == ["LoRA r=1 α=16", "LoRA r=4 α=16", "full FT"]
    run_id = rows[0]["id"]
    assert main(["runs", "show", run_id, "--runs-dir", str(out_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == run_id
    assert main(["runs", "export", run_id, "--to", str(tmp_path / "b.zip"), "--runs-dir", str(out_dir)]) == 0
    assert main(["runs", "delete", run_id, "--runs-dir", str(out_dir)]) == 0
    assert len(runstore.list_runs(out_dir)) == 2
    assert main(["runs", "import", str(tmp_path / "b.zip"), "--runs-dir", str(out_dir)]) == 0
    assert len(runstore.list_runs(out_dir)) == 3
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(tmp_path / "empty")]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert main(["runs", "show", "nope", "--runs-dir", str(out_dir)]) == 2


def test_a_bug_in_a_command_is_a_traceback_not_a_user_error(lora_home, monkeypatch, capsys):
    """Defect 11: only ValueError (and OSError about a file the user named) is a one-line error, exit 2;
    a KeyError or RuntimeError inside a command is a bug and propagates with its traceback."""
    from lora_analysis.training import trainer

    for bug in (KeyError("x"), RuntimeError("internal state")):
        def buggy(*args, _bug=bug, **kwargs):
            raise _bug

        monkeypatch.setattr(trainer, "train", buggy)
        with pytest.raises(type(bug)):
            main(["train", "--steps", "1", "--pretrain-steps", "30", "-q"])
        assert "error:" not in capsys.readouterr().err


def test_an_os_error_is_a_user_error_only_for_a_file_the_user_named(lora_home, monkeypatch, capsys, tmp_path):
    from lora_analysis.training import trainer

    named = tmp_path / "data.csv"

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(named))

    monkeypatch.setattr(trainer, "task_for", unreadable)
    assert main(["train", "--data", str(named), "-q"]) == 2
    assert "Permission denied" in capsys.readouterr().err

    def cache_broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "somewhere" / "cache.bin"))

    monkeypatch.setattr(trainer, "task_for", cache_broken)
    with pytest.raises(PermissionError):
        main(["train", "-q"])


def test_every_store_command_takes_runs_dir_and_the_default_store_points_at_runs_here(lora_home, capsys, tmp_path,
                                                                                      monkeypatch):
    """One option, one meaning: --runs-dir (alias --out) on every command that reads or writes runs; a command
    that finds nothing in the default store mentions ./runs when runs are there (the old README chain)."""
    from lora_analysis.cli import build_parser

    parser = build_parser()
    for argv in (["train"], ["sweep"], ["runs"], ["runs", "list"], ["runs", "show", "x"], ["report", "--html", "r"],
                 ["spectra", "x"], ["similarity", "x", "y"]):
        for flag in ("--runs-dir", "--out"):
            args = parser.parse_args([*argv, flag, "somewhere"])
            assert "somewhere" in (getattr(args, "runs_dir", None), getattr(args, "sub_runs_dir", None)), argv
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "5", "--pretrain-steps", "30", "-q", "--out", "runs", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "completed"            # stdout: the JSON only
    assert "runs list --runs-dir runs" in captured.err
    assert f"LORA_ANALYSIS_HOME={tmp_path} " in captured.err            # the dashboard reads <home>/runs
    assert main(["runs", "list"]) == 0
    assert f"{tmp_path / 'runs'} holds 1 run: add --runs-dir runs" in capsys.readouterr().out
    assert main(["report", "--html", "r.html"]) == 2
    assert "add --runs-dir runs" in capsys.readouterr().err
    assert main(["runs", "list", "--runs-dir", "runs"]) == 0
    assert "completed" in capsys.readouterr().out
