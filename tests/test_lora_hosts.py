"""Host models that read a wrapped layer's ``weight``/``bias`` directly (HF T5, torch's
``nn.TransformerEncoderLayer``): ours and PEFT's wrappers give the same outputs, and forward works."""

import warnings

import pytest
import torch
from torch import nn

from lora_analysis import apply_lora, lora_layers
from lora_analysis.lora import LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def randomise_b(layers, seed=1):
    """Non-zero B for every (name, layer) pair, drawn by name so two wrappers get the same factors."""
    with torch.no_grad():
        for name, (a, b) in layers.items():
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            b.copy_(0.3 * torch.randn(b.shape, generator=g))


def ours_factors(model):
    return {n: (m.lora_A.weight, m.lora_B.weight) for n, m in lora_layers(model).items()}


def peft_factors(model):
    out = {}
    for name, m in model.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in getattr(m, "lora_A", {}):
            out[name] = (m.lora_A["default"].weight, m.lora_B["default"].weight)
    return out


def copy_factors(src, dst):
    assert set(src) <= set(dst), sorted(set(src) - set(dst))
    with torch.no_grad():
        for name, (a, b) in src.items():
            dst[name][0].copy_(a)
            dst[name][1].copy_(b)


def tiny_t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.enc(x))


def test_lora_linear_exposes_weight_bias_and_base_layer():
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, 2, 2.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.get_base_layer() is base
    assert LoRALinear(nn.Linear(6, 4, bias=False), 2, 2.0).bias is None


def test_t5_outputs_equal_peft():
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    targets = ["q", "v", "wi", "wo"]
    ours = apply_lora(tiny_t5(), targets=targets, rank=4, alpha=8)
    theirs = peft.get_peft_model(tiny_t5(), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8)).eval()
    assert set(ours_factors(ours)) == set(peft_factors(theirs))
    randomise_b(ours_factors(ours))
    copy_factors(ours_factors(ours), peft_factors(theirs))
    with torch.no_grad():
        y_ours = ours(input_ids=ids, decoder_input_ids=ids).logits      # wo.weight.dtype is read here
        y_theirs = theirs(input_ids=ids, decoder_input_ids=ids).logits
        y_base = tiny_t5()(input_ids=ids, decoder_input_ids=ids).logits
    assert not torch.allclose(y_ours, y_base, atol=1e-3)                 # the adapter does something
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)


def test_transformer_encoder_layer_all_linear_equals_peft_and_leaves_out_mha_out_proj():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    # train mode (dropout is 0): the path where PEFT applies LoRA inside the block (see the next test)
    ours = apply_lora(Encoder(), targets="all-linear", rank=4, alpha=8).train()
    # MHA reads out_proj.weight directly, so a LoRA there would never run: "all-linear" leaves it out
    assert set(lora_layers(ours)) == {"enc.linear1", "enc.linear2", "head"}
    theirs = peft.get_peft_model(Encoder(), peft.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8)).train()
    randomise_b(peft_factors(theirs))          # PEFT also wraps out_proj; its update is ignored by MHA
    copy_factors({n: f for n, f in peft_factors(theirs).items() if n in lora_layers(ours)}, ours_factors(ours))
    with torch.no_grad():
        y_ours, y_theirs, y_base = ours(x), theirs(x), Encoder().train()(x)
    assert not torch.allclose(y_ours, y_base, atol=1e-3)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stack", [False, True])
def test_lora_inside_a_transformer_encoder_layer_runs_in_eval_mode(stack):
    # In eval mode torch's fused encoder path reads linear1/linear2.weight itself and never calls those
    # modules, so their LoRA update would silently vanish at inference (PEFT 0.21 has this problem).
    def build():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stack else layer

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if stack else None
    model = apply_lora(build(), targets=["linear1", "linear2"], rank=4, alpha=8)
    randomise_b(ours_factors(model))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # torch's nested-tensor notice for the padded batch
        y_train = model.train()(x, src_key_padding_mask=padding)
        y_eval = model.eval()(x, src_key_padding_mask=padding)
        y_base = build().eval()(x, src_key_padding_mask=padding)
    assert not torch.allclose(y_train[0], y_base[0], atol=1e-3)          # the adapter does something
    torch.testing.assert_close(y_eval[0], y_train[0], atol=1e-5, rtol=1e-5)   # and still does in eval mode


def test_mha_out_proj_named_explicitly_warns_and_forward_works():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    model = Encoder().train()                  # train mode: the slow path that reads out_proj.weight
    with pytest.warns(UserWarning, match="enc.self_attn.out_proj.*MultiheadAttention"):
        apply_lora(model, targets=["out_proj", "linear1"], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model(x).shape == (2, 5, 8)
