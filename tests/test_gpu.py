"""On a CUDA device: training with bf16 autocast, the memory a run records, gradient checkpointing lowering
peak memory with the same gradients, and the merge audit. Every test here is skipped without CUDA (CPU-only
machines and CI); the CPU side of the same code is in test_runtime.py, test_training.py, test_merge_check.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lora_analysis import apply_lora
from lora_analysis.lora import lora_layers
from lora_analysis.lora.adapter_io import read_adapter
from lora_analysis.training import TrainConfig, train
from lora_analysis.training.runtime import enable_gradient_checkpointing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False here)")

GPT = dict(model="tiny-gpt", pretrain_steps=20, seq_len=32, batch_size=16, max_eval_tokens=1024)


def test_lora_trains_on_cuda_with_bf16_and_records_peak_memory(lora_home):
    result = train(TrainConfig(model="mlp-digits", rank=4, alpha=16, steps=60, eval_every=30, pretrain_steps=30,
                               device="cuda", bf16=True))
    assert result.status == "completed" and result.error is None
    m = result.metrics
    assert m["device"].startswith("cuda")
    assert m["cuda_max_memory_allocated_bytes"] > 0
    assert math.isfinite(m["val_loss"]) and m["val_accuracy"] > m["base_val_accuracy"]
    # the factors train in float32 under autocast (PEFT's setup) and are saved as such
    for layer in lora_layers(result.model).values():
        assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.device.type == "cuda"
    adapter = read_adapter(result.run_dir / "adapter")
    assert len(adapter.modules) == 3


def test_full_finetuning_records_more_cuda_memory_than_lora(lora_home):
    runs = {method: train(TrainConfig(method=method, rank=4, steps=3, eval_every=3,
                                      device="cuda", **GPT), save=False, keep_model=False)
            for method in ("lora", "full")}
    memory = {k: r.metrics["cuda_max_memory_allocated_bytes"] for k, r in runs.items()}
    assert all(r.status == "completed" for r in runs.values())
    assert 0 < memory["lora"] < memory["full"]


def test_gradient_checkpointing_trains_tiny_gpt_on_cuda(lora_home):
    result = train(TrainConfig(rank=4, steps=5, eval_every=5, device="cuda", bf16=True,
                               gradient_checkpointing=True, **GPT), save=False)
    assert result.status == "completed" and result.error is None
    assert math.isfinite(result.metrics["val_loss"]) and result.metrics["cuda_max_memory_allocated_bytes"] > 0


def _deep_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=512, n_positions=512,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    apply_lora(model, ["c_attn"], rank=8, alpha=16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.02)
    return model.train()


def _peak_step(model: nn.Module, ids: torch.Tensor) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Peak CUDA bytes above what was allocated before one forward + backward, the loss, the grads."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return peak, float(loss), grads


def test_gradient_checkpointing_lowers_peak_memory_with_the_same_gradients():
    plain = _deep_gpt2().cuda()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    ids = torch.randint(0, 512, (8, 512), generator=torch.Generator().manual_seed(2)).cuda()
    _peak_step(plain, ids)                          # warm up kernels and the caching allocator
    peak0, loss0, grads0 = _peak_step(plain, ids)
    peak1, loss1, grads1 = _peak_step(checkpointed, ids)
    # 8 blocks of ~(8·512·256) activations each: only block inputs are kept, one block is recomputed at a time
    assert peak1 < 0.6 * peak0, (peak1, peak0)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_merge_audit_on_cuda():
    from lora_analysis.analysis.merge_check import latency_check, merge_check, merge_verdict
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
    apply_lora(model, ["0", "2"], rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_(std=0.5)
    model = model.cuda()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).cuda()
    check = merge_check(model, x)
    assert check.skipped == {}                      # float16 and bfloat16 both run on CUDA
    assert set(check.errors["dtype"]) == {"float32", "bfloat16", "float16"}
    verdict = merge_verdict(check.errors)
    assert verdict.same, verdict.text
    low = check.errors[(check.errors["dtype"] == "bfloat16") & (check.errors["variant"] == "unmerged")]
    assert (low["max_abs_vs_fp32"] > 0).all()       # bf16 differs from float32: the audit measured on the GPU
    assert next(model.parameters()).device.type == "cuda"       # the audit left the model where it was
    table = latency_check(model, x, repeats=3, warmup=1, devices=["cuda"])
    assert set(table["device"]) == {"cuda"}
    assert set(table["variant"]) == {"base", "unmerged", "merged"}
    assert (table["median_ms"] > 0).all()
