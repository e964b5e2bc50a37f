"""Users' data through Hugging Face ``datasets``: tiny causal LMs and a tiny BERT built from configs, with
small real tokenizers trained here, fine-tuned from .csv/.jsonl/.parquet/.txt files; their adapters load in
PEFT with the same outputs; instruction and chat data take the loss on the response only."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import transformers
from peft import PeftModel

from lora_analysis import runstore
from lora_analysis.cli import main
from lora_analysis.lora import load_adapter
from lora_analysis.training import TrainConfig, prepare_task, train
from lora_analysis.training import hf_data
from lora_analysis.training.hf_data import IGNORE_INDEX, instruction_example
from lora_analysis.training.trainer import evaluate

WORDS = "good great fine nice bad awful poor sad the movie was film plot and very really a it".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=g)) + "." for _ in range(n)]


def _tokenizer(path) -> None:
    """A byte-level BPE of 300 ids that starts every text with <s> (as Llama's does), ends turns with </s>,
    and carries a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_sentences(50) + ["<|user|><|assistant|><|system|> Q: A:"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _causal_lm(kind: str, path) -> str:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    else:
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    _tokenizer(path)
    return str(path)


def _bert(path) -> str:
    from tests.test_training_hf import _save_tiny_bert
    return _save_tiny_bert(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _causal_lm("llama", tmp_path_factory.mktemp("models") / "llama")


def _same_logits_in_peft(model_path: str, adapter_dir, ours: torch.nn.Module, inputs: dict,
                         auto=transformers.AutoModelForCausalLM, **kwargs) -> None:
    theirs = PeftModel.from_pretrained(auto.from_pretrained(model_path, **kwargs), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)


# ---- training from files, adapters in PEFT ------------------------------------------------------------

def test_causal_lm_trains_on_packed_text_from_a_csv_and_its_adapter_loads_in_peft(lora_home, tmp_path):
    path = _causal_lm("gpt2", tmp_path / "gpt2")
    csv = tmp_path / "notes.csv"
    pd.DataFrame({"id": range(60), "body": _sentences(60)}).to_csv(csv, index=False)
    task = prepare_task(path, str(csv), text_field="body", seq_len=32)
    assert task.data.layout == "packed" and "bytes" not in task.info["tokenizer"]
    assert task.data_name == str(csv.resolve()) and task.data.held_out == "10% of the windows (seed 0)"
    result = train(TrainConfig(model=path, data=str(csv), text_field="body", seq_len=32, steps=20, batch_size=8,
                               lr=1e-2, eval_every=20), task=task)
    assert result.status == "completed", result.error
    assert result.metrics["val_loss"] < result.metrics["base_val_loss"] - 0.1
    _same_logits_in_peft(path, result.run_dir / "adapter", result.model, task.data.held_out_inputs(3))


def test_instruction_jsonl_through_the_cli_trains_on_responses_and_loads_in_peft(lora_home, tmp_path, llama, capsys):
    rows = [{"question": f"Q: {p}", "answer": f"A: {p.split()[0]} {p.split()[1]}"} for p in _sentences(40)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", llama, "--data", str(data), "--prompt-column", "question", "--response-column",
            "answer", "--task", "causal-lm", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
            "--steps", "25", "--batch-size", "8", "--lr", "1e-2", "--seq-len", "32", "-q", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "completed" and record["val_loss"] < record["base_val_loss"] - 0.1
    run = runstore.load_run(record["run_id"])
    assert run.config["prompt_column"] == "question" and run.config["response_column"] == "answer"
    task = prepare_task(llama, str(data), prompt_column="question", response_column="answer", seq_len=32)
    ours = task.build_model()
    load_adapter(ours, run.dir / "adapter")
    _same_logits_in_peft(llama, run.dir / "adapter", ours, task.data.held_out_inputs(4))



def test_a_sweep_takes_the_same_data_flags(lora_home, tmp_path, llama, capsys):
    data = tmp_path / "qa.csv"
    pd.DataFrame({"q": _sentences(12), "a": _sentences(12, seed=1)}).to_csv(data, index=False)
    argv = ["sweep", "--model", llama, "--data", str(data), "--prompt-column", "q", "--response-column", "a",
            "--task", "causal-lm", "--ranks", "1,2", "--alphas", "4", "--targets", "q_proj,v_proj", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--gradient-checkpointing", "-q", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert {runstore.load_run(r["run_id"]).config["response_column"] for r in rows} == {"a"}

def test_encoder_trains_from_a_csv_through_the_cli_and_its_adapter_loads_in_peft(lora_home, tmp_path, capsys):
    path = _bert(tmp_path / "bert")
    from tests.test_training_hf import _sentiment_csv
    csv = _sentiment_csv(tmp_path / "reviews.csv", rows=48)
    argv = ["train", "--model", path, "--data", csv, "--text-column", "review", "--label-column", "label",
            "--task", "classification", "--rank", "4", "--alpha", "8", "--targets", "query,value", "--steps", "120",
            "--batch-size", "8", "--lr", "1e-2", "-q", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "completed" and record["val_loss"] < record["base_val_loss"]
    run = runstore.load_run(record["run_id"])
    assert json.loads((run.dir / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    task = prepare_task(path, csv, text_field="review", label_column="label")
    ours = task.build_model()
    load_adapter(ours, run.dir / "adapter")
    inputs = {"input_ids": task.data.x_val, "attention_mask": task.data.mask_val}
    _same_logits_in_peft(path, run.dir / "adapter", ours, inputs,
                         auto=transformers.AutoModelForSequenceClassification, num_labels=2)


# ---- what the examples hold ----------------------------------------------------------------------------

def test_the_response_only_label_mask_is_exact(lora_home, tmp_path, llama):
    assert instruction_example([1, 7, 8], [9, 10, 2], 16) == {"input_ids": [1, 7, 8, 9, 10, 2],
                                                               "labels": [-100, -100, -100, 9, 10, 2]}
    assert instruction_example([1, 7, 8], [9, 10, 2], 4)["labels"] == [-100, -100, -100, 9]      # truncated
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was", "response": "very good"}) + "\n"
                    + json.dumps({"prompt": "a film", "response": "bad"}) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    prompt, response = (tok("the movie was", add_special_tokens=False)["input_ids"],
                        tok("very good", add_special_tokens=False)["input_ids"])
    task = prepare_task(llama, str(data), seq_len=32)          # prompt/response found by their names
    assert task.data.layout == "instruction"
    every = {tuple(i): lab for part in (task.data.train, task.data.val)
             for i, lab in zip(part["input_ids"], part["labels"])}
    ids = tuple([tok.bos_token_id] + prompt + response + [tok.eos_token_id])
    assert every[ids] == [-100] * (1 + len(prompt)) + response + [tok.eos_token_id]
    # a batch: right-padded by DataCollatorForSeq2Seq, targets shifted by one, -100 on padding
    from datasets import Dataset
    task.data.val = Dataset.from_dict({"input_ids": [list(ids), [1, 5, 6]], "labels": [every[ids], [-100, -100, 6]]})
    [(x, y)] = task.data.eval_batches(2, 10**6)
    assert x["input_ids"][1].tolist() == [1, 5, 6] + [tok.pad_token_id] * (len(ids) - 3)
    assert x["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(ids) - 3)
    assert y[1].tolist() == [-100, 6] + [-100] * (len(ids) - 2)
    assert y[0].tolist() == every[ids][1:] + [-100]


def test_chat_messages_take_the_loss_on_assistant_turns_only(lora_home, tmp_path, llama):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the plot"},
                    {"role": "assistant", "content": "very good"}, {"role": "user", "content": "and"},
                    {"role": "assistant", "content": "sad"}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation[:3 + 2 * (i % 2)]}) + "\n" for i in range(6)))
    task = prepare_task(llama, str(data), seq_len=128)
    assert task.data.layout == "chat" and max(map(len, task.data.train["input_ids"])) < 128     # not truncated
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    longest = max(list(task.data.train) + list(task.data.val), key=lambda e: len(e["input_ids"]))
    assert tok.decode(longest["input_ids"]) == tok.apply_chat_template(conversation, tokenize=False)
    trained = [i for i, l in zip(longest["input_ids"], longest["labels"]) if l != IGNORE_INDEX]
    assert trained == [i for i, l in zip(longest["input_ids"], longest["labels"]) if l == i]
    assert tok.decode(trained) == "very good</s>sad</s>"
    no_template = tmp_path / "plain"
    _causal_lm("gpt2", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template: give prompt/response columns"):
        prepare_task(str(no_template), str(data), seq_len=64)


def test_evaluation_is_the_mean_loss_over_response_tokens(lora_home, tmp_path, llama):
    data = tmp_path / "qa.csv"
    pd.DataFrame({"prompt": _sentences(10), "response": _sentences(10, seed=1)}).to_csv(data, index=False)
    task = prepare_task(llama, str(data), seq_len=64)
    model = task.build_model().eval()
    got = evaluate(task, model, torch.device("cpu"), batch_size=3, max_eval_tokens=10**6)["val_loss"]
    losses = []
    with torch.no_grad():
        for ids, labels in zip(task.data.val["input_ids"], task.data.val["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            keep = torch.tensor(labels[1:]) != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(logits[keep], torch.tensor(labels[1:])[keep],
                                                            reduction="none"))
    assert got == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)


def test_parquet_and_txt_files_load_and_packing_gives_full_windows(lora_home, tmp_path, llama):
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"text": _sentences(30)}).to_parquet(parquet)
    task = prepare_task(llama, str(parquet), seq_len=16)
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    stream = [i for s in _sentences(30) for i in tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = list(task.data.train["input_ids"]) + list(task.data.val["input_ids"])
    assert {len(w) for w in windows} == {16} and len(windows) == len(stream) // 16
    assert sorted(map(tuple, windows)) == sorted(tuple(stream[i:i + 16]) for i in range(0, len(stream) // 16 * 16, 16))
    txt = tmp_path / "notes.txt"
    txt.write_text("\n".join(_sentences(20)) + "\n")
    splits = hf_data.load_splits(str(txt))
    assert len(splits.train) == 1 and splits.train[0]["text"] == txt.read_text()      # the file is one text
    assert prepare_task(llama, str(txt), seq_len=16).data.layout == "packed"


def test_a_folder_with_a_validation_file_is_held_out_and_splits_are_checked(lora_home, tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    pd.DataFrame({"text": _sentences(12), "label": ["pos", "neg"] * 6}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": _sentences(4, 1), "label": ["pos", "neg"] * 2}).to_csv(folder / "validation.csv",
                                                                                   index=False)
    splits = hf_data.load_splits(str(folder))
    assert (len(splits.train), len(splits.val), splits.held_out) == (12, 4, "the validation split")
    assert len(hf_data.load_splits(str(folder), split="train[:5]").train) == 5
    with pytest.raises(ValueError, match=r"split 'dev' is not in .*reviews: its splits are train, validation"):
        hf_data.load_splits(str(folder), split="dev")
    task = prepare_task(_bert(tmp_path / "bert"), str(folder))
    assert (len(task.data.y_train), len(task.data.y_val)) == (12, 4) and task.info["classes"] == ["neg", "pos"]


def test_bad_data_gives_value_errors_naming_the_value_and_what_exists(lora_home, tmp_path, llama):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"body": _sentences(8)}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"no text column 'txt' \(columns: body\): name it with --text-column"):
        prepare_task(llama, str(csv), text_field="txt")
    with pytest.raises(ValueError, match=r"no response column 'reply' \(columns: body\).*--response-column"):
        prepare_task(llama, str(csv), prompt_column="body", response_column="reply")
    with pytest.raises(ValueError, match="missing.jsonl' does not exist"):
        prepare_task(llama, str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' \(as json\) could not be loaded"):
        hf_data.load_splits(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match=r"dataset 'some-org/not-cached' could not be loaded.*This machine is offline"):
        hf_data.load_splits("some-org/not-cached")
    with pytest.raises(ValueError, match="gives 0 full windows of 64 tokens: too few.*2 × seq_len"):
        prepare_task(llama, str(csv), text_field="body", seq_len=64, data_split="train[:1]")
    with pytest.raises(ValueError, match="instruction data, which needs the model's tokenizer"):
        hf_data.causal_lm_split(hf_data.load_splits(str(csv)), None, 16, prompt_column="body", response_column="body")
