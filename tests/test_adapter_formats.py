"""Adapter formats users bring (kohya / diffusers Stable-Diffusion LoRA files, PEFT-style keys without a config,
loralib state dicts, bf16/fp16 factors), each read into the same Adapter: every module's ΔW against a dense float64
B·A·scale computed here; unknown formats and pickles refused with what was found."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_analysis.analysis.sources import iter_updates, load_updates
from lora_analysis.cli import main
from lora_analysis.lora import read_adapter

torch.set_num_threads(1)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_delta(adapter, name, up, down, scale):
    """ΔW of module ``name`` (as the analyses see it: float32 factors, (out, in·kh·kw)) against float64."""
    expected = scale * (up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1))
    module = adapter.modules[name]
    assert module.lora_A.dtype == torch.float32 and module.lora_B.dtype == torch.float32
    _, updates = load_updates(adapter)
    got = updates[name]
    assert got.shape == tuple(expected.shape)
    assert got.scaling == pytest.approx(scale, rel=1e-12)
    delta = got.scaling * (got.lora_B.double() @ got.lora_A.double())
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6)


def test_kohya_linear_and_conv_with_alpha_against_float64(tmp_path):
    conv_down, conv_up = _randn(4, 6, 3, 3, seed=1), _randn(5, 4, 1, 1, seed=2)       # LoCon 3x3 conv, r=4
    lin_down, lin_up = _randn(2, 7, seed=3), _randn(9, 2, seed=4)                      # linear, r=2
    te_down, te_up = _randn(3, 8, seed=5), _randn(8, 3, seed=6)                        # no alpha: scaling 1
    unet, te = "lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_mlp_fc1"
    lin = "lora_unet_mid_block_attentions_0_proj_in"
    save_file({f"{unet}.lora_down.weight": conv_down.float(), f"{unet}.lora_up.weight": conv_up.float(),
               f"{unet}.alpha": torch.tensor(2.0),
               f"{lin}.lora_down.weight": lin_down.float(), f"{lin}.lora_up.weight": lin_up.float(),
               f"{lin}.alpha": torch.tensor(8.0, dtype=torch.float16),
               f"{te}.lora_down.weight": te_down.float(), f"{te}.lora_up.weight": te_up.float()},
              str(tmp_path / "sd_lora.safetensors"))
    adapter = read_adapter(tmp_path / "sd_lora.safetensors")
    assert adapter.format == "kohya" and adapter.dtype == "float32"
    assert sorted(adapter.modules) == sorted([unet, lin, te])          # kohya's names kept as given
    assert adapter.modules[unet].kernel == (3, 3) and adapter.modules[unet].shape == (5, 6 * 9)
    _assert_delta(adapter, unet, conv_up.float(), conv_down.float(), 2.0 / 4)
    _assert_delta(adapter, lin, lin_up.float(), lin_down.float(), 8.0 / 2)
    _assert_delta(adapter, te, te_up.float(), te_down.float(), 1.0)
    assert any("scaling taken as 1" in n and "1 of 3 modules" in n for n in adapter.notes)
    assert any("conv" in n and "3x3" in n for n in adapter.notes)
    # the synthetic PEFT config gives each module its rank and alpha back
    assert {n: (adapter.config.rank_for(n), adapter.config.alpha_for(n)) for n in adapter.modules} == \
        {unet: (4, 2.0), lin: (2, 8.0), te: (3, 3.0)}


def test_kohya_base_keys_match_by_path_and_conv_w0_is_flattened(tmp_path):
    unet = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{unet}.lora_down.weight": _randn(2, 3, 3, 3, seed=1).float(),
               f"{unet}.lora_up.weight": _randn(4, 2, 1, 1, seed=2).float(), f"{unet}.alpha": torch.tensor(4.0)},
              str(tmp_path / "lora.safetensors"))
    w0 = _randn(4, 3, 3, 3, seed=3).float()
    save_file({"down_blocks.0.resnets.0.conv1.weight": w0, "down_blocks.0.resnets.0.conv2.weight": w0.clone()},
              str(tmp_path / "unet.safetensors"))
    (update,) = list(iter_updates(tmp_path / "lora.safetensors", tmp_path / "unet.safetensors"))
    assert torch.equal(update.w0, w0.reshape(4, 27))
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match=r"kohya module .*belongs to the UNet.*down_blocks_0_resnets_0_conv1"):
        list(iter_updates(tmp_path / "lora.safetensors", tmp_path / "te.safetensors"))


@pytest.mark.parametrize("with_alpha", [True, False])
def test_diffusers_style_bare_file_without_config(tmp_path, with_alpha):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = _randn(4, 10, seed=1), _randn(12, 4, seed=2)
    state = {f"{name}.lora_A.weight": a.float(), f"{name}.lora_B.weight": b.float()}
    if with_alpha:
        state[f"{name}.alpha"] = torch.tensor(16.0)
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    adapter = read_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter.format == "diffusers" and list(adapter.modules) == [name]
    _assert_delta(adapter, name, b.float(), a.float(), 16.0 / 4 if with_alpha else 1.0)
    assert any("no lora_alpha is known" in n for n in adapter.notes) != with_alpha


def test_loralib_state_dict_alpha_from_caller_sidecar_or_default(tmp_path):
    a, b = _randn(8, 6, seed=1), _randn(5, 8, seed=2)
    path = tmp_path / "lora.safetensors"
    save_file({"transformer.h.0.attn.c_attn.lora_A": a.float(), "transformer.h.0.attn.c_attn.lora_B": b.float()},
              str(path))
    name = "transformer.h.0.attn.c_attn"
    plain = read_adapter(path)
    assert plain.format == "loralib"
    _assert_delta(plain, name, b.float(), a.float(), 1.0)                 # default: alpha = r, scaling 1
    assert any("loralib files store no alpha" in n and "--alpha" in n for n in plain.notes)
    _assert_delta(read_adapter(path, alpha=16), name, b.float(), a.float(), 16 / 8)
    (tmp_path / "lora.json").write_text(json.dumps({"lora_alpha": 32}))
    sidecar = read_adapter(path)
    _assert_delta(sidecar, name, b.float(), a.float(), 32 / 8)
    assert any("lora.json" in n for n in sidecar.notes)
    with pytest.raises(ValueError, match="alpha=-1 is not allowed"):
        read_adapter(path, alpha=-1)


def test_an_alpha_by_hand_is_refused_where_the_file_stores_alphas(tmp_path):
    save_file({"m.lora_down.weight": torch.ones(1, 2), "m.lora_up.weight": torch.ones(2, 1),
               "m.alpha": torch.tensor(1.0)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match="stores each module's alpha"):
        read_adapter(tmp_path / "k.safetensors", alpha=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_are_upcast_exactly_and_their_dtype_recorded(tmp_path, dtype):
    a, b = _randn(4, 16, seed=1).to(dtype), _randn(24, 4, seed=2).to(dtype)
    # a PEFT folder ...
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"base_model.model.layer.fc.lora_A.weight": a, "base_model.model.layer.fc.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["fc"]}))
    # ... and a kohya file, both in half precision
    save_file({"lora_unet_fc.lora_down.weight": a, "lora_unet_fc.lora_up.weight": b,
               "lora_unet_fc.alpha": torch.tensor(8.0, dtype=dtype)}, str(tmp_path / "k.safetensors"))
    name_of = {"peft": "layer.fc", "kohya": "lora_unet_fc"}
    for fmt, where in (("peft", folder), ("kohya", tmp_path / "k.safetensors")):
        adapter = read_adapter(where)
        assert adapter.format == fmt and adapter.dtype == str(dtype).removeprefix("torch.")
        assert any(f"stored in {adapter.dtype}, analysed in float32" in n for n in adapter.notes)
        _assert_delta(adapter, name_of[fmt], b, a, 2.0)                 # b, a: the half values, exactly upcast
        assert torch.equal(adapter.modules[name_of[fmt]].lora_A, a.float())


def test_unknown_formats_name_what_was_found(tmp_path):
    save_file({"model.layers.0.q_proj.weight": torch.ones(2, 2), "model.layers.0.q_proj.bias": torch.ones(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        read_adapter(tmp_path / "model.safetensors")
    text = str(err.value)
    assert "not an adapter format" in text and "'model.layers.0.q_proj.bias'" in text
    assert ".q_proj.weight (1)" in text and ".bias (1)" in text and "kohya" in text and "loralib" in text
    save_file({"lora_unet_x.hada_w1_a": torch.ones(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2),
               "lora_unet_y.lora_down.weight": torch.ones(1, 2), "lora_unet_y.lora_up.weight": torch.ones(2, 1)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match=r"2 tensor\(s\) are no LoRA factor.*LoHa.*\.hada_w1_a \(1\)"):
        read_adapter(tmp_path / "loha.safetensors")
    save_file({"x.lora_down.weight": torch.ones(1, 2), "x.lora_up.weight": torch.ones(2, 1),
               "y.lora_A.weight": torch.ones(1, 2), "y.lora_B.weight": torch.ones(2, 1)},
              str(tmp_path / "mix.safetensors"))
    with pytest.raises(ValueError, match="mixes the key styles of diffusers and kohya"):
        read_adapter(tmp_path / "mix.safetensors")
    save_file({"x.lora_down.weight": torch.ones(1, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="module 'x' has lora_A .* but no lora_B"):
        read_adapter(tmp_path / "half.safetensors")


def test_pickles_are_refused_not_unpickled(tmp_path, capsys):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    import pickle

    for suffix in (".bin", ".pt", ".ckpt"):
        path = tmp_path / f"lora{suffix}"
        path.write_bytes(pickle.dumps(Boom()))
        with pytest.raises(ValueError, match="pickle file, which is not loaded for safety.*safetensors"):
            read_adapter(path)
    assert main(["spectra", str(tmp_path / "lora.pt"), "--json"]) != 0
    assert "pickle file" in capsys.readouterr().err


def test_spectra_cli_reads_an_adapter_file_and_says_what_it_assumed(tmp_path, capsys):
    a, b = _randn(3, 10, seed=1), _randn(6, 3, seed=2)
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a.to(torch.bfloat16),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b.to(torch.bfloat16)},
              str(tmp_path / "te.safetensors"))
    assert main(["spectra", str(tmp_path / "te.safetensors"), "--json", "--alpha", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "kohya" and out["dtype"] == "bfloat16"
    (module,) = out["modules"]
    assert module["scaling"] == pytest.approx(2.0)
    expected = torch.linalg.svdvals(2.0 * (b.to(torch.bfloat16).double() @ a.to(torch.bfloat16).double()))
    assert module["singular_values"] == pytest.approx(expected[:3].tolist(), rel=1e-5)
    assert main(["spectra", str(tmp_path / "te.safetensors")]) == 0
    assert "read as the kohya format, factors stored in bfloat16" in capsys.readouterr().out
