"""Spectra of ΔW: the factored SVD equals the dense one, metrics on cases with known answers, and the
adapter/base-weight loaders that feed the analyses."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_analysis import apply_lora, read_adapter, save_adapter
from lora_analysis.analysis.sources import load_base_weights, load_updates, orient_out_in, updates_from_adapter
from lora_analysis.analysis.spectra import (cumulative_energy, dense_svd, effective_rank, energy_rank, factored_svd,
                                            numerical_rank,
                                            spectra_frame, spectrum_metrics, stable_rank, update_spectrum)
from lora_analysis.weights import ModuleUpdate


def _factors(out_f=40, in_f=30, r=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, in_f, generator=g, dtype=dtype), torch.randn(out_f, r, generator=g, dtype=dtype))


def _align_signs(v, ref):
    """Flip each column of v to point like ref's (singular vectors are defined up to sign)."""
    return v * torch.sign((v * ref).sum(0))


@pytest.mark.parametrize("shape", [(40, 30, 6), (30, 40, 6), (12, 50, 12), (64, 64, 1)])
def test_factored_svd_matches_dense_values_and_vectors(shape):
    out_f, in_f, r = shape
    a, b = _factors(out_f, in_f, r)
    spec = factored_svd(a, b, scaling=0.75)
    u, s, vh = torch.linalg.svd(0.75 * b @ a, full_matrices=False)
    assert spec.U.shape == (out_f, r) and spec.V.shape == (in_f, r) and spec.S.shape == (r,)
    rel = ((spec.S - s[:r]).abs() / s[:r]).max()
    assert rel < 1e-5
    torch.testing.assert_close(_align_signs(spec.U, u[:, :r]), u[:, :r], atol=1e-5, rtol=0)
    torch.testing.assert_close(_align_signs(spec.V, vh[:r].T), vh[:r].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(spec.dense(), 0.75 * b @ a, atol=1e-10, rtol=1e-10)
    # orthonormal columns
    torch.testing.assert_close(spec.U.T @ spec.U, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)


def test_factored_svd_float32_inputs_are_computed_in_float64():
    a, b = _factors(dtype=torch.float32)
    spec = factored_svd(a, b, 2.0)
    assert spec.S.dtype == torch.float64
    dense = torch.linalg.svdvals(2.0 * b.double() @ a.double())[:6]
    assert ((spec.S - dense).abs() / dense).max() < 1e-10


def test_factored_svd_rejects_mismatched_factors():
    with pytest.raises(ValueError, match=r"lora_A \(3, 10\) and lora_B \(8, 4\)"):
        factored_svd(torch.zeros(3, 10), torch.zeros(8, 4))


def test_metrics_of_a_known_diagonal_spectrum():
    s = [4.0, 2.0, 1.0, 1.0]           # Σσ² = 22, σ₁² = 16
    m = spectrum_metrics(s)
    assert m["fro_norm"] == pytest.approx(math.sqrt(22))
    assert m["spectral_norm"] == 4.0
    assert m["stable_rank"] == pytest.approx(22 / 16)
    p = np.array(s) / 8.0
    assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # cumulative energy 16/22=.727, 20/22=.909, 21/22=.955, 1
    assert m["rank_90"] == 2 and m["rank_99"] == 4
    assert m["normalized_spectrum"] == [1.0, 0.5, 0.25, 0.25]


def test_metrics_of_flat_and_rank_one_spectra():
    assert effective_rank([3.0] * 5) == pytest.approx(5.0)
    assert stable_rank([3.0] * 5) == pytest.approx(5.0)
    assert effective_rank([2.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert energy_rank([1.0] * 10, 0.9) == 9 and energy_rank([1.0] * 10, 0.99) == 10
    assert energy_rank([1.0] * 10, 1.0) == 10


def test_dense_svd_of_a_constructed_matrix():
    q1, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(15, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    sigma = torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    m = (q1[:, :3] * sigma) @ q2[:, :3].T
    spec = dense_svd(m)
    torch.testing.assert_close(spec.S[:3], sigma)
    assert spec.S[3:].abs().max() < 1e-12
    assert spectrum_metrics(spec.S)["numerical_rank"] == 3


def test_zero_update_has_defined_metrics_not_nan():
    a, _ = _factors()
    u = ModuleUpdate("fc", lora_A=a, lora_B=torch.zeros(40, 6, dtype=torch.float64), scaling=2.0)
    m = spectrum_metrics(update_spectrum(u).S)
    assert m["fro_norm"] == 0 and m["spectral_norm"] == 0 and m["stable_rank"] == 0 and m["effective_rank"] == 0
    assert m["rank_90"] == 0 and m["rank_99"] == 0 and m["numerical_rank"] == 0
    assert m["normalized_spectrum"] == [0.0] * 6
    assert not np.isnan(cumulative_energy(update_spectrum(u).S)).any()


def test_energy_rank_rejects_bad_share():
    with pytest.raises(ValueError, match="share=1.5"):
        energy_rank([1.0], 1.5)


def test_spectra_frame_rows_for_lora_and_full():
    a, b = _factors(dtype=torch.float32)
    w0 = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    lora = ModuleUpdate("layers.0.q", lora_A=a, lora_B=b, scaling=0.5)
    w_ft = w0 + 0.01 * torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    full = ModuleUpdate("layers.0.q", w0=w0, w_ft=w_ft)
    frame = spectra_frame([lora, full])
    assert list(frame["kind"]) == ["lora", "full"]
    assert frame.loc[0, "shape"] == [40, 30] and frame.loc[0, "rank"] == 6 and frame.loc[0, "scaling"] == 0.5
    assert len(frame.loc[0, "singular_values"]) == 6 and len(frame.loc[1, "singular_values"]) == 30
    want = torch.linalg.svdvals(0.5 * b.double() @ a.double())[:6].numpy()
    np.testing.assert_allclose(frame.loc[0, "singular_values"], want, rtol=1e-6)
    want_full = torch.linalg.svdvals((w_ft.double() - w0.double())).numpy()
    np.testing.assert_allclose(frame.loc[1, "singular_values"], want_full, rtol=1e-5)
    assert frame.loc[1, "rank_90"] > 6   # a random dense update needs many directions


# ---- loading adapters and base weights ------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _saved_adapter(tmp_path, rank=4, alpha=8.0):
    torch.manual_seed(0)
    base = Net()
    model = apply_lora(Net().requires_grad_(False), ["fc1", "fc2"], rank=rank, alpha=alpha)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            layer.lora_B.weight.normal_()
    save_adapter(model, tmp_path / "adapter")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    return base, model, tmp_path / "adapter"


def test_updates_from_adapter_with_safetensors_base(tmp_path):
    base, model, path = _saved_adapter(tmp_path)
    adapter, updates = load_updates(path, tmp_path / "base.safetensors")
    assert set(updates) == {"fc1", "fc2"}
    u = updates["fc1"]
    assert u.scaling == pytest.approx(2.0) and u.rank == 4
    torch.testing.assert_close(u.w0, base.fc1.weight)
    torch.testing.assert_close(u.dense_delta(), model.fc1.delta_weight())


def test_updates_without_base_have_no_w0(tmp_path):
    _, _, path = _saved_adapter(tmp_path)
    updates = updates_from_adapter(read_adapter(path))
    assert set(updates) == {"fc1", "fc2"} and all(u.w0 is None for u in updates.values())


def test_conv1d_weights_are_transposed_by_shape(tmp_path):
    w_in_out = torch.randn(12, 20)                 # Conv1D storage of a 20x12 (out, in) layer
    save_file({"fc1.weight": w_in_out}, str(tmp_path / "w.safetensors"))
    got = load_base_weights(tmp_path / "w.safetensors", {"fc1": (20, 12)})["fc1"]
    torch.testing.assert_close(got, w_in_out.T)
    sq = torch.randn(6, 6)
    torch.testing.assert_close(orient_out_in(sq, (6, 6), "m", fan_in_fan_out=True), sq.T)
    torch.testing.assert_close(orient_out_in(sq, (6, 6), "m"), sq)


def test_mismatched_base_weights_name_the_module_and_shapes(tmp_path):
    _, _, path = _saved_adapter(tmp_path)
    save_file({"fc1.weight": torch.randn(20, 13), "fc2.weight": torch.randn(8, 20)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"module 'fc1' has shape \(20, 13\).*\(20, 12\)"):
        load_updates(path, tmp_path / "bad.safetensors")
    save_file({"fc2.weight": torch.randn(8, 20)}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="'fc1.weight'"):
        load_updates(path, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_updates(path, tmp_path / "nope.safetensors")


def test_adapter_without_safetensors_is_refused(tmp_path):
    _, _, path = _saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_updates(path)


def test_base_weights_from_a_hugging_face_model_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    gpt2.save_pretrained(tmp_path / "gpt2")
    names = {"transformer.h.0.attn.c_attn": (48, 16), "transformer.h.0.attn.c_proj": (16, 16),
             "transformer.h.0.mlp.c_fc": (64, 16)}
    got = load_base_weights(tmp_path / "gpt2", names)
    for name, shape in names.items():
        conv = gpt2.get_submodule(name)
        assert tuple(got[name].shape) == shape
        torch.testing.assert_close(got[name], conv.weight.T)    # Conv1D (in, out) → (out, in), square too
    with pytest.raises(ValueError, match="'transformer.h.7.attn.c_attn' does not exist"):
        load_base_weights(tmp_path / "gpt2", ["transformer.h.7.attn.c_attn"])
    # the same file read as a flat safetensors file: keys match up to the leading "transformer." and the
    # square c_proj is only known to be (in, out) through fan_in_fan_out
    flat = tmp_path / "gpt2" / "model.safetensors"
    got_flat = load_base_weights(flat, names, fan_in_fan_out=True)
    for name in names:
        torch.testing.assert_close(got_flat[name], got[name])


def test_llama_model_dir_linear_weights_are_kept(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50)
    llama = transformers.LlamaForCausalLM(cfg)
    llama.save_pretrained(tmp_path / "llama")
    names = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.up_proj": (32, 16)}
    got = load_base_weights(tmp_path / "llama", names)
    for name in names:
        torch.testing.assert_close(got[name], llama.get_submodule(name).weight)


def test_missing_base_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="base model or weights '.*nowhere' does not exist"):
        load_base_weights(tmp_path / "nowhere", ["x"])


def test_pickle_base_weights_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        load_base_weights(tmp_path / "w.bin", ["x"])


def test_run_style_base_weights_are_not_transposed_again(tmp_path):
    """A run keeps W0 as (out, in) under the bare module name; a checkpoint stores a Conv1D weight (in, out)
    under "<name>.weight". For a square Conv1D only the key tells them apart."""
    from safetensors.torch import save_file

    from lora_analysis.analysis.sources import load_base_weights

    w = torch.arange(16.0).reshape(4, 4)            # (out, in)
    save_file({"h.0.c_proj": w}, tmp_path / "run.safetensors")
    save_file({"h.0.c_proj.weight": w.T.contiguous()}, tmp_path / "ckpt.safetensors")
    for name in ("run", "ckpt"):
        got = load_base_weights(tmp_path / f"{name}.safetensors", {"h.0.c_proj": (4, 4)}, fan_in_fan_out=True)
        assert torch.equal(got["h.0.c_proj"], w), name


# ---- numerical rank: the cutoff follows the dtype the update was stored in (defect 10) ----------------

def _float32_full_ft(n=256, k=5, seed=5):
    """W0 and W_ft = W0 + ΔW (ΔW of rank k) as float32 weights: W_ft carries float32 rounding everywhere."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).float()
    delta = 0.05 * torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g,
                                                                                   dtype=torch.float64) / n**0.5
    return w0, (w0.double() + delta).float()


def test_numerical_rank_of_a_float32_full_ft_update_is_its_true_rank():
    w0, w_ft = _float32_full_ft(k=5)
    row = spectra_frame([ModuleUpdate("m", w0=w0, w_ft=w_ft)]).iloc[0]
    s = np.asarray(row["singular_values"])
    assert s[5] > 1e-12 * s[0]          # rounding noise is far above a float64 cutoff: the old rule said 256
    assert row["numerical_rank"] == 5
    # the same rule on the bare float32 ΔW (numpy.linalg.matrix_rank's tolerance)
    delta = (w_ft.double() - w0.double()).float()
    assert numerical_rank(torch.linalg.svdvals(delta), shape=(256, 256), dtype=torch.float32) == 5
    assert np.linalg.matrix_rank(delta.numpy()) == 5


def test_numerical_rank_still_sees_a_full_rank_float32_update():
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(64, 48, generator=g)
    w_ft = w0 + 0.01 * torch.randn(64, 48, generator=g)
    assert spectra_frame([ModuleUpdate("m", w0=w0, w_ft=w_ft)]).loc[0, "numerical_rank"] == 48


def test_numerical_rank_tolerance_is_eps_times_size_times_sigma1():
    s = np.array([1.0, 1e-5, 1e-9])
    # float32: eps·max(m, n) = 1.19e-7·100 ≈ 1.2e-5 drops 1e-5; float64 keeps all three
    assert numerical_rank(s, shape=(100, 3), dtype=torch.float32) == 1
    assert numerical_rank(s, shape=(100, 3), dtype=torch.float64) == 3
    assert numerical_rank(s, shape=(100, 3), dtype=np.float32) == 1
    assert numerical_rank([0.0, 0.0], shape=(2, 2), dtype=torch.float32) == 0
    assert spectrum_metrics(s, shape=(100, 3), dtype=torch.float32)["numerical_rank"] == 1
    # LoRA factors in float32: the cutoff is float32's too
    a, b = _factors(out_f=100, in_f=3, r=3, dtype=torch.float32)
    assert spectra_frame([ModuleUpdate("m", lora_A=a, lora_B=b, scaling=1.0)]).loc[0, "numerical_rank"] == 3
