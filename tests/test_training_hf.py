"""Hugging Face models, offline: tiny GPT-2 and Llama (causal LMs) and a tiny BERT (sequence classification)
built from configs, saved to tmp_path, fine-tuned with LoRA; the run's adapter loads with PEFT on the same
base and gives the same logits. The tokenizer is loaded the way the model is."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from lora_analysis import runstore
from lora_analysis.lora import lora_layers
from lora_analysis.training import TrainConfig, prepare_task, train

WORDS = "good great fine nice bad awful poor sad the movie was film plot and very really a it".split()


def _save_tokenizer(path, kind: str = "bpe") -> None:
    """A real (tiny) tokenizer, trained here: byte-level BPE with 300 ids, or a BERT WordPiece with [CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(["def f(x): return x + 1, the docs of python"] * 5,
                                trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator([" ".join(WORDS)] * 5, trainers.WordPieceTrainer(
            vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)


def _save_tiny_bert(path, tokenizer: bool = True) -> str:
    """A pretrained-encoder folder as the Hub has them: BertModel weights (no classification head)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(path)
    if tokenizer:
        _save_tokenizer(path, "wordpiece")
    return str(path)


def _sentiment_csv(path, rows: int = 48) -> str:
    """Texts whose label shows in their words: "pos" texts hold good/great/fine/nice, "neg" ones bad/awful/..."""
    g = torch.Generator().manual_seed(0)
    lines = ["review,label"]
    for i in range(rows):
        cue = WORDS[int(torch.randint(0, 4, (1,), generator=g)) + (4 if i % 2 else 0)]
        filler = " ".join(WORDS[8 + int(j)] for j in torch.randint(0, 10, (4,), generator=g))
        lines.append(f"{filler} {cue} {filler},{'neg' if i % 2 else 'pos'}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


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
    with pytest.warns(UserWarning, match="has no tokenizer"):
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
    x = task.data.held_out_inputs(2)             # two packed windows of 32 tokens, from datasets
    assert x["input_ids"].shape == (2, 32) and task.data.layout == "packed"
    result.model.eval()
    peft_model.eval()
    with torch.no_grad():
        ours, theirs = result.model(**x).logits, peft_model(**x).logits
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
    assert task.data_name == str(text.resolve()) and len(task.data.train) * 16 > 100
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
    _save_tokenizer(repo / "snapshots" / commit)
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


def _hub_snapshot(tmp_path, monkeypatch, repo_id: str, tokenizer: bool):
    """A hub cache holding ``repo_id`` (a tiny Llama), offline, as a download leaves it."""
    import huggingface_hub

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    _save_tiny("llama", repo / "snapshots" / commit)
    if tokenizer:
        _save_tokenizer(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_model_whose_tokenizer_cannot_be_found_is_an_error_not_bytes(lora_home, tmp_path, monkeypatch):
    """The bug of issue 9: the model's weights came from the Hub but its tokenizer was looked up locally only,
    the failure swallowed, and the model trained on raw bytes without a word. Now the tokenizer is resolved
    as the model is, and a hub model without one is refused, naming the tokenizer."""
    _hub_snapshot(tmp_path, monkeypatch, "tiny-org/no-tokenizer", tokenizer=False)
    with pytest.raises(ValueError, match="the tokenizer of 'tiny-org/no-tokenizer' could not be loaded"):
        prepare_task("tiny-org/no-tokenizer", "python-docs", seq_len=16)
    _hub_snapshot(tmp_path, monkeypatch, "tiny-org/with-tokenizer", tokenizer=True)
    task = prepare_task("tiny-org/with-tokenizer", "python-docs", seq_len=16)
    assert task.info["tokenizer"] != "bytes" and "tokenizer_warning" not in task.info


def test_a_folder_without_a_tokenizer_falls_back_to_bytes_loudly_and_the_run_records_it(lora_home, tmp_path):
    path = _save_tiny_bert(tmp_path / "bert", tokenizer=False)
    csv = _sentiment_csv(tmp_path / "reviews.csv", rows=12)
    with pytest.warns(UserWarning, match="has no tokenizer.*UTF-8 bytes"):
        result = train(TrainConfig(model=path, data=csv, text_field="review", steps=1, batch_size=2))
    run = runstore.load_run(result.run_id)
    assert run.task["tokenizer"] == "bytes (mod 120)" and "UTF-8 bytes" in run.task["tokenizer_warning"]
    with_tokenizer = _save_tiny_bert(tmp_path / "bert2")
    assert prepare_task(with_tokenizer, csv, text_field="review").info["tokenizer"] != "bytes (mod 120)"


def test_hf_encoder_trains_from_a_csv_and_its_adapter_loads_in_peft(lora_home, tmp_path):
    """A BERT folder (no head) fine-tuned for sequence classification from a CSV's text and label columns:
    LoRA on query/value plus the new classifier head (modules_to_save, as PEFT's SEQ_CLS), which trains and
    is saved in the adapter; PeftModel.from_pretrained gives the same logits."""
    path = _save_tiny_bert(tmp_path / "bert")
    csv = _sentiment_csv(tmp_path / "reviews.csv")
    task = prepare_task(path, csv, text_field="review", label_column="label")
    assert (task.kind, task.task_type, task.modules_to_save) == ("classification", "SEQ_CLS", ["classifier"])
    assert task.info["classes"] == ["neg", "pos"] and task.default_targets == ["query", "value"]
    base_head = task.build_model().classifier.weight.detach().clone()
    torch.testing.assert_close(base_head, task.build_model().classifier.weight)      # the new head is seeded
    result = train(TrainConfig(model=path, data=csv, text_field="review", rank=4, steps=120, batch_size=8, lr=1e-2),
                   task=task)
    assert result.status == "completed", result.error
    assert sorted(lora_layers(result.model)) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
                                                 for p in ("query", "value")]
    assert result.metrics["val_loss"] < result.metrics["base_val_loss"] - 0.05
    assert not torch.allclose(result.model.classifier.weight, base_head)              # the head trained
    adapter = result.run_dir / "adapter"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert "classifier" in peft_model.peft_config["default"].modules_to_save
    inputs = {"input_ids": task.data.x_val, "attention_mask": task.data.mask_val}
    result.model.eval()
    with torch.no_grad():
        ours, theirs = result.model(**inputs).logits, peft_model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # full fine-tuning records the encoder's Linear modules, not the new head (its W0 is no pretrained weight)
    full = train(TrainConfig(model=path, data=csv, text_field="review", method="full", steps=2, batch_size=4),
                 task=task)
    updates = runstore.load_updates(full.run_id)
    assert "classifier" not in updates and "bert.encoder.layer.0.attention.self.query" in updates


def test_text_classification_files_and_task_names_are_checked(lora_home, tmp_path):
    from lora_analysis.training.data import read_text_classification

    path = _save_tiny_bert(tmp_path / "bert")
    csv = _sentiment_csv(tmp_path / "reviews.csv", rows=8)
    with pytest.raises(ValueError, match=r"no text column .*columns: review, label.*--text-column"):
        prepare_task(path, csv)
    with pytest.raises(ValueError, match="no label column 'stars'"):
        prepare_task(path, csv, text_field="review", label_column="stars")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "good film", "label": 1}\n{"text": "", "label": 0}\n')
    with pytest.raises(ValueError, match="row 2 has an empty text"):
        read_text_classification(jsonl)
    with pytest.raises(ValueError, match="task='regression' is not allowed"):
        TrainConfig(model=path, task="regression").validate()
    with pytest.raises(ValueError, match="task='causal-lm' is not allowed for the built-in model 'mlp-digits'"):
        prepare_task("mlp-digits", task="causal-lm")


def test_a_folder_holding_only_a_pickle_is_refused_in_one_line(tmp_path):
    from lora_analysis.training import hf

    folder = tmp_path / "pickled"
    folder.mkdir()
    transformers.GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=1).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    for task in ("causal-lm", "classification"):
        with pytest.raises(ValueError) as info:
            hf.load_model(str(folder), task, num_labels=2)
        message = str(info.value)
        assert "\n" not in message and "pytorch_model.bin" in message and "never loaded" in message
        assert "safe_serialization=True" in message          # says how to convert
    # a safetensors file beside it: the folder is loadable, the pickle is ignored
    _save_tiny("gpt2", folder)
    (folder / "pytorch_model.bin").write_bytes(b"ignored")
    model, _ = hf.load_model(str(folder), "causal-lm")
    assert sum(p.numel() for p in model.parameters()) > 0
