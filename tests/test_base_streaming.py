"""``spectra ADAPTER --base MODEL --json`` against real checkpoint layouts (a sharded folder with its index, a BERT
encoder, GPT-2's Conv1D), each module's intruders, amplification and ‖ΔW‖/‖W0‖ checked against a dense float64
computation on the same W0 and ΔW; and the memory bound: a base several times larger than the budget of two
modules' W0 is analysed (CLI JSON and the registry's report entries) without ever exceeding it."""

from __future__ import annotations

import json
import weakref

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from lora_analysis.cli import main

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def _adapter(tmp_path, model, targets, r=4, alpha=8, fan_in_fan_out=False):
    """A PEFT adapter with random A and B for ``targets``; returns its folder and {name: (A, B)} in float64."""
    g = torch.Generator().manual_seed(7)
    state, factors = {}, {}
    for name in targets:
        mod = model.get_submodule(name)
        w = mod.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if type(mod).__name__ == "Conv1D" else tuple(w.shape)
        a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
        state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"] = a, b
        factors[name] = (a.double(), b.double())
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets})}))
    return folder, factors


def _dense(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, k=10, eps=0.5) -> dict:
    """The reference: every number from full float64 SVDs of W0, ΔW and W0 + ΔW."""
    w0 = w0.double()
    delta = scale * (b @ a)
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    uft = torch.linalg.svd(w0 + delta, full_matrices=False).U[:, :k]
    max_cos = (uft.T @ u0).abs().max(dim=1).values.numpy()
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    r = a.shape[0]
    proj = torch.linalg.matrix_norm(u[:, :r].T @ w0 @ vh[:r].T)
    return {"relative_norm": float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w0)),
            "amplification": float(torch.linalg.matrix_norm(delta) / proj),
            "intruders": int((max_cos < eps).sum()), "min_max_cos": float(max_cos.min()),
            "w0_fro": float(torch.linalg.matrix_norm(w0))}


def _check_cli(adapter, base, model, factors, capsys, conv1d=False, scale=2.0):
    assert main(["spectra", str(adapter), "--base", str(base), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == {} and out["intruders"]["k"] == 10 and out["intruders"]["epsilon"] == 0.5
    modules = {m["name"]: m for m in out["modules"]}
    assert set(modules) == set(factors)
    for name, (a, b) in factors.items():
        w = model.get_submodule(name).weight.detach()
        w0 = w.T if conv1d else w                      # Conv1D stores (in, out)
        ref, got = _dense(w0, a, b, scale), modules[name]
        for key in ("relative_norm", "amplification", "min_max_cos", "w0_fro"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), (name, key)
        assert got["intruders"] == ref["intruders"], name
    return out


def test_sharded_llama_folder_with_index(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    index = json.loads((tmp_path / "llama" / "model.safetensors.index.json").read_text())
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert len({index["weight_map"][f"{t}.weight"] for t in targets}) >= 2          # spread over shards
    adapter, factors = _adapter(tmp_path, model, targets)
    out = _check_cli(adapter, tmp_path / "llama", model, factors, capsys)
    assert "model folder" in out["base_read"] and "safetensors file(s)" in out["base_read"]


def test_bert_encoder_base_built_from_its_config(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=50, max_position_embeddings=32)
    model = transformers.BertModel(cfg)
    model.save_pretrained(tmp_path / "bert")
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense",
               "encoder.layer.1.output.dense"]
    adapter, factors = _adapter(tmp_path, model, targets)
    _check_cli(adapter, tmp_path / "bert", model, factors, capsys)


def test_gpt2_conv1d_base_built_from_its_config(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                                 n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    targets = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]
    adapter, factors = _adapter(tmp_path, model, targets, fan_in_fan_out=True)
    _check_cli(adapter, tmp_path / "gpt2", model, factors, capsys, conv1d=True)


def test_a_base_larger_than_the_memory_budget_is_analysed_within_it(tmp_path, capsys, monkeypatch):
    """Eight adapted 48x48 modules in a sharded base; the budget is two modules' W0 (the one analysed and the next
    being read). Every W0 read is watched (weakref): the bytes alive at once never exceed the budget, through the
    CLI's JSON pass and through the registry's amplification and intruders entries (the --html report)."""
    from lora_analysis.store import base_weights

    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i}.proj" for i in range(8)]
    base = tmp_path / "base"
    base.mkdir()
    weight_map = {}
    for i, name in enumerate(names):            # one shard per module
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({f"{name}.weight": torch.randn(48, 48, generator=g)}, str(base / shard))
        weight_map[f"{name}.weight"] = shard
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    module_bytes = 48 * 48 * 4
    budget = 2 * module_bytes
    state = {}
    for name in names:
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, 48, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(48, 4, generator=g)
    (tmp_path / "ad").mkdir()
    save_file(state, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                     "target_modules": ["proj"]}))
    live: dict[int, int] = {}
    peak, reads = [0], [0]
    read_one = base_weights._read_one

    def watched(plan, shapes):
        w0 = read_one(plan, shapes)
        reads[0] += 1
        live[id(w0)] = w0.numel() * w0.element_size()
        weakref.finalize(w0, live.pop, id(w0), None)
        peak[0] = max(peak[0], sum(live.values()))
        return w0

    monkeypatch.setattr(base_weights, "_read_one", watched)
    assert len(names) * module_bytes >= 4 * budget                      # the base is larger than the budget
    report = tmp_path / "report.html"
    assert main(["spectra", str(tmp_path / "ad"), "--base", str(base), "--json", "--html", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["modules"]) == len(names) and report.is_file()
    assert reads[0] >= 3 * len(names)           # the JSON pass, then the report's amplification and intruders
    assert 0 < peak[0] <= budget, (peak[0], budget)
    # listing every update instead would hold them all: the watch can tell
    from lora_analysis.analysis.sources import load_updates

    peak[0] = 0
    _, held = load_updates(tmp_path / "ad", base)
    assert peak[0] == len(names) * module_bytes
    del held


def test_the_report_entries_on_a_streamed_adapter_equal_those_on_loaded_updates(tmp_path):
    """The registry's amplification and intruders on StreamedUpdates (W0 read per module) give the same frames as
    on updates loaded all at once."""
    from lora_analysis.analysis import registry
    from lora_analysis.analysis.sources import StreamedUpdates, load_updates

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                                           num_attention_heads=4, vocab_size=50,
                                                           max_position_embeddings=32))
    model.save_pretrained(tmp_path / "bert")
    adapter, _ = _adapter(tmp_path, model, ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"])
    streamed = registry.Inputs.from_updates({"ad": StreamedUpdates(adapter, tmp_path / "bert")})
    loaded = registry.Inputs.from_updates({"ad": load_updates(adapter, tmp_path / "bert")[1]})
    assert streamed.has_w0("ad") and streamed.kind("ad") == "lora" and streamed.rank("ad") == 4
    for name in ("amplification", "intruders", "spectra"):
        a, b = registry.get(name).run(streamed).value, registry.get(name).run(loaded).value
        frames = (lambda v: [v] if isinstance(v, pd.DataFrame) else [v.modules, v.sweep])
        assert len(frames(a)[0]) == 2
        for left, right in zip(frames(a), frames(b)):
            pd.testing.assert_frame_equal(left, right)
