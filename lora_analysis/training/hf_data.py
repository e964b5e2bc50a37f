"""Users' data through Hugging Face ``datasets``: local files and folders, hub datasets, column names, a
held-out split, and the causal-LM layouts (packed text, instruction pairs, chat conversations).

    splits = load_splits("reviews.csv")                          # a local .txt/.jsonl/.json/.csv/.parquet
    splits = load_splits("imdb", split="train")                  # a hub dataset (cache, then the Hub)
    splits.train, splits.val, splits.held_out                    # Dataset, Dataset, "the test split"
    lm = causal_lm_split(splits, tokenizer, seq_len=128)         # packed text, or prompt/response, or chat

Where the data comes from:
  - a file ``.txt`` (the whole file is one text), ``.jsonl``/``.json``, ``.csv`` or ``.parquet``: loaded with
    ``load_dataset("text"/"json"/"csv"/"parquet", data_files=...)``, its Arrow cache under our cache folder;
  - a local folder: ``load_dataset(folder)``, which names splits by file name (``train.csv``,
    ``validation.csv``, ``test.csv``...);
  - anything else is a hub dataset id (``imdb``, ``org/name``), with an optional config name
    (``data_config``): the ``datasets`` cache first, the Hub unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
    is set; a dataset that cannot be loaded is a ``ValueError`` that says why (and that the machine is
    offline, when it is).
The training split is ``split`` (default ``train``; slices such as ``train[:1000]`` work); the held-out
split is the dataset's own validation (or else test) split when it has one, else a seeded fraction.

Causal-LM layouts (:func:`causal_lm_split`), chosen by the columns asked for or found:
  - **chat**: a ``messages`` column of ``[{"role", "content"}, ...]`` rendered with the tokenizer's chat
    template; the loss is on the assistant turns only;
  - **instruction**: ``prompt``/``response`` columns (also instruction/question and completion/output/answer);
    the loss is on the response only (labels -100 on the prompt and on padding);
  - **packed**: plain text, tokenised, EOS between texts, concatenated and cut into full windows of
    ``seq_len`` tokens (the ``group_texts`` recipe of transformers' ``run_clm``).
Batches of unequal length are padded by ``DataCollatorForSeq2Seq`` (labels padded with -100).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import ByteTokenizer, TextTable, _check_file, _read_utf8, cache_dir, sha256_text

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_SUFFIXES = tuple(FILE_BUILDERS)
HELD_OUT_SPLITS = ("validation", "valid", "val", "dev", "test")
TEXT_COLUMNS = ("text", "sentence", "content", "body", "code")
LABEL_COLUMNS = ("label", "labels", "target", "class")
PROMPT_COLUMNS = ("prompt", "instruction", "question")
RESPONSE_COLUMNS = ("response", "completion", "output", "answer")
MESSAGES_COLUMNS = ("messages",)
IGNORE_INDEX = -100        # labels that take no loss (PyTorch's cross_entropy and transformers' default)
LAYOUTS = ("packed", "instruction", "chat")


@dataclass
class Splits:
    """A training ``Dataset`` and the data's own held-out one (None when it has none: the caller then holds
    out a seeded fraction). ``name`` says where the data came from (a resolved file path, a folder or a hub
    id), ``held_out`` which split was held out ("" for none)."""

    train: Any
    val: Any
    name: str
    held_out: str

    @property
    def columns(self) -> list[str]:
        return list(self.train.column_names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0] not in line:
        line += f" ({str(cause).strip().splitlines()[0]})"
    return line


def offline() -> bool:
    """True when ``datasets`` may not reach the Hub: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set now
    (in the environment) or when ``datasets`` was imported."""
    from datasets import config
    return bool(config.HF_HUB_OFFLINE) or any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                                              for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextmanager
def _hub_access():
    """``datasets`` reads the offline variables once, at import: an offline setting made since (a job's
    environment, a test) is applied for the block, so a lookup never waits on network retries."""
    from datasets import config
    saved = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = offline()
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = saved


def is_local(data: str) -> bool:
    """True for a path: an existing file or folder, a name with a data-file suffix, or one that starts
    with ``.``, ``/`` or ``~``. Anything else is taken as a hub dataset id."""
    path = Path(data).expanduser()
    return path.exists() or path.suffix.lower() in DATA_SUFFIXES or data.startswith((".", "/", "~"))


def _quiet(function):
    """Run ``function`` with the datasets library's own progress bars off (loading a local file or packing a
    corpus takes a second; the run's progress is ours), restoring the caller's setting afterwards."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from datasets import utils as bars

        was_off = bars.are_progress_bars_disabled()
        bars.disable_progress_bars()
        try:
            return function(*args, **kwargs)
        finally:
            if not was_off:
                bars.enable_progress_bars()
    return wrapper


def _load(what: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; any failure becomes a ``ValueError`` naming ``what``."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:     # the library raises many kinds (ConnectionError, DatasetGenerationError...)
        raise ValueError(f"{what} could not be loaded: {_first_line(exc)}") from exc


def load_dataset_dict(data: str, config_name: str | None = None):
    """(DatasetDict, name): every split of a local file or folder, or of a hub dataset."""
    if is_local(data):
        path = Path(data).expanduser()
        if path.is_dir():
            folder = path.resolve()
            return _load(f"the data folder '{folder}'", str(folder), config_name,
                         cache_dir=str(cache_dir() / "datasets")), str(folder)
        path = _check_file(path, "data", DATA_SUFFIXES)
        builder = FILE_BUILDERS[path.suffix.lower()]
        if builder != "parquet":
            _read_utf8(path, "data")          # binary or non-UTF-8 text: named here, plainly
        options = {"sample_by": "document"} if builder == "text" else {}   # a .txt file is one text, as is
        return _load(f"data file '{path}' (as {builder})", builder, data_files={"train": str(path.resolve())},
                     cache_dir=str(cache_dir() / "datasets"), **options), str(path.resolve())
    where = "the datasets cache" + ("" if offline() else ", then the Hub")
    try:
        with _hub_access():
            return _load(f"dataset {data!r}" + (f" (config {config_name!r})" if config_name else ""), data,
                         config_name), data + (f":{config_name}" if config_name else "")
    except ValueError as exc:
        note = (" This machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): load the dataset once where "
                "the Hub is reachable, or give a local .jsonl/.csv/.parquet/.txt file or folder."
                if offline() else "")
        raise ValueError(f"{exc} (it is no local file or folder, so it was looked up as a hub dataset in {where})."
                         f"{note}") from exc.__cause__


def pick_splits(dataset_dict, name: str, split: str | None = None,
                reload: Callable[[str], Any] | None = None) -> Splits:
    """The training split (``split``, default ``train`` or the only split) and the held-out one: the first
    of validation/valid/val/dev/test the data has, else None (the caller holds out a seeded fraction). A
    split with a slice (``train[:100]``) is loaded by ``reload(split)``."""
    names = list(dataset_dict)
    if split is None:
        split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
        if split is None:
            raise ValueError(f"{name} has no 'train' split: choose one with --data-split (its splits: "
                             f"{', '.join(names)})")
    base = split.split("[")[0].strip()
    if base not in names or (split not in names and reload is None):
        raise ValueError(f"split {split!r} is not in {name}: its splits are {', '.join(names)}")
    train = dataset_dict[split] if split in names else reload(split)
    held = next((n for n in HELD_OUT_SPLITS if n in names and n != base), None)
    if held is None:
        return Splits(train, None, name, "")
    return Splits(train, dataset_dict[held], name, f"the {held} split")


@_quiet
def load_splits(data: str, *, split: str | None = None, config_name: str | None = None) -> Splits:
    """A dataset's training and held-out splits (see the module docstring). ``ValueError`` names a file
    that is missing, empty, binary or unparsable, a split that does not exist (and the ones that do), and
    a hub dataset that cannot be loaded (and why)."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"data={data!r} is not allowed: give a data file, a folder or a hub dataset id")
    dataset_dict, name = load_dataset_dict(data, config_name)

    def reload(sliced: str):
        if is_local(data) and Path(data).expanduser().is_file():
            path = Path(data).expanduser()
            builder = FILE_BUILDERS[path.suffix.lower()]
            return _load(f"split {sliced!r} of '{path}'", builder, data_files={"train": str(path.resolve())},
                         split=sliced, cache_dir=str(cache_dir() / "datasets"),
                         **({"sample_by": "document"} if builder == "text" else {}))
        if is_local(data):
            return _load(f"split {sliced!r} of {name}", str(Path(data).expanduser().resolve()), config_name,
                         split=sliced, cache_dir=str(cache_dir() / "datasets"))
        with _hub_access():
            return _load(f"split {sliced!r} of {name}", data, config_name, split=sliced)
    return pick_splits(dataset_dict, name, split, reload)


def column(columns: list[str], given: str | None, defaults: tuple[str, ...], role: str, flag: str,
           where: str) -> str:
    """The column ``given`` (it must exist), else the first of ``defaults`` present; ``ValueError`` names
    the column, the columns there are, and the flag that names one."""
    found = given if given is not None else next((c for c in defaults if c in columns), None)
    if found is None or found not in columns:
        raise ValueError(f"{where} has no {role} column {repr(found) if found else ''} (columns: "
                         f"{', '.join(columns[:12])}): name it with {flag}")
    return found


# ---- text classification ---------------------------------------------------------------------------

def _values(dataset, name: str) -> list[str]:
    """A column as text; a ``ClassLabel`` column gives its label names."""
    feature = dataset.features.get(name)
    names = getattr(feature, "names", None)
    return [("" if v is None else (names[v] if names and isinstance(v, int) and 0 <= v < len(names) else str(v)))
            for v in dataset[name]]


def text_table(dataset, text_column: str, label_column: str, where: str,
               classes: list[str] | None = None) -> TextTable:
    """Texts and labels (as text) of a ``Dataset``; ``classes`` (default: the sorted distinct labels)
    index them. ``ValueError`` names the row of the first empty text or label."""
    texts = _values(dataset, text_column)
    labels = [v.strip() for v in _values(dataset, label_column)]
    for kind, values in (("text", texts), ("label", labels)):
        empty = next((i for i, v in enumerate(values) if not v.strip() or v == "nan"), None)
        if empty is not None:
            raise ValueError(f"{where}: row {empty + 1} has an empty {kind}")
    classes = classes or sorted(set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{where}: labels {', '.join(map(repr, unknown[:5]))} of the held-out split are not in "
                         f"the training split (its classes: {', '.join(classes[:12])})")
    if len(classes) < 2:
        raise ValueError(f"{where}: label column {label_column!r} has only one class ({classes[0]!r})")
    index = {c: i for i, c in enumerate(classes)}
    return TextTable(texts, torch.tensor([index[v] for v in labels], dtype=torch.long), classes)


def classification_tables(splits: Splits, text_column: str | None = None,
                          label_column: str | None = None) -> tuple[TextTable, TextTable | None]:
    """(train, held-out) text tables; held-out is None when the data has no held-out split of its own
    (the caller splits the training rows)."""
    where = f"text-classification data '{splits.name}'"
    columns = splits.columns
    text = column(columns, text_column, TEXT_COLUMNS, "text", "--text-column", where)
    label = column(columns, label_column, LABEL_COLUMNS, "label", "--label-column", where)
    if splits.val is not None:
        train = text_table(splits.train, text, label, where)
        val_classes = sorted({v.strip() for v in _values(splits.val, label)})
        classes = sorted(set(train.classes) | set(val_classes))
        return text_table(splits.train, text, label, where, classes), \
            text_table(splits.val, text, label, f"{where} ({splits.held_out})", classes)
    return text_table(splits.train, text, label, where), None


# ---- causal language models --------------------------------------------------------------------------

def layout_of(columns: list[str], text_column: str | None, prompt_column: str | None, response_column: str | None,
              messages_column: str | None) -> str:
    """"chat", "instruction" or "packed": the columns asked for decide; without any, a ``messages`` column
    means chat, a prompt and a response column mean instruction, else plain text."""
    if messages_column is not None:
        return "chat"
    if prompt_column is not None or response_column is not None:
        return "instruction"
    if text_column is not None:
        return "packed"
    if any(c in columns for c in MESSAGES_COLUMNS):
        return "chat"
    if any(c in columns for c in PROMPT_COLUMNS) and any(c in columns for c in RESPONSE_COLUMNS):
        return "instruction"
    return "packed"


def _encoder(tokenizer, vocab_size: int) -> Callable[[list[str]], list[list[int]]]:
    """texts → token ids (no special tokens): the tokenizer, or UTF-8 bytes without one."""
    if tokenizer is None:
        tok = ByteTokenizer(vocab_size)
        return lambda texts: [tok.encode(t).tolist() for t in texts]
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


@_quiet
def pack(dataset, encode: Callable, text_column: str, seq_len: int, eos_id: int | None, separator: list[int]):
    """The ``group_texts`` recipe: each text tokenised, EOS (or ``separator``) after it, all concatenated and
    cut into windows of exactly ``seq_len`` tokens (the remainder is dropped). Returns a ``Dataset`` of
    ``input_ids`` (int32 windows; their labels are the same ids: the model predicts every next token)."""
    end = np.asarray([eos_id] if eos_id is not None else separator, dtype=np.int32)

    def tokenize(batch):
        return {"input_ids": [np.concatenate([np.asarray(ids, dtype=np.int32), end])
                              for ids in encode([t or "" for t in batch[text_column]])]}

    def group(batch):
        stream = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in batch["input_ids"]] or
                                [np.zeros(0, np.int32)])
        n = len(stream) // seq_len
        return {"input_ids": stream[:n * seq_len].reshape(n, seq_len)}
    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, keep_in_memory=True,
                         desc="tokenising")
    # one map batch of every text: the stream is cut once (the recipe's 1000-text batches each drop a remainder)
    return tokens.map(group, batched=True, batch_size=max(1, len(tokens)), keep_in_memory=True, desc="packing")


def instruction_example(prompt_ids: list[int], response_ids: list[int], seq_len: int) -> dict[str, list[int]]:
    """One prompt/response pair as a training example, truncated to ``seq_len`` tokens: ``labels`` are the
    response ids and -100 on every prompt token."""
    ids = (prompt_ids + response_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
    return {"input_ids": ids, "labels": labels}


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """A conversation rendered by the tokenizer's chat template, as (text, is an assistant turn) pieces whose
    concatenation is the whole rendering: each assistant turn is what rendering through it adds to the
    rendering up to it with the generation prompt. ``ValueError`` when the template does not render a
    conversation prefix by prefix (the pieces would not be the conversation)."""
    def render(part: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before) and full.startswith(through)):
            raise ValueError("the tokenizer's chat template does not render a conversation prefix by prefix, so its "
                             "assistant turns cannot be told apart: give prompt/response columns instead")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    pieces.append((full[len(done):], False))
    return [(text, assistant) for text, assistant in pieces if text]


def _messages(value: Any, row: int, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ValueError(f"{where}: row {row + 1} of the messages column is not a list of {{'role', 'content'}} "
                         f"messages ({str(value)[:80]!r})")
    return value


@dataclass
class LMExampleSplit:
    """Causal-LM training examples and held-out ones (``Dataset``s of ``input_ids`` and ``labels``, at most
    ``seq_len`` tokens; labels -100 where no loss is taken). ``layout`` is packed/instruction/chat;
    ``collate`` pads a list of examples into (B, T) tensors (``DataCollatorForSeq2Seq``; packed windows are
    all full and only stacked). Batches are (x, y): x ``{"input_ids", "attention_mask"}`` (B, T), y (B, T)
    the labels shifted left by one (y[:, t] is what the logits at t predict; -100 at the end), so the
    trainer's loss is the cross-entropy of the logits and y, ignoring -100."""

    train: Any
    val: Any
    seq_len: int
    layout: str
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] = field(repr=False)
    held_out: str = ""

    def _flat(self, part, column: str) -> np.ndarray:
        """Every token of ``column`` of a part, in row order, as one array (read from Arrow, no Python lists)."""
        import pyarrow.compute as pc
        return pc.list_flatten(part.with_format("arrow")[:][column]).to_numpy()

    def fingerprint(self) -> str:
        columns = ("input_ids", "labels") if "labels" in self.train.column_names else ("input_ids",)
        return sha256_text(self.layout, str(self.seq_len), *(
            self._flat(part, c).astype(np.int64).tobytes() for part in (self.train, self.val) for c in columns))

    def max_token_id(self) -> int:
        """The largest token id of the examples (read from the Arrow tables the parts select rows of)."""
        import pyarrow.compute as pc
        return max(int(pc.max(pc.list_flatten(part.data.column("input_ids"))).as_py() or 0)
                   for part in (self.train, self.val))

    def _batch(self, part, rows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        picked = part[rows]
        labels = picked["labels"] if "labels" in picked else picked["input_ids"]
        batch = self.collate([{"input_ids": i, "labels": l} for i, l in zip(picked["input_ids"], labels)])
        labels = batch["labels"].long()
        y = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}, y

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Random training examples (with replacement), padded: (x, y) as the class docstring says."""
        rows = torch.randint(0, len(self.train), (batch_size,), generator=generator).tolist()
        return self._batch(self.train, rows)

    def eval_batches(self, batch_size: int, max_tokens: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Held-out examples from the first, in order (the same every evaluation), until ``max_tokens`` label
        tokens (at least one batch)."""
        out, counted = [], 0
        for start in range(0, len(self.val), batch_size):
            x, y = self._batch(self.val, list(range(start, min(start + batch_size, len(self.val)))))
            out.append((x, y))
            counted += int((y != IGNORE_INDEX).sum())
            if counted >= max_tokens:
                break
        return out

    def held_out_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` held-out examples' model inputs (input_ids, attention_mask), padded."""
        return self._batch(self.val, list(range(min(max(1, n), len(self.val)))))[0]


def _stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Full windows of equal length: stacked, nothing to pad."""
    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


@_quiet
def causal_lm_split(splits: Splits, tokenizer, seq_len: int, *, vocab_size: int = 256, text_column: str | None = None,
                    prompt_column: str | None = None, response_column: str | None = None,
                    messages_column: str | None = None, val_fraction: float = 0.1, seed: int = 0) -> LMExampleSplit:
    """Training and held-out examples for a causal LM (the layouts of the module docstring). ``tokenizer``
    None means UTF-8 bytes (plain text only). Without a held-out split of its own, packed text holds out
    ``val_fraction`` of its windows, other layouts of their examples, chosen with ``seed``."""
    where = f"data '{splits.name}'"
    columns = splits.columns
    layout = layout_of(columns, text_column, prompt_column, response_column, messages_column)
    own = splits.val is not None
    parts = (splits.train, splits.val) if own else (splits.train,)
    encode = _encoder(tokenizer, vocab_size)
    if layout != "packed" and tokenizer is None:
        raise ValueError(f"{where} holds {layout} data, which needs the model's tokenizer (this model has none: its "
                         "text would be UTF-8 bytes); give plain text with --text-column, or a model with a tokenizer")
    if layout == "packed":
        text = column(columns, text_column, TEXT_COLUMNS, "text", "--text-column", where)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        made = [pack(p, encode, text, seq_len, eos, encode(["\n\n"])[0]) for p in parts]
    elif layout == "instruction":
        prompt = column(columns, prompt_column, PROMPT_COLUMNS, "prompt", "--prompt-column", where)
        response = column(columns, response_column, RESPONSE_COLUMNS, "response", "--response-column", where)
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None and \
            tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def examples(batch):
            prompts, responses = encode([p or "" for p in batch[prompt]]), encode([r or "" for r in batch[response]])
            rows = [instruction_example(bos + p, r + eos, seq_len) for p, r in zip(prompts, responses)]
            return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
        made = [p.map(examples, batched=True, remove_columns=p.column_names, keep_in_memory=True, desc="tokenising")
                for p in parts]
    else:
        messages = column(columns, messages_column, MESSAGES_COLUMNS, "messages", "--messages-column", where)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where} holds chat messages but the model's tokenizer has no chat template: give "
                             "prompt/response columns (--prompt-column, --response-column) instead")

        def examples(batch, indices):
            ids, labels = [], []
            for row, conversation in zip(indices, batch[messages]):
                pieces = chat_segments(tokenizer, _messages(conversation, row, where))
                tokens = encode([t for t, _ in pieces])
                ids.append(list(chain.from_iterable(tokens))[:seq_len])
                labels.append(list(chain.from_iterable(t if a else [IGNORE_INDEX] * len(t)
                                                       for t, (_, a) in zip(tokens, pieces)))[:seq_len])
            return {"input_ids": ids, "labels": labels}
        made = [p.map(examples, batched=True, with_indices=True, remove_columns=p.column_names, keep_in_memory=True,
                      desc="rendering chats") for p in parts]
    if layout != "packed":   # an example whose every loss token fell to truncation teaches nothing
        made = [m.filter(lambda e: any(v != IGNORE_INDEX for v in e["labels"][1:]), keep_in_memory=True) for m in made]
    unit = f"full windows of {seq_len} tokens" if layout == "packed" else "examples with a response"
    if not own:
        (everything,) = made
        if len(everything) < 2:
            raise ValueError(f"{where} gives {len(everything)} {unit}: too few to train and hold some out (need "
                             f"at least 2{', i.e. 2 × seq_len tokens' if layout == 'packed' else ''})")
        halves = everything.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        made = [halves["train"], halves["test"]]
        held_out = f"{val_fraction:.0%} of the {'windows' if layout == 'packed' else 'examples'} (seed {seed})"
    else:
        held_out = splits.held_out
    for part, what in zip(made, ("training", "held-out")):
        if len(part) == 0:
            raise ValueError(f"{where}: its {what} split gives no {unit}")
    if layout == "packed":
        collate = _stack
    else:
        from transformers import DataCollatorForSeq2Seq
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        tokenizer.padding_side = "right"      # positions count from the first token, as in training
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                         return_tensors="pt")
    return LMExampleSplit(made[0], made[1], seq_len, layout, collate, held_out)
