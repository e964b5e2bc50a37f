"""Hugging Face models and their tokenizers, loaded one way: a local folder, else the hub cache, else the
Hub (skipped when ``HF_HUB_OFFLINE`` is set).

    config = load_config("bert-base-uncased")            # which architecture, before any weights load
    kind = infer_task(config)                             # "classification" (encoders) or "causal-lm"
    model, new_modules = load_model("bert-base-uncased", kind, num_labels=3, seed=0)
    tokenizer, note = load_tokenizer("bert-base-uncased")

The tokenizer is resolved exactly as the model is. Only a *local folder* that holds no tokenizer file at
all falls back to UTF-8 bytes, with a warning (and ``note`` says so, for the run's record); a hub model
whose tokenizer cannot be loaded is an error, never silently bytes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

TASKS = ("classification", "causal-lm")

# Encoder families fine-tuned for sequence classification (``AutoModelForSequenceClassification``).
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "modernbert", "distilbert", "electra",
                 "albert", "camembert", "mpnet", "xlm", "ernie", "nomic_bert")

# Heads PEFT keeps trainable and saves for TaskType.SEQ_CLS (``modules_to_save``), when the model has them.
CLASSIFIER_HEADS = ("classifier", "score")

# Weight files that are Python pickles: never loaded (unpickling runs code that the file carries).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def _local_folder(name_or_path: str) -> Path | None:
    """The folder ``name_or_path`` names, or None for a hub id. A folder without config.json is refused."""
    local = Path(name_or_path).expanduser()
    if not local.is_dir():
        return None
    if not (local / "config.json").is_file():
        raise ValueError(f"'{local}' is a directory without config.json: not a Hugging Face model folder")
    return local


def check_no_pickle_only(folder: Path) -> None:
    """``ValueError`` (one line) when ``folder`` holds model weights only as pickles (``pytorch_model.bin``,
    ``*.pt``, ...) and no ``*.safetensors``: pickles are never loaded, and the message says how to convert."""
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"'{folder}' holds its weights only as a pickle ({', '.join(pickles[:3])}), and pickles are "
                         "never loaded here (unpickling can run code): convert it to safetensors first, where you "
                         "trust the file: AutoModel.from_pretrained(folder).save_pretrained(folder, "
                         "safe_serialization=True)")


def _attempts(local: Path | None) -> list[bool]:
    """``local_files_only`` values to try: a folder or an offline machine only looks locally; a hub id
    tries the hub cache first, then the Hub."""
    return [True] if local is not None or os.environ.get("HF_HUB_OFFLINE") else [True, False]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve(name_or_path: str, what: str, load):
    """``load(source, local_files_only)`` tried as :func:`_attempts` says; the last failure becomes a
    ``ValueError`` naming ``what`` could not be loaded and why."""
    local = _local_folder(name_or_path)
    source = str(local) if local is not None else name_or_path
    error: Exception | None = None
    for local_only in _attempts(local):
        try:
            return load(source, local_only)
        except (OSError, ValueError, KeyError) as exc:    # not found, not a model of this kind, offline
            error = exc
    raise ValueError(f"{what} of {name_or_path!r} could not be loaded "
                     f"({'local folder' if local is not None else 'hub id: cache, then the Hub'}): "
                     f"{_first_line(error)}") from error


def load_config(name_or_path: str):
    """The model's ``PretrainedConfig``."""
    from transformers import AutoConfig
    return _resolve(name_or_path, "the config", lambda s, lo: AutoConfig.from_pretrained(s, local_files_only=lo))


def infer_task(config) -> str:
    """"classification" for encoders (BERT, RoBERTa, DeBERTa, ModernBERT, ...), else "causal-lm"."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if config.model_type in ENCODER_TYPES or any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    return "causal-lm"


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r} is not allowed: choose one of {', '.join(TASKS)} (or leave it out: "
                         "the model's config decides)")


def load_model(name_or_path: str, task: str, num_labels: int | None = None, labels: list[str] | None = None,
               seed: int = 0) -> tuple[nn.Module, list[str]]:
    """(model, new_modules): float32 on the CPU. ``task`` "classification" loads
    ``AutoModelForSequenceClassification`` with ``num_labels`` outputs; its new head (and any other module
    the checkpoint lacks) is initialised from ``seed``, so every load gives the same base. ``new_modules``
    names those freshly initialised modules (PEFT's ``modules_to_save``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_task(task)
    local = _local_folder(name_or_path)
    if local is not None:
        check_no_pickle_only(local)
    if task == "causal-lm":
        # use_safetensors=True: transformers refuses pickled weights instead of unpickling them
        return _resolve(name_or_path, "the causal LM",
                        lambda s, lo: AutoModelForCausalLM.from_pretrained(s, local_files_only=lo, dtype=torch.float32,
                                                                           use_safetensors=True)), []
    kwargs = {"num_labels": num_labels}
    if labels:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={c: i for i, c in enumerate(labels)})

    def load(source: str, local_only: bool):
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()   # its load report calls the new head "MISSING": expected, and recorded
        try:
            with torch.random.fork_rng(devices=[]):   # the new head's init, without touching the caller's RNG
                torch.manual_seed(seed)
                return AutoModelForSequenceClassification.from_pretrained(
                    source, local_files_only=local_only, dtype=torch.float32, output_loading_info=True,
                    use_safetensors=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    model, info = _resolve(name_or_path, "the sequence-classification model", load)
    return model, new_modules(model, info.get("missing_keys") or [])


def new_modules(model: nn.Module, missing_keys) -> list[str]:
    """The modules a classification fine-tune must train and save besides LoRA (``modules_to_save``):
    PEFT's classifier heads, plus the modules whose parameters the checkpoint lacked (e.g. DistilBERT's
    ``pre_classifier``), named by their outermost new module."""
    names = [n for n in CLASSIFIER_HEADS if hasattr(model, n)]
    modules = dict(model.named_modules())
    for key in sorted(missing_keys):
        parts = key.split(".")[:-1]
        outer = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if ".".join(parts[:i]) in modules and ".".join(parts[:i]) != model.base_model_prefix), None)
        if outer and not any(outer == n or outer.startswith(n + ".") for n in names):
            names.append(outer)
    return names


def load_tokenizer(name_or_path: str):
    """(tokenizer, note). A local folder without any tokenizer file gives (None, note) and a warning: the
    caller feeds UTF-8 bytes and records ``note`` in the run. Every other failure is a ``ValueError``."""
    from transformers import AutoTokenizer

    local = _local_folder(name_or_path)
    if local is not None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        note = (f"the model folder {local} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): its text "
                "is fed as UTF-8 bytes, which the model never saw in pretraining")
        warnings.warn(note, UserWarning, stacklevel=3)
        return None, note
    tokenizer = _resolve(name_or_path, "the tokenizer",
                         lambda s, lo: AutoTokenizer.from_pretrained(s, local_files_only=lo))
    if not tokenizer("probe text", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"the tokenizer of {name_or_path!r} turns text into no tokens (an empty vocabulary?)")
    return tokenizer, type(tokenizer).__name__
