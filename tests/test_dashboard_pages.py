"""AppTest of every dashboard page: on the demo data and on an empty run store; key widgets change what is
shown; uploads (valid and broken adapters, configs, run bundles) and bad widget combinations show an
``st.error`` that says what is wrong, never an exception; nothing already in the run store is lost.

The demo store is built once per module with the library (no background job): a tiny-gpt LoRA run, then
the newest sweep on mlp-digits (LoRA r=1, r=4, full fine-tuning). Tests that write to the store (imports,
deletes, launches) work on a private copy of it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lora_analysis import jobs, runstore
from lora_analysis.analysis import registry
from lora_analysis.analysis.spectra import spectra_frame

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PAGES = ["home", "params", "finetune", "spectra", "rank_alpha", "subspaces", "findings", "merge", "reports"]
RUN_PAGES = ["spectra", "rank_alpha", "subspaces", "findings", "merge"]     # pages that need completed runs
JSON, BIN, ZIP = "application/json", "application/octet-stream", "application/zip"
SUBMIT = "FormSubmitter:finetune_form-Launch"
HF_CHOICE = "Hugging Face model (folder or hub id)"


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_home(tmp_path_factory, _shared_cache):
    """A LORA_ANALYSIS_HOME holding the demo runs (built once per module; the base cache is the session's)."""
    from lora_analysis.training import run_sweep, sweep_settings

    home = tmp_path_factory.mktemp("demo-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ANALYSIS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        tiny = run_sweep(sweep_settings(model="tiny-gpt", ranks=[2], alphas=[16], full_ft=False, steps=5,
                                        pretrain_steps=20))
        mlp = run_sweep(sweep_settings(model="mlp-digits", ranks=[1, 4], alphas=[16], full_ft=True, steps=30,
                                       pretrain_steps=60))
    assert all(r.status == "completed" for r in tiny.results + mlp.results)
    return home


def _run_dirs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "runs").iterdir())


@pytest.fixture
def demo(demo_home, monkeypatch):
    """The shared demo store, read-only: every test leaves exactly the same runs in it."""
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(demo_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _run_dirs(demo_home)
    yield demo_home
    assert _run_dirs(demo_home) == before, "a read-only page test changed the demo run store"


@pytest.fixture
def demo_copy(demo_home, lora_home):
    """A private, writable copy of the demo store (LORA_ANALYSIS_HOME = lora_home)."""
    shutil.copytree(demo_home / "runs", lora_home / "runs")
    return lora_home


@pytest.fixture
def empty(lora_home):
    return lora_home


# ---- helpers -----------------------------------------------------------------------------------------

def open_page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def clean(at: AppTest) -> AppTest:
    """No exception and no error on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def shown(markdown: str) -> str:
    """The text a reader sees: user-supplied text is escaped for Streamlit's markdown (``plain``)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    return [shown(e.value) for e in at.error]


def specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def title(spec: dict) -> str:
    t = spec["layout"].get("title", {})
    return t.get("text", "") if isinstance(t, dict) else str(t)


def chart(at: AppTest, title_part: str) -> dict:
    found = [s for s in specs(at) if title_part in title(s)]
    assert len(found) == 1, (title_part, [title(s) for s in specs(at)])
    return found[0]


def values(array) -> list:
    """A trace's x or y as a list: plotly ships numeric arrays as {"dtype", "bdata" (base64)}."""
    if isinstance(array, dict) and "bdata" in array:
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def traces(spec: dict) -> list:
    return [d.get("name") for d in spec["data"]]


def frame_with(at: AppTest, column: str):
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, (column, [list(d.value.columns) for d in at.dataframe])
    return found[0]


def texts(elements) -> str:
    return "\n".join(shown(e.value) for e in elements)


def runs_by_name(model: str | None = None) -> dict[str, runstore.Run]:
    return {r.name: r for r in runstore.list_runs() if model is None or r.model == model}


def label_of(at: AppTest, key: str, part: str, widget: str = "selectbox") -> str:
    options = getattr(at, widget)(key=key).options
    found = [o for o in options if part in o]
    assert len(found) == 1, (part, options)
    return found[0]


def adapter_files(directory: Path) -> tuple[bytes, bytes]:
    return (directory / "adapter_config.json").read_bytes(), (directory / "adapter_model.safetensors").read_bytes()


# ---- every page: demo data and empty store ------------------------------------------------------------

@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_on_the_demo_data(demo, name):
    at = clean(open_page(name))
    if name == "reports":                   # no charts: the run choices and the export of a demo run
        assert len(at.multiselect(key="rep_runs").options) == 4 and at.get("download_button")
    else:
        assert at.title and at.get("plotly_chart"), f"{name} shows no chart on the demo data"
    # no chart's axis reaches far past its data (an annotation placed at 10^N on a log axis, a forced range)
    from lora_analysis.plots.checks import axis_problems

    problems = {title(spec): axis_problems(spec) for spec in specs(at)}
    assert not any(problems.values()), {t: p for t, p in problems.items() if p}


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_on_an_empty_store(empty, name):
    at = clean(open_page(name))
    if name in RUN_PAGES:
        assert "no completed runs yet" in texts(at.info)
        assert not at.get("plotly_chart")
    elif name == "finetune":
        assert "No runs yet" in texts(at.info) and not at.dataframe
        assert at.button(key=SUBMIT)            # the launch form is there
    elif name == "reports":
        assert "No completed runs yet" in texts(at.info)
        assert at.file_uploader(key="rep_import")  # import still works without runs
        assert not at.multiselect               # no report section without runs
    else:                                       # home and params need no runs
        assert at.get("plotly_chart")


# ---- home --------------------------------------------------------------------------------------------

def test_home_shows_the_diagram_and_the_quick_demo_button(demo):
    at = clean(open_page("home"))
    assert "r = 8" in title(specs(at)[0])
    assert at.button(key="quick_demo").label == "Run the quick demo"


def test_home_quick_demo_that_cannot_start_shows_an_error(empty, monkeypatch):
    def refuse(kind, spec, home=None):
        raise ValueError("the disk is full")

    monkeypatch.setattr(jobs, "start_job", refuse)
    at = open_page("home")
    at.button(key="quick_demo").click().run()
    assert errors(at) == ["Could not do starting the quick demo: the disk is full"]
    assert "home_job" not in at.session_state


# ---- params (more in test_dashboard_params.py) -------------------------------------------------------

GPT2_SMALL = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 100, "n_positions": 32}


def test_params_counts_an_uploaded_config(empty):
    at = open_page("params")
    at.radio(key="params_mode").set_value("Hugging Face config.json").run()
    assert "Upload a config.json" in texts(at.info)
    at.file_uploader(key="params_config").set_value(("config.json", json.dumps(GPT2_SMALL).encode(), JSON)).run()
    clean(at)
    # default target c_attn (64 -> 192) in 2 layers at r=8: 2 · 8 · (64 + 192)
    assert {m.label: m.value for m in at.metric}["Trainable (LoRA)"] == f"{2 * 8 * (64 + 192):,}"
    assert list(frame_with(at, "lora_params")["name"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "config.json is not valid JSON"),
    (b"[1, 2]", "config.json must hold a JSON object"),
    (b'{"hidden_size": 64}', "no 'model_type' key"),
])
def test_params_broken_config_upload_shows_an_error(empty, content, expected):
    at = open_page("params")
    at.radio(key="params_mode").set_value("Hugging Face config.json").run()
    at.file_uploader(key="params_config").set_value(("config.json", content, JSON)).run()
    errs = errors(at)
    assert len(errs) == 1 and expected in errs[0], errs
    assert not at.metric


def test_params_run_choice_changes_the_module_table(demo):
    at = open_page("params")
    at.radio(key="params_mode").set_value("A run's model").run()
    at.selectbox(key="params_run").set_value(label_of(at, "params_run", "mlp-digits · LoRA r=4")).run()
    assert list(clean(at) and frame_with(at, "lora_params")["name"]) == ["fc1", "fc2", "fc3"]
    at.selectbox(key="params_run").set_value(label_of(at, "params_run", "tiny-gpt")).run()
    names = list(clean(at) and frame_with(at, "lora_params")["name"])
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in names)


# ---- fine-tune -----------------------------------------------------------------------------------------

def test_finetune_lists_runs_and_compares_the_latest_sweep(demo):
    at = clean(open_page("finetune"))
    table = at.dataframe[0].value
    assert sorted(table["name"]) == ["LoRA r=1 α=16", "LoRA r=2 α=16", "LoRA r=4 α=16", "full FT"]
    assert set(table["status"]) == {"completed"}
    # the newest sweep (mlp-digits) is compared by default: one loss curve per run
    assert sorted(traces(chart(at, "Training loss"))) == ["LoRA r=1 α=16", "LoRA r=4 α=16", "full FT"]
    finals = frame_with(at, "base_val_accuracy")
    assert len(finals) == 3
    runs = runs_by_name("mlp-digits")
    assert dict(zip(finals["name"], finals["val_accuracy"])) == pytest.approx(
        {n: r.metrics["val_accuracy"] for n, r in runs.items()})


def test_finetune_compare_choice_changes_the_curves(demo):
    at = open_page("finetune")
    at.multiselect(key="ft_compare").set_value([label_of(at, "ft_compare", "r=2", "multiselect")]).run()
    clean(at)
    assert traces(chart(at, "Training loss")) == ["LoRA r=2 α=16"]
    assert "val_perplexity" in frame_with(at, "base_val_perplexity").columns
    at.multiselect(key="ft_compare").set_value([]).run()
    assert not clean(at).get("plotly_chart")


@pytest.mark.parametrize("change, expected", [
    ({"ft_methods": []}, "choose at least one method"),
    ({"ft_ranks": []}, "choose at least one LoRA rank"),
    ({"ft_alphas": "abc"}, "alpha='abc' is not allowed"),
    ({"ft_alphas": " , "}, "alphas is empty"),
    ({"ft_model": HF_CHOICE}, "give a Hugging Face model folder or hub id"),
])
def test_finetune_bad_settings_show_an_error_and_start_nothing(demo, change, expected):
    at = open_page("finetune")
    for key, value in change.items():
        widget = {"ft_methods": at.multiselect, "ft_ranks": at.multiselect, "ft_alphas": at.text_input,
                  "ft_model": at.selectbox}[key](key=key)
        widget.set_value(value)
    at.button(key=SUBMIT).click().run()
    errs = errors(at)
    assert len(errs) == 1 and errs[0].startswith("Could not do launching the fine-tune") and expected in errs[0]
    assert jobs.list_jobs() == [] and "ft_job" not in at.session_state


def _wait_for(job_id: str, timeout: float = 120) -> jobs.Job:
    deadline = time.time() + timeout
    job = jobs.read_job(jobs.jobs_dir() / job_id)
    while not job.done and time.time() < deadline:
        time.sleep(0.2)
        job = jobs.read_job(jobs.jobs_dir() / job_id)
    if not job.done:
        jobs.cancel_job(job)
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s")
    return job


def test_finetune_launches_and_reports_bad_targets_and_corrupt_data(demo_copy):
    before = _run_dirs(demo_copy)
    # a job whose LoRA run names a module the model lacks: the full FT run is written, the failure is shown
    at = open_page("finetune")
    at.multiselect(key="ft_ranks").set_value([1])
    at.text_input(key="ft_targets").set_value("nonexistent_proj")
    at.number_input(key="ft_steps").set_value(5)
    at.button(key=SUBMIT).click().run()
    clean(at)
    # a job on an uploaded data file that is not a CSV: the job fails and says why
    bad = open_page("finetune")
    bad.multiselect(key="ft_methods").set_value(["full fine-tuning"])
    bad.number_input(key="ft_steps").set_value(5)
    bad.file_uploader(key="ft_data").set_value(("data.csv", b"\x00\x01\x02 binary junk", "text/csv"))
    bad.button(key=SUBMIT).click().run()
    clean(bad)

    job = _wait_for(at.session_state["ft_job"])
    assert job.status == "completed" and len(job.run_ids) == 1
    assert job.spec["targets"] == ["nonexistent_proj"] and job.spec["ranks"] == [1]
    at.run()
    assert "Done: 1 runs written" in texts(at.success)
    errs = errors(at)
    assert len(errs) == 1 and "failed: targets=['nonexistent_proj'] matched no Linear/Conv1D module" in errs[0]
    assert "Modules that exist: fc1, fc2, fc3" in errs[0]

    failed = _wait_for(bad.session_state["ft_job"])
    assert failed.status == "failed"
    bad.run()
    errs = errors(bad)
    assert len(errs) == 1 and errs[0].startswith("The job failed") and "looks binary" in errs[0]

    after = _run_dirs(demo_copy)
    assert set(before) < set(after) and len(after) == len(before) + 1      # nothing lost, one new run
    new = runstore.load_run(job.run_ids[0])
    assert new.method == "full" and new.status == "completed"
    at.run()
    assert len(at.dataframe[0].value) == len(after)


def test_finetune_delete_removes_only_the_chosen_runs(demo_copy):
    at = open_page("finetune")
    victim = label_of(at, "ft_compare", "r=1", "multiselect")
    at.multiselect(key="ft_compare").set_value([victim]).run()
    at.button(key="ft_delete").click().run()
    clean(at)
    names = sorted(r.name for r in runstore.list_runs())
    assert names == ["LoRA r=2 α=16", "LoRA r=4 α=16", "full FT"]
    assert victim not in at.multiselect(key="ft_compare").options


# ---- spectra --------------------------------------------------------------------------------------------

def test_spectra_compares_lora_ranks_with_full_ft(demo):
    at = clean(open_page("spectra"))
    runs = runs_by_name("mlp-digits")
    assert sorted(at.multiselect(key="spectra_runs").value) == sorted(
        label_of(at, "spectra_runs", f"{n} ·", "multiselect") for n in runs)
    sweep = chart(at, "Spectra across ranks")
    assert [t.split(" · ")[0] for t in traces(sweep)] == ["LoRA r=1 α=16", "LoRA r=4 α=16", "full FT"]
    spectra = {n: spectra_frame(runstore.load_updates(r)).set_index("name") for n, r in runs.items()}
    full = spectra["full FT"]
    # the default module is where some run's ΔW is largest
    largest = max(["fc1", "fc2", "fc3"], key=lambda m: max(s.loc[m, "fro_norm"] for s in spectra.values()))
    assert at.selectbox(key="spectra_module").value == largest
    assert f"needs {int(full.loc[largest, 'rank_90'])} of 128 directions for 90% of its ΔW energy in {largest}" \
        in texts(at.info)
    assert "largest LoRA rank compared (4)" in texts(at.info)
    # the σ's drawn are the library's, normalised by σ₁
    (drawn,) = [d for d in sweep["data"] if d["name"].startswith("full FT")]
    s = full.loc[largest, "singular_values"]
    assert values(drawn["y"])[:5] == pytest.approx([v / s[0] for v in s[:5]], rel=1e-6)

    other = next(m for m in ("fc3", "fc1") if m != largest)
    at.selectbox(key="spectra_module").set_value(other).run()
    clean(at)
    dims = {"fc1": 64, "fc2": 128, "fc3": 10}       # min(out, in) of each module: the directions available
    assert f"needs {int(full.loc[other, 'rank_90'])} of {dims[other]} directions" in texts(at.info)
    assert f"energy in {other}" in texts(at.info)
    assert chart(at, "Spectra across ranks")["data"] != sweep["data"]


def test_spectra_per_run_table_matches_the_library_and_follows_the_run_choice(demo):
    at = open_page("spectra")
    runs = runs_by_name("mlp-digits")
    at.selectbox(key="spectra_run_detail").set_value(label_of(at, "spectra_run_detail", "r=4")).run()
    clean(at)
    table = frame_with(at, "effective_rank").set_index("name")
    expected = spectra_frame(runstore.load_updates(runs["LoRA r=4 α=16"])).set_index("name")
    assert list(table.index) == sorted(expected.index) == ["fc1", "fc2", "fc3"]
    assert table["fro_norm"].to_dict() == pytest.approx(expected["fro_norm"].to_dict(), rel=1e-6)
    assert set(table["rank"]) == {4}
    at.selectbox(key="spectra_run_detail").set_value(label_of(at, "spectra_run_detail", "full FT")).run()
    table = frame_with(clean(at), "effective_rank")
    assert set(table["kind"]) == {"full"}


def test_spectra_normalise_toggle_and_energy_slider_change_the_output(demo):
    at = open_page("spectra")
    at.selectbox(key="spectra_run_detail").set_value(label_of(at, "spectra_run_detail", "full FT")).run()
    raw = chart(at, "ingular spectrum")
    at.toggle(key="run_norm").set_value(True).run()
    normed = chart(clean(at), "ingular spectrum")
    assert "Normalised" in title(normed) and normed["data"] != raw["data"]
    assert max(max(values(d["y"])) for d in normed["data"]) == pytest.approx(1.0)

    at.slider(key="run_advice_energy_share").set_value(0.5).run()
    low = frame_with(clean(at), "advised_rank")["advised_rank"].sum()
    at.slider(key="run_advice_energy_share").set_value(0.99).run()
    high = frame_with(clean(at), "advised_rank")["advised_rank"].sum()
    assert high > low >= 3


def test_spectra_bad_run_choices_warn_instead_of_failing(demo):
    at = open_page("spectra")
    at.multiselect(key="spectra_runs").set_value([]).run()
    assert "Choose at least one run." in texts(clean(at).warning) and not at.get("plotly_chart")
    # runs of two different models share no module: said so, and the per-run charts still show
    at.multiselect(key="spectra_runs").set_value(at.multiselect(key="spectra_runs").options).run()
    clean(at)
    assert "share no module" in texts(at.caption)
    assert "spectra_module" not in [s.key for s in at.selectbox]
    assert chart(at, "ingular spectrum")


def _upload_adapter(files) -> AppTest:
    at = open_page("spectra")
    at.radio(key="spectra_src").set_value("Upload a PEFT adapter").run()
    assert "Upload the two files" in texts(at.info)
    at.file_uploader(key="spectra_upload").set_value(files).run()
    return at


def test_spectra_upload_of_a_run_adapter_gives_the_runs_spectra(demo):
    run = runs_by_name("mlp-digits")["LoRA r=4 α=16"]
    config, weights = adapter_files(run.dir / "adapter")
    at = clean(_upload_adapter([("adapter_config.json", config, JSON), ("adapter_model.safetensors", weights, BIN)]))
    assert texts(at.success) == "3 adapted modules, ranks [4]."
    table = frame_with(at, "effective_rank").set_index("name")
    stored = spectra_frame(runstore.load_updates(run)).set_index("name")
    assert table["fro_norm"].to_dict() == pytest.approx(stored["fro_norm"].to_dict(), rel=1e-5)
    assert sorted(traces(chart(at, "ingular spectrum"))) == ["fc1", "fc2", "fc3"]
    assert set(frame_with(at, "advised_rank")["name"]) == {"fc1", "fc2", "fc3"}


def _adapter_folder(typed: str) -> AppTest:
    at = open_page("spectra")
    at.radio(key="spectra_src").set_value("An adapter folder on this machine").run()
    at.text_input(key="spectra_folder").set_value(typed).run()
    return at


def test_spectra_reads_an_adapter_folder_inside_the_user_data_folder(demo, tmp_path):
    run = runs_by_name("mlp-digits")["LoRA r=4 α=16"]
    at = clean(_adapter_folder(str(run.dir / "adapter")))       # the run store lies in the user data folder
    assert texts(at.success) == "3 adapted modules, ranks [4]."
    table = frame_with(at, "effective_rank").set_index("name")
    stored = spectra_frame(runstore.load_updates(run)).set_index("name")
    assert table["fro_norm"].to_dict() == pytest.approx(stored["fro_norm"].to_dict(), rel=1e-5)
    assert set(frame_with(at, "advised_rank")["name"]) == {"fc1", "fc2", "fc3"}
    # outside the allowed folders: one message, whether the folder holds an adapter, is empty or is missing
    shutil.copytree(run.dir / "adapter", tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    messages = set()
    for typed in (tmp_path / "adapter", tmp_path / "empty", tmp_path / "missing"):
        errs = errors(_adapter_folder(str(typed)))
        assert len(errs) == 1 and "was refused: it is outside the folders" in errs[0], errs
        messages.add(errs[0].replace(str(typed), "PATH"))
    assert len(messages) == 1


def test_spectra_upload_of_a_peft_style_adapter(empty, tmp_path):
    import torch
    from torch import nn

    from lora_analysis import apply_lora, save_adapter

    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), rank=2, alpha=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    config, weights = adapter_files(save_adapter(model, tmp_path / "adapter"))
    at = clean(_upload_adapter([("my_config.json", config, JSON), ("weights.safetensors", weights, BIN)]))
    assert texts(at.success) == "2 adapted modules, ranks [2]."
    table = frame_with(at, "effective_rank")
    assert [list(s) for s in table["shape"]] == [[16, 8], [4, 16]]
    assert list(table["rank"]) == [2, 2]


def _valid_adapter(demo_home: Path) -> tuple[bytes, bytes]:
    run = next(r for r in runstore.list_runs(demo_home / "runs") if r.name == "LoRA r=1 α=16")
    return adapter_files(run.dir / "adapter")


def _broken_uploads(config: bytes, weights: bytes) -> dict:
    raw = json.loads(config)
    return {
        "garbage weights": ([("adapter_config.json", config, JSON), ("adapter_model.safetensors", b"\x00junk" * 9, BIN)],
                            "adapter_model.safetensors is not a readable safetensors file"),
        "not a LoRA config": ([("adapter_config.json", b'{"model_type": "gpt2"}', JSON),
                               ("adapter_model.safetensors", weights, BIN)], "has no 'r' key"),
        "config not JSON": ([("adapter_config.json", b"{oops", JSON), ("adapter_model.safetensors", weights, BIN)],
                            "adapter_config.json is not valid JSON"),
        "config a list": ([("adapter_config.json", b"[1]", JSON), ("adapter_model.safetensors", weights, BIN)],
                          "must hold a JSON object"),
        "prefix tuning": ([("adapter_config.json", json.dumps({**raw, "peft_type": "PREFIX_TUNING"}).encode(), JSON),
                           ("adapter_model.safetensors", weights, BIN)], "only LORA adapters"),
        "rank does not fit": ([("adapter_config.json", json.dumps({**raw, "r": 8}).encode(), JSON),
                               ("adapter_model.safetensors", weights, BIN)],
                              "the weights have rank 1 but the config says r=8"),
        "two weight files": ([("adapter_model.safetensors", weights, BIN), ("other.safetensors", weights, BIN)],
                             "or one .safetensors adapter file alone (got adapter_model.safetensors, other.safetensors)"),
        "config only": ([("adapter_config.json", config, JSON)],
                        "upload adapter_config.json and adapter_model.safetensors (a PEFT adapter), or one "
                        ".safetensors adapter file alone (got adapter_config.json)"),
    }


BROKEN = ["garbage weights", "not a LoRA config", "config not JSON", "config a list", "prefix tuning",
          "rank does not fit", "two weight files", "config only"]


@pytest.mark.parametrize("case", BROKEN)
def test_spectra_broken_adapter_upload_shows_a_clear_error(demo, case):
    files, expected = _broken_uploads(*_valid_adapter(demo))[case]
    at = _upload_adapter(files)
    errs = errors(at)
    assert len(errs) == 1 and errs[0].startswith("Could not do reading the adapter") and expected in errs[0], errs
    assert tempfile.gettempdir() not in errs[0], "the message names a private temp path instead of the upload"
    assert not at.success and not at.get("plotly_chart")


# ---- rank & alpha -------------------------------------------------------------------------------------------

def test_rank_alpha_charts_show_the_runs_metrics(demo):
    at = clean(open_page("rank_alpha"))
    assert at.selectbox(key="ra_model").value == "mlp-digits"      # the newest runs' model
    assert at.selectbox(key="ra_metric").options == ["val_accuracy", "val_loss"]
    by_rank = chart(at, "versus LoRA rank")
    assert title(by_rank).startswith("Validation accuracy")
    runs = runs_by_name("mlp-digits")
    (line,) = by_rank["data"]
    assert values(line["x"]) == [1, 4]
    assert values(line["y"]) == pytest.approx([runs["LoRA r=1 α=16"].metrics["val_accuracy"],
                                             runs["LoRA r=4 α=16"].metrics["val_accuracy"]])
    assert sorted(traces(chart(at, "Efficiency"))) == ["LoRA", "frontier", "full fine-tuning"]

    at.selectbox(key="ra_metric").set_value("val_loss").run()
    clean(at)
    assert title(chart(at, "versus LoRA rank")).startswith("Validation loss")
    assert values(chart(at, "versus LoRA rank")["data"][0]["y"]) == pytest.approx(
        [runs["LoRA r=1 α=16"].metrics["val_loss"], runs["LoRA r=4 α=16"].metrics["val_loss"]])


def test_rank_alpha_model_choice_switches_runs_and_metrics(demo):
    at = open_page("rank_alpha")
    at.selectbox(key="ra_model").set_value("tiny-gpt").run()
    clean(at)
    assert at.selectbox(key="ra_metric").options == ["val_perplexity", "val_loss"]
    by_rank = chart(at, "versus LoRA rank")
    assert title(by_rank).startswith("Validation perplexity") and values(by_rank["data"][0]["x"]) == [2]
    assert "full fine-tuning" not in traces(chart(at, "Efficiency"))


# ---- subspaces ------------------------------------------------------------------------------------------

def test_subspaces_defaults_compare_two_runs_of_one_model(demo):
    from lora_analysis.analysis.similarity import adapter_similarity

    at = clean(open_page("subspaces"))     # the store holds two models: the default pair must share modules
    assert at.selectbox(key="sub_a").value.startswith("LoRA r=4")
    assert at.selectbox(key="sub_b").value.startswith("LoRA r=1")
    assert at.selectbox(key="sub_side").value == "A"
    summary = frame_with(at, "phi_top1")
    assert list(summary["name"]) == ["fc1", "fc2", "fc3"] and set(summary["side"]) == {"A"}
    runs = runs_by_name("mlp-digits")
    expected = adapter_similarity(runstore.load_updates(runs["LoRA r=4 α=16"]),
                                  runstore.load_updates(runs["LoRA r=1 α=16"]), "A")
    assert list(summary["phi_top1"]) == pytest.approx([expected[m].phi[0, 0] for m in ("fc1", "fc2", "fc3")])
    assert "d = 64" in title(chart(at, "Subspace similarity"))          # fc1 reads 64 inputs

    at.selectbox(key="sub_module").set_value("fc2").run()
    assert "d = 128" in title(chart(clean(at), "Subspace similarity"))


def test_subspaces_full_ft_run_drops_the_a_matrix_side(demo):
    at = open_page("subspaces")
    at.selectbox(key="sub_a").set_value(label_of(at, "sub_a", "full FT")).run()
    clean(at)
    side = at.selectbox(key="sub_side")
    assert side.options == ["ΔW input directions (V)", "ΔW output directions (U)"] and side.value == "input"
    assert set(frame_with(at, "phi_top1")["side"]) == {"input"}


def test_subspaces_runs_of_different_models_show_an_error_not_a_crash(demo):
    at = open_page("subspaces")
    at.selectbox(key="sub_b").set_value(label_of(at, "sub_b", "r=2")).run()     # tiny-gpt vs mlp-digits r=4
    errs = errors(at)
    assert len(errs) == 1 and "share no adapted module" in errs[0]
    # the rest of the page still works
    assert chart(at, "top directions lie in W0") and chart(at, "Intruder dimensions")


def test_subspaces_base_run_and_intruder_k_change_what_is_shown(demo):
    at = open_page("subspaces")
    at.selectbox(key="base_run").set_value(label_of(at, "base_run", "r=2")).run()
    clean(at)
    assert all(m.startswith("blocks.") for m in at.selectbox(key="base_module").options)
    at.selectbox(key="base_run").set_value(label_of(at, "base_run", "r=4")).run()
    assert clean(at).selectbox(key="base_module").options == ["fc1", "fc2", "fc3"]

    assert any(c.startswith("intruders at ε=0.5, k=10") for c in frame_with(at, "label").columns)
    at.slider(key="intr_k").set_value(3).run()
    table = frame_with(clean(at), "label")
    assert any(c.startswith("intruders at ε=0.5, k=3") for c in table.columns)
    # the counts are the library's, per run, at k=3 and ε=0.5
    from lora_analysis.analysis.intruders import intruders_frame
    expected = {registry.run_label(r): int(intruders_frame(runstore.load_updates(r), 3, 0.5)["intruders"].sum())
                for r in runstore.latest_sweep(runstore.list_runs())}
    assert dict(zip(table["label"], table["intruders over all its modules"])) == expected


# ---- merge ------------------------------------------------------------------------------------------------

def test_merge_verdict_and_task_table(demo):
    at = clean(open_page("merge"))
    assert at.selectbox(key="merge_run").value.startswith("LoRA r=4")
    (verdict,) = [t for t in (shown(i.value) for i in at.info) if "float32" in t]     # the answer, at the top
    assert verdict.startswith("Yes in float32") and "bfloat16" in verdict and "float16" in verdict
    run = runs_by_name("mlp-digits")["LoRA r=4 α=16"]
    task = frame_with(at, "variant").set_index("variant")
    assert list(task.index) == ["frozen base", "LoRA (unmerged)", "LoRA (merged)", "full fine-tuning"]
    assert task.loc["LoRA (unmerged)", "val_accuracy"] == pytest.approx(run.metrics["val_accuracy"])
    assert task.loc["LoRA (merged)", "val_accuracy"] == pytest.approx(task.loc["LoRA (unmerged)", "val_accuracy"])
    errs = frame_with(at, "changed_entries")
    assert list(errs["dtype"]) == ["float32", "bfloat16", "float16"]
    assert float(errs.loc[errs["dtype"] == "float32", "max_abs"].iloc[0]) <= 1e-5


def test_merge_reference_and_run_choice_change_what_is_shown(demo):
    at = open_page("merge")
    assert "reference: unmerged, same dtype" in title(chart(at, "Merge error"))
    at.radio(key="merge_ref").set_value("fp32").run()
    assert "reference: unmerged, fp32" in title(chart(clean(at), "Merge error"))
    at.selectbox(key="merge_run").set_value(label_of(at, "merge_run", "r=2")).run()
    clean(at)
    task = frame_with(at, "variant")
    assert list(task["variant"]) == ["frozen base", "LoRA (unmerged)", "LoRA (merged)"]
    assert "val_perplexity" in task.columns
    assert "No full fine-tuning run of this model" in texts(at.caption)


# ---- reports --------------------------------------------------------------------------------------------------

def test_reports_builds_a_report_of_the_chosen_runs(demo):
    at = clean(open_page("reports"))
    assert len(at.multiselect(key="rep_runs").value) == 3        # the newest sweep
    assert at.multiselect(key="rep_parts").value == registry.ANALYSES.names()     # every analysis by default
    at.multiselect(key="rep_parts").set_value([]).run()
    assert "Choose at least one run and one analysis." in texts(clean(at).warning)
    assert "rep_build" not in [b.key for b in at.button]
    at.multiselect(key="rep_parts").set_value(["loss_curves"]).run()
    at.multiselect(key="rep_runs").set_value([label_of(at, "rep_runs", "r=4", "multiselect")]).run()
    at.button(key="rep_build").click().run()
    clean(at)
    assert texts(at.success).startswith("Report ready")
    assert "rep_dl" in [b.key for b in at.get("download_button")]
    html = at.session_state["rep_html"]
    assert "<html" in html.lower() and "LoRA r=4 α=16" in html
    assert "<h2>Training runs</h2>" in html and "<h2>Singular spectra of ΔW" not in html


def test_reports_export_follows_the_chosen_run(demo):
    at = open_page("reports")
    for part in ("r=1", "full FT"):
        at.selectbox(key="rep_export_run").set_value(label_of(at, "rep_export_run", part)).run()
        run = runs_by_name()[part if part == "full FT" else "LoRA r=1 α=16"]
        (button,) = [b for b in clean(at).get("download_button") if b.key == "rep_export_dl"]
        assert f"Download {run.id}.zip" in button.label


def _bundle(run: runstore.Run) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return runstore.export_run(run, Path(tmp) / "b.zip").read_bytes()


def test_reports_import_of_a_valid_bundle_keeps_every_run(demo_copy):
    before = {r.id: r.name for r in runstore.list_runs()}
    source = next(r for r in runstore.list_runs() if r.name == "LoRA r=4 α=16")
    at = open_page("reports")
    at.file_uploader(key="rep_import").set_value(("shared.zip", _bundle(source), ZIP)).run()
    clean(at)
    assert "Imported run 'LoRA r=4 α=16'" in texts(at.success)
    after = {r.id: r.name for r in runstore.list_runs()}
    assert before.items() < after.items() and len(after) == len(before) + 1   # same id taken: a new id
    new_id = (set(after) - set(before)).pop()
    assert runstore.load_run(new_id).record["imported_as_new_id_of"] == source.id
    at.run()                                # a re-run does not import the same upload again
    assert "Imported:" in texts(clean(at).success) and len(runstore.list_runs()) == len(after)
    # the imported run shows on the other pages
    assert any(new_id[-6:] in o for o in open_page("spectra").multiselect(key="spectra_runs").options)


def test_reports_import_into_an_empty_store(empty, demo_home):
    source = next(r for r in runstore.list_runs(demo_home / "runs") if r.name == "full FT")
    at = open_page("reports")
    at.file_uploader(key="rep_import").set_value(("full.zip", _bundle(source), ZIP)).run()
    clean(at)
    assert [r.id for r in runstore.list_runs()] == [source.id]          # a free id is kept
    at = clean(open_page("reports"))
    assert at.multiselect(key="rep_runs").options == [f"full FT · {source.id[-6:]}"]


def _zip(entries: dict[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


RUN_JSON = json.dumps({"id": "shared-run", "config": {"model": "mlp-digits"}, "status": "completed"})
BAD_BUNDLES = {
    "not a zip": (b"PK but not really a zip", "is not a zip file"),
    "code inside": (_zip({"run.json": RUN_JSON, "evil.py": "print('hi')"}), "only .json, .csv"),
    "pickle inside": (_zip({"run.json": RUN_JSON, "adapter/adapter_model.bin": b"\x80\x04"}), "no pickles"),
    "no run.json": (_zip({"metrics.csv": "step,train_loss\n1,2\n"}), "has no run.json"),
    "run.json not JSON": (_zip({"run.json": "{oops"}), "run.json is not valid JSON"),
    "broken safetensors": (_zip({"run.json": RUN_JSON, "adapter/adapter_model.safetensors": b"junk"}),
                           "is not a valid safetensors file"),
    "path escape": (_zip({"../run.json": RUN_JSON}), "whose path is not allowed"),
    "empty zip": (_zip({}), "is an empty zip"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_reports_broken_bundle_shows_an_error_and_loses_nothing(demo_copy, case):
    data, expected = BAD_BUNDLES[case]
    before = sorted(p.name for p in (demo_copy / "runs").iterdir())
    at = open_page("reports")
    at.file_uploader(key="rep_import").set_value(("bad-bundle.zip", data, ZIP)).run()
    errs = errors(at)
    assert len(errs) == 1 and errs[0].startswith("Could not do importing the bundle") and expected in errs[0], errs
    assert "bad-bundle.zip" in errs[0]                              # names the user's file
    assert tempfile.gettempdir() not in errs[0], "the message names a private temp path instead of the upload"
    assert sorted(p.name for p in (demo_copy / "runs").iterdir()) == before   # no run and no leftover staging
    assert "rep_imported" not in at.session_state


# ---- the report shows what the pages show ---------------------------------------------------------------------

# the runs each analysis's page shows by default: the newest sweep, or every completed run
PAGE_RUNS = {"loss_curves": "sweep", "rank_alpha": "all", "spectra_sweep": "sweep", "spectra": "sweep",
             "rank_advice": "sweep", "similarity": "all", "base_overlap": "all", "amplification": "all",
             "intruders": "sweep", "merge": "all"}
TIMED = ("Forward latency",)      # timings differ between two measurements: compared without their values


def _decoded(value):
    """Plotly's binary arrays ({"dtype", "bdata", "shape"}) as numpy arrays; anything else as is."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return value


def same_figure_data(a, b) -> bool:
    """Equal figure data, numbers to float64 rounding: the page's script thread and the test's thread may
    run torch with different thread counts, which changes the last bits of an SVD (never a count or a label)."""
    a, b = _decoded(a), _decoded(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and bool(np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_figure_data(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_figure_data(x, y) for x, y in zip(a, b))
    return a == b


def _report_section(entry, runs, params):
    from lora_analysis.run_report import report_sections

    sections = report_sections(runs, [entry.name])
    if entry.each and len(sections) > 1:       # one section per choice: the one the page opens on
        sections = [s for s in sections if s.title == f"{entry.title}: {params[entry.each]}"]
    (section,) = sections
    return section


def test_every_analysis_has_a_page_and_a_place_in_this_test():
    pages = {p.stem for p in (Path(APP).parent / "views").glob("*.py")}
    assert {a.page for a in registry.ANALYSES} <= pages
    assert set(PAGE_RUNS) == set(registry.ANALYSES.names())


@pytest.mark.parametrize("name", list(PAGE_RUNS))
def test_the_report_shows_what_the_page_shows(demo, name):
    entry = registry.get(name)
    done = [r for r in runstore.list_runs() if r.status == "completed"]
    runs = runstore.latest_sweep(done) if PAGE_RUNS[name] == "sweep" else done
    params = entry.resolve(registry.Inputs.from_runs(runs))
    at = clean(open_page(entry.page))
    if f"params:{name}" in at.session_state:      # pages built on the registry record what they computed with
        assert at.session_state[f"params:{name}"] == params
    section = _report_section(entry, runs, params)
    shown = {title(s): s for s in specs(at)}
    for fig in section.figures:
        spec = json.loads(fig.to_json())
        assert title(spec) in shown, (title(spec), list(shown))
        page = shown[title(spec)]
        if title(spec).startswith(TIMED):
            assert [(d["name"], d["x"]) for d in page["data"]] == [(d["name"], d["x"]) for d in spec["data"]]
        else:
            assert same_figure_data(page["data"], spec["data"]) and page["layout"] == spec["layout"], title(spec)
    if not section.figures:                      # a table-only analysis (rank advice): its table and code
        (caption, table), = section.tables
        (page,) = [d.value for d in at.dataframe if list(d.value.columns) == list(table.columns)]
        assert page.to_dict("list") == table.to_dict("list")
        assert section.code.strip() in [c.value.strip() for c in at.code]


def test_runs_without_base_weights_skip_the_w0_analyses_with_a_message(demo, monkeypatch):
    """A LoRA run stored without W0 loads with w0=None: spectra and φ still show, the analyses that compare
    with W0 leave it out and say why."""
    import dataclasses

    import streamlit as st

    load = runstore.load_updates

    def without_w0(run, *args, **kwargs):
        return {n: dataclasses.replace(u, w0=None) if u.kind == "lora" else u
                for n, u in load(run, *args, **kwargs).items()}

    monkeypatch.setattr(runstore, "load_updates", without_w0)
    st.cache_resource.clear()
    st.cache_data.clear()
    try:
        at = clean(open_page("subspaces"))
        full = label_of(at, "base_run", "full FT")
        assert at.selectbox(key="base_run").options == [full]
        lora = sorted(registry.run_label(r) for r in runstore.latest_sweep(runstore.list_runs()) if r.method == "lora")
        assert f"Skipped (no base weights W0): {', '.join(sorted(lora, reverse=True))}." in texts(at.caption) or \
            f"Skipped (no base weights W0): {', '.join(lora)}." in texts(at.caption)
        assert frame_with(at, "phi_top1") is not None           # φ needs no W0
        clean(open_page("spectra"))
    finally:
        st.cache_resource.clear()
        st.cache_data.clear()


def test_home_lists_every_registered_analysis(empty):
    at = clean(open_page("home"))
    (listed,) = [e.markdown[0].value for e in at.expander if e.label.startswith("What each analysis answers")]
    assert all(f"**{a.title}**: {a.question}" in shown(listed) for a in registry.ANALYSES)


# ---- every page: its question, its answer, how to read its charts, its tables as CSV ------------------------

QUESTIONS = {"home": "What does LoRA change in my model, and what does it cost?",
             "params": "How many parameters and how much memory does LoRA save?",
             "finetune": "How do LoRA and full fine-tuning train on my model and data?",
             "spectra": registry.PAGE_QUESTIONS["spectra"], "rank_alpha": registry.PAGE_QUESTIONS["rank_alpha"],
             "subspaces": registry.PAGE_QUESTIONS["subspaces"], "merge": registry.PAGE_QUESTIONS["merge"],
             "reports": "How do I keep and share what these pages found?",
             "findings": "Do the published findings about LoRA hold on these runs?"}
TABLE_PAGES = ["params", "finetune", "spectra", "subspaces", "merge"]      # pages that show tables on the demo


def question_of(at: AppTest) -> str:
    (first, *_) = [shown(m.value) for m in at.markdown if m.value.startswith("##### ")]
    return first[len("##### "):]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_opens_with_its_question_and_the_answer_from_the_runs(demo, name):
    at = clean(open_page(name))
    assert question_of(at) == QUESTIONS[name]
    answers = [shown(i.value) for i in at.info if i.icon == ":material/lightbulb:"]
    assert answers and all(len(a) > 40 for a in answers), answers
    # the answers are computed: they name what is in the store (a run count, a run label, a rank, a model)
    labels = [registry.run_label(r) for r in runstore.list_runs()]
    assert any(re.search(r"\d", a) for a in answers)
    if name in ("subspaces",):
        assert any(label in a for a in answers for label in labels)
    # the rule of each answer that has one, in an expander under it
    assert all(e.label == "How this answer is computed" for e in at.expander
               if e.label.startswith("How this answer"))
    if name in RUN_PAGES:       # each registered chart says how to read it
        readings = [c.value for c in at.caption if c.value.startswith("How to read this: ")]
        assert len(readings) >= 1
    if name in TABLE_PAGES:     # every table can be downloaded as CSV
        buttons = [b for b in at.get("download_button") if b.proto.label == "CSV"]
        assert len(buttons) >= len(at.dataframe) > 0, name


def test_the_answer_follows_the_chosen_runs(demo):
    at = clean(open_page("subspaces"))
    before = [shown(i.value) for i in at.info]
    first, second = at.selectbox(key="sub_a").value, label_of(at, "sub_b", "full FT")
    assert f"{first} and {at.selectbox(key='sub_b').value} share" in before[0]
    at.selectbox(key="sub_b").set_value(second).run()
    after = [shown(i.value) for i in clean(at).info]
    assert before[0] != after[0] and f"{first} and {second} share" in after[0]


def test_charts_save_as_svg_from_plotly_toolbar(demo):
    at = clean(open_page("rank_alpha"))
    for c in at.get("plotly_chart"):
        config = json.loads(c.proto.config)
        assert config["toImageButtonOptions"]["format"] == "svg" and config["displayModeBar"] is True
        assert config["toImageButtonOptions"]["filename"]


def test_csv_download_holds_the_table(demo, monkeypatch):
    import io

    import pandas as pd
    import streamlit as st

    sent = {}
    original = st.download_button

    def recording(label, data, file_name=None, *args, **kwargs):
        sent[file_name] = data
        return original(label, data, file_name, *args, **kwargs)

    monkeypatch.setattr(st, "download_button", recording)
    at = clean(open_page("finetune"))
    assert [b.proto.label for b in at.get("download_button") if b.key == "ft_runs_csv"] == ["CSV"]
    shown_table = frame_with(at, "status")
    csv = pd.read_csv(io.BytesIO(sent["runs.csv"]))
    assert list(csv.columns) == list(shown_table.columns) and len(csv) == len(shown_table) == len(runstore.list_runs())
    assert list(csv["id"]) == list(shown_table["id"])


# ---- fine-tune form: real defaults, devices that exist, typed paths --------------------------------------------

def test_finetune_fields_show_the_models_real_defaults(empty):
    from lora_analysis.device import available_devices
    from lora_analysis.training.models import DEFAULTS

    at = clean(open_page("finetune"))
    steps, lr = at.number_input(key="ft_steps"), at.number_input(key="ft_lr")
    assert steps.value is None and lr.value is None        # empty: the model's default, said in the field
    assert steps.proto.placeholder == f"default ({DEFAULTS['mlp-digits']['steps']})"
    assert f"LoRA {DEFAULTS['mlp-digits']['lr']['lora']:g}" in lr.proto.placeholder
    assert f"full {DEFAULTS['mlp-digits']['lr']['full']:g}" in lr.proto.placeholder
    assert at.text_input(key="ft_targets").proto.placeholder == "default: all-linear"
    assert at.number_input(key="ft_dropout").value == 0.0 and at.number_input(key="ft_seed").value == 0
    assert at.text_input(key="ft_alphas").value == "16"
    assert at.selectbox(key="ft_device").options == ["auto", *available_devices()]
    at.selectbox(key="ft_model").set_value("tiny-gpt").run()
    assert clean(at).number_input(key="ft_steps").proto.placeholder == f"default ({DEFAULTS['tiny-gpt']['steps']})"
    assert at.text_input(key="ft_targets").proto.placeholder == "default: q_proj, v_proj"


def _launch_hf(at: AppTest, typed: str) -> list[str]:
    at.selectbox(key="ft_model").set_value(HF_CHOICE).run()
    at.text_input(key="ft_hf_model").set_value(typed)
    at.button(key=SUBMIT).click().run()
    return errors(at)


def test_typed_model_folder_outside_the_allowed_folders_is_refused_alike_whether_it_exists(empty, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "model").mkdir(parents=True)
    (outside / "model" / "config.json").write_text("{}")
    messages = {}
    for typed in (str(outside / "model"), str(outside / "missing"), "/etc", "/no/such/folder/anywhere"):
        errs = _launch_hf(open_page("finetune"), typed)
        assert len(errs) == 1 and "was refused" in errs[0] and "outside the folders" in errs[0], errs
        messages[typed] = errs[0].replace(typed, "PATH")
    assert len(set(messages.values())) == 1, messages      # nothing tells an existing folder from a missing one
    assert jobs.list_jobs() == []


def test_typed_model_folder_link_out_of_an_allowed_folder_is_refused(empty, tmp_path):
    from dashboard.typed_paths import model_source

    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (empty / "models").mkdir()
    (empty / "models" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="was refused: it is outside"):
        model_source(str(empty / "models" / "link"))
    inside = empty / "models" / "mine"
    inside.mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        model_source(str(inside))
    (inside / "config.json").write_text("{}")
    assert model_source(str(empty / "models" / ".." / "models" / "mine")) == str(inside.resolve())
    assert model_source("gpt2") == "gpt2" and model_source("mlp-digits") == "mlp-digits"


# ---- uploaders: the page's own limit --------------------------------------------------------------------------

def test_uploaders_state_the_limit_the_page_accepts(empty):
    from dashboard.common import MAX_JSON_BYTES, MAX_UPLOAD_BYTES

    at = clean(open_page("finetune"))
    data = at.file_uploader(key="ft_data")
    assert data.proto.max_upload_size_mb == MAX_UPLOAD_BYTES // 2**20 and "up to 200 MiB" in data.proto.label
    at = clean(open_page("reports"))
    bundle = at.file_uploader(key="rep_import")
    assert bundle.proto.max_upload_size_mb == MAX_UPLOAD_BYTES // 2**20
    assert "up to 200 MiB packed" in bundle.proto.label and f"{runstore.LIMITS.max_files} files" in bundle.proto.help
    at = open_page("params")
    at.radio(key="params_mode").set_value("Hugging Face config.json").run()
    config = clean(at).file_uploader(key="params_config")
    assert config.proto.max_upload_size_mb == MAX_JSON_BYTES // 2**20 and "up to 2 MiB" in config.proto.label
    at = open_page("spectra")
    at.radio(key="spectra_src").set_value("Upload a PEFT adapter").run()
    adapter = clean(at).file_uploader(key="spectra_upload")
    assert "up to 200 MiB for the two files together" in adapter.proto.label


# ---- subspaces: a bounded default, chosen by the user --------------------------------------------------------

def test_spread_keeps_the_baseline_and_the_rank_extremes():
    from types import SimpleNamespace

    from dashboard.runs import spread

    runs = [SimpleNamespace(id=f"r{r}", method="lora", config={"rank": r}) for r in (64, 1, 8, 2, 32, 4, 16, 128, 3, 5)]
    runs.append(SimpleNamespace(id="full", method="full", config={}))
    picked = spread(runs, 5)
    ranks = sorted(r.config["rank"] for r in picked if r.method == "lora")
    assert len(picked) == 5 and any(r.id == "full" for r in picked)
    assert ranks[0] == 1 and ranks[-1] == 128 and len(set(ranks)) == 4
    assert [r.id for r in picked] == [r.id for r in runs if r in picked]     # order kept
    assert spread(runs[:3], 8) == runs[:3]


def test_subspaces_says_which_sweep_and_lets_the_user_choose_the_intruder_runs(demo):
    at = clean(open_page("subspaces"))
    newest = runstore.latest_sweep(runstore.list_runs())
    assert f"Opens on all {len(newest)} runs of the newest sweep ({newest[0].sweep_id}, mlp-digits)." in \
        texts(at.caption)
    chooser = at.multiselect(key="intr_runs")
    assert sorted(chooser.value) == sorted(registry.run_label(r) for r in newest)
    assert chooser.proto.max_selections > 0
    keep = [label_of(at, "intr_runs", "r=1", "multiselect")]
    chooser.set_value(keep).run()
    table = frame_with(clean(at), "label")
    assert list(table["label"]) == keep


def test_subspaces_amplification_table_fits_its_rows(demo):
    at = clean(open_page("subspaces"))
    spec = chart(at, "Amplification (LoRA paper, Table 7)")
    rows = len(spec["data"][0]["cells"]["values"][0])
    assert spec["layout"]["height"] <= 70 + 40 + 30 * rows      # no gap under the table


# ---- jobs: found again from the store, wherever the user is ------------------------------------------------------

def _running_job(home: Path, message: str) -> str:
    import os

    from lora_analysis.store.liveness import process_identity

    job_id = "20990101-000000-abcdef"
    d = home / "jobs" / job_id
    d.mkdir(parents=True)
    # this test process stands in for the worker: alive, so the job reads as running
    (d / "job.json").write_text(json.dumps({"id": job_id, "kind": "sweep", "spec": {"model": "mlp-digits"},
                                            "status": "running", "started": time.time(),
                                            **process_identity(os.getpid())}))
    (d / "progress.json").write_text(json.dumps({"done": 1, "total": 4, "message": message}))
    return job_id


@pytest.mark.parametrize("name", ["spectra", "reports"])
def test_a_running_job_shows_live_on_any_page_after_a_reload(empty, name):
    job_id = _running_job(empty, "LoRA r=4 · step 20/300 · loss 0.8")
    at = clean(open_page(name))             # a fresh session: nothing in session state knows the job
    side = at.sidebar
    assert any("Jobs running" in m.value for m in side.markdown)
    assert any(job_id in shown(c.value) for c in side.caption)
    (bar,) = [p for p in at.get("progress")]
    assert "step 20/300" in bar.proto.text and bar.proto.value == 25
    assert any(b.key == f"cancel_sidebar_{job_id}" for b in side.button)


def test_finetune_lists_running_jobs_in_the_page_not_the_sidebar(empty):
    job_id = _running_job(empty, "starting the sweep")
    at = clean(open_page("finetune"))
    assert not [m for m in at.sidebar.markdown if "Jobs running" in m.value]
    assert any(b.key == f"cancel_main_{job_id}" for b in at.button)


def test_compare_runs_follows_a_new_sweep(demo_copy):
    from lora_analysis.training import run_sweep, sweep_settings

    at = clean(open_page("finetune"))
    old = at.multiselect(key="ft_compare").value
    assert sorted(old) == sorted(registry.run_label(r) for r in runstore.latest_sweep(runstore.list_runs()))
    run_sweep(sweep_settings(model="mlp-digits", ranks=[2], alphas=[16], full_ft=False, steps=3, pretrain_steps=60))
    at.run()
    new = clean(at).multiselect(key="ft_compare").value
    assert len(new) == 1 and "r=2" in new[0]             # the finished sweep replaced the stale selection
    # a user's own choice stays while the newest sweep does not change
    at.multiselect(key="ft_compare").set_value(old[:1]).run()
    at.run()
    assert clean(at).multiselect(key="ft_compare").value == old[:1]
