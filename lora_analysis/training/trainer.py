"""One trainer for LoRA and full fine-tuning: same data, same seed, same steps, AdamW.

    result = train(TrainConfig(model="mlp-digits", method="lora", rank=4, alpha=16),
                   progress=lambda **p: print(p["step"], p["total"], p["loss"]), cancel=threading.Event())

:func:`train` is the training loop, to be read in one sitting; what a run records (the run folder, metric
rows, time and memory, the saved weights) lives in :mod:`.record`. Evaluation happens at step 0 (the
frozen base: ``base_*`` metrics), every ``eval_every`` steps and at the end.

Random numbers: a run draws LoRA's init and dropout from its own ``torch.Generator`` and its batches from
another, both seeded with ``seed``, so runs in threads of one process give exactly the losses each gives
alone (on CPU). A model whose own layers draw from the process's global RNG (the dropout of most Hugging
Face models) cannot have that; such runs take turns, one at a time per process, with the global RNG
seeded for the run and restored after it (:func:`global_rng_turn`).

Threads and determinism: a run uses the thread count of :func:`.runtime.threads_for` (one thread for the
small models; the run's ``threads`` setting wins) and deterministic algorithms, both for the run only,
and records them with what else its numbers depend on (``environment`` in run.json).

Divergence, one rule for every run (train and sweep alike): a run stops as "failed", with a message that
starts "diverged at step N" and ends "lower the learning rate (lr=...)", when a training or validation
loss is NaN/inf or above :data:`DIVERGED_FACTOR` × max(1, the frozen base's validation loss), or a
trainable weight is no longer finite (checked at every evaluation and before the weights are saved).
"""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from ..device import pick_device
from ..lora import apply_lora
from ..lora.config import ALL_LINEAR, LoRAConfig, matches_module_to_save, parse_targets
from ..lora.layer import is_adaptable
from ..lora.model import _output_head_names, find_targets
from .config import METHODS, TrainConfig
from .data import ClassificationSplit, classification_batch, classification_inputs, token_batch, token_eval_batches
from .hf_data import IGNORE_INDEX, LMExampleSplit
from .models import TASK_SETTINGS, Task, prepare_task
from .record import MAX_BASE_WEIGHTS_BYTES, RunRecord, TrainResult, default_run_name, training_state_bytes, \
    weight_copy
from .runtime import deterministic_scope, prepare_for_device, threads_scope

__all__ = ["Cancel", "DIVERGED_FACTOR", "MAX_BASE_WEIGHTS_BYTES", "METHODS", "TrainConfig", "TrainResult",
           "adaptable_modules", "default_run_name", "divergence", "evaluate", "global_rng_turn", "is_cancelled",
           "prepare_model", "resolve_config", "task_for", "train", "training_state_bytes"]

Cancel = Union[threading.Event, Callable[[], bool], None]


def is_cancelled(cancel: Cancel) -> bool:
    """``cancel`` is an Event-like object (``is_set()``), a callable returning True to stop, or None."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def task_for(config: TrainConfig, progress: Callable[..., None] | None = None) -> Task:
    """The pretrained base and data split ``config`` trains on (built-in bases come from the cache; a
    built-in pretrains on the run's thread count, see :func:`.runtime.threads_for`)."""
    with threads_scope(config.model, requested=config.threads):
        return prepare_task(**{k: getattr(config, k) for k in TASK_SETTINGS}, progress=progress)


def resolve_config(config: TrainConfig, task: Task) -> TrainConfig:
    """Fill the model's defaults into the ``None`` fields (learning rate per method, steps, targets...)."""
    d = task.defaults
    return replace(config,
                   lr=config.lr if config.lr is not None else d["lr"][config.method],
                   steps=config.steps or d["steps"], batch_size=config.batch_size or d["batch_size"],
                   eval_every=config.eval_every or d["eval_every"],
                   targets=config.targets if config.targets is not None else d["targets"] or ALL_LINEAR,
                   alpha=float(config.alpha if config.alpha is not None else config.rank))


def lora_config(cfg: TrainConfig, modules_to_save: list[str] | None = None) -> LoRAConfig:
    """The run's adapter settings. A module smaller than the rank gets min(out, in) and keeps the run's
    scaling α/r (α/√r): a rank-32 sweep still adapts mlp-digits' 10-output head, at rank 10.
    ``modules_to_save`` (a classifier's new head) train fully beside LoRA and are saved in the adapter."""
    return LoRAConfig(targets=parse_targets(cfg.targets), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                      rslora=cfg.rslora, init=cfg.init, cap_rank=True, modules_to_save=list(modules_to_save or []))


def adaptable_modules(model: nn.Module, modules_to_save: list[str] | None = None) -> list[str]:
    """Linear/Conv1D modules a full fine-tuning run records (all but the output head and a classifier's
    new head, whose W0 is no pretrained weight): the modules whose ΔW = W_ft − W0 the analyses compare
    with LoRA's."""
    heads = _output_head_names(model)
    return [n for n, m in model.named_modules() if n and is_adaptable(m) and n not in heads
            and not matches_module_to_save(modules_to_save or [], n)]


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device,
                  modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Make ``model`` trainable as ``cfg.method`` says, in place: LoRA on the targets plus
    ``modules_to_save`` (base frozen; A's init and the dropout masks from a generator seeded with
    ``cfg.seed``) or every parameter. Returns W0 (out, in), float32 on the CPU, of the modules the run
    records, taken before PiSSA moves W."""
    modules = dict(model.named_modules())
    if cfg.method == "full":
        model.requires_grad_(True)
        return {n: weight_copy(modules[n]) for n in adaptable_modules(model, modules_to_save)}
    adapter = lora_config(cfg, modules_to_save)
    w0 = {n: weight_copy(modules[n]) for n in find_targets(model, adapter)}
    apply_lora(model, config=adapter, generator=torch.Generator(device).manual_seed(cfg.seed))
    return w0


def draws_from_global_rng(model: nn.Module) -> bool:
    """True when the model's own layers draw from the global RNG in training: a dropout layer with p > 0,
    or a dropout rate in a Hugging Face config (attention code calls ``F.dropout`` with it)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = vars(config).items() if hasattr(config, "__dict__") else ()
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v > 0 for k, v in rates)


# The global RNG is one per process: runs whose model draws from it take turns (see the module docstring).
_GLOBAL_RNG_TURN = threading.Lock()


@contextmanager
def global_rng_turn(model: nn.Module, seed: int, device: torch.device):
    """For a model that draws from the global RNG: hold this process's turn, seed the global RNG with
    ``seed`` and restore its state afterwards. For any other model: nothing."""
    if not draws_from_global_rng(model):
        yield
        return
    with _GLOBAL_RNG_TURN, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def to_device(x, device: torch.device):
    """A tensor, or a dict of tensors (a tokenised text batch), on ``device``."""
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def next_batch(task: Task, batch_size: int, generator: torch.Generator) -> tuple:
    """(x, y): rows and labels (classification; texts: x is a dict of input_ids and attention_mask), token
    windows and their next tokens (built-in language models), or padded examples of a Hugging Face causal
    LM (x a dict of input_ids and attention_mask, y their next tokens, -100 where no loss is taken)."""
    if isinstance(task.data, ClassificationSplit):
        return classification_batch(task.data, batch_size, generator)
    if isinstance(task.data, LMExampleSplit):
        return task.data.batch(batch_size, generator)
    return token_batch(task.data.train, task.data.seq_len, batch_size, generator)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, device: torch.device, batch_size: int, max_eval_tokens: int,
             autocast: bool = False) -> dict[str, float]:
    """Validation loss plus accuracy (classification) or perplexity = exp(loss) (language models: the mean
    loss over the target tokens, -100 targets such as prompts and padding excluded)."""
    was_training = model.training
    model.eval()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        if isinstance(task.data, ClassificationSplit):
            n, y = len(task.data.y_val), task.data.y_val.to(device)
            logits = torch.cat([task.logits(model, to_device(classification_inputs(task.data, slice(i, i + 256)),
                                                             device)).float() for i in range(0, n, 256)])
            out = {"val_loss": float(nn.functional.cross_entropy(logits, y)),
                   "val_accuracy": float((logits.argmax(-1) == y).float().mean())}
        else:
            total, count = 0.0, 0
            batches = task.data.eval_batches(batch_size, max_eval_tokens) if isinstance(task.data, LMExampleSplit) \
                else token_eval_batches(task.data.val, task.data.seq_len, batch_size, max_eval_tokens)
            for x, y in batches:
                targets = int((y != IGNORE_INDEX).sum())
                if targets:
                    loss = task.loss(model, (to_device(x, device), y.to(device)))
                    total, count = total + float(loss) * targets, count + targets
            val = total / count if count else float("nan")
            out = {"val_loss": val, "val_perplexity": math.exp(min(val, 80.0))}
    out.update(source_metrics(task, model, device))
    model.train(was_training)
    return out


def source_metrics(task: Task, model: nn.Module, device: torch.device) -> dict[str, float]:
    """The model on the task its base was pretrained for (``task.source_metrics``, when the task has one):
    what fine-tuning made it forget. Keys start with ``source_`` (added when missing); values are floats."""
    measure = getattr(task, "source_metrics", None)
    if measure is None:
        return {}
    return {(k if k.startswith("source_") else f"source_{k}"): float(v) for k, v in measure(model, device).items()}


DIVERGED_FACTOR = 100.0     # a loss this many times the frozen base's (at least 1) is no longer training


def divergence(loss: float, base_val_loss: float | None, what: str) -> str | None:
    """Why ``loss`` (the "training" or "validation" loss) says the run diverged, or None when it does not:
    NaN/inf, or above DIVERGED_FACTOR × max(1, the frozen base's validation loss)."""
    if math.isnan(loss) or math.isinf(loss):
        return f"the {what} loss became {'NaN' if math.isnan(loss) else 'inf'}"
    limit = DIVERGED_FACTOR * max(1.0, base_val_loss if base_val_loss is not None and math.isfinite(base_val_loss)
                                  else 1.0)
    if loss > limit:
        return (f"the {what} loss {loss:.3g} is over {DIVERGED_FACTOR:g}× the frozen base's validation loss "
                f"({base_val_loss:.3g})")
    return None


def non_finite_weight(params: dict[str, torch.Tensor]) -> str | None:
    """The name of the first trainable weight holding NaN or inf, or None."""
    return next((n for n, p in params.items() if not bool(torch.isfinite(p).all())), None)


def train(config: TrainConfig, *, task: Task | None = None, runs_dir: str | Path | None = None,
          save: bool = True, progress: Callable[..., None] | None = None, cancel: Cancel = None,
          name: str | None = None, sweep_id: str | None = None, keep_model: bool = True,
          pretrain_progress: Callable[..., None] | None = None) -> TrainResult:
    """Fine-tune with LoRA or fully; record the run in the run store (unless ``save=False``).

    ``progress(step=, total=, loss=, run_id=, metrics=)`` is called after every step (``metrics`` holds the
    val_* values on evaluation steps, else None). ``cancel`` (an Event-like object or a callable returning
    True) is checked before every step and while the base pretrains; the run then stops and is recorded as
    "cancelled". A run that diverges (see the module docstring) stops as "failed" with the step and the
    learning rate in the message; Ctrl-C records it as "interrupted" and re-raises. Bad settings raise
    ``ValueError`` and leave nothing in the store. ``task`` reuses a prepared base and data split (a sweep
    prepares it once); without it the base is loaded here, after the run folder is claimed, and a built-in
    base that must pretrain first reports ``pretrain_progress(step=, total=, loss=, phase="pretrain")``.
    """
    config.validate()
    device = pick_device(config.device)
    if config.bf16 and device.type != "cuda":
        raise ValueError(f"bf16=True needs a CUDA device (this run is on {device}): leave bf16 off")

    def pretraining(**p) -> None:
        if is_cancelled(cancel):
            raise _CancelledSetup(f"cancelled while pretraining the base, at step {p.get('step')} of {p.get('total')}")
        if pretrain_progress is not None:
            pretrain_progress(**p)

    with ExitStack() as scopes:
        scopes.enter_context(threads_scope(config.model, requested=config.threads))
        scopes.enter_context(deterministic_scope())
        record = RunRecord.claim(config, device, save=save, runs_dir=runs_dir, name=name, sweep_id=sweep_id)
        try:
            task = task or task_for(config, pretraining)
            cfg = resolve_config(config, task)
            model = task.build_model().to(device)
            scopes.enter_context(threads_scope(config.model, sum(p.numel() for p in model.parameters()),
                                               config.threads))
            scopes.enter_context(global_rng_turn(model, cfg.seed, device))
            w0 = prepare_model(model, cfg, device, task.modules_to_save)
            applied = prepare_for_device(model, cfg, device)   # gradient checkpointing, torch.compile (in place)
        except ValueError:
            record.discard()            # refused settings leave nothing behind
            raise
        except _CancelledSetup as exc:
            return record.abort("cancelled", str(exc))
        except KeyboardInterrupt:
            record.abort("interrupted", "interrupted (KeyboardInterrupt) before training started")
            raise
        except BaseException as exc:
            record.abort("failed", f"{type(exc).__name__}: {exc}")
            raise
        return _train_loop(cfg, task, model, w0, device, record, progress, cancel, keep_model, applied)


class _CancelledSetup(Exception):
    """Cancel was asked for while the base was being prepared."""


def _train_loop(cfg: TrainConfig, task: Task, model: nn.Module, w0: dict, device: torch.device,
                record: RunRecord, progress, cancel: Cancel, keep_model: bool,
                device_options: dict | None = None) -> TrainResult:
    """The loop itself: evaluate the frozen base, then train, evaluating every ``eval_every`` steps."""
    autocast = cfg.bf16
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = torch.Generator().manual_seed(cfg.seed)            # the batch order
    record.begin(cfg, task, model, w0, device_options)

    def diverged(step: int, reason: str) -> None:
        record.stop("failed", f"diverged at step {step}: {reason}: lower the learning rate (lr={cfg.lr:g})")

    with record.guard(model):
        base = evaluate(task, model, device, cfg.batch_size, cfg.max_eval_tokens, autocast)
        record.log(0, float("nan"), base)
        base_loss = base["val_loss"]
        if not math.isfinite(base_loss):
            record.stop("failed", f"the frozen base's validation loss is {base_loss} before any training: its "
                                  "weights or the data hold non-finite values")
            return record.finish(model, keep_model)
        model.train()
        for step in range(1, cfg.steps + 1):
            if is_cancelled(cancel):
                record.stop("cancelled", f"cancelled before step {step} of {cfg.steps}")
                break
            with record.timing("train"):
                x, y = next_batch(task, cfg.batch_size, batches)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = task.loss(model, (to_device(x, device), y.to(device)))
                train_loss = loss.item()
                if reason := divergence(train_loss, base_loss, "training"):
                    diverged(step, reason)
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
                try:
                    optimizer.step()
                except RuntimeError as exc:       # the update itself overflows float32
                    if "overflow" not in str(exc):
                        raise
                    diverged(step, f"the optimizer's update overflowed ({exc})")
                    break
            record.count_memory(model, optimizer)
            metrics = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                with record.timing("eval"):
                    metrics = evaluate(task, model, device, cfg.batch_size, cfg.max_eval_tokens, autocast)
            record.log(step, train_loss, metrics)
            if progress is not None:
                progress(step=step, total=cfg.steps, loss=train_loss, run_id=record.run_id, metrics=metrics)
            if metrics is not None:
                reason = divergence(metrics["val_loss"], base_loss, "validation")
                bad = non_finite_weight(params) if reason is None else None
                if reason or bad:
                    diverged(step, reason or f"the weight {bad} holds NaN or inf")
                    break
        return record.finish(model, keep_model)
