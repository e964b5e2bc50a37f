"""Hostile and broken inputs (issue 13): each tried as a hostile user would, each refused with one line.

Everything is built small in tmp_path: adapters of a 2-layer MLP, run bundles of a few hundred bytes, a
142-byte Hugging Face config. The regex test uses a bounded input and asserts a refusal, never a time.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_analysis import runstore
from lora_analysis.analysis.spectra import factored_svd, spectra_frame
from lora_analysis.lora import apply_lora, load_adapter, read_adapter, save_adapter
from lora_analysis.lora.config import pattern_key
from lora_analysis.store import bundles, runs
from lora_analysis.weights import ModuleUpdate


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)


def _adapter(tmp_path, name="adapter"):
    torch.manual_seed(0)
    model = apply_lora(MLP(), ["fc1", "fc2"], rank=2, alpha=4.0)
    for layer in (model.fc1, model.fc2):
        nn.init.normal_(layer.lora_B.weight)
    return save_adapter(model, tmp_path / name)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return directory


def _set_tensors(directory, tensors):
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    return str(info.value)


# ---- regex denial of service ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key, why", [("(a+)+b", "repeated group inside a repeat"),
                                       ("(a|aa)+b", "alternation inside a repeat"),
                                       ("(.*)*b", "repeated group inside a repeat"),
                                       (".*a.*a.*b", "open-ended repeats"),
                                       (r"(a)\1", "back-references"),
                                       pytest.param("(" + "a" * 300 + ")", "at most 256", id="300-chars"),
                                       ("(", "not a valid regular expression")])
def test_pattern_keys_that_could_match_for_minutes_are_refused_when_read(tmp_path, key, why):
    name = "a" * 18           # bounded: the catastrophic keys would still finish quickly against it
    directory = _adapter(tmp_path)
    _set_tensors(directory, {f"base_model.model.{name}.lora_A.weight": torch.ones(2, 6),
                             f"base_model.model.{name}.lora_B.weight": torch.ones(3, 2)})
    _edit_config(directory, target_modules=[name], rank_pattern={key: 2})
    _one_line_error(lambda: read_adapter(directory), re.escape(why))
    _edit_config(directory, rank_pattern={}, alpha_pattern={key: 3.0})
    _one_line_error(lambda: read_adapter(directory), re.escape(why))
    with pytest.raises(ValueError, match=re.escape(why)):            # and wherever a pattern is matched
        pattern_key({key: 2}, name)


def test_a_regex_target_is_bounded_the_same_way(tmp_path):
    directory = _edit_config(_adapter(tmp_path), target_modules="(f+)+c1")
    _one_line_error(lambda: read_adapter(directory), "target_modules")
    from lora_analysis.lora.config import matches_target, parse_targets

    with pytest.raises(ValueError, match="targets='re:\\(f\\+\\)\\+c1' is not allowed: a repeated group"):
        parse_targets("re:(f+)+c1")
    with pytest.raises(ValueError, match="inside a repeat"):
        matches_target("(f+)+c1", "f" * 18)
    assert matches_target("fc[12]", "fc1") and not matches_target("fc[12]", "sub.fc1")


@pytest.mark.parametrize("key", ["fc", "^fc", "^sub\\.fc", "sub.fc", "model.layers.1.self_attn.q_proj",
                                 r"layers\.\d+\.fc", "(q|v)_proj", "fc[12]", r"^a\-b", "a-b", ".*\\.fc"])
def test_legitimate_keys_keep_peft_semantics(key):
    names = ["fc", "sub.fc", "xfc", "sub.xfc", "model.layers.1.self_attn.q_proj", "a.layers.12.fc", "v_proj",
             "q.v_proj", "fc1", "fc2", "a-b", "x.a-b", "subXfc"]
    for name in names:
        peft = re.match(rf"(.*\.)?({key})$", name) is not None        # peft.utils.other.get_pattern_key
        assert (pattern_key({key: 1}, name) == key) == peft, (key, name)


def test_an_overlong_module_name_is_refused_before_any_regex_runs(tmp_path):
    name = "a" * 600
    directory = _set_tensors(_adapter(tmp_path), {f"base_model.model.{name}.lora_A.weight": torch.ones(2, 6),
                                                  f"base_model.model.{name}.lora_B.weight": torch.ones(3, 2)})
    _edit_config(directory, target_modules=[name])
    _one_line_error(lambda: read_adapter(directory), "at most 512")


# ---- one validation of adapters ------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"lora_alpha": None}, "lora_alpha=None"),
    ({"lora_alpha": [4]}, r"lora_alpha=\[4\]"),
    ({"lora_alpha": 0}, "lora_alpha=0 .*finite number > 0"),
    ({"lora_alpha": -1}, "lora_alpha=-1"),
    ({"alpha_pattern": {"fc1": None}}, r"alpha_pattern\['fc1'\]=None"),
    ({"rank_pattern": [2]}, r"rank_pattern=\[2\]"),
    ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"rank_pattern": {"fc1": "2"}}, r"rank_pattern\['fc1'\]='2'"),
    ({"target_modules": 5}, "target_modules=5"),
    ({"target_modules": None}, "target_modules=None"),
    ({"r": "4"}, "r='4' is not allowed: the rank must be an integer"),
    ({"r": 0}, "r=0"),
    ({"r": True}, "r=True"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1\.0"),
    ({"use_rslora": "yes"}, "use_rslora='yes'"),
    ({"modules_to_save": "head"}, "modules_to_save='head'"),
])
def test_malformed_adapter_configs_give_one_line_errors(tmp_path, changes, match):
    directory = _edit_config(_adapter(tmp_path), **changes)
    _one_line_error(lambda: read_adapter(directory), match)
    _one_line_error(lambda: load_adapter(MLP(), directory), match)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int8])
def test_non_float_weights_are_refused(tmp_path, dtype):
    directory = _set_tensors(_adapter(tmp_path), {"base_model.model.fc1.lora_A.weight": torch.ones(2, 6, dtype=dtype),
                                                  "base_model.model.fc1.lora_B.weight": torch.ones(5, 2)})
    _edit_config(directory, target_modules=["fc1"])
    _one_line_error(lambda: read_adapter(directory), f"module 'fc1': lora_A has dtype {str(dtype)[6:]}")


def test_a_rank_0_adapter_is_refused(tmp_path):
    directory = _set_tensors(_adapter(tmp_path), {"base_model.model.fc1.lora_A.weight": torch.ones(0, 6),
                                                  "base_model.model.fc1.lora_B.weight": torch.ones(5, 0)})
    _one_line_error(lambda: read_adapter(directory), "module 'fc1'.*empty")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_their_module(tmp_path, bad):
    directory = _adapter(tmp_path)
    a = torch.ones(2, 5)
    a[1, 3] = bad
    _set_tensors(directory, {"base_model.model.fc1.lora_A.weight": torch.ones(2, 6),
                             "base_model.model.fc1.lora_B.weight": torch.ones(5, 2),
                             "base_model.model.fc2.lora_A.weight": a,
                             "base_model.model.fc2.lora_B.weight": torch.ones(3, 2)})
    _one_line_error(lambda: read_adapter(directory), "module 'fc2': lora_A holds 1 non-finite value")
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _one_line_error(lambda: load_adapter(model, directory), "module 'fc2'")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # untouched


def test_spectra_say_which_module_is_not_finite_instead_of_lin_alg_error():
    a = torch.ones(2, 6)
    a[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        factored_svd(a, torch.ones(5, 2))
    good = ModuleUpdate(name="fc1", lora_A=torch.ones(2, 6), lora_B=torch.ones(5, 2), scaling=1.0)
    nan = ModuleUpdate(name="fc2", lora_A=a, lora_B=torch.ones(5, 2), scaling=1.0)
    big = ModuleUpdate(name="fc3", lora_A=torch.full((2, 6), 1e200, dtype=torch.float64),
                       lora_B=torch.full((5, 2), 1e200, dtype=torch.float64), scaling=1e100)
    full = ModuleUpdate(name="fc4", w0=torch.zeros(3, 3), w_ft=torch.tensor([[float("inf"), 0, 0]] * 3))
    assert len(spectra_frame([good])) == 1
    for update in (nan, big, full):
        with pytest.raises(ValueError, match=f"module '{update.name}': .*non-finite"):
            spectra_frame([good, update])


# ---- bundles: schema, atomic ids, limits ---------------------------------------------------------------------

GOOD = {"format_version": 1, "id": "20250101-000000-abcdef01", "name": "shared", "sweep_id": None,
        "status": "completed", "created": 1.7e9, "heartbeat": 1.7e9, "finished": 1.7e9 + 5, "pid": 4242,
        "host": "elsewhere", "config": {"model": "mlp-digits", "method": "lora", "rank": 2, "alpha": 4.0,
                                        "targets": ["fc1"]},
        "task": {}, "environment": {}, "metrics": {"val_loss": 0.5, "label": "r=2"}, "error": None}


def _bundle(path, record=None, entries=None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run.json", json.dumps(GOOD if record is None else record))
        for name, data in (entries or {}).items():
            zf.writestr(name, data)
    return path


def _store_is_empty(root):
    return not root.exists() or not [p for p in root.iterdir()]


@pytest.mark.parametrize("changes, match", [
    ({"metrics": [1, 2]}, r"metrics=\[1, 2\]"),
    ({"metrics": "abc"}, "metrics='abc'"),
    ({"metrics": {"val_loss": [1]}}, "metric 'val_loss'"),
    ({"config": {"targets": 5}}, "config.targets=5"),
    ({"config": {"targets": ["fc1", 3]}}, "config.targets"),
    ({"config": {"rank": "2"}}, "config.rank='2'"),
    ({"config": "lora"}, "config='lora'"),
    ({"created": 1e300}, "created=1e\\+300"),
    ({"created": "yesterday"}, "created='yesterday'"),
    ({"created": 5.0}, "created=5.0 .*from the year 2000"),
    ({"created": None}, "created=None"),
    ({"status": "weird"}, "status='weird'"),
    ({"name": {"x": 1}}, "name="),
    ({"pid": True}, "pid=True"),
    ({"heartbeat": float("inf")}, "heartbeat=inf"),
])
def test_bundles_with_wrongly_typed_records_are_refused_and_leave_nothing(lora_home, tmp_path, changes, match):
    record = {**GOOD, **changes}
    bundle = _bundle(tmp_path / "bad.zip", record, entries={"metrics.csv": b"step,train_loss\n0,1.0\n"})
    _one_line_error(lambda: runstore.import_run(bundle), match)
    assert _store_is_empty(lora_home / "runs")


def test_one_bad_run_in_the_store_lists_as_damaged_and_can_be_deleted(lora_home, tmp_path):
    good = runstore.import_run(_bundle(tmp_path / "ok.zip"))
    root = lora_home / "runs"
    for i, change in enumerate([{"metrics": [1, 2]}, {"config": {"targets": 5}}, {"created": 1e300}]):
        d = root / f"20240101-00000{i}-bad0000{i}"
        d.mkdir()
        (d / "run.json").write_text(json.dumps({**GOOD, "id": d.name, **change}))
    listed = {r.id: r for r in runstore.list_runs()}
    assert listed[good.id].status == "completed" and len(listed) == 4
    damaged = [r for r in listed.values() if r.status == "damaged"]
    assert len(damaged) == 3 and all("not allowed" in r.error for r in damaged)
    frame = runstore.runs_frame()              # the Fine-tune page's and `runs list`'s table
    assert sorted(frame["status"]) == ["completed", "damaged", "damaged", "damaged"]
    runstore.load_metrics(list(listed.values()))          # the loss curves of a comparison with them
    for run in damaged:
        runstore.delete_run(run)
    assert [r.id for r in runstore.list_runs()] == [good.id]


def test_a_deeply_nested_or_huge_run_json_lists_as_damaged(lora_home, monkeypatch):
    root = lora_home / "runs"
    nested, huge = root / "20240101-000000-nested00", root / "20240101-000000-huge0000"
    for d in (nested, huge):
        d.mkdir(parents=True)
    (nested / "run.json").write_text("[" * 10_000 + "]" * 10_000)
    (huge / "run.json").write_text(json.dumps({**GOOD, "name": "x" * 30_000}))
    monkeypatch.setattr(runs, "MAX_RUN_JSON_BYTES", 25_000)
    listed = {r.id: r for r in runstore.list_runs()}
    assert listed[nested.name].status == "damaged" and "not valid JSON" in listed[nested.name].error
    assert listed[huge.name].status == "damaged" and "at most" in listed[huge.name].error
    adapter = lora_home / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[" * 10_000 + "]" * 10_000)
    _one_line_error(lambda: read_adapter(adapter), "not valid JSON")


def test_an_imported_running_run_is_interrupted_and_can_be_deleted(lora_home, tmp_path):
    record = {**GOOD, "status": "running", "pid": 1, "pid_start_time": None, "host": None,
              "heartbeat": time.time() + 10**6}
    run = runstore.import_run(_bundle(tmp_path / "running.zip", record))
    assert run.status == "interrupted" and "imported as interrupted" in run.error
    runstore.export_run(run, tmp_path / "again.zip")
    runstore.delete_run(run.id)
    assert _store_is_empty(lora_home / "runs")


def test_a_heartbeat_from_the_future_does_not_keep_a_run_running(lora_home):
    d = lora_home / "runs" / "20250101-000000-future01"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({**GOOD, "id": d.name, "status": "running", "host": "elsewhere",
                                            "heartbeat": time.time() + 10**6}))
    assert runstore.load_run(d.name).status == "interrupted"
    runstore.delete_run(d.name)
    assert not d.exists()


def test_two_imports_of_one_bundle_at_once_get_their_own_ids(lora_home, tmp_path, monkeypatch):
    bundle = _bundle(tmp_path / "b.zip", entries={"metrics.csv": b"step,train_loss\n0,1.0\n"})
    both_extracted = threading.Barrier(2, timeout=30)
    check = bundles._check_safetensors

    def in_step(staging, source):           # both imports reach the id choice together
        check(staging, source)
        both_extracted.wait()

    monkeypatch.setattr(bundles, "_check_safetensors", in_step)
    results, errors = [], []

    def work():
        try:
            results.append(runstore.import_run(bundle))
        except BaseException as exc:          # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({r.id for r in results}) == 2 and GOOD["id"] in {r.id for r in results}
    assert sorted(r.status for r in runstore.list_runs()) == ["completed", "completed"]


def test_a_zip_bomb_is_refused_from_its_headers(lora_home, tmp_path):
    bundle = _bundle(tmp_path / "bomb.zip", entries={"metrics.csv": b"0" * (3 * 2**20)})
    assert bundle.stat().st_size < 20_000
    _one_line_error(lambda: runstore.import_run(bundle), "times larger than it is packed .*zip bomb")
    assert _store_is_empty(lora_home / "runs")


def test_per_file_limits_come_from_one_place(lora_home, tmp_path, monkeypatch):
    monkeypatch.setattr(bundles, "LIMITS", bundles.BundleLimits(max_file_bytes=(
        (".json", 2**20), (".txt", 2**20), (".csv", 1000), (".safetensors", 2**20))))
    bundle = _bundle(tmp_path / "big.zip", entries={"metrics.csv": os.urandom(1500).hex().encode()})
    _one_line_error(lambda: runstore.import_run(bundle), "'metrics.csv' unpacks to .* at most")
    assert _store_is_empty(lora_home / "runs")


def test_a_zip_with_a_bad_checksum_is_refused(lora_home, tmp_path):
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("run.json", json.dumps(GOOD))
        zf.writestr("metrics.csv", b"step,train_loss\n0,1.0\n1,0.5\n")
    data = path.read_bytes().replace(b"0,1.0\n1,0.5", b"0,1.0\n1,0.6")
    path.write_bytes(data)
    _one_line_error(lambda: runstore.import_run(path), "'metrics.csv' is corrupt")
    assert _store_is_empty(lora_home / "runs")


def test_an_entry_that_is_a_file_and_a_folder_is_refused(lora_home, tmp_path):
    bundle = _bundle(tmp_path / "clash.zip", entries={"a.json": b"{}", "a.json/b.json": b"{}"})
    _one_line_error(lambda: runstore.import_run(bundle), "as a file and as a folder")
    assert _store_is_empty(lora_home / "runs")


def test_a_page_never_reads_a_whole_huge_metrics_file(lora_home, tmp_path):
    run = runstore.import_run(_bundle(tmp_path / "ok.zip"))
    rows = "".join(f"{i},{1 / (i + 1)}\n" for i in range(2000))
    (run.dir / "metrics.csv").write_text("step,train_loss\n" + rows)
    size = (run.dir / "metrics.csv").stat().st_size
    frame = run.metrics_frame(max_bytes=size // 10)
    assert list(frame.columns) == ["step", "train_loss"] and 0 < len(frame) < 300
    assert frame["step"].iloc[-1] == 1999 and frame["step"].is_monotonic_increasing
    assert len(run.metrics_frame()) == 2000                 # small files are read whole
    (run.dir / "metrics.csv").write_text("step,train_loss\n0,abc\n1,0.5\n")
    assert run.metrics_frame()["train_loss"].isna().tolist() == [True, False]    # numbers, or NaN
    (run.dir / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage\n\x00\x01")
    with pytest.warns(UserWarning, match="not a readable CSV"):
        assert len(run.metrics_frame()) == 0


# ---- unbounded configs ---------------------------------------------------------------------------------------

def test_a_tiny_config_asking_for_5000_layers_is_refused_before_anything_is_built(monkeypatch):
    from lora_analysis import params

    config = {"model_type": "bert", "num_hidden_layers": 5000, "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 100}
    assert len(json.dumps(config)) < 142
    built = []
    monkeypatch.setattr(torch, "device", lambda *a: built.append(a) or (_ for _ in ()).throw(AssertionError))
    _one_line_error(lambda: params.build_from_config_dict(config), "num_hidden_layers=5000 .*at most 160")
    _one_line_error(lambda: params.build_from_config_dict({**config, "num_hidden_layers": "abc"}),
                    "num_hidden_layers='abc'")
    _one_line_error(lambda: params.build_from_config_dict({"model_type": "mixtral", "num_hidden_layers": 100,
                                                             "num_local_experts": 500}), "experts in all")
    _one_line_error(lambda: params.build_from_config_dict({"model_type": "llava", "text_config": {
        "num_hidden_layers": 10**6}}), "text_config.num_hidden_layers")
    assert not built


# ---- footguns ------------------------------------------------------------------------------------------------

def test_delete_refuses_folders_outside_the_store_and_hidden_ones(lora_home, tmp_path, monkeypatch):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "run.json").write_text(json.dumps(GOOD))
    (outside / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not a run folder of the run store"):
        runstore.delete_run(str(outside))
    with pytest.raises(ValueError, match="not a run folder of the run store"):
        runstore.delete_run(runstore.load_run(str(outside)))            # what `runs delete <path>` does
    assert (outside / "thesis.txt").is_file()
    run = runstore.import_run(_bundle(tmp_path / "ok.zip"))
    root = lora_home / "runs"
    hidden = root / ".import-123-456-abcdef"
    hidden.mkdir()
    (hidden / "run.json").write_text(json.dumps({**GOOD, "id": run.id}))
    monkeypatch.chdir(root)
    for text in (".imp", ".import-123-456-abcdef", str(hidden)):
        with pytest.raises(ValueError):
            runstore.delete_run(text)
    assert hidden.is_dir() and run.dir.is_dir()
    runstore.delete_run(str(run.dir))                   # a run folder of the store, given as a path
    assert not run.dir.exists()


def test_stale_temp_files_are_cleaned_at_start_up(lora_home, tmp_path, monkeypatch):
    import subprocess
    import sys

    run = runstore.import_run(_bundle(tmp_path / "ok.zip"))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = f".run.json.{proc.pid}.1.abc123.tmp"
    live = f".run.json.{os.getpid()}.1.abc123.tmp"
    for d in (run.dir, run.dir.parent):
        (d / dead).write_text("{half")
        (d / live).write_text("{half")
    monkeypatch.setattr(runs, "_TEMP_CLEANED", set())      # a new process starting
    runstore.list_runs()
    for d in (run.dir, run.dir.parent):
        assert not (d / dead).exists() and (d / live).exists()


# ---- markdown in messages ------------------------------------------------------------------------------------

def test_names_are_shown_as_text_never_as_markdown():
    from dashboard.plain_text import plain

    name = "![x](http://example.invalid/pixel.png) :red[big] $x^2$ **b** <img src=x>\nline"
    shown = plain(name)
    assert "\n" not in shown
    assert "![" not in shown and "](" not in shown and ":red[" not in shown and "**" not in shown
    # removing the escapes gives the name back: nothing is lost, only made literal
    assert re.sub(r"\\(.)", r"\1", shown) == name.replace("\n", " ")
    source = open(os.path.join(os.path.dirname(__file__), "..", "dashboard", "views", "reports.py")).read()
    assert "plain(run.name)" in source and "'{run.name}'" not in source
