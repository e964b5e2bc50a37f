"""Data for the fine-tuning demos and for users' own files, all offline.

Built-in corpora ship with every Python install:
  - ``python-docs``: the English text of the CPython documentation topics (``pydoc_data.topics``);
  - ``python-source``: a fixed list of standard-library ``.py`` files (a different domain: code).
``mlp-digits`` uses scikit-learn's bundled 8×8 digits (``load_digits``, 1,797 images).

A built-in text-classification task ships the same way:
  - ``bshift-python-docs``: Bigram Shift (SentEval's BShift probing task, Conneau et al. 2018), on the
    1,206 prose sentences of the CPython documentation topics: is the sentence as written, or have two
    adjacent words been swapped? A word-order task: a bag-of-words view cannot solve it, and sentence
    embeddings trained for meaning barely see it, so a frozen encoder does poorly and fine-tuning helps.

Built-in language models read text per byte of UTF-8 (:class:`ByteTokenizer`); Hugging Face models use
their own tokenizer (:mod:`.hf`). Users' data files, folders and hub datasets are loaded with Hugging Face
``datasets`` (:mod:`.hf_data`); :func:`read_text_file` remains the plain reader of one text file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..paths import ENV

# A fixed list so the corpus (and the hash that keys the cache) is the same on every run of a given Python.
STDLIB_FILES = ("argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "csv.py", "dataclasses.py",
                "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py",
                "ipaddress.py", "json/decoder.py", "json/encoder.py", "operator.py", "pathlib.py", "pprint.py",
                "shlex.py", "shutil.py", "statistics.py", "string.py", "tempfile.py", "textwrap.py",
                "tokenize.py", "typing.py", "uuid.py", "collections/__init__.py", "logging/__init__.py")

CORPORA = ("python-docs", "python-source")
TEXT_TASKS = ("bshift-python-docs",)
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
MAX_FILE_BYTES = 512 * 2**20


def cache_dir() -> Path:
    """Where pretrained bases are cached: ``$LORA_ANALYSIS_HOME/cache`` or the user cache folder."""
    value = os.environ.get(ENV)
    if value:
        return Path(value).expanduser() / "cache"
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("lora-analysis"))


def sha256_text(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


# ---- built-in corpora --------------------------------------------------------------------------------

def python_docs_text() -> str:
    """English prose (with a few code samples): the CPython documentation topics, sorted by topic."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def python_source_text(files: tuple[str, ...] = STDLIB_FILES) -> str:
    """Python code: the listed standard-library files, concatenated (files missing here are skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / f).read_text(encoding="utf-8") for f in files if (root / f).is_file()]
    if not parts:
        raise ValueError(f"none of the standard-library files {files[:3]}... exist under {root}")
    return "\n\n".join(parts)


def corpus_text(name: str) -> str:
    """A built-in corpus by name (see ``CORPORA``)."""
    if name == "python-docs":
        return python_docs_text()
    if name == "python-source":
        return python_source_text()
    raise ValueError(f"corpus {name!r} is not known: choose one of {', '.join(CORPORA)} or give a .txt, "
                     ".jsonl or .csv file")


def docs_sentences() -> list[str]:
    """The prose sentences of the CPython documentation topics: 6 to 24 words, starting with a capital,
    ending with a full stop, without markup or code characters; sorted, unique."""
    paragraphs = re.split(r"\n\s*\n", python_docs_text())
    sentences = (re.sub(r"\s+", " ", s).strip() for p in paragraphs
                 for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p.replace("\n", " ")))
    return sorted({s for s in sentences if re.fullmatch(r"[A-Z][^*`<>{}\[\]=|\\_]+[.]", s)
                   and 6 <= len(s.split()) <= 24})


def bigram_shift(sentence: str, rng: random.Random) -> str | None:
    """The sentence with two adjacent words swapped, never the first or the last word (a capital moved
    inside or a full stop moved inside would give the answer away), never two equal words; None when no
    pair qualifies."""
    words = sentence.split()
    choices = [i for i in range(1, len(words) - 2) if words[i].lower() != words[i + 1].lower()]
    if not choices:
        return None
    i = rng.choice(choices)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


@dataclass
class TextTable:
    """Texts with labels: ``y`` (N,) int64 indexes ``classes``; rows of one ``group`` stay in one split."""

    texts: list[str]
    y: torch.Tensor
    classes: list[str]
    groups: list[int] | None = None


def bshift_table(seed: int = 0) -> TextTable:
    """Every documentation sentence twice: as written ("original") and bigram-shifted ("shifted"), the
    pair in one group so a sentence is never seen in training and validated on."""
    rng = random.Random(seed)
    texts, labels, groups = [], [], []
    for i, sentence in enumerate(docs_sentences()):
        shifted = bigram_shift(sentence, rng)
        if shifted is None:
            continue
        texts += [sentence, shifted]
        labels += [0, 1]
        groups += [i, i]
    return TextTable(texts, torch.tensor(labels), ["original", "shifted"], groups)


def text_task_table(name: str) -> TextTable:
    if name == "bshift-python-docs":
        return bshift_table()
    raise ValueError(f"text task {name!r} is not known: choose one of {', '.join(TEXT_TASKS)} or give a .csv or "
                     ".jsonl file with a text and a label column")


# ---- tokenisation ------------------------------------------------------------------------------------

class ByteTokenizer:
    """One token per UTF-8 byte. For a model whose vocabulary is smaller than 256, byte b becomes
    ``b % vocab_size`` (lossy, but it lets any tiny test model train on any text)."""

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} is too small for byte-level tokens (need >= 2)")
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> torch.Tensor:
        """text → (N,) int64 token ids."""
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        return ids % self.vocab_size if self.vocab_size < 256 else ids

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


# ---- reading users' files ----------------------------------------------------------------------------

def _check_file(path: str | os.PathLike, kind: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{kind} file '{path}' does not exist")
    if not path.is_file():
        raise ValueError(f"{kind} file '{path}' is not a file")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{kind} file '{path}' has suffix '{path.suffix}': use one of {', '.join(suffixes)}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{kind} file '{path}' is empty")
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{kind} file '{path}' is {size / 2**20:.0f} MiB: the limit is "
                         f"{MAX_FILE_BYTES // 2**20} MiB")
    return path


def _read_utf8(path: Path, kind: str) -> str:
    raw = path.read_bytes()
    if b"\0" in raw[:65536]:
        raise ValueError(f"{kind} file '{path}' looks binary (it holds NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{kind} file '{path}' is not UTF-8 text (bad byte at offset {exc.start})") from exc


TEXT_FIELDS = ("text", "content", "body", "code")


def read_text_file(path: str | os.PathLike, text_field: str | None = None) -> str:
    """The training text of a ``.txt`` file (as is), a ``.jsonl`` file (the ``text_field`` of each line,
    default the first of text/content/body/code present) or a ``.csv`` file (the ``text_field`` column,
    default the same names). Raises ``ValueError`` naming the file and the problem."""
    path = _check_file(path, "text", TEXT_SUFFIXES)
    content = _read_utf8(path, "text")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = content
    elif suffix == ".jsonl":
        pieces = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"text file '{path}' line {lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"text file '{path}' line {lineno} is not a JSON object")
            field = text_field or next((f for f in TEXT_FIELDS if f in record), None)
            if field is None or field not in record:
                raise ValueError(f"text file '{path}' line {lineno} has no "
                                 f"{repr(text_field) if text_field else 'text/content/body/code'} field "
                                 f"(keys: {', '.join(list(record)[:8])})")
            pieces.append(str(record[field]))
        text = "\n\n".join(pieces)
    else:
        rows = list(csv.DictReader(io.StringIO(content)))
        if not rows:
            raise ValueError(f"text file '{path}' has a header but no rows")
        columns = list(rows[0])
        field = text_field or next((f for f in TEXT_FIELDS if f in columns), None)
        if field is None or field not in columns:
            raise ValueError(f"text file '{path}' has no {repr(text_field) if text_field else 'text'} column "
                             f"(columns: {', '.join(columns[:12])})")
        text = "\n\n".join(r[field] or "" for r in rows)
    if len(text.strip()) == 0:
        raise ValueError(f"text file '{path}' holds no text")
    return text


def read_text_classification(path: str | os.PathLike, text_column: str | None = None,
                             label_column: str | None = None) -> TextTable:
    """Texts and labels of every row of a ``.csv``/``.jsonl``/``.json``/``.parquet`` file, read with
    ``datasets`` (:mod:`.hf_data`): the ``text_column`` (default the first of text/sentence/content/body/
    code present) and the ``label_column`` (default label/labels/target/class). Labels are taken as text;
    ``classes`` are their sorted distinct values. Raises ``ValueError`` naming the file, and the row of the
    first empty text or label."""
    from . import hf_data

    splits = hf_data.load_splits(str(path))
    table, _ = hf_data.classification_tables(splits, text_column, label_column)
    return table


def encode_texts(texts: list[str], max_len: int, tokenizer=None, vocab_size: int = 256,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T) int64, T = the longest text's length up to ``max_len``,
    padded with ``pad_id`` (mask 0). Without a tokenizer: UTF-8 bytes (modulo ``vocab_size`` below 256)."""
    if tokenizer is not None:
        batch = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()
    tok = ByteTokenizer(vocab_size)
    rows = [tok.encode(t)[:max_len] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


@dataclass
class TabularData:
    """A classification table: features X (N, F) float32, labels y (N,) int64 indexing ``classes``."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    feature_names: list[str]
    extra: dict[str, list] = field(default_factory=dict)   # non-feature columns asked for, raw values


def read_tabular_csv(path: str | os.PathLike, label_column: str | None = None,
                     extra_columns: tuple[str, ...] = ()) -> TabularData:
    """Read a CSV for classification: numeric feature columns and one label column (default ``label``,
    else ``target``, else ``class``, else the last column). Raises ``ValueError`` naming the file, and the
    row and column of the first non-numeric feature value. ``extra_columns`` present in the file are
    returned raw in ``extra`` and are not features."""
    import pandas as pd

    path = _check_file(path, "CSV", (".csv",))
    _read_utf8(path, "CSV")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"CSV file '{path}' could not be parsed ({str(exc).strip().splitlines()[0]})") from exc
    if frame.empty or frame.shape[1] < 2:
        raise ValueError(f"CSV file '{path}' needs a header, at least one row, and at least one feature "
                         f"column besides the label (it has {frame.shape[0]} rows, {frame.shape[1]} columns)")
    if label_column is None:
        label_column = next((c for c in ("label", "target", "class") if c in frame.columns), frame.columns[-1])
    if label_column not in frame.columns:
        raise ValueError(f"CSV file '{path}' has no column {label_column!r} (columns: "
                         f"{', '.join(map(str, frame.columns[:12]))})")
    extra = {c: frame[c].tolist() for c in extra_columns if c in frame.columns and c != label_column}
    features = frame.drop(columns=[label_column, *extra])
    if features.shape[1] == 0:
        raise ValueError(f"CSV file '{path}' has no feature columns besides the label {label_column!r}")
    numeric = features.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & features.notna() | features.isna()
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise ValueError(f"CSV file '{path}': row {row + 2}, column {features.columns[col]!r} holds "
                         f"{features.iat[row, col]!r}, not a number (features must be numeric)")
    labels = frame[label_column].astype(str)
    classes = sorted(labels.unique())
    if len(classes) < 2:
        raise ValueError(f"CSV file '{path}': label column {label_column!r} has only one class ({classes[0]!r})")
    index = {c: i for i, c in enumerate(classes)}
    return TabularData(x=torch.tensor(numeric.to_numpy(dtype=np.float32)),
                       y=torch.tensor([index[v] for v in labels], dtype=torch.long),
                       classes=classes, feature_names=[str(c) for c in features.columns], extra=extra)


# ---- splits the trainer samples from ------------------------------------------------------------------

@dataclass
class ClassificationSplit:
    """Train and validation sets: x (N, F) float32, y (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    def fingerprint(self) -> str:
        return sha256_text(*(t.numpy().tobytes() for t in (self.x_train, self.y_train, self.x_val, self.y_val)))


@dataclass
class TextClassificationSplit(ClassificationSplit):
    """Tokenised texts: x (N, T) int64 token ids, padded; ``mask_*`` (N, T) their attention masks (1: a
    token, 0: padding); y (N,) int64. Batches are ``{"input_ids", "attention_mask"}`` dicts."""

    mask_train: torch.Tensor
    mask_val: torch.Tensor

    def fingerprint(self) -> str:
        return sha256_text(super().fingerprint(), self.mask_train.numpy().tobytes(), self.mask_val.numpy().tobytes())


def split_text_classification(ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, num_classes: int,
                              groups: list[int] | None = None, val_fraction: float = 0.2,
                              seed: int = 0) -> TextClassificationSplit:
    """Shuffle the groups (each row its own group by default) with ``seed`` and hold out ``val_fraction``."""
    if len(ids) < 4:
        raise ValueError(f"{len(ids)} rows are too few to train and validate on (need at least 4)")
    groups = torch.arange(len(ids)) if groups is None else torch.as_tensor(groups)
    unique = torch.unique(groups)
    perm = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    held = perm[:max(1, int(round(len(unique) * val_fraction)))]
    val = torch.isin(groups, held)
    train = (~val).nonzero().squeeze(1)
    val = val.nonzero().squeeze(1)
    return TextClassificationSplit(ids[train], y[train], ids[val], y[val], num_classes, mask[train], mask[val])


def classification_inputs(split: ClassificationSplit, rows=slice(None), part: str = "val"):
    """The model inputs of some rows: x (n, F), or for texts a dict of input_ids and attention_mask (n, T)
    without the columns that are padding in all of those rows."""
    x = (split.x_val if part == "val" else split.x_train)[rows]
    if not isinstance(split, TextClassificationSplit):
        return x
    mask = (split.mask_val if part == "val" else split.mask_train)[rows]
    keep = mask.bool().any(0)
    return {"input_ids": x[:, keep], "attention_mask": mask[:, keep]}


@dataclass
class TokenSplit:
    """Token streams (N,) int64 to cut training windows from; ``seq_len`` tokens per window."""

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int

    def fingerprint(self) -> str:
        return sha256_text(self.train.numpy().tobytes(), self.val.numpy().tobytes(), str(self.seq_len))


def split_classification(x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.2,
                         seed: int = 0) -> ClassificationSplit:
    """Shuffle with ``seed`` and hold out ``val_fraction`` of the rows."""
    if len(x) < 4:
        raise ValueError(f"{len(x)} rows are too few to train and validate on (need at least 4)")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return ClassificationSplit(x[train], y[train], x[val], y[val], int(y.max()) + 1)


def split_tokens(ids: torch.Tensor, seq_len: int, val_fraction: float = 0.1) -> TokenSplit:
    """The last ``val_fraction`` of the stream is validation (no shuffling: windows would overlap)."""
    n_val = max(int(len(ids) * val_fraction), seq_len + 1)
    if len(ids) - n_val < seq_len + 1:
        raise ValueError(f"the text gives {len(ids)} tokens: too few for windows of {seq_len} tokens plus a "
                         f"validation part (need at least {2 * (seq_len + 1)})")
    return TokenSplit(ids[:-n_val].clone(), ids[-n_val:].clone(), seq_len)


def classification_batch(split: ClassificationSplit, batch_size: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows (with replacement): x (B, F) (texts: a dict of input_ids and attention_mask), y (B,)."""
    idx = torch.randint(0, len(split.x_train), (batch_size,), generator=generator)
    return classification_inputs(split, idx, "train"), split.y_train[idx]


def token_batch(stream: torch.Tensor, seq_len: int, batch_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs x (B, T) and next-token targets y (B, T), y[t] = x[t + 1]."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = stream[starts[:, None] + offsets]          # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def token_eval_batches(stream: torch.Tensor, seq_len: int, batch_size: int,
                       max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows from the start of ``stream`` (fixed, so every eval sees the same tokens),
    at most ``max_tokens`` target tokens, as (x, y) batches of up to ``batch_size`` windows."""
    n = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
