"""The model zoo, its data and the device choice: shapes, the shifted digits task, the pretraining cache,
users' files with clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_analysis.device import available_devices, pick_device
from lora_analysis.training import data as D
from lora_analysis.training.gpt import GPTConfig, TinyGPT
from lora_analysis.training.models import DigitsMLP, digits_splits, prepare_task, rotate_digits


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == available_devices()[0]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not available on this machine: available are auto"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="device='tpu'"):
        pick_device("tpu")


def test_tiny_gpt_shapes_and_causality():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_embd=32, n_head=4)).eval()
    idx = torch.randint(0, 256, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 256)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    # a later token never changes earlier logits
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7], logits[:, 7])
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_digits_task_is_a_real_shift():
    source, target = digits_splits()
    assert source.x_train.shape[1] == 64 and len(source.x_train) + len(source.x_val) + len(target.x_train) \
        + len(target.x_val) == 1797
    img = torch.arange(64.0).view(1, 64)
    assert rotate_digits(img).view(8, 8)[0].tolist() == img.view(8, 8)[:, 7].tolist()
    assert torch.equal(rotate_digits(rotate_digits(rotate_digits(rotate_digits(img)))), img)


def test_pretrained_base_is_cached_by_config_and_data(lora_home, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(tmp_path / "fresh"))
    first = prepare_task("mlp-digits", pretrain_steps=30)
    assert first.info["pretrain"]["cache_hit"] is False
    meta_path = tmp_path / "fresh" / "cache" / "bases"
    files = sorted(p.name for p in meta_path.iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    meta = json.loads(next(meta_path.glob("*.json")).read_text())
    assert meta["config"]["steps"] == 30 and len(meta["data_sha256"]) == 64
    second = prepare_task("mlp-digits", pretrain_steps=30)
    assert second.info["pretrain"]["cache_hit"] is True
    a, b = first.build_model().state_dict(), second.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert prepare_task("mlp-digits", pretrain_steps=31).info["pretrain"]["cache_hit"] is False
    assert isinstance(first.build_model(), DigitsMLP)
    assert first.base_sha256 == second.base_sha256 != prepare_task("mlp-digits", pretrain_steps=31).base_sha256


def test_a_corrupt_cache_file_warns_and_is_pretrained_again(lora_home, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(tmp_path / "fresh"))
    first = prepare_task("mlp-digits", pretrain_steps=30)
    cache_file = Path(first.info["pretrain"]["cache_file"])
    cache_file.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match=f"{cache_file.name}.*pretraining it again"):
        again = prepare_task("mlp-digits", pretrain_steps=30)
    assert again.info["pretrain"]["cache_hit"] is False
    a, b = first.build_model().state_dict(), again.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)      # pretraining is deterministic: the same base again
    assert prepare_task("mlp-digits", pretrain_steps=30).info["pretrain"]["cache_hit"] is True
    cache_file.with_suffix(".json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="pretraining it again"):
        assert prepare_task("mlp-digits", pretrain_steps=30).info["pretrain"]["cache_hit"] is False


def test_an_unrelated_error_in_the_cache_propagates(lora_home, monkeypatch, tmp_path):
    """Only a missing or unreadable cache file means "pretrain again"; a bug is not hidden by it."""
    from lora_analysis.training import models

    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(tmp_path / "fresh"))
    prepare_task("mlp-digits", pretrain_steps=30)

    def buggy_load(path):
        raise KeyError("a bug in the loader")

    monkeypatch.setattr(models, "load_file", buggy_load)
    with pytest.raises(KeyError, match="a bug in the loader"):
        prepare_task("mlp-digits", pretrain_steps=30)


def test_base_is_good_on_source_and_bad_on_the_shifted_target(lora_home):
    task = prepare_task("mlp-digits")
    assert task.info["pretrain"]["metrics"]["source_val_accuracy"] > 0.9
    model = task.build_model()
    with torch.no_grad():
        acc = (model(task.data.x_val).argmax(-1) == task.data.y_val).float().mean()
    assert acc < 0.3


def test_corpora_differ_and_tokenise_per_byte():
    docs, code = D.python_docs_text(), D.python_source_text()
    assert len(docs) > 100_000 and len(code) > 100_000
    assert code.count("def ") / len(code) > 10 * docs.count("def ") / len(docs)
    tok = D.ByteTokenizer()
    assert tok.encode("hé").tolist() == [104, 195, 169] and tok.decode(tok.encode("hé")) == "hé"
    assert D.ByteTokenizer(100).encode("hé").tolist() == [4, 95, 69]
    x, y = D.token_batch(torch.arange(100), 8, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert D.read_text_file(tmp_path / "a.txt") == "hello world"
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert D.read_text_file(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "a.csv").write_text("id,content\n1,alpha\n2,beta\n")
    assert D.read_text_file(tmp_path / "a.csv") == "alpha\n\nbeta"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"   \n\n", "holds no text"),
    ("bin.txt", b"\x00\x01\x02binary", "looks binary"),
    ("latin.txt", "café".encode("latin-1"), "is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    ("nofield.jsonl", b'{"body2": "x"}\n', "line 1 has no text/content/body/code field"),
    ("nocol.csv", b"a,b\n1,2\n", "has no text column"),
    ("data.pdf", b"%PDF", "has suffix '.pdf'"),
])
def test_bad_text_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        D.read_text_file(path)
    assert name in str(err.value)


def test_user_csv_for_classification(lora_home, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    label = (x[:, 0] + x[:, 1] > 0).long()
    rows = ["f1,f2,f3,label,domain"] + [f"{a:.4f},{b:.4f},{c:.4f},{'yes' if l else 'no'},"
                                          f"{'source' if i % 2 else 'target'}"
                                          for i, ((a, b, c), l) in enumerate(zip(x.tolist(), label.tolist()))]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    task = prepare_task("mlp-digits", str(tmp_path / "t.csv"))
    assert task.info["classes"] == ["no", "yes"] and task.data.x_train.shape[1] == 3
    assert len(task.data.x_train) + len(task.data.x_val) == 100
    (tmp_path / "bad.csv").write_text("f1,label\n1.0,a\nabc,b\n")
    with pytest.raises(ValueError, match=r"bad.csv': row 3, column 'f1' holds 'abc', not a number"):
        prepare_task("mlp-digits", str(tmp_path / "bad.csv"))
    (tmp_path / "one.csv").write_text("f1,label\n1.0,a\n2.0,a\n")
    with pytest.raises(ValueError, match="has only one class"):
        prepare_task("mlp-digits", str(tmp_path / "one.csv"))
    (tmp_path / "nolabel.csv").write_text("f1,f2\n1,2\n")
    with pytest.raises(ValueError, match="has no column 'y'"):
        D.read_tabular_csv(tmp_path / "nolabel.csv", "y")
    (tmp_path / "garbled.csv").write_bytes(b'a,b\n"1,2\n\x00\x00')
    with pytest.raises(ValueError, match="garbled.csv"):
        prepare_task("mlp-digits", str(tmp_path / "garbled.csv"))


def test_bshift_task_pairs_each_docs_sentence_with_its_bigram_shift():
    """The built-in text task: every documentation sentence as written (label 0) and with two adjacent inner
    words swapped (label 1), the pair in one group (never split between training and validation)."""
    from lora_analysis.training.data import bshift_table, split_text_classification

    table = bshift_table()
    assert len(table.texts) > 1500 and table.classes == ["original", "shifted"]
    assert table.y.tolist() == [0, 1] * (len(table.texts) // 2)
    for original, shifted in zip(table.texts[::2], table.texts[1::2]):
        a, b = original.split(), shifted.split()
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(diff) == 2 and diff[1] == diff[0] + 1 and 0 < diff[0] and diff[1] < len(a) - 1
        assert (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
    n = 40
    ids = torch.arange(n)[:, None].repeat(1, 3)
    split = split_text_classification(ids, torch.ones_like(ids), table.y[:n], 2, table.groups[:n])
    train_groups = {table.groups[int(i)] for i in split.x_train[:, 0]}
    assert not train_groups & {table.groups[int(i)] for i in split.x_val[:, 0]} and len(split.y_val) == 8


# ---- source-task metrics: what a run forgets --------------------------------------------------------------

def test_mlp_digits_source_metrics_score_the_base_on_upright_digits(lora_home, one_thread):
    task = prepare_task("mlp-digits", pretrain_steps=30)
    model, cpu = task.build_model().train(), torch.device("cpu")
    base = task.source_metrics(model, cpu)
    assert set(base) == {"source_loss", "source_accuracy"} and model.training      # its mode is left as it was
    source, _ = digits_splits()
    with torch.no_grad():
        logits = model.eval()(source.x_val)
    assert base["source_accuracy"] == pytest.approx(float((logits.argmax(-1) == source.y_val).float().mean()))
    assert base["source_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, source.y_val)), rel=1e-5)
    with torch.no_grad():
        model.fc3.weight.zero_()
        model.fc3.bias.zero_()
    forgot = task.source_metrics(model, cpu)
    assert forgot["source_accuracy"] < base["source_accuracy"] and forgot["source_loss"] == pytest.approx(math.log(10))


@pytest.fixture
def one_thread():
    """The project's thread rule for the toy built-ins (one thread), for the block of a test."""
    from lora_analysis.training.runtime import threads_scope

    with threads_scope("tiny-gpt"):
        yield


def test_tiny_gpt_source_metrics_are_bounded_and_fixed(lora_home, one_thread):
    from lora_analysis.training import models

    task = prepare_task("tiny-gpt", pretrain_steps=2, seq_len=16)
    model, cpu = task.build_model(), torch.device("cpu")
    first, again = task.source_metrics(model, cpu), task.source_metrics(model, cpu)
    assert first == again and set(first) == {"source_loss", "source_perplexity"}      # the same windows each time
    assert first["source_perplexity"] == pytest.approx(math.exp(first["source_loss"]), rel=1e-6)
    seen = []
    original = models.F.cross_entropy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models.F, "cross_entropy", lambda logits, y, **kw: seen.append(y.numel()) or original(logits, y))
        task.source_metrics(model, cpu)
    assert 0 < sum(seen) <= models.SOURCE_MAX_TOKENS                                   # bounded: cheap at every eval


def test_a_user_csv_is_scored_on_the_rows_that_pretrained_its_base(lora_home, tmp_path):
    rows = "\n".join(f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows + "\n")
    task = prepare_task("mlp-digits", str(tmp_path / "t.csv"), pretrain_steps=5)
    assert set(task.source_metrics(task.build_model(), torch.device("cpu"))) == {"source_loss", "source_accuracy"}
