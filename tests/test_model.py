"""apply_lora / merge / unmerge / merge_and_unload on whole models; bad input leaves the model unchanged."""

import copy

import pytest
import torch
from torch import nn

from lora_analysis import apply_lora, count_parameters, lora_layers, merge, merge_and_unload, unmerge
from lora_analysis.lora import LoRALinear, lora_report_frame


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o_proj(att @ self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.fc_in, self.fc_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.fc_out(torch.relu(self.fc_in(x)))


class TinyNet(nn.Module):
    def __init__(self, d=16, n_layers=2, n_classes=5):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


X = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(42))


def test_suffix_targets_pick_exact_modules_and_report():
    model = apply_lora(tiny(), targets=["q_proj", "v_proj"], rank=4, alpha=8)
    assert sorted(lora_layers(model)) == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                                          "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    report = lora_report_frame(model)
    assert list(report["lora_params"]) == [4 * 32] * 4
    assert list(report["full_params"]) == [256] * 4
    assert set(report["scaling"]) == {2.0}


def test_regex_targets_fullmatch_like_peft():
    model = apply_lora(tiny(), targets=r"blocks\.1\..*_proj", rank=2)
    assert sorted(lora_layers(model)) == [f"blocks.1.attn.{n}_proj" for n in "koqv"]


def test_all_linear_excludes_modules_to_save():
    model = apply_lora(tiny(), targets="all-linear", rank=2, modules_to_save=["head"])
    names = set(lora_layers(model))
    assert "head" not in names and "embed" in names and len(names) == 1 + 2 * 6
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert isinstance(model.head, nn.Linear)


def test_all_linear_excludes_lm_head_of_hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = apply_lora(transformers.GPT2LMHeadModel(cfg), targets="all-linear", rank=2)
    names = set(lora_layers(model))
    assert "lm_head" not in names
    assert {n.rpartition(".")[2] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_freezes_base_trains_only_lora():
    model = apply_lora(tiny(), targets=["q_proj", "v_proj"], rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    count = count_parameters(model)
    assert count.trainable == 4 * 4 * 32
    assert count.total == sum(p.numel() for p in tiny().parameters()) + count.trainable


def test_rank_and_alpha_patterns():
    model = apply_lora(tiny(), targets=["q_proj", "v_proj"], rank=4, alpha=8,
                       rank_pattern={"blocks.1.attn.q_proj": 2}, alpha_pattern={"v_proj": 32})
    layers = lora_layers(model)
    assert layers["blocks.1.attn.q_proj"].rank == 2 and layers["blocks.1.attn.q_proj"].scaling == 4.0
    assert layers["blocks.0.attn.q_proj"].rank == 4 and layers["blocks.0.attn.q_proj"].scaling == 2.0
    assert layers["blocks.0.attn.v_proj"].scaling == 8.0


def test_merge_unmerge_merge_and_unload_keep_outputs():
    model = apply_lora(tiny(), targets="all-linear", rank=4, alpha=8, modules_to_save=["head"])
    randomise_lora(model)
    model.eval()
    y = model(X).detach()
    merge(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in tiny().parameters())
    torch.testing.assert_close(plain(X), y, atol=1e-5, rtol=1e-5)


def test_adapted_output_differs_from_base_after_training_step():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), targets=["q_proj", "v_proj"], rank=2, alpha=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(X).pow(2).mean()
    loss.backward()
    opt.step()
    before = base.state_dict()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for name, p0 in before.items():
        assert torch.equal(p0, after[name]), name        # base weights bit-identical
    assert not torch.allclose(model(X), base(X))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("kwargs,match", [
    ({"targets": ["nope"]}, r"matched no Linear/Conv1D module\. Modules that exist: embed, blocks\.0\.attn\.q_proj"),
    ({"targets": ["norm"]}, "'blocks.0.norm' is a LayerNorm, not a Linear"),
    ({"targets": ["q_proj"], "rank": 0}, "rank=0"),
    ({"targets": ["q_proj"], "rank": 17}, r"rank=17 is not allowed for module 'blocks.0.attn.q_proj' \(16x16\)"),
    ({"targets": ["q_proj"], "alpha": float("inf")}, "alpha=inf"),
    ({"targets": ["q_proj"], "dropout": 1.5}, "dropout=1.5"),
    ({"targets": ["q_proj"], "rank_pattern": {"blocks.1.attn.q_proj": 64}}, "rank=64"),
    ({"targets": ["q_proj"], "modules_to_save": ["classifier"]}, "modules_to_save=\\['classifier'\\]"),
    ({"targets": []}, "targets=\\[\\] is not allowed"),
])
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, match):
    model = tiny()
    before, types = snapshot(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **kwargs)
    after, types_after = snapshot(model)
    assert types == types_after and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads == [p.requires_grad for p in model.parameters()]


def test_applying_twice_is_refused():
    model = apply_lora(tiny(), targets=["q_proj"], rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=["v_proj"], rank=2)


def test_cap_rank_caps_small_modules_and_keeps_their_scaling():
    model = apply_lora(tiny(), targets=["embed", "head"], rank=12, alpha=24, cap_rank=True)
    report = lora_report_frame(model).set_index("name")
    assert report.loc["embed", "rank"] == 8 and report.loc["head", "rank"] == 5     # min(out, in) of 16x8, 5x16
    assert set(report["scaling"]) == {2.0}                                          # α/r of the uncapped setting
    assert model.lora_config.cap_rank is True


def test_generator_gives_the_same_factors_whatever_the_global_rng():
    def adapted(global_seed):
        torch.manual_seed(global_seed)
        model = apply_lora(tiny(), targets=["q_proj", "v_proj"], rank=4, dropout=0.1,
                           generator=torch.Generator().manual_seed(7))
        return {n: m.lora_A.weight.detach().clone() for n, m in lora_layers(model).items()}

    first, second = adapted(0), adapted(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not torch.equal(first["blocks.0.attn.q_proj"], first["blocks.1.attn.q_proj"])   # one stream, drawn in turn
