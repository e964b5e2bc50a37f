"""LoRALinear: shapes, init, scaling, the two formulations (unmerged and merged) and their equality."""

import math
import warnings

import pytest
import torch
from torch import nn

from lora_analysis.lora import LoRALinear, compute_scaling


def make_layer(rank=4, alpha=8.0, init="kaiming", rslora=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 7).to(dtype)
    return LoRALinear(base, rank, alpha, rslora=rslora, init=init)


def randomise_b(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))


def test_shapes_follow_peft():
    layer = make_layer(rank=3)
    assert layer.lora_A.weight.shape == (3, 12)      # A: (r, in)
    assert layer.lora_B.weight.shape == (7, 3)       # B: (out, r)
    assert layer.delta_weight().shape == (7, 12)     # ΔW: (out, in), like nn.Linear.weight


def test_default_init_leaves_outputs_unchanged():
    layer = make_layer()
    x = torch.randn(5, 12)
    assert torch.equal(layer.lora_B.weight, torch.zeros(7, 4))
    assert layer.lora_A.weight.abs().sum() > 0
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_kaiming_init_is_peft_formula():
    # PEFT: kaiming_uniform_(A, a=√5) on (r, in), i.e. U(-1/√in, 1/√in)
    layer = LoRALinear(nn.Linear(12, 7), rank=4, alpha=8, generator=torch.Generator().manual_seed(3))
    expected = nn.init.kaiming_uniform_(torch.empty(4, 12), a=math.sqrt(5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.lora_A.weight, expected)
    bound = 1 / math.sqrt(12)
    assert 0.9 * bound < layer.lora_A.weight.abs().max() <= bound + 1e-7


def test_gaussian_init_std():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4000, 10), rank=4, alpha=4, init="gaussian")
    assert torch.equal(layer.lora_B.weight, torch.zeros(10, 4))
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.02)


def test_pissa_keeps_outputs_and_takes_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 12)
    y0 = base(x).detach()
    layer = LoRALinear(base, rank=3, alpha=6, init="pissa")
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    s = torch.linalg.svdvals(w0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:3], s[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], s[3:], atol=1e-5, rtol=1e-5)


def test_pissa_on_conv1d_writes_the_residual_in_the_conv1d_orientation():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=7, nx=12)                # weight (in=12, out=7)
    w0 = conv.weight.detach().clone()
    x = torch.randn(5, 12)
    y0 = conv(x).detach()
    layer = LoRALinear(conv, rank=3, alpha=6, init="pissa")
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    assert layer.base_layer.weight.shape == (12, 7)
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), w0, atol=1e-5, rtol=1e-5)
    s = torch.linalg.svdvals(w0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], s[3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    assert make_layer(rank=4, alpha=16, rslora=rslora).scaling == expected
    assert compute_scaling(4, 16, rslora) == expected


def test_unmerged_formula_is_xW_plus_scaled_xBA():
    layer = make_layer(rank=4, alpha=8)
    randomise_b(layer)
    x = torch.randn(6, 12)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a_mat, b_mat = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ w.T + b + (8 / 4) * (x @ a_mat.T @ b_mat.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_merged_equals_unmerged_and_unmerge_restores_w():
    layer = make_layer()
    randomise_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 12)
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight(), atol=1e-7, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    # a merged layer's forward is the base layer's forward only
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unmerge_are_idempotent_with_warning():
    layer = make_layer()
    randomise_b(layer)
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_refuses_non_finite_result():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w)


def test_merge_in_bfloat16_computes_delta_in_float32():
    layer = make_layer(dtype=torch.bfloat16)
    randomise_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    expected = (w0.float() + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, expected)
    rounded_twice = w0 + layer.delta_weight().to(torch.bfloat16)      # what a bf16 merge would give
    assert not torch.equal(rounded_twice, expected)                    # so the check above can fail
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_base_is_frozen_and_lora_trainable():
    layer = make_layer()
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_conv1d_delta_is_transposed_like_its_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=9, nx=5)           # weight (in=5, out=9)
    with torch.no_grad():
        conv.weight.normal_()
    layer = LoRALinear(conv, rank=2, alpha=4)
    randomise_b(layer)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (5, 9)
    assert layer.delta_weight().shape == (5, 9)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), conv(x) + 2 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T,
                               atol=1e-5, rtol=1e-5)
    y = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank=0"),
    ({"rank": 8, "init": "pissa"}, r"rank=8 is not allowed .* init='pissa'.* min\(in, out\) = 7"),
    ({"rank": 2.5}, "rank=2.5"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"alpha": -1.0}, "alpha=-1.0"),
    ({"dropout": 1.0}, r"dropout=1.0 .* \[0, 1\)"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"init": "orthogonal"}, "init='orthogonal'"),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    settings = {"rank": 2, "alpha": 2.0, "dropout": 0.0, "init": "kaiming"} | kwargs
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(12, 7), settings["rank"], settings["alpha"], settings["dropout"],
                   init=settings["init"])


def test_rank_above_min_in_out_is_a_valid_layer_like_peft():
    # the cap at min(in, out) is a creation-time policy of apply_lora; a saved adapter may exceed it
    layer = LoRALinear(nn.Linear(12, 7), rank=16, alpha=8)
    randomise_b(layer)
    x = torch.randn(3, 12)
    expected = layer.base_layer(x) + 0.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_non_linear_base_is_refused():
    with pytest.raises(ValueError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4), 2, 2)


def test_dropout_only_on_lora_path_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 7), 4, 4, dropout=0.5)
    randomise_b(layer)
    x = torch.randn(64, 12)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_eval, y_train)
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), layer.base_layer(x))   # no LoRA path → dropout invisible


def test_merge_refuses_overflow_of_the_weight_dtype():
    layer = make_layer(dtype=torch.float16)
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)      # near fp16's max (65504)
        layer.lora_A.weight.fill_(1.0)              # ΔW = 2·B·A = +8e4 everywhere, whatever the random init
        layer.lora_B.weight.fill_(1e4)
    with pytest.raises(ValueError, match="torch.float16"):
        layer.merge()
    assert not layer.merged and torch.isfinite(layer.base_layer.weight).all()


# ---- per-run random numbers ---------------------------------------------------------------------------

def test_generator_makes_init_and_dropout_reproducible_across_threads():
    import threading

    def run(seed=0):
        g = torch.Generator().manual_seed(seed)
        layer = LoRALinear(nn.Linear(12, 7), rank=4, alpha=4, dropout=0.5, generator=g)
        a = layer.lora_A.weight.detach().clone()
        x = torch.ones(64, 12)
        masks = [layer.lora_dropout(x) for _ in range(3)]      # train mode: fresh masks from g
        return a, masks

    sequential = run()
    results = [None, None]

    def worker(i):
        torch.manual_seed(1000 + i)           # another thread's global RNG must not matter
        results[i] = run()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, masks in results:
        assert torch.equal(a, sequential[0])
        for m, m_seq in zip(masks, sequential[1]):
            assert torch.equal(m, m_seq)
    assert not torch.equal(sequential[1][0], sequential[1][1])             # masks change step to step
    assert set(sequential[1][0].unique().tolist()) == {0.0, 2.0}            # inverted dropout, p = 0.5
    other = LoRALinear(nn.Linear(12, 7), 4, 4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.lora_A.weight, sequential[0])              # the seed matters


def test_generator_leaves_the_global_rng_alone():
    base, x = nn.Linear(12, 7), torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    before = torch.get_rng_state()
    layer = LoRALinear(base, 4, 4, dropout=0.5, generator=torch.Generator().manual_seed(0))
    layer(x)
    assert torch.equal(torch.get_rng_state(), before)
    base = nn.Linear(12, 7)
    before = torch.get_rng_state()
    LoRALinear(base, 4, 4)                              # without a generator: the global RNG, as PEFT
    assert not torch.equal(torch.get_rng_state(), before)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("layer_device,gen_device", [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=needs_cuda),
                                                     pytest.param("cpu", "cuda", marks=needs_cuda)])
def test_generator_on_another_device_than_the_layer(layer_device, gen_device):
    # A is drawn on the generator's device (the same numbers as a plain draw there), then lives on the layer's
    layer = LoRALinear(nn.Linear(12, 7).to(layer_device), 4, 4, dropout=0.5,
                       generator=torch.Generator(device=gen_device).manual_seed(0)).train()
    expected = nn.init.kaiming_uniform_(torch.empty(4, 12, device=gen_device), a=math.sqrt(5),
                                        generator=torch.Generator(device=gen_device).manual_seed(0))
    assert layer.lora_A.weight.device.type == layer_device
    assert torch.equal(layer.lora_A.weight.cpu(), expected.cpu())
    masked = layer.lora_dropout(torch.ones(64, 12, device=layer_device))
    assert masked.device.type == layer_device and set(masked.unique().tolist()) == {0.0, 2.0}
    randomise_b(layer)
    assert layer(torch.ones(5, 12, device=layer_device)).device.type == layer_device
