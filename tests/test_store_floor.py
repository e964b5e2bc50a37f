"""The storage floor imports nothing above it, and reading a run never trains, downloads or rebuilds a model:
W0 comes from the run's stored weights or from a source the caller names (a file, a model folder, a hub id
at the revision the run recorded)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_analysis import runstore
from lora_analysis.lora import apply_lora, save_adapter

ROOT = Path(__file__).resolve().parents[1]
UPWARD = ("lora_analysis.training", "lora_analysis.analysis", "lora_analysis.plots", "lora_analysis.report",
          "lora_analysis.run_report", "dashboard", "transformers", "streamlit")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)


def _record(method: str, **task) -> dict:
    """run.json as the store writes it (format 1), finished."""
    return {"format_version": 1, "id": f"20250101-000000-{method}0000", "name": method, "sweep_id": None,
            "status": "completed", "created": 1.0, "heartbeat": 2.0, "finished": 2.0, "pid": 1, "host": "h",
            "config": {"model": "mlp-digits", "method": method, "rank": 2, "alpha": 4.0},
            "task": {"model": "mlp-digits", **task}, "environment": {}, "metrics": {}, "error": None}


def _lora_run(root: Path, keep_w0: bool, **task) -> tuple[Path, nn.Module]:
    """A completed LoRA run of ``Tiny`` (mlp-digits in its config, a built-in that would need pretraining)."""
    torch.manual_seed(0)
    base = Tiny()
    model = apply_lora(copy.deepcopy(base), ["fc1", "fc2"], rank=2, alpha=4.0)
    for layer in (model.fc1, model.fc2):
        nn.init.normal_(layer.lora_B.weight)
    directory = root / _record("lora")["id"]
    directory.mkdir(parents=True)
    save_adapter(model, directory / runstore.ADAPTER_DIR)
    (directory / runstore.RUN_FILE).write_text(json.dumps(_record("lora", **task)))
    if keep_w0:
        save_file({n: base.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")},
                  str(directory / runstore.BASE_WEIGHTS))
    return directory, base


def _full_run(root: Path, keep_w0: bool) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    base = Tiny()
    directory = root / _record("full")["id"]
    directory.mkdir(parents=True)
    save_file({n: base.get_submodule(n).weight.detach() + 1.0 for n in ("fc1", "fc2")},
              str(directory / runstore.FULL_WEIGHTS))
    if keep_w0:
        save_file({n: base.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")},
                  str(directory / runstore.BASE_WEIGHTS))
    (directory / runstore.RUN_FILE).write_text(json.dumps(_record("full")))
    return directory, base


def test_the_store_imports_nothing_above_it_and_reading_a_run_never_trains(tmp_path):
    """In a fresh interpreter, with the package's own ``__init__`` (which gathers the whole library) kept
    out of the way, importing the store and reading a run without stored W0 loads no upper floor."""
    run_dir, _ = _lora_run(tmp_path / "runs", keep_w0=False)
    code = textwrap.dedent(f"""
        import sys, types
        pkg = types.ModuleType("lora_analysis")
        pkg.__path__ = [{str(ROOT / "lora_analysis")!r}]
        sys.modules["lora_analysis"] = pkg
        import lora_analysis.store, lora_analysis.store.files, lora_analysis.store.liveness
        import lora_analysis.store.runs, lora_analysis.store.bundles, lora_analysis.store.base_weights
        import lora_analysis.runstore, lora_analysis.jobs
        updates = lora_analysis.runstore.load_updates({str(run_dir)!r})
        assert sorted(updates) == ["fc1", "fc2"] and all(u.w0 is None for u in updates.values()), updates
        upward = {UPWARD!r}
        print("\\n".join(sorted(m for m in sys.modules if m.startswith(upward))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "LORA_ANALYSIS_HOME": str(tmp_path / "home"),
                               "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [], f"the store imported upper floors: {proc.stdout.split()}"


def test_store_package_init_imports_nothing():
    import ast

    tree = ast.parse((ROOT / "lora_analysis" / "store" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_lora_run_without_w0_has_no_w0_and_a_named_base_gives_it(tmp_path, monkeypatch):
    import lora_analysis.training.models as models
    monkeypatch.setattr(models, "prepare_task", lambda *a, **k: pytest.fail("reading a run called prepare_task"))
    run_dir, base = _lora_run(tmp_path / "runs", keep_w0=False)
    updates = runstore.load_updates(run_dir)
    assert all(u.w0 is None for u in updates.values())
    assert updates["fc1"].lora_A.shape == (2, 6) and updates["fc1"].lora_B.shape == (5, 2)
    weights = tmp_path / "base.safetensors"
    save_file({f"{n}.weight": base.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}, str(weights))
    named = runstore.load_updates(run_dir, base=weights)
    for n in ("fc1", "fc2"):
        assert torch.equal(named[n].w0, base.get_submodule(n).weight.detach())
        assert named[n].w0.dtype == torch.float32


def test_stored_w0_wins_and_is_float32(tmp_path):
    run_dir, base = _lora_run(tmp_path / "runs", keep_w0=True)
    updates = runstore.load_updates(run_dir)
    assert torch.equal(updates["fc2"].w0, base.fc2.weight.detach()) and updates["fc2"].w0.dtype == torch.float32


def test_full_run_without_w0_says_how_to_give_base(tmp_path, monkeypatch):
    import lora_analysis.training.models as models
    monkeypatch.setattr(models, "prepare_task", lambda *a, **k: pytest.fail("reading a run called prepare_task"))
    run_dir, base = _full_run(tmp_path / "runs", keep_w0=False)
    with pytest.raises(ValueError, match=r"kept no base weights.*base="):
        runstore.load_updates(run_dir)
    weights = tmp_path / "w0.safetensors"
    save_file({f"{n}.weight": base.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}, str(weights))
    updates = runstore.load_updates(run_dir, base=weights)
    assert torch.allclose(updates["fc1"].dense_delta(), torch.ones(5, 6))


def _tiny_llama(path: Path, **save) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, **save)
    return model


@pytest.mark.parametrize("sharded", [False, True])
def test_a_model_folder_is_read_tensor_by_tensor_without_transformers(tmp_path, monkeypatch, sharded):
    from lora_analysis.store import base_weights

    model = _tiny_llama(tmp_path / "llama", **({"max_shard_size": "2KB"} if sharded else {}))
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file() == sharded
    monkeypatch.setattr(base_weights, "_from_transformers",
                        lambda *a, **k: pytest.fail("the whole model was loaded for a few tensors"))
    names = {"model.layers.1.self_attn.q_proj": (16, 16), "model.layers.0.mlp.up_proj": (32, 16)}
    got = base_weights.load_base_weights(tmp_path / "llama", names)
    for name in names:
        assert torch.equal(got[name], model.get_submodule(name).weight.detach())


def test_a_conv1d_model_folder_with_square_weights_falls_back_to_transformers(tmp_path):
    from lora_analysis.store import base_weights

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                                n_positions=16))
    gpt2.save_pretrained(tmp_path / "gpt2")
    name = "transformer.h.0.attn.c_proj"                  # Conv1D, square: its shape cannot tell (in, out)
    got = base_weights.load_base_weights(tmp_path / "gpt2", {name: (16, 16)})
    assert torch.equal(got[name], gpt2.get_submodule(name).weight.detach().T)
    # with PEFT's fan_in_fan_out (an adapter of a Conv1D model records it) the tensor is read directly
    direct = base_weights.load_base_weights(tmp_path / "gpt2", {name: (16, 16)}, fan_in_fan_out=True)
    assert torch.equal(direct[name], got[name])


def test_a_hub_id_is_fetched_at_the_revision_the_run_recorded(tmp_path, monkeypatch):
    import huggingface_hub

    model = _tiny_llama(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        assert "config.json" in allow_patterns and not any(p.endswith(".bin") for p in allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    save_file({n: model.get_submodule(n).weight.detach() + 1.0 for n in names}, str(run_dir / runstore.FULL_WEIGHTS))
    record = _record("full", base_model_name_or_path="org/tiny-llama", base_revision="0123abcd" * 5)
    (run_dir / runstore.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="base='org/tiny-llama'"):      # nothing fetched unless asked
        runstore.load_updates(run_dir)
    assert calls == []
    run = runstore.load_run(run_dir)
    updates = runstore.load_updates(run, base=runstore.recorded_base(run))
    assert calls == [("org/tiny-llama", "0123abcd" * 5)]
    for n in names:
        assert torch.equal(updates[n].w0, model.get_submodule(n).weight.detach())
    # another hub id than the run's base: no recorded revision applies to it
    runstore.load_updates(run_dir, base="org/other")
    assert calls[-1] == ("org/other", None)
