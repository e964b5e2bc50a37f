"""Spectra over training (issue 9, "the user's own training loop"): a real ``transformers.Trainer`` with the
callback, a loop of one's own with the plain hook, and our trainer all record the factored spectra of every
LoRA module into the run store; the numbers equal a dense float64 SVD of ΔW, the adapter loads back in PEFT
with the same outputs, and the Spectra page draws the history.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lora_analysis import apply_lora, runstore
from lora_analysis.analysis.history import LoRAFactors, lora_factors, spectra_rows
from lora_analysis.analysis.spectra import effective_rank, stable_rank
from lora_analysis.store.runs import HISTORY_FILE, read_history_csv
from lora_analysis.training.callback import LoRASpectraCallback, SpectraRecorder, trainer_metrics

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def dense_numbers(a: torch.Tensor, b: torch.Tensor, scaling: float) -> dict:
    """The reference: the dense ΔW = s·B·A in float64 and its full SVD."""
    delta = scaling * b.detach().double() @ a.detach().double()
    s = torch.linalg.svdvals(delta).numpy()
    return {"sigma": s, "norm": float(torch.linalg.matrix_norm(delta)), "effective_rank": effective_rank(s),
            "stable_rank": stable_rank(s)}


def check_row(row: pd.Series, a, b, scaling, k: int) -> None:
    ref = dense_numbers(a, b, scaling)
    assert [row[f"sigma_{i}"] for i in range(1, k + 1)] == pytest.approx(ref["sigma"][:k], rel=1e-6, abs=1e-12)
    for key in ("norm", "effective_rank", "stable_rank"):
        assert row[key] == pytest.approx(ref[key], rel=1e-6), key
    assert row["spectral_norm"] == pytest.approx(ref["sigma"][0], rel=1e-6)


# ---- a real transformers.Trainer on a tiny GPT-2 with PEFT LoRA -------------------------------------------------

TARGETS = ["c_attn", "c_proj"]


def trainer_callback_run(root: Path, runs_dir: Path | None = None) -> dict:
    """A tiny GPT-2 (2 layers, width 32) saved as a base under ``root``, PEFT LoRA r=4 on c_attn and c_proj,
    5 steps of ``transformers.Trainer`` with the callback every 2 steps, evaluating at step 4 and at the end,
    recorded into ``runs_dir`` (default ``root/runs``). Also used by the browser test."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    runs_dir = runs_dir or root / "runs"
    torch.manual_seed(0)
    base_dir = root / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(base_dir)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True,
                                      task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (24, 12), generator=g)]
    args = TrainingArguments(output_dir=str(root / "out"), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=2e-2, logging_steps=1, eval_strategy="steps", eval_steps=4,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    callback = LoRASpectraCallback(every=2, runs_dir=runs_dir, config={"data": "random tokens"})
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback])
    with callback:
        trainer.train()
    return {"root": root, "base": base_dir, "model": model.eval(), "run": runstore.load_run(callback.run_id,
                                                                                            runs_dir)}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    return trainer_callback_run(tmp_path_factory.mktemp("callback"))


def test_the_trainer_run_is_in_the_store_with_its_settings_and_metrics(trainer_run):
    run = trainer_run["run"]
    assert [r.id for r in runstore.list_runs(trainer_run["root"] / "runs")] == [run.id]
    assert run.status == "completed" and run.method == "lora"
    c = run.config
    assert (c["model"], c["rank"], c["alpha"], c["targets"], c["rslora"]) == (str(trainer_run["base"]), 4, 8.0,
                                                                              TARGETS, False)
    assert (c["source"], c["steps"], c["lr"], c["data"], c["spectra_every"]) == ("transformers.Trainer", 5, 2e-2,
                                                                                 "random tokens", 2)
    assert run.origin == run.id and run.task["base_model_name_or_path"] == str(trainer_run["base"])
    metrics = run.metrics_frame()
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5]
    assert metrics["train_loss"].notna().all() and metrics["val_loss"].notna().tolist() == [False] * 3 + [True, True]
    val = metrics["val_loss"].dropna().iloc[-1]
    assert run.metrics["val_loss"] == val and run.metrics["val_perplexity"] == pytest.approx(math.exp(val))
    assert run.metrics["steps_done"] == 5 and run.metrics["lora_modules"] == 6 and run.metrics["scaling"] == 2.0
    assert run.metrics["spectra_recordings"] == 4 and run.metrics["train_seconds"] > 0


def test_the_trainer_history_matches_a_dense_svd_of_the_final_update(trainer_run):
    run, model = trainer_run["run"], trainer_run["model"]
    history = run.spectra_history()
    modules = sorted(lora_factors(model))
    assert len(modules) == 6 and all(m.startswith("transformer.h.") for m in modules)
    # steps 0 (before training), 2, 4 (every 2) and 5 (the end), each with every module
    assert history.groupby("step")["module"].apply(sorted).to_dict() == {s: modules for s in (0, 2, 4, 5)}
    zero = history[history["step"] == 0]
    assert (zero[["effective_rank", "stable_rank", "norm", "sigma_1"]] == 0).all().all()
    end = history[history["step"] == 5].set_index("module")
    for name, layer in model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            module = name.removeprefix("base_model.model.")
            check_row(end.loc[module], layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                      layer.scaling["default"], k=4)
    # the update grew: larger at step 4 than at step 2, for every module
    norms = history.pivot(index="module", columns="step", values="norm")
    assert (norms[4] > norms[2]).all() and (norms[2] > 0).all()


def test_the_trainer_adapter_loads_in_peft_with_the_same_outputs(trainer_run):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    run, model = trainer_run["run"], trainer_run["model"]
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(trainer_run["base"]), run.dir / "adapter").eval()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert not (run.dir / "adapter" / "README.md").exists()
    # and every analysis reads it: the run's own W0 beside its factors
    updates = runstore.load_updates(run)
    assert sorted(updates) == sorted(lora_factors(model))
    w0 = GPT2LMHeadModel.from_pretrained(trainer_run["base"]).transformer.h[1].attn.c_attn.weight
    assert torch.equal(updates["transformer.h.1.attn.c_attn"].w0, w0.T)


def test_trainer_logs_take_the_run_stores_names():
    row, summary = trainer_metrics({"loss": 2.5, "grad_norm": 0.3, "learning_rate": 1e-3, "epoch": 0.5})
    assert row == {"train_loss": 2.5, "grad_norm": 0.3, "lr": 1e-3, "epoch": 0.5} and summary == {}
    row, _ = trainer_metrics({"eval_loss": 1.5, "eval_accuracy": 0.75, "eval_runtime": 0.1, "epoch": 1.0})
    assert row == {"val_loss": 1.5, "val_accuracy": 0.75, "epoch": 1.0}
    row, summary = trainer_metrics({"train_runtime": 3.0, "train_loss": 2.0, "train_samples_per_second": 8.0,
                                    "epoch": 1.0})
    assert row == {} and summary == {"train_seconds": 3.0, "mean_train_loss": 2.0, "samples_per_s": 8.0}


# ---- the plain hook in a loop of one's own, with this project's LoRA -------------------------------------------

def _mlp_with_lora(rank: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    return apply_lora(model, ["0", "2"], rank=rank, alpha=6.0)


def _steps(model, recorder, steps: int, start: int = 1) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(2)
    for step in range(start, start + steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.step(step, {"loss": loss, "learning_rate": 5e-2})
        if step % 4 == 0:
            recorder.step(step, {"val_loss": loss.item() + 0.1})


def test_the_plain_hook_records_a_custom_loop(lora_home):
    model = _mlp_with_lora()
    with SpectraRecorder(model, every=3, name="my loop", config={"lr": 5e-2}) as recorder:
        _steps(model, recorder, 7)
    run = runstore.load_run(recorder.run_id)
    assert run.status == "completed" and run.name == "my loop"
    assert (run.config["rank"], run.config["alpha"], run.config["source"], run.config["lr"]) == (3, 6.0,
                                                                                                 "custom loop", 5e-2)
    metrics = run.metrics_frame()
    assert metrics["step"].tolist() == list(range(1, 8)) and metrics["lr"].eq(5e-2).all()
    assert metrics["val_loss"].notna().tolist() == [s == 4 for s in range(1, 8)]
    history = run.spectra_history()
    assert sorted(history["step"].unique()) == [0, 3, 6, 7]
    assert list(history.columns[-3:]) == ["sigma_1", "sigma_2", "sigma_3"]
    end = history[history["step"] == 7].set_index("module")
    updates = runstore.load_updates(run)            # the saved adapter holds the final factors
    assert sorted(end.index) == sorted(updates) == ["0", "2"]
    for name, u in updates.items():
        check_row(end.loc[name], u.lora_A, u.lora_B, u.scaling, k=3)
        assert torch.equal(u.w0, model[int(name)].base_layer.weight)


def test_a_crash_in_the_loop_is_recorded_as_failed_with_its_history(lora_home):
    model = _mlp_with_lora()
    with pytest.raises(RuntimeError, match="out of data"):
        with SpectraRecorder(model, every=2) as recorder:
            _steps(model, recorder, 3)
            raise RuntimeError("out of data")
    run = runstore.load_run(recorder.run_id)
    assert run.status == "failed" and "RuntimeError: out of data" in run.error
    assert sorted(run.spectra_history()["step"].unique()) == [0, 2]        # what was recorded stays
    assert not (run.dir / "adapter").exists()
    with pytest.raises(KeyboardInterrupt):
        with SpectraRecorder(model, every=2) as stopped:
            raise KeyboardInterrupt
    assert runstore.load_run(stopped.run_id).status == "interrupted"


def test_the_hook_refuses_bad_input_with_the_allowed_values(lora_home, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA module"):
        SpectraRecorder(nn.Linear(3, 3), runs_dir=tmp_path)
    model = _mlp_with_lora()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"every={bad!r} is not allowed"):
            SpectraRecorder(model, every=bad, runs_dir=tmp_path)
    with pytest.raises(ValueError, match="config rank='4' is not allowed: it must be int"):
        SpectraRecorder(model, runs_dir=tmp_path, config={"rank": "4"})
    assert not (tmp_path).exists() or runstore.list_runs(tmp_path) == []         # refused before a run began
    recorder = SpectraRecorder(model, every=2, runs_dir=tmp_path)
    recorder.step(3)
    with pytest.raises(ValueError, match="step=2 is not allowed: steps only go forward"):
        recorder.step(2)
    with pytest.raises(ValueError, match="metric 'loss'='high' is not allowed"):
        recorder.step(4, {"loss": "high"})
    recorder.close("cancelled", error="stopped by hand")
    assert runstore.load_run(recorder.run_id, tmp_path).status == "cancelled"
    with pytest.raises(ValueError, match="is closed"):
        recorder.step(5)


def test_a_pissa_layer_is_recorded_as_its_rank_2r_update():
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(10, 8)), ["0"], rank=2, alpha=4.0, init="pissa")
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.add_(0.1)
    (row,) = spectra_rows(lora_factors(model), 1)
    assert row["rank"] == 4
    a0, b0 = layer.pissa_init
    delta = layer.scaling * (layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
                             - b0.double() @ a0.double())
    assert row["norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-6)


def test_non_finite_factors_are_recorded_as_nan_not_raised():
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    bad = b.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="hold NaN or inf"):
        rows = spectra_rows({"ok": LoRAFactors(a, b, 1.0), "bad": LoRAFactors(a, bad, 1.0)}, 7)
    assert [r["module"] for r in rows] == ["ok", "bad"]
    assert math.isnan(rows[1]["norm"]) and math.isnan(rows[1]["effective_rank"])
    assert rows[0]["norm"] == pytest.approx(dense_numbers(a, b, 1.0)["norm"], rel=1e-6)


# ---- the history file: read bounded, exported with the run ------------------------------------------------------

def test_a_cut_history_keeps_only_whole_steps(tmp_path):
    rows = [{"step": s, "module": m, "rank": 2, "norm": float(s)} for s in range(20) for m in ("a", "b", "c")]
    path = tmp_path / HISTORY_FILE
    pd.DataFrame(rows).to_csv(path, index=False)
    whole = read_history_csv(path)
    assert len(whole) == 60 and pd.api.types.is_string_dtype(whole["module"])
    cut = read_history_csv(path, max_bytes=200)
    assert len(cut) and (cut.groupby("step").size() == 3).all() and cut["step"].max() == 19
    assert read_history_csv(tmp_path / "missing.csv") is None


def test_the_history_travels_with_an_exported_run(lora_home, tmp_path):
    model = _mlp_with_lora(rank=2)
    with SpectraRecorder(model, every=2) as recorder:
        _steps(model, recorder, 2)
    bundle = runstore.export_run(recorder.run_id, tmp_path / "out")
    with zipfile.ZipFile(bundle) as zf:
        assert HISTORY_FILE in zf.namelist()
    imported = runstore.import_run(bundle, tmp_path / "other")
    pd.testing.assert_frame_equal(imported.spectra_history(), runstore.load_run(recorder.run_id).spectra_history())


# ---- our own trainer records the same history at every evaluation ----------------------------------------------

def test_our_trainer_records_the_history_at_each_evaluation(lora_home):
    from lora_analysis.training import TrainConfig, train

    result = train(TrainConfig(model="mlp-digits", rank=2, alpha=4, steps=6, eval_every=3, pretrain_steps=30))
    run = runstore.load_run(result.run_id)
    history = run.spectra_history()
    assert sorted(history["step"].unique()) == [0, 3, 6]
    assert sorted(history["module"].unique()) == ["fc1", "fc2", "fc3"]
    assert (history.loc[history["step"] == 0, "norm"] == 0).all()
    end = history[history["step"] == 6].set_index("module")
    for name, u in runstore.load_updates(run).items():
        check_row(end.loc[name], u.lora_A, u.lora_B, u.scaling, k=2)
    assert run.metrics["spectra_seconds"] >= 0


# ---- the Spectra page draws it ---------------------------------------------------------------------------------

def test_the_spectra_page_shows_the_history_of_the_trainer_run(trainer_run, monkeypatch, tmp_path):
    import shutil

    from streamlit.testing.v1 import AppTest

    home = tmp_path / "home"
    shutil.copytree(trainer_run["run"].dir, home / "runs" / trainer_run["run"].id)
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("views/spectra.py").run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert "How the spectrum grew during training" in [h.value for h in at.subheader]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (spec,) = [s for s in specs if "grew during training" in s["layout"]["title"]["text"]]
    history = trainer_run["run"].spectra_history()
    modules = at.multiselect(key=f"spectra_history_modules_{trainer_run['run'].id}").value
    assert len(modules) == 6
    top = history[history["module"] == modules[0]].sort_values("step")
    (drawn,) = [d for d in spec["data"] if d["name"] == modules[0] and d["yaxis"] == "y"]
    y = drawn["y"]
    if isinstance(y, dict):          # plotly ships numeric arrays packed
        import base64

        y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]).tolist()
    assert y == pytest.approx(top["effective_rank"].tolist())
    assert any("median effective rank" in i.value for i in at.info)
    # fewer modules chosen: fewer lines
    at.multiselect(key=f"spectra_history_modules_{trainer_run['run'].id}").set_value(modules[:2]).run()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (spec,) = [s for s in specs if "grew during training" in s["layout"]["title"]["text"]]
    assert len(spec["data"]) == 4 and not at.exception


def test_a_callback_run_with_training_loss_only_leaves_rank_alpha_and_merge_clean(lora_home):
    # seen in Chromium: a Trainer run that never evaluated made the Rank & alpha page fail ("needs val_loss"),
    # and the Merge page opened on it and failed to rebuild its model
    from streamlit.testing.v1 import AppTest

    from lora_analysis.analysis.registry import ANALYSES, Inputs
    from tests.test_dashboard_pages import APP

    model = _mlp_with_lora()
    with SpectraRecorder(model, every=3, name="loss only") as recorder:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for step in range(1, 4):
            loss = model(torch.randn(4, 12, generator=torch.Generator().manual_seed(step))).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            recorder.step(step, {"loss": loss.item()})
    entry = ANALYSES.get("rank_alpha")
    assert entry.skip_reason(Inputs.from_runs(runstore.list_runs())) == \
        "no run has a validation metric (val_accuracy, val_perplexity or val_loss)"
    assert "cannot be rebuilt" in ANALYSES.get("merge").skip_reason(Inputs.from_runs(runstore.list_runs()))
    for page in ("rank_alpha", "merge"):       # the merge audit would rebuild the model: it is not offered
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception and not at.error, (page, [e.value for e in at.exception], [e.value for e in at.error])
