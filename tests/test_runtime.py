"""runtime.prepare_for_device on CPU: gradient checkpointing gives the same loss and gradients as without
(a tiny GPT-2 built from its config under LoRA, tiny-gpt; in the trainer: the same losses), LoRA's own
dropout masks are replayed in the recomputation, compile (the "eager" backend: no compiler) keeps the
parameter names and a trained run's saved adapter, and models without checkpointing are refused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_analysis import apply_lora
from lora_analysis.lora.model import lora_layers
from lora_analysis.training import runtime
from lora_analysis.training.gpt import GPTConfig, TinyGPT
from lora_analysis.training.runtime import enable_gradient_checkpointing, prepare_for_device

transformers = pytest.importorskip("transformers")


def _settings(gradient_checkpointing=False, compile=False, model="test-model"):
    return SimpleNamespace(gradient_checkpointing=gradient_checkpointing, compile=compile, model=model)


def _gpt2(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _tiny_gpt(dropout: float = 0.0) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def _with_lora(base: nn.Module, targets, dropout: float) -> nn.Module:
    model = copy.deepcopy(base)
    apply_lora(model, targets, rank=4, alpha=8, dropout=dropout, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():       # B ≠ 0 so that every factor gets a gradient
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(4))
    return model.train()


def _count_lora_calls(model: nn.Module) -> list[int]:
    calls = [0]
    for layer in lora_layers(model).values():
        layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)        # the model's own dropout draws from the global RNG
    out = model(input_ids=ids) if hasattr(model, "config") and not isinstance(model, TinyGPT) else model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(1))


def _compare(plain: nn.Module, checkpointed: nn.Module, ids: torch.Tensor) -> None:
    calls = _count_lora_calls(checkpointed)
    loss0, grads0 = _loss_and_grads(plain, ids)
    loss1, grads1 = _loss_and_grads(checkpointed, ids)
    n_layers = len(lora_layers(checkpointed))
    assert calls[0] == 2 * n_layers             # every LoRA layer ran again in the backward pass
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) == 2 * n_layers
    for name, g in grads0.items():
        assert grads1[name] is not None and g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_gpt2_same_loss_and_grads_under_lora():
    base = _gpt2(dropout=0.1)
    plain, checkpointed = _with_lora(base, ["c_attn", "c_fc"], 0.1), _with_lora(base, ["c_attn", "c_fc"], 0.1)
    applied = prepare_for_device(checkpointed, _settings(gradient_checkpointing=True), torch.device("cpu"))
    assert applied == {"gradient_checkpointing": {"how": "transformers", "layers": 2}}
    assert checkpointed.config.use_cache is False
    # the embeddings are frozen (their output needs no grad): the non-reentrant checkpoint still trains LoRA
    assert not checkpointed.transformer.wte.weight.requires_grad
    _compare(plain, checkpointed, _ids(64))


def test_lora_dropout_masks_are_replayed_in_the_recomputation(monkeypatch):
    """Without replaying the run's generator, the recomputed block draws new LoRA dropout masks and the
    gradients are wrong: the replay is what makes the test above pass with dropout."""
    base = _gpt2(dropout=0.0)
    plain, checkpointed = _with_lora(base, ["c_attn"], 0.5), _with_lora(base, ["c_attn"], 0.5)
    monkeypatch.setattr(runtime, "lora_dropout_generators", lambda model: [])
    enable_gradient_checkpointing(checkpointed)
    _, grads0 = _loss_and_grads(plain, _ids(64))
    _, grads1 = _loss_and_grads(checkpointed, _ids(64))
    assert any(not torch.allclose(grads0[n], grads1[n]) for n in grads0)


def test_gradient_checkpointing_tiny_gpt_keeps_names_and_gradients():
    base = _tiny_gpt(dropout=0.1)
    plain, checkpointed = _with_lora(base, ["q_proj", "v_proj"], 0.2), _with_lora(base, ["q_proj", "v_proj"], 0.2)
    names = [n for n, _ in checkpointed.named_parameters()]
    applied = enable_gradient_checkpointing(checkpointed, name="tiny-gpt")
    assert applied == {"how": "torch.utils.checkpoint per block", "layers": 2}
    assert [n for n, _ in checkpointed.named_parameters()] == names
    _compare(plain, checkpointed, _ids(32))
    # in evaluation (or without gradients) the blocks run once, as before
    calls = _count_lora_calls(checkpointed.eval())
    with torch.no_grad():
        checkpointed(_ids(32))
    assert calls[0] == len(lora_layers(checkpointed))
    copied = copy.deepcopy(checkpointed)         # the copy's blocks call themselves, not the original's
    with torch.no_grad():
        copied.blocks[0].attn.q_proj.lora_B.weight.add_(1.0)
        assert not torch.allclose(copied(_ids(32)), checkpointed(_ids(32)))


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4)), None])
def test_gradient_checkpointing_refused_without_support(model):
    if model is None:           # a Hugging Face model class that declares no support
        model = _gpt2()
        model.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match=r"gradient_checkpointing is not supported for the model 'mlp-digits'"):
        prepare_for_device(model, _settings(gradient_checkpointing=True, model="mlp-digits"), torch.device("cpu"))


def test_nothing_applied_when_both_off():
    model = _with_lora(_gpt2(), ["c_attn"], 0.0)
    assert prepare_for_device(model, _settings(), torch.device("cpu")) == {}
    assert model._compiled_call_impl is None and not model.transformer.h[0].gradient_checkpointing


def test_compile_model_in_place():
    model = nn.Linear(3, 2)
    assert prepare_for_device(model, _settings(compile=True), torch.device("cpu"), compile_backend="eager") == \
        {"compile": {"backend": "eager", "device": "cpu"}}
    assert model._compiled_call_impl is not None and [n for n, _ in model.named_parameters()] == ["weight", "bias"]
    torch.testing.assert_close(model(torch.ones(1, 3)), model._call_impl(torch.ones(1, 3)))


# ---- through the trainer: the run settings gradient_checkpointing and compile ------------------------

GPT = dict(model="tiny-gpt", pretrain_steps=20, seq_len=32, batch_size=16, max_eval_tokens=1024)


def test_trainer_gradient_checkpointing_gives_the_same_losses(lora_home):
    from lora_analysis.training import TrainConfig, train
    from lora_analysis.training.trainer import task_for
    task = task_for(TrainConfig(**GPT))
    runs = [train(TrainConfig(rank=4, steps=3, eval_every=3, dropout=0.1, gradient_checkpointing=gc, **GPT),
                  task=task, save=False) for gc in (False, True)]
    assert all(r.status == "completed" for r in runs)
    assert isinstance(runs[1].model.blocks[0].forward, runtime.CheckpointedForward)
    losses = [r.history["train_loss"].dropna().to_numpy() for r in runs]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_trainer_refuses_gradient_checkpointing_for_mlp_digits(lora_home):
    from lora_analysis import runstore
    from lora_analysis.training import TrainConfig, train
    with pytest.raises(ValueError, match="gradient_checkpointing is not supported for the model 'mlp-digits'"):
        train(TrainConfig(model="mlp-digits", steps=2, gradient_checkpointing=True))
    assert runstore.list_runs() == []           # a refused run leaves nothing behind


def test_trainer_compile_saves_the_same_adapter(lora_home, monkeypatch):
    from lora_analysis.training import TrainConfig, train
    from lora_analysis.training.trainer import task_for
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")    # torch.compile's plumbing, no compiler
    task = task_for(TrainConfig(model="mlp-digits"))
    runs = [train(TrainConfig(model="mlp-digits", rank=2, steps=4, eval_every=4, compile=c), task=task)
            for c in (False, True)]
    assert runs[1].model._compiled_call_impl is not None and runs[0].model._compiled_call_impl is None
    assert [n for n, _ in runs[1].model.named_parameters()] == [n for n, _ in runs[0].model.named_parameters()]
    a, b = (load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
