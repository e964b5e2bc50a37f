"""Rank advice as a PEFT config, and rank reduction of a trained adapter (exact at full rank, loadable by
our loader and by PEFT)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_analysis import apply_lora, load_adapter, read_adapter, save_adapter
from lora_analysis.analysis.rank_advice import (peft_config_from_advice, peft_config_snippet, rank_advice,
                                                reduce_rank, save_reduced_adapter)
from lora_analysis.analysis.sources import updates_from_adapter
from lora_analysis.weights import ModuleUpdate


def _update(name, sigma, out_f=20, in_f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(sigma), generator=g, dtype=torch.float64))
    s = torch.tensor(sigma, dtype=torch.float64)
    return ModuleUpdate(name, lora_A=v.T.contiguous(), lora_B=u * s, scaling=1.0)


def test_rank_advice_on_known_spectra():
    ups = [_update("layers.0.q_proj", [3.0, 1.0, 1.0, 0.5]),  # energies 9,1,1,.25: 10/11.25 < .9 ≤ 11/11.25
           _update("layers.0.v_proj", [1.0, 0.01, 0.01, 0.01], seed=1),
           _update("layers.1.v_proj", [1.0, 0.01, 0.01, 0.01], seed=2)]
    advice = rank_advice(ups, energy=0.9)
    assert advice["advised_rank"].tolist() == [3, 1, 1]
    assert advice.loc[0, "retained_energy"] == pytest.approx(11 / 11.25)
    assert advice["rank"].tolist() == [4, 4, 4]
    assert rank_advice(ups, energy=0.9, max_rank=2)["advised_rank"].tolist() == [2, 1, 1]
    assert rank_advice(ups, energy=0.9, min_rank=2)["advised_rank"].tolist() == [3, 2, 2]


def test_peft_config_keeps_ratio_or_alpha():
    advice = rank_advice([_update("layers.0.q_proj", [3.0, 1.0, 1.0, 0.5]),
                          _update("layers.0.v_proj", [1.0, 0.01, 0.01, 0.01], seed=1),
                          _update("layers.1.v_proj", [1.0, 0.01, 0.01, 0.01], seed=2)])
    ratio = peft_config_from_advice(advice, alpha_mode="ratio", ratio=2.0)
    assert ratio["r"] == 1 and ratio["lora_alpha"] == 2.0
    key = r"^layers\.0\.q_proj"                        # exactly that module in PEFT, not a suffix
    assert ratio["rank_pattern"] == {key: 3} and ratio["alpha_pattern"] == {key: 6.0}
    assert ratio["target_modules"] == ["q_proj", "v_proj"]
    fixed = peft_config_from_advice(advice, alpha_mode="fixed", alpha=16.0)
    assert fixed["lora_alpha"] == 16.0 and fixed["alpha_pattern"] == {}
    json.dumps(fixed)                                       # JSON-ready
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(**ratio)
    assert config.r == 1 and config.rank_pattern == {key: 3}
    namespace = {}
    exec(peft_config_snippet(ratio), namespace)              # the snippet is runnable Python
    assert namespace["config"].alpha_pattern == {key: 6.0}
    with pytest.raises(ValueError, match="alpha_mode='double'"):
        peft_config_from_advice(advice, alpha_mode="double")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 10))


@pytest.fixture
def trained(tmp_path):
    model = apply_lora(_net(), ["0", "2"], rank=6, alpha=12.0)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_()
    save_adapter(model, tmp_path / "src")
    return model, tmp_path / "src"


@pytest.mark.parametrize("alpha_mode", ["ratio", "fixed"])
def test_reduction_at_full_rank_reproduces_the_adapter(trained, tmp_path, alpha_mode):
    model, src = trained
    adapter = read_adapter(src)
    reduced = reduce_rank(adapter, 6, alpha_mode=alpha_mode)
    assert reduced.report["retained_energy"].tolist() == pytest.approx([1.0, 1.0])
    save_reduced_adapter(reduced, tmp_path / "same")
    again = updates_from_adapter(read_adapter(tmp_path / "same"))
    for name, layer in (("0", model[0]), ("2", model[2])):
        want = layer.delta_weight().detach()
        torch.testing.assert_close(again[name].dense_delta(), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert not list(tmp_path.glob("same/.*.tmp"))           # temp files renamed away


def test_reduced_adapter_loads_in_ours_and_peft_with_matching_outputs(trained, tmp_path):
    peft = pytest.importorskip("peft")
    model, src = trained
    adapter = read_adapter(src)
    reduced = reduce_rank(adapter, {"0": 2, "2": 3})
    assert reduced.report["new_rank"].tolist() == [2, 3]
    out = save_reduced_adapter(reduced, tmp_path / "small")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {"^0": 2}
    assert config["lora_alpha"] == pytest.approx(6.0) and config["alpha_pattern"] == {"^0": pytest.approx(4.0)}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.0.lora_A.weight"].shape == (2, 12)
    assert tensors["base_model.model.2.lora_B.weight"].shape == (10, 3)

    # the truncated ΔW is the best rank-k approximation: error² = dropped energy
    full = adapter.modules["0"]
    s = torch.linalg.svdvals(full.scaling * full.lora_B.double() @ full.lora_A.double())
    small = updates_from_adapter(read_adapter(out))["0"]
    err = torch.linalg.matrix_norm(small.dense_delta().double() - model[0].delta_weight().detach().double())
    assert float(err) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)
    assert reduced.report.loc[0, "fro_error"] == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-6)

    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    ours = load_adapter(_net(), out).eval()
    theirs = peft.PeftModel.from_pretrained(_net(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        manual = _net()
        manual[0].weight += small.dense_delta()
        manual[2].weight += updates_from_adapter(read_adapter(out))["2"].dense_delta()
        torch.testing.assert_close(ours(x), manual(x), atol=1e-5, rtol=1e-5)


def test_bad_ranks_are_refused(trained):
    _, src = trained
    adapter = read_adapter(src)
    with pytest.raises(ValueError, match="rank=0 is not allowed"):
        reduce_rank(adapter, 0)
    with pytest.raises(ValueError, match="rank for module '2'=-1"):
        reduce_rank(adapter, {"0": 2, "2": -1})
    with pytest.raises(ValueError, match=r"no entry for modules \['2'\]"):
        reduce_rank(adapter, {"0": 2})
    with pytest.raises(ValueError, match="energy=0"):
        rank_advice(updates_from_adapter(adapter), energy=0)


def test_rank_above_the_adapter_rank_keeps_it(trained):
    _, src = trained
    reduced = reduce_rank(read_adapter(src), 50)
    assert reduced.report["new_rank"].tolist() == [6, 6] and reduced.config["r"] == 6


class _Nested(nn.Module):
    """``fc`` and ``sub.fc``: PEFT's suffix rule lets a key for ``fc`` also match ``sub.fc``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 20)
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(20, 16)

    def forward(self, x):
        return self.sub.fc(torch.relu(self.fc(x)))


def _peft_ranks(model, peft):
    return {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_advice_keys_name_exactly_one_module_in_peft():
    peft = pytest.importorskip("peft")
    advice = rank_advice([_update("fc", [1.0, 0.01, 0.01, 0.01]),                       # advised 1
                          _update("sub.fc", [3.0, 1.0, 1.0, 0.5], 16, 20, seed=1),         # advised 3
                          ], energy=0.9)
    assert advice["advised_rank"].tolist() == [1, 3]      # r = 3, so the pattern names fc
    config = peft_config_from_advice(advice, alpha_mode="ratio", ratio=2.0)
    model = peft.get_peft_model(_Nested(), peft.LoraConfig(**config))
    assert _peft_ranks(model, peft) == {"fc": 1, "sub.fc": 3}
    alphas = {n.removeprefix("base_model.model."): m.lora_alpha["default"] for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert alphas == {"fc": 2.0, "sub.fc": 6.0}


def test_reduced_adapter_keys_name_exactly_one_module(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_lora(_Nested(), ["fc"], rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in (model.fc, model.sub.fc):
            layer.lora_B.weight.normal_()
    save_adapter(model, tmp_path / "src")
    reduced = reduce_rank(read_adapter(tmp_path / "src"), {"fc": 2, "sub.fc": 3})
    out = save_reduced_adapter(reduced, tmp_path / "small")
    theirs = peft.PeftModel.from_pretrained(_Nested(), str(out))
    assert _peft_ranks(theirs, peft) == {"fc": 2, "sub.fc": 3}
    ours = load_adapter(_Nested(), out)
    assert (ours.fc.rank, ours.sub.fc.rank) == (2, 3)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_advice_never_exceeds_the_module_size():
    advice = rank_advice([_update("m", [1.0] * 4, out_f=4, in_f=16)], energy=1.0, min_rank=8)
    assert advice["advised_rank"].tolist() == [4]


@pytest.mark.parametrize("rank, alpha, rslora", [(1, 16.0, False), (4, 16.0, False), (8, 4.0, True)])
def test_advice_for_a_trained_rank_and_alpha_reproduces_the_trained_scaling(rank, alpha, rslora):
    """An r=1, α=16 run used to get α=2 (α = 2·r): a copied config 8× off the trained update. Kept scaling:
    PEFT's α/r (α/√r with use_rslora) of the advised config equals the trained run's, module by module."""
    from lora_analysis.analysis.rank_advice import trained_scalings
    from lora_analysis.lora.layer import compute_scaling

    trained = compute_scaling(rank, alpha, rslora)
    ups = [ModuleUpdate(u.name, lora_A=u.lora_A[:rank], lora_B=u.lora_B[:, :rank], scaling=trained)
           for u in (_update("layers.0.q_proj", [3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05]),
                     _update("layers.0.v_proj", [1.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], seed=1))]
    advice = rank_advice(ups, energy=0.9)
    config = peft_config_from_advice(advice, alpha_mode="trained", scalings=trained_scalings(ups), use_rslora=rslora)
    peft = pytest.importorskip("peft")
    lora_config = peft.LoraConfig(**config)
    for name, k in zip(advice["name"], advice["advised_rank"]):
        a = next((v for key, v in lora_config.alpha_pattern.items() if key.strip("^$").replace("\\", "") == name),
                 lora_config.lora_alpha)
        r = next((v for key, v in lora_config.rank_pattern.items() if key.strip("^$").replace("\\", "") == name),
                 lora_config.r)
        assert r == k
        assert (a / r ** 0.5 if lora_config.use_rslora else a / r) == pytest.approx(trained)
    if rank == 1:
        assert config["r"] == 1 and config["lora_alpha"] == 16.0     # not 2.0
