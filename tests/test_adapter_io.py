"""PEFT-format adapters both ways, proven with PEFT itself, on a custom model, a tiny GPT-2 and a tiny Llama."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_analysis import apply_lora, load_adapter, lora_layers, merge_and_unload, read_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(10, 32), nn.Linear(32, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp():
    torch.manual_seed(0)
    return MLP()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def randomise(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(scale * torch.randn(layer.lora_B.weight.shape, generator=g))
    return model


TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
FEATURES = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))

CASES = {
    "mlp": (mlp, FEATURES, dict(targets=["fc1", "fc2"], rank=4, alpha=8, modules_to_save=["head"])),
    "mlp-rslora-patterns": (mlp, FEATURES, dict(targets=["fc1", "fc2"], rank=4, alpha=8, rslora=True,
                                                rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3.0})),
    "gpt2-conv1d": (tiny_gpt2, TOKENS, dict(targets=["c_attn", "c_proj"], rank=4, alpha=16)),
    "llama": (tiny_llama, TOKENS, dict(targets=["q_proj", "v_proj"], rank=4, alpha=8,
                                       rank_pattern={"model.layers.1.self_attn.q_proj": 8},
                                       alpha_pattern={"v_proj": 2.0})),
    "llama-all-linear-rslora": (tiny_llama, TOKENS, dict(targets="all-linear", rank=2, alpha=4, rslora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, x, kwargs = CASES[case]
    ours = randomise(apply_lora(build(), **kwargs))
    if "modules_to_save" in kwargs:
        with torch.no_grad():
            ours.head.weight.mul_(-1.5)       # a trained head must travel with the adapter
    ours.eval()
    assert not torch.allclose(outputs(ours, x), outputs(build(), x), atol=1e-4)   # the adapter does something
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(outputs(theirs, x), outputs(ours, x), atol=1e-5, rtol=1e-5)
    # and the merged weights agree with PEFT's merge_and_unload
    peft_merged = dict(theirs.merge_and_unload().named_parameters())
    our_merged = dict(merge_and_unload(copy.deepcopy(ours)).named_parameters())
    assert peft_merged.keys() == our_merged.keys()
    for name in our_merged:
        torch.testing.assert_close(our_merged[name], peft_merged[name], atol=1e-6, rtol=1e-6, msg=name)


def peft_config(kwargs):
    targets = kwargs["targets"]
    return LoraConfig(target_modules=targets, r=kwargs["rank"], lora_alpha=kwargs["alpha"],
                      use_rslora=kwargs.get("rslora", False), rank_pattern=kwargs.get("rank_pattern", {}),
                      alpha_pattern=kwargs.get("alpha_pattern", {}), modules_to_save=kwargs.get("modules_to_save"),
                      init_lora_weights=False)        # random non-zero B, so the test is not trivial


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours_with_same_outputs(case, tmp_path):
    build, x, kwargs = CASES[case]
    torch.manual_seed(5)
    theirs = get_peft_model(build(), peft_config(kwargs)).eval()
    reference = outputs(theirs, x)
    assert not torch.allclose(reference, outputs(build(), x), atol=1e-4)   # the adapter does something
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build(), tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(ours, x), reference, atol=1e-5, rtol=1e-5)
    peft_merged = dict(theirs.merge_and_unload().named_parameters())
    for name, p in merge_and_unload(ours).named_parameters():
        torch.testing.assert_close(p, peft_merged[name], atol=1e-6, rtol=1e-6, msg=name)


def test_saved_files_are_exactly_peft_format(tmp_path):
    model = randomise(apply_lora(tiny_gpt2(), targets=["c_attn"], rank=4, alpha=8))
    save_adapter(model, tmp_path, base_model_name_or_path="gpt2", task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern",
                "alpha_pattern", "fan_in_fan_out", "bias", "modules_to_save", "base_model_name_or_path",
                "task_type"):
        assert key in config, key
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn"] and config["base_model_name_or_path"] == "gpt2"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert len(tensors) == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_pissa_adapter_is_saved_as_equivalent_plain_lora(tmp_path):
    base = mlp()
    model = apply_lora(copy.deepcopy(base), targets=["fc1", "fc2"], rank=3, alpha=6, init="pissa")
    with torch.no_grad():              # pretend training moved the factors
        for layer in lora_layers(model).values():
            layer.lora_B.weight.mul_(1.3)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 6
    loaded = load_adapter(copy.deepcopy(base), tmp_path)           # against the ORIGINAL weights
    torch.testing.assert_close(outputs(loaded, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(theirs, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)


def test_read_adapter_without_base(tmp_path):
    model = randomise(apply_lora(mlp(), targets=["fc1", "fc2"], rank=4, alpha=8, rank_pattern={"fc2": 2}))
    save_adapter(model, tmp_path)
    adapter = read_adapter(tmp_path)
    assert set(adapter.modules) == {"fc1", "fc2"}
    fc2 = adapter.modules["fc2"]
    assert fc2.rank == 2 and fc2.shape == (24, 32) and fc2.scaling == 4.0
    torch.testing.assert_close(fc2.scaling * fc2.lora_B @ fc2.lora_A, lora_layers(model)["fc2"].delta_weight())


# ---- bad input: clear errors, model unchanged ----------------------------------------------------

def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    assert not lora_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def saved(tmp_path):
    model = randomise(apply_lora(mlp(), targets=["fc1", "fc2"], rank=4, alpha=8))
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(mlp(), tmp_path / "nowhere")


def test_missing_config(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(mlp(), saved)


def test_corrupt_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(mlp(), saved)


def test_missing_safetensors(saved):
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        load_adapter(mlp(), saved)


def test_corrupt_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    model = mlp()
    before = state(model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_pickle_bin_is_refused_not_unpickled(saved):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"this would be a pickle")
    with pytest.raises(ValueError, match="pickle file.*convert it to safetensors"):
        load_adapter(mlp(), saved)


def test_shape_mismatch_names_module_and_both_shapes(saved):
    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(32, 30)
            self.head = nn.Linear(30, 3)

    model = Wider()
    before = state(model)
    with pytest.raises(ValueError, match=r"module 'fc2'.*lora_B \(24, 4\).*30x32 layer needs \(4, 32\) and \(30, 4\)"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_adapter_for_another_model_is_refused(saved):
    model = tiny_llama()
    with pytest.raises(ValueError, match="adapter module 'fc1' does not exist in the model"):
        load_adapter(model, saved)
    assert not lora_layers(model)


def test_rank_in_config_disagreeing_with_weights(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights have rank 4 but the config says r=8"):
        load_adapter(mlp(), saved)


def test_missing_b_factor(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.fc1.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="module 'fc1' has lora_A but no lora_B"):
        load_adapter(mlp(), saved)


def test_dora_and_other_peft_types_are_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(mlp(), saved)
    (saved / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        load_adapter(mlp(), saved)


def test_saving_a_merged_model_is_refused(tmp_path):
    model = apply_lora(mlp(), targets=["fc1"], rank=2)
    lora_layers(model)["fc1"].merge()
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(model, tmp_path)


# ---- rank above min(in, out): legal in a saved adapter (defect 1) ------------------------------------

def test_peft_adapter_with_rank_above_the_module_size_loads(tmp_path):
    # r=16 is above min(in, out) of fc1 (10) and head (3): PEFT creates and loads such adapters
    torch.manual_seed(5)
    theirs = get_peft_model(mlp(), LoraConfig(target_modules=["fc1", "fc2", "head"], r=16, lora_alpha=8,
                                              init_lora_weights=False)).eval()
    reference = outputs(theirs, FEATURES)
    theirs.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.modules["head"].rank == 16 and adapter.modules["head"].shape == (3, 24)
    ours = load_adapter(mlp(), tmp_path).eval()
    assert lora_layers(ours)["head"].rank == 16
    torch.testing.assert_close(outputs(ours, FEATURES), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank,cap_rank", [(2, False), (6, True)])
def test_pissa_round_trip_where_twice_the_rank_exceeds_the_module(tmp_path, rank, cap_rank):
    # saved as rank 2r: head (3 outputs) gets 4 (r=2) or 6 (r=6 capped at 3); fc1 gets 12 > 10 at r=6
    base = mlp()
    model = apply_lora(copy.deepcopy(base), targets=["fc1", "fc2", "head"], rank=rank, alpha=2.0 * rank,
                       init="pissa", cap_rank=cap_rank)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.mul_(1.3)
    save_adapter(model, tmp_path)
    assert read_adapter(tmp_path).modules["head"].rank == 2 * min(rank, 3) > 3
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(loaded, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(theirs, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)


# ---- pattern keys match exactly the module they name (defect 3) --------------------------------------

class Nested(nn.Module):
    """Two modules that PEFT's suffix rule confuses: ``fc`` and ``sub.fc``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 4)
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(10, 12)

    def forward(self, x):
        return torch.cat([self.fc(x), self.sub.fc(x)], dim=-1)


def peft_ranks(model):
    return {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_cap_written_for_fc_does_not_cap_sub_fc_in_peft(tmp_path):
    model = randomise(apply_lora(Nested(), targets=["fc"], rank=6, alpha=12.0, cap_rank=True)).eval()
    assert {n: m.rank for n, m in lora_layers(model).items()} == {"fc": 4, "sub.fc": 6}
    save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(Nested(), tmp_path).eval()
    assert peft_ranks(theirs) == {"fc": 4, "sub.fc": 6}
    torch.testing.assert_close(outputs(theirs, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)
    adapter = read_adapter(tmp_path)
    assert {n: m.rank for n, m in adapter.modules.items()} == {"fc": 4, "sub.fc": 6}
    assert {n: m.scaling for n, m in adapter.modules.items()} == {"fc": 2.0, "sub.fc": 2.0}
    ours = load_adapter(Nested(), tmp_path).eval()
    torch.testing.assert_close(outputs(ours, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)


def test_adapter_with_plain_name_keys_from_an_older_version_still_loads(tmp_path):
    model = randomise(apply_lora(Nested(), targets=["fc"], rank=6, alpha=12.0, cap_rank=True)).eval()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"], config["alpha_pattern"] = {"fc": 4}, {"fc": 8.0}    # as old reduce_rank wrote
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    adapter = read_adapter(tmp_path)
    assert {n: (m.rank, m.alpha) for n, m in adapter.modules.items()} == {"fc": (4, 8.0), "sub.fc": (6, 12.0)}
    ours = load_adapter(Nested(), tmp_path).eval()
    torch.testing.assert_close(outputs(ours, FEATURES), outputs(model, FEATURES), atol=1e-5, rtol=1e-5)


def test_user_suffix_pattern_is_saved_so_peft_builds_the_same_ranks(tmp_path):
    # {"fc": 3} is a suffix pattern (PEFT's rule): it sets both fc and sub.fc; the file keeps that meaning
    model = randomise(apply_lora(Nested(), targets=["fc"], rank=2, alpha=4.0, rank_pattern={"fc": 3}))
    assert {n: m.rank for n, m in lora_layers(model).items()} == {"fc": 3, "sub.fc": 3}
    save_adapter(model, tmp_path)
    assert peft_ranks(PeftModel.from_pretrained(Nested(), tmp_path)) == {"fc": 3, "sub.fc": 3}


def test_peft_adapter_with_anchored_and_escaped_pattern_keys_loads_with_the_same_outputs(tmp_path):
    # the key forms PEFT >= 0.15 documents for "this module only": '^' + full name, escaped dots
    config = LoraConfig(target_modules=["fc"], r=4, lora_alpha=8, rank_pattern={"^fc": 2},
                        alpha_pattern={r"sub\.fc": 2.0}, init_lora_weights=False)
    theirs = get_peft_model(Nested(), config).eval()
    theirs.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    assert {n: (m.rank, m.alpha) for n, m in adapter.modules.items()} == {"fc": (2, 8.0), "sub.fc": (4, 2.0)}
    ours = load_adapter(Nested(), tmp_path).eval()
    torch.testing.assert_close(outputs(ours, FEATURES), outputs(theirs, FEATURES), atol=1e-5, rtol=1e-5)


def test_all_linear_in_any_case_is_saved_as_the_modules_it_selected(tmp_path):
    model = apply_lora(mlp(), targets="ALL-Linear", rank=2)
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(written) == sorted(lora_layers(model))        # a list PEFT selects exactly, not its own all-linear
