"""Hugging Face causal LMs, offline: tiny GPT-2 and Llama built from configs, saved to tmp_path, fine-tuned
with LoRA; the run's adapter loads with PEFT on the same base and gives the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel

from lora_analysis import runstore
from lora_analysis.lora import lora_layers
from lora_analysis.training import TrainConfig, prepare_task, train


def _save_tiny(kind: str, path) -> str:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)       # no tokenizer files: the byte-level fallback is used
    return str(path)


@pytest.mark.parametrize("kind, targets", [("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
                                           ("llama", [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                      for p in ("q_proj", "v_proj")])])
def test_hf_lora_run_loads_in_peft_with_the_same_logits(lora_home, tmp_path, kind, targets):
    path = _save_tiny(kind, tmp_path / kind)
    task = prepare_task(path, "python-docs", seq_len=32)
    assert task.info["tokenizer"] == "bytes" and task.task_type == "CAUSAL_LM"
    result = train(TrainConfig(model=path, data="python-docs", seq_len=32, steps=15, batch_size=4, lr=1e-2,
                               max_eval_tokens=256), task=task)
    assert result.status == "completed", result.error
    assert sorted(lora_layers(result.model)) == sorted(targets)          # per-architecture default targets
    assert result.metrics["val_loss"] < result.metrics["base_val_loss"]
    adapter = result.run_dir / "adapter"
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), adapter)
    assert peft_model.peft_config["default"].base_model_name_or_path == str(tmp_path / kind)
    x = task.data.val[:32][None]
    result.model.eval()
    peft_model.eval()
    with torch.no_grad():
        ours, theirs = result.model(input_ids=x).logits, peft_model(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the analyses get (out, in) factors and W0, Conv1D transposed to Linear orientation
    updates = runstore.load_updates(result.run_id)
    first = updates[targets[0]]
    assert first.shape == ((96, 32) if kind == "gpt2" else (32, 32))
    assert first.w0.shape == first.shape


def test_hf_full_finetuning_records_w_ft(lora_home, tmp_path):
    path = _save_tiny("gpt2", tmp_path / "gpt2")
    result = train(TrainConfig(model=path, method="full", data="python-source", seq_len=16, steps=3, batch_size=2,
                               max_eval_tokens=64))
    assert result.status == "completed"
    updates = runstore.load_updates(result.run_id)
    assert "lm_head" not in updates and len(updates) == 2 * 4        # c_attn, c_proj, c_fc, mlp.c_proj per block
    u = updates["transformer.h.0.attn.c_attn"]
    assert u.kind == "full" and u.shape == (96, 32) and not torch.equal(u.w0, u.w_ft)


def test_hf_text_file_data_and_bad_folder(lora_home, tmp_path):
    path = _save_tiny("llama", tmp_path / "llama")
    text = tmp_path / "notes.jsonl"
    text.write_text('{"text": "def f(x):\\n    return x + 1\\n"}\n' * 40)
    task = prepare_task(path, str(text), seq_len=16)
    assert task.data_name == str(text.resolve()) and len(task.data.train) > 100
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        prepare_task(str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        prepare_task(path, seq_len=128)


def test_a_run_records_the_revision_of_its_base(lora_home, tmp_path, monkeypatch):
    """Interface 7: a hub model's run keeps the commit it was trained on; a local folder's run and a built-in
    base's run keep a content hash (the same files give the same hash, other files another)."""
    import huggingface_hub

    from lora_analysis.training.models import folder_sha256, state_sha256

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    _save_tiny("llama", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read once, at import
    short = dict(data="python-docs", seq_len=16, steps=1, batch_size=2, max_eval_tokens=64)
    hub_run = runstore.load_run(train(TrainConfig(model="tiny-org/tiny-llama", **short)).run_id)
    assert hub_run.task[runstore.BASE_REVISION_KEY] == commit and hub_run.task["base_sha256"] is None

    folder = _save_tiny("gpt2", tmp_path / "gpt2")
    local_run = runstore.load_run(train(TrainConfig(model=folder, **short)).run_id)
    assert local_run.task[runstore.BASE_REVISION_KEY] is None
    assert local_run.task["base_sha256"] == folder_sha256(tmp_path / "gpt2") != folder_sha256(repo / "snapshots" / commit)

    task = prepare_task("mlp-digits", pretrain_steps=30)
    digits_run = runstore.load_run(train(TrainConfig(model="mlp-digits", pretrain_steps=30, steps=1), task=task).run_id)
    assert digits_run.task["base_sha256"] == state_sha256(task.build_model().state_dict())
    assert digits_run.task["base_sha256"] != prepare_task("mlp-digits", pretrain_steps=31).base_sha256


def test_models_that_draw_from_the_global_rng_take_turns(lora_home, tmp_path):
    """GPT-2's own dropout draws from the process's global RNG, which no per-run generator can replace:
    such runs take turns (one at a time per process) with the global RNG seeded per run, so threads
    still reproduce the run alone, and the caller's global RNG is left as it was."""
    import threading

    from lora_analysis.training.trainer import _GLOBAL_RNG_TURN, draws_from_global_rng

    path = _save_tiny("gpt2", tmp_path / "gpt2")
    task = prepare_task(path, "python-docs", seq_len=16)
    assert draws_from_global_rng(task.build_model())
    assert not draws_from_global_rng(prepare_task("mlp-digits", pretrain_steps=30).build_model())
    cfg = TrainConfig(model=path, data="python-docs", seq_len=16, steps=4, batch_size=2, max_eval_tokens=64,
                      dropout=0.1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    alone = train(cfg, task=task, save=False).history["train_loss"].tolist()[1:]
    assert torch.equal(torch.get_rng_state(), before)
    losses, held = {}, []

    def run(i):
        result = train(cfg, task=task, save=False, progress=lambda **_: held.append(_GLOBAL_RNG_TURN.locked()))
        losses[i] = result.history["train_loss"].tolist()[1:]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert losses == {0: alone, 1: alone, 2: alone} and len(held) == 12 and all(held)
