"""One trainer for LoRA and full fine-tuning: same data, same seed, same steps, AdamW.

    result = train(TrainConfig(model="mlp-digits", method="lora", rank=4, alpha=16),
                   progress=lambda **p: print(p["step"], p["total"], p["loss"]), cancel=threading.Event())

Each run is written to the run store (:mod:`lora_analysis.runstore`) as it goes. Evaluation happens at
step 0 (the frozen base: ``base_*`` metrics), every ``eval_every`` steps and at the end. Memory on CPU is
counted from tensors (parameters + gradients + optimizer states: what differs between LoRA and full
fine-tuning) plus the process's peak RSS; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Union

import pandas as pd
import psutil
import torch
from torch import nn

from .. import runstore
from ..device import pick_device
from ..lora import apply_lora, lora_layers, save_adapter
from ..lora.config import ALL_LINEAR, LoRAConfig
from ..lora.layer import INIT_METHODS, compute_scaling, is_adaptable, linear_shape, weight_out_in
from ..lora.model import _output_head_names, find_targets
from .data import ClassificationSplit, classification_batch, token_batch, token_eval_batches
from .models import Task, check_model_name, prepare_task

METHODS = ("lora", "full")
# Keep W0 beside a run when the adapted modules' weights are at most this big (for load_updates).
MAX_BASE_WEIGHTS_BYTES = 256 * 2**20

Cancel = Union[threading.Event, Callable[[], bool], None]


@dataclass
class TrainConfig:
    """One fine-tuning run. ``None`` means "the model's default" (see ``models.DEFAULTS``).

    Args:
        model: "mlp-digits", "tiny-gpt", a Hugging Face hub id or a local model folder.
        method: "lora" (base frozen, only A and B train) or "full" (every parameter trains).
        data: None for the model's default task, a CSV (mlp-digits) or a corpus name / text file (LMs).
        rank, alpha, dropout, rslora, init, targets: LoRA settings (ignored by full fine-tuning). alpha
            None means alpha = rank (scaling 1). A rank above a module's min(out, in) is capped there.
        lr: AdamW learning rate (None: per model and method, larger for LoRA).
        steps, batch_size, eval_every: optimisation length, rows or windows per step, evaluation cadence.
        seed: seeds LoRA's init, dropout and batch order; the same seed gives the same losses on CPU.
        device: "auto" (cuda > mps > cpu), "cuda", "mps" or "cpu". bf16: autocast to bfloat16 (CUDA only).
        pretrain_steps, seq_len, label_column, text_field: passed to :func:`models.prepare_task`.
    """

    model: str = "mlp-digits"
    method: str = "lora"
    data: str | None = None
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    targets: str | list[str] | None = None
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    eval_every: int | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    pretrain_steps: int | None = None
    seq_len: int | None = None
    label_column: str | None = None
    text_field: str | None = None
    max_eval_tokens: int = 16384

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["targets"] is not None and not isinstance(d["targets"], str):
            d["targets"] = list(d["targets"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}: allowed are {', '.join(sorted(known))}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value and what is allowed."""
        def positive_int(name, value, allow_none=True):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: {name} must be an integer >= 1")

        def number(name, value, low, low_open=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= low if low_open else value < low):
                raise ValueError(f"{name}={value!r} is not allowed: {name} must be a finite number "
                                 f"{'>' if low_open else '>='} {low}")

        check_model_name(self.model)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed: choose one of {', '.join(METHODS)}")
        if self.lr is not None:
            number("lr", self.lr, 0.0)
        for name in ("steps", "batch_size", "eval_every", "pretrain_steps"):
            positive_int(name, getattr(self, name))
        positive_int("rank", self.rank, allow_none=False)
        if self.alpha is not None:
            number("alpha", self.alpha, 0.0)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} is not allowed: dropout must be in [0, 1)")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init={self.init!r} is not allowed: choose one of {', '.join(INIT_METHODS)}")
        number("weight_decay", self.weight_decay, 0.0, low_open=False)
        if self.grad_clip is not None:
            number("grad_clip", self.grad_clip, 0.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is not allowed: seed must be an integer >= 0")
        positive_int("max_eval_tokens", self.max_eval_tokens, allow_none=False)
        if self.targets is not None and not isinstance(self.targets, str) and (
                not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(f"targets={self.targets!r} is not allowed: give module-name suffixes, a regex or "
                             f"'{ALL_LINEAR}'")


@dataclass
class TrainResult:
    """What :func:`train` returns. ``history``: one row per step (step, train_loss, lr, elapsed_s, and
    val_* on evaluation steps). ``model`` is the trained model (LoRA layers unmerged), None when not kept."""

    run_id: str | None
    run_dir: Path | None
    status: str
    error: str | None
    metrics: dict
    history: pd.DataFrame
    config: TrainConfig
    model: nn.Module | None = field(default=None, repr=False)


class TrainingDiverged(RuntimeError):
    pass


def resolve_config(config: TrainConfig, task: Task) -> TrainConfig:
    """Fill the model's defaults into the ``None`` fields (learning rate per method, steps, targets...)."""
    d = task.defaults
    return replace(config,
                   lr=config.lr if config.lr is not None else d["lr"][config.method],
                   steps=config.steps or d["steps"], batch_size=config.batch_size or d["batch_size"],
                   eval_every=config.eval_every or d["eval_every"],
                   targets=config.targets if config.targets is not None else d["targets"] or ALL_LINEAR,
                   alpha=float(config.alpha if config.alpha is not None else config.rank))


def _is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    return weight_out_in(module).detach().float().cpu().clone()


def adaptable_modules(model: nn.Module) -> list[str]:
    """Linear/Conv1D modules a full fine-tuning run records (all but the output head): the modules
    whose ΔW = W_ft − W0 the analyses compare with LoRA's."""
    heads = _output_head_names(model)
    return [n for n, m in model.named_modules() if n and is_adaptable(m) and n not in heads]


def rank_caps(model: nn.Module, targets, rank: int) -> dict[str, int]:
    """``rank_pattern`` entries capping the rank at min(out, in) for modules too small for ``rank``
    (fc3 of mlp-digits has 10 outputs, so a rank-32 sweep still runs there at rank 10)."""
    modules = dict(model.named_modules())
    caps = {}
    for name in find_targets(model, LoRAConfig(targets=targets, rank=rank, alpha=float(rank))):
        out_f, in_f = linear_shape(modules[name])
        if rank > min(out_f, in_f):
            caps[name] = min(out_f, in_f)
    return caps


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held by parameters, their gradients and the optimizer's states (AdamW: exp_avg, exp_avg_sq)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    return {"param_bytes": params, "grad_bytes": grads, "optimizer_bytes": states,
            "training_state_bytes": params + grads + states}


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, device: torch.device, batch_size: int, max_eval_tokens: int,
             autocast: bool = False) -> dict[str, float]:
    """Validation loss plus accuracy (classification) or perplexity = exp(loss) (language models)."""
    was_training = model.training
    model.eval()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        if isinstance(task.data, ClassificationSplit):
            x, y = task.data.x_val.to(device), task.data.y_val.to(device)
            logits = task.logits(model, x).float()
            out = {"val_loss": float(nn.functional.cross_entropy(logits, y)),
                   "val_accuracy": float((logits.argmax(-1) == y).float().mean())}
        else:
            total, count = 0.0, 0
            for x, y in token_eval_batches(task.data.val, task.data.seq_len, batch_size, max_eval_tokens):
                loss = task.loss(model, (x.to(device), y.to(device)))
                total, count = total + float(loss) * y.numel(), count + y.numel()
            val = total / count
            out = {"val_loss": val, "val_perplexity": math.exp(min(val, 80.0))}
    model.train(was_training)
    return out


def train(config: TrainConfig, *, task: Task | None = None, runs_dir: str | Path | None = None,
          save: bool = True, progress: Callable[..., None] | None = None, cancel: Cancel = None,
          name: str | None = None, sweep_id: str | None = None, keep_model: bool = True) -> TrainResult:
    """Fine-tune with LoRA or fully; record the run in the run store (unless ``save=False``).

    ``progress(step=, total=, loss=, run_id=, metrics=)`` is called after every step (``metrics`` holds the
    val_* values on evaluation steps, else None). ``cancel`` (a ``threading.Event`` or a callable returning
    True) is checked before every step; the run then stops and is recorded as "cancelled". A NaN/inf loss
    stops the run as "failed" with the step in the message; Ctrl-C records it as "interrupted" and
    re-raises. Bad settings raise ``ValueError`` before anything is written. ``task`` reuses a prepared
    base and data split (a sweep prepares it once).
    """
    config.validate()
    device = pick_device(config.device)
    if config.bf16 and device.type != "cuda":
        raise ValueError(f"bf16=True needs a CUDA device (this run is on {device}): leave bf16 off")
    if task is None:
        task = prepare_task(config.model, config.data, pretrain_steps=config.pretrain_steps,
                            seq_len=config.seq_len, label_column=config.label_column, text_field=config.text_field,
                            seed=0)
    cfg = resolve_config(config, task)

    torch.manual_seed(cfg.seed)       # LoRA's A init and dropout masks
    model = task.build_model()
    if cfg.method == "lora":
        caps = rank_caps(model, cfg.targets, cfg.rank)
        # a capped module keeps the sweep's scaling α/r (α/√r): its alpha shrinks with its rank
        alphas = {n: compute_scaling(cfg.rank, cfg.alpha, cfg.rslora) * (math.sqrt(c) if cfg.rslora else c)
                  for n, c in caps.items()}
        module_names = find_targets(model, LoRAConfig(targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha))
        w0 = {n: _weight_out_in(m) for n, m in model.named_modules() if n in module_names}   # before PiSSA
        apply_lora(model, targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                   rslora=cfg.rslora, init=cfg.init, rank_pattern=caps, alpha_pattern=alphas)
    else:
        caps = {}
        for p in model.parameters():
            p.requires_grad_(True)
        w0 = {n: _weight_out_in(m) for n, m in model.named_modules() if n in set(adaptable_modules(model))}
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = torch.Generator().manual_seed(cfg.seed)   # batch order, independent of the global RNG
    autocast = bool(cfg.bf16 and device.type == "cuda")

    writer = None
    if save:
        task_info = {"model": task.model_name, "kind": task.kind, "data": task.data_name,
                     "base_model_name_or_path": task.base_model_name_or_path,
                     "pretrain": {k: v for k, v in task.info.get("pretrain", {}).items() if k != "created"},
                     "tokenizer": task.info.get("tokenizer"), "rank_caps": caps}
        writer = runstore.create_run(cfg.to_dict(), runs_dir, name=name or default_run_name(cfg),
                                     sweep_id=sweep_id, task=task_info, device=device)
    run_id = writer.id if writer else None
    process = psutil.Process()
    peak_rss = process.memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows: list[dict] = []
    status, error, memory = "completed", None, {}
    try:
        base_metrics = evaluate(task, model, device, cfg.batch_size, cfg.max_eval_tokens, autocast)
    except BaseException as exc:   # e.g. out of memory: the run says so instead of staying "running"
        if writer:
            writer.finish("failed", error=f"evaluating the base failed: {type(exc).__name__}: {exc}")
        raise
    last_eval = base_metrics
    rows.append({"step": 0, "train_loss": float("nan"), "lr": cfg.lr, "elapsed_s": 0.0, **base_metrics})
    if writer:
        writer.log(rows[-1])
    train_seconds, eval_seconds, steps_done = 0.0, 0.0, 0
    started = time.perf_counter()
    model.train()
    try:
        for step in range(1, cfg.steps + 1):
            if _is_cancelled(cancel):
                status, error = "cancelled", f"cancelled before step {step} of {cfg.steps}"
                break
            t0 = time.perf_counter()
            if isinstance(task.data, ClassificationSplit):
                x, y = classification_batch(task.data, cfg.batch_size, batches)
            else:
                x, y = token_batch(task.data.train, task.data.seq_len, cfg.batch_size, batches)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = task.loss(model, (x, y))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {'NaN' if torch.isnan(loss) else 'inf'} at step {step}: "
                                       f"lower the learning rate (lr={cfg.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if step == 1:  # every state exists after the first step; count it before gradients are freed
                memory = training_state_bytes(model, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0
            steps_done = step
            peak_rss = max(peak_rss, process.memory_info().rss)
            row = {"step": step, "train_loss": loss.item(), "lr": cfg.lr,
                   "elapsed_s": round(time.perf_counter() - started, 4)}
            metrics_now = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                t1 = time.perf_counter()
                metrics_now = last_eval = evaluate(task, model, device, cfg.batch_size, cfg.max_eval_tokens, autocast)
                eval_seconds += time.perf_counter() - t1
                row.update(metrics_now)
            rows.append(row)
            if writer:
                writer.log(row)
            if progress is not None:
                progress(step=step, total=cfg.steps, loss=row["train_loss"], run_id=run_id, metrics=metrics_now)
    except TrainingDiverged as exc:
        status, error = "failed", str(exc)
    except KeyboardInterrupt:
        if writer:
            writer.finish("interrupted", _final_metrics(rows, base_metrics, last_eval, trainable, total_params,
                                                        memory, peak_rss, train_seconds, eval_seconds,
                                                        steps_done, cfg, task, model, device),
                          error="interrupted (KeyboardInterrupt)")
        raise
    except Exception as exc:
        if writer:
            writer.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise

    metrics = _final_metrics(rows, base_metrics, last_eval, trainable, total_params, memory, peak_rss,
                             train_seconds, eval_seconds, steps_done, cfg, task, model, device)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 4)   # steps + evaluations
    if writer:
        try:
            if status == "completed":
                _save_weights(writer, cfg, task, model, w0)
            writer.finish(status, metrics, error)
        except BaseException as exc:
            writer.finish("failed", metrics, error=f"saving the run failed: {type(exc).__name__}: {exc}")
            raise
    return TrainResult(run_id=run_id, run_dir=writer.dir if writer else None, status=status, error=error,
                       metrics=metrics, history=pd.DataFrame(rows), config=cfg,
                       model=model if keep_model else None)


def default_run_name(cfg: TrainConfig) -> str:
    if cfg.method == "full":
        return f"{cfg.model} full FT"
    targets = cfg.targets if isinstance(cfg.targets, str) else ",".join(cfg.targets)
    scaling = "α/√r" if cfg.rslora else "α/r"
    return f"{cfg.model} LoRA r={cfg.rank} α={cfg.alpha:g} ({scaling}) on {targets}"


def _final_metrics(rows, base, last_eval, trainable, total_params, memory, peak_rss, train_seconds,
                   eval_seconds, steps_done, cfg, task, model, device) -> dict:
    out: dict = {f"base_{k}": v for k, v in base.items()}
    out.update(last_eval if steps_done else {})
    losses = [r["train_loss"] for r in rows if r["step"] > 0]
    if losses:
        out["final_train_loss"] = losses[-1]
    samples = steps_done * cfg.batch_size
    out.update(steps_done=steps_done, trainable_params=trainable, total_params=total_params,
               trainable_percent=100.0 * trainable / total_params, train_seconds=round(train_seconds, 4),
               eval_seconds=round(eval_seconds, 4),
               steps_per_s=steps_done / train_seconds if train_seconds else None,
               samples_per_s=samples / train_seconds if train_seconds else None, peak_rss_bytes=peak_rss,
               device=str(device), **memory)
    if task.kind == "causal-lm":
        out["tokens_per_s"] = samples * task.data.seq_len / train_seconds if train_seconds else None
    if device.type == "cuda":
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if cfg.method == "lora":
        layers = lora_layers(model)
        out["scaling"] = next(iter(layers.values())).scaling if layers else None
        out["lora_modules"] = len(layers)
    return out


def _save_weights(writer: runstore.RunWriter, cfg: TrainConfig, task: Task, model: nn.Module,
                  w0: dict[str, torch.Tensor]) -> None:
    """LoRA: the adapter in PEFT format. Full FT: W_ft of the adaptable modules. Both: W0 when small."""
    if cfg.method == "lora":
        save_adapter(model, writer.dir / runstore.ADAPTER_DIR,
                     base_model_name_or_path=task.base_model_name_or_path or task.model_name,
                     task_type=task.task_type)
    else:
        modules = dict(model.named_modules())
        writer.save_tensors(runstore.FULL_WEIGHTS, {n: _weight_out_in(modules[n]) for n in w0})
        state = model.state_dict()
        if sum(t.numel() * 4 for t in state.values()) <= MAX_BASE_WEIGHTS_BYTES:
            # clones: safetensors refuses tensors that share memory (tied embeddings)
            writer.save_tensors(runstore.FULL_MODEL, {k: v.detach().clone() for k, v in state.items()})
    if sum(w.numel() * 4 for w in w0.values()) <= MAX_BASE_WEIGHTS_BYTES:
        writer.save_tensors(runstore.BASE_WEIGHTS, w0)
