"""W0 streamed from checkpoint files: sharded folders, an encoder, GPT-2's Conv1D, the local hub cache, a single
file; key matching across prefixes, explained when it fails; one module's W0 at a time."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import save_file

from lora_analysis.analysis.sources import iter_updates, load_updates
from lora_analysis.store.base_weights import iter_base_weights, load_base_weights, open_base

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def _llama(tmp_path, shard_size=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(tmp_path / "llama", **kwargs)
    return model, tmp_path / "llama"


def _adapter(tmp_path, model, targets, r=4, dtype=torch.float32, fan_in_fan_out=False, seed=1):
    """A PEFT-format adapter for ``model``'s modules ``targets`` with random A and B (keys base_model.model.*)."""
    g = torch.Generator().manual_seed(seed)
    state, shapes = {}, {}
    for name in targets:
        mod = model.get_submodule(name)
        w = mod.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if type(mod).__name__ == "Conv1D" else tuple(w.shape)
        shapes[name] = (out_f, in_f)
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g).to(dtype)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g).to(dtype)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted({t.rsplit(".", 1)[-1]
                                                                                          for t in targets}),
              "fan_in_fan_out": fan_in_fan_out, "base_model_name_or_path": None, "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, shapes


def test_sharded_llama_folder_streams_only_the_adapted_modules(tmp_path):
    model, folder = _llama(tmp_path, shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3        # really sharded
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    source = open_base(folder)
    assert source.kind == "folder" and "safetensors file(s)" in source.describe()
    got = dict(iter_base_weights(source, names))
    assert set(got) == set(names)
    for name in names:
        assert torch.equal(got[name], model.get_submodule(name).weight.detach())
    # PEFT-prefixed names and names without "model." match the same tensors
    peft = load_base_weights(folder, ["base_model.model.model.layers.0.self_attn.q_proj"])
    bare = load_base_weights(folder, ["layers.0.self_attn.q_proj"])
    assert torch.equal(next(iter(peft.values())), got[names[0]])
    assert torch.equal(next(iter(bare.values())), got[names[0]])


def test_a_missing_module_names_itself_and_the_nearest_keys(tmp_path):
    _, folder = _llama(tmp_path, shard_size="20KB")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.qproj' does not exist.*nearest keys: "
                                         r"model.layers.0.self_attn.q_proj.weight"):
        list(iter_base_weights(folder, ["model.layers.0.self_attn.qproj"]))
    (folder / next(iter(sorted(folder.glob("model-*.safetensors"))))).unlink()
    with pytest.raises(ValueError, match="lists shard"):
        open_base(folder)


def test_bert_encoder_reads_from_its_files_without_a_causal_lm(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                  vocab_size=50, max_position_embeddings=16)
    bert = transformers.BertModel(cfg)
    bert.save_pretrained(tmp_path / "bert")
    names = {"encoder.layer.0.attention.self.query": (32, 32), "encoder.layer.0.intermediate.dense": (48, 32)}
    got = load_base_weights(tmp_path / "bert", names)
    for name in names:
        assert torch.equal(got[name], bert.get_submodule(name).weight.detach())
    # a BertForSequenceClassification checkpoint names the same layers "bert.encoder...": the adapter's
    # "bert.encoder..." name matches a bare "encoder..." checkpoint up to the leading part
    got = load_base_weights(tmp_path / "bert", {"bert.encoder.layer.0.attention.self.query": (32, 32)})
    assert torch.equal(next(iter(got.values())), bert.encoder.layer[0].attention.self.query.weight.detach())


def test_gpt2_conv1d_is_oriented_from_its_files_against_a_dense_float64_delta(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    gpt2.save_pretrained(tmp_path / "gpt2")
    targets = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    adapter, shapes = _adapter(tmp_path, gpt2, targets, fan_in_fan_out=True)

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was built: W0 should come from the files alone")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    updates = {u.name: u for u in iter_updates(adapter, tmp_path / "gpt2")}
    assert set(updates) == set(targets)
    for name in targets:
        conv = gpt2.get_submodule(name)
        assert tuple(updates[name].w0.shape) == shapes[name]
        assert torch.equal(updates[name].w0, conv.weight.detach().T)     # Conv1D (in, out) → (out, in), square too
        u = updates[name]
        dense = u.w0.double() + u.scaling * u.lora_B.double() @ u.lora_A.double()
        expected = conv.weight.detach().double().T + 2.0 * u.lora_B.double() @ u.lora_A.double()
        torch.testing.assert_close(dense, expected, rtol=0, atol=1e-12)


def test_hub_id_is_read_from_the_local_cache_with_its_revision(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    model, folder = _llama(tmp_path)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--tiny-llama"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((folder / f).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = open_base("someone/tiny-llama")
    assert source.kind == "hub" and source.revision == sha and sha in source.describe()
    name = "model.layers.1.self_attn.v_proj"
    got = load_base_weights(source, [name])[name]
    assert torch.equal(got, model.get_submodule(name).weight.detach())
    with pytest.raises(ValueError, match="neither in the local Hugging Face cache"):
        open_base("someone/not-cached")


def test_single_file_bf16_base_and_bf16_adapter_against_float64(tmp_path):
    model, folder = _llama(tmp_path)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj"]
    state = {f"{n}.weight": model.get_submodule(n).weight.detach().to(torch.bfloat16) for n in names}
    save_file(state, str(tmp_path / "w.safetensors"))
    adapter, _ = _adapter(tmp_path, model, names, dtype=torch.bfloat16)
    _, updates = load_updates(adapter, tmp_path / "w.safetensors")
    for n in names:
        assert updates[n].w0.dtype == torch.bfloat16
        assert torch.equal(updates[n].w0.double(), state[f"{n}.weight"].double())


def test_streaming_holds_one_w0_at_a_time(tmp_path, monkeypatch):
    """When the next module's W0 is read, no earlier W0 is still alive: the reader, the update generator and
    the analyses each drop theirs first. Listing the updates instead keeps them all (the watch can tell)."""
    from lora_analysis.analysis import against_base, amplification, intruders
    from lora_analysis.store import base_weights

    model, folder = _llama(tmp_path, shard_size="20KB")
    targets = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    adapter, _ = _adapter(tmp_path, model, targets)
    alive: list[weakref.ref] = []
    before_read: list[int] = []
    read_one = base_weights._read_one

    def watched(plan, shapes):      # refcounts free a tensor at once; garbage in a cycle would count as alive
        before_read.append(sum(r() is not None for r in alive))
        w0 = read_one(plan, shapes)
        alive.append(weakref.ref(w0))
        return w0

    monkeypatch.setattr(base_weights, "_read_one", watched)
    for analyse in (intruders.intruders_frame, amplification.amplification_frame,
                    lambda ups: against_base.analyse_against_base(ups).intruders):
        alive.clear(), before_read.clear()
        frame = analyse(iter_updates(adapter, folder))
        assert len(frame) == len(targets) and before_read == [0] * len(targets), analyse
    alive.clear(), before_read.clear()
    held = list(iter_updates(adapter, folder))
    assert before_read == [0, 1, 2, 3] and len(held) == len(targets)


def test_a_wrong_base_fails_from_the_headers_before_any_tensor_is_read(tmp_path, monkeypatch):
    from lora_analysis.store import base_weights

    _, folder = _llama(tmp_path, shard_size="20KB")

    def no_read(*args):
        raise AssertionError("a tensor was read before every shape was checked")

    monkeypatch.setattr(base_weights, "_read_one", no_read)
    shapes = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.up_proj": (48, 33)}
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj' has shape \(48, 32\).*\(48, 33\)"):
        next(iter_base_weights(folder, shapes))


def test_a_tied_lm_head_is_read_from_the_input_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in open_base(tmp_path / "tied").files        # stored once, as the embedding
    got = load_base_weights(tmp_path / "tied", {"lm_head": (64, 32)})["lm_head"]
    assert torch.equal(got, model.lm_head.weight.detach())


def test_a_base_folder_holding_only_a_pickle_is_refused_not_unpickled(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    transformers.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                             num_key_value_heads=1, vocab_size=16).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(ValueError) as info:
        list(iter_base_weights(folder, ["model.layers.0.self_attn.q_proj.weight"]))
    message = str(info.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "never loaded" in message
