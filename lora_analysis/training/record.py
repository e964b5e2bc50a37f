"""What a training run records, apart from the loop that trains (:func:`.trainer.train`).

A :class:`RunRecord` keeps the metric rows, the time spent training and evaluating, the memory the
training state holds and the process's peak RSS; when the run is saved it also writes the run folder
(:mod:`lora_analysis.runstore`): run.json and metrics.csv as the run goes, then the weights (LoRA: the
adapter in PEFT format; full fine-tuning: W_ft, and the whole model when small; both: W0 when small).

A saved LoRA run also records its spectra over training (spectra_history.csv, :mod:`lora_analysis.analysis.history`):
the factored spectrum of every LoRA module at every row that has evaluation metrics, step 0 (the frozen base:
ΔW = 0, every number 0) included, so the Spectra page can draw how effective rank and ‖ΔW‖_F grew.

Memory on CPU is counted from tensors (parameters + gradients + optimizer states: what differs between LoRA
and full fine-tuning) plus the peak RSS; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import torch
from torch import nn

from .. import runstore
from ..analysis.history import lora_factors, spectra_rows
from ..lora import lora_layers, save_adapter
from ..lora.config import format_targets, parse_targets
from ..lora.layer import weight_out_in
from .config import TrainConfig
from .models import Task

# Keep W0 (and a fully fine-tuned model) beside a run when they are at most this big.
MAX_BASE_WEIGHTS_BYTES = 256 * 2**20


@dataclass
class TrainResult:
    """What :func:`~.trainer.train` returns. ``history``: one row per step (step, train_loss, lr, elapsed_s,
    and val_* on evaluation steps). ``model`` is the trained model (LoRA layers unmerged), None when not kept."""

    run_id: str | None
    run_dir: Path | None
    status: str
    error: str | None
    metrics: dict
    history: pd.DataFrame
    config: TrainConfig
    model: nn.Module | None = field(default=None, repr=False)


def weight_copy(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 (out, in) CPU copy."""
    return weight_out_in(module).detach().float().cpu().clone()


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held by parameters, their gradients and the optimizer's states (AdamW: exp_avg, exp_avg_sq)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    return {"param_bytes": params, "grad_bytes": grads, "optimizer_bytes": states,
            "training_state_bytes": params + grads + states}


def default_run_name(cfg: TrainConfig) -> str:
    if cfg.method == "full":
        return f"{cfg.model} full FT"
    scaling = "α/√r" if cfg.rslora else "α/r"
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank          # before the defaults are filled in
    targets = format_targets(parse_targets(cfg.targets)) if cfg.targets is not None else "the default targets"
    return f"{cfg.model} LoRA r={cfg.rank} α={alpha:g} ({scaling}) on {targets}"


def task_record(task: Task, model: nn.Module) -> dict:
    """The run's record of its base and data: which model at which revision, and, for LoRA, the rank and
    alpha each adapted module actually got (a rank above min(out, in) is capped there)."""
    layers = lora_layers(model)
    return {"model": task.model_name, "kind": task.kind, "data": task.data_name,
            "base_model_name_or_path": task.base_model_name_or_path,
            runstore.BASE_REVISION_KEY: task.base_revision, "base_sha256": task.base_sha256,
            "pretrain": {k: v for k, v in task.info.get("pretrain", {}).items() if k != "created"},
            "tokenizer": task.info.get("tokenizer"),
            **({"tokenizer_warning": task.info["tokenizer_warning"]} if task.info.get("tokenizer_warning") else {}),
            **({"classes": task.info["classes"]} if task.info.get("classes") else {}),
            "modules_to_save": list(task.modules_to_save),
            "ranks": {n: layer.rank for n, layer in layers.items()},
            "alphas": {n: layer.alpha for n, layer in layers.items()}}


class RunRecord:
    """The record of one run; ``writer`` is None when the run is not saved.

    A saved run's folder is claimed first (:meth:`claim`: run.json with status "running", the settings as
    given and the environment), before the base is loaded or pretrained, so a process killed at any moment
    leaves an "interrupted" run, never an empty folder; :meth:`begin` then adds the resolved settings and
    the task once the model is built."""

    def __init__(self, cfg: TrainConfig, device: torch.device, writer: runstore.RunWriter | None) -> None:
        self.cfg, self.device, self.writer = cfg, device, writer
        self.task: Task | None = None
        self.w0: dict[str, torch.Tensor] = {}
        self.named = False                   # a name the caller gave is kept; a default one is refined
        self.rows: list[dict] = []
        self.status, self.error = "completed", None
        self.seconds = {"train": 0.0, "eval": 0.0, "spectra": 0.0}
        self.model: nn.Module | None = None      # the model being trained (from begin): its spectra are recorded
        self.memory: dict = {}
        self.steps_done = 0
        self.base_metrics: dict = {}
        self.last_eval: dict = {}
        self.process = psutil.Process()
        self.peak_rss = self.process.memory_info().rss
        self.started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @classmethod
    def claim(cls, cfg: TrainConfig, device: torch.device, *, save: bool, runs_dir: str | Path | None = None,
              name: str | None = None, sweep_id: str | None = None) -> "RunRecord":
        """Begin the record; with ``save`` claim a run folder at once (status "running", settings as given)."""
        writer = runstore.create_run(cfg.to_dict(), runs_dir, name=name or default_run_name(cfg),
                                     sweep_id=sweep_id, device=device) if save else None
        record = cls(cfg, device, writer)
        record.named = name is not None
        return record

    def begin(self, cfg: TrainConfig, task: Task, model: nn.Module, w0: dict[str, torch.Tensor],
              device_options: dict | None = None) -> None:
        """The model is built: record the resolved settings, the task and the environment now in effect
        (the thread count may have changed with the model's size), with ``device_options``: what
        :func:`.runtime.prepare_for_device` applied (gradient checkpointing, torch.compile), when anything."""
        self.cfg, self.task, self.w0 = cfg, task, w0
        self.model = model
        if self.writer:
            environment = runstore.environment(self.device)
            if device_options:
                environment["device_options"] = device_options
            self.writer.update(config=cfg.to_dict(), task=task_record(task, model), environment=environment,
                               **({} if self.named else {"name": default_run_name(cfg)}))
            self.writer.flush()

    def abort(self, status: str, error: str) -> TrainResult:
        """The run ends before training started (cancelled or failed while loading or pretraining the base)."""
        self.status, self.error = status, error
        if self.writer:
            self.writer.finish(status, {"steps_done": 0}, error=error)
        return TrainResult(run_id=self.run_id, run_dir=self.writer.dir if self.writer else None, status=status,
                           error=error, metrics={"steps_done": 0}, history=pd.DataFrame(), config=self.cfg)

    def discard(self) -> None:
        """Remove the claimed folder: the run's settings were refused (a ValueError before training)."""
        if self.writer:
            self.writer.discard()

    @property
    def run_id(self) -> str | None:
        return self.writer.id if self.writer else None

    @contextmanager
    def timing(self, kind: str):
        """Add the wall time of the block to ``kind`` ("train" or "eval"); CUDA work is waited for."""
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[kind] += time.perf_counter() - t0

    def log(self, step: int, train_loss: float, metrics: dict | None) -> None:
        """One row of the history: the step's loss and, on evaluation steps, the val_* metrics; an evaluation
        row also records the LoRA spectra (:meth:`log_spectra`) of the model given to :meth:`begin`."""
        if step == 0:
            self.base_metrics = dict(metrics or {})
        elif metrics:
            self.last_eval = dict(metrics)
        self.steps_done = step
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        row = {"step": step, "train_loss": train_loss, "lr": self.cfg.lr,
               "elapsed_s": round(time.perf_counter() - self.started, 4), **(metrics or {})}
        self.rows.append(row)
        if self.writer:
            self.writer.log(row)
        if metrics and self.model is not None:
            self.log_spectra(step, self.model)

    def log_spectra(self, step: int, model: nn.Module) -> None:
        """Append the factored spectra of ``model``'s LoRA modules at ``step`` to the run's
        spectra_history.csv (saved LoRA runs only; a few ms for a small model: no dense ΔW)."""
        if not self.writer or self.cfg.method != "lora":
            return
        t0 = time.perf_counter()
        self.writer.log_history(spectra_rows(lora_factors(model), step))
        self.seconds["spectra"] += time.perf_counter() - t0

    def count_memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Count the training state once every optimizer state exists (after the first step)."""
        if not self.memory:
            self.memory = training_state_bytes(model, optimizer)

    def stop(self, status: str, error: str) -> None:
        """The run ends early: "cancelled" or "failed" (with the reason)."""
        self.status, self.error = status, error

    @contextmanager
    def guard(self, model: nn.Module):
        """A crash is recorded as "failed", Ctrl-C as "interrupted" (with the metrics so far), then re-raised:
        a run folder never stays "running" after its run ended."""
        try:
            yield
        except KeyboardInterrupt:
            if self.writer:
                self.writer.finish("interrupted", self.final_metrics(model), error="interrupted (KeyboardInterrupt)")
            raise
        except BaseException as exc:
            if self.writer:
                self.writer.finish("failed", error=f"{type(exc).__name__}: {exc}")
            raise

    def finish(self, model: nn.Module, keep_model: bool = True) -> TrainResult:
        """Write the weights (completed runs) and the final record; return the :class:`TrainResult`."""
        metrics = self.final_metrics(model)
        if self.writer:
            try:
                if self.status == "completed":
                    self._save_weights(model)
                self.writer.finish(self.status, metrics, self.error)
            except BaseException as exc:
                self.writer.finish("failed", metrics, error=f"saving the run failed: {type(exc).__name__}: {exc}")
                raise
        return TrainResult(run_id=self.run_id, run_dir=self.writer.dir if self.writer else None,
                           status=self.status, error=self.error, metrics=metrics, history=pd.DataFrame(self.rows),
                           config=self.cfg, model=model if keep_model else None)

    def final_metrics(self, model: nn.Module) -> dict:
        cfg, task, device = self.cfg, self.task, self.device
        train_s, steps = self.seconds["train"], self.steps_done
        out: dict = {f"base_{k}": v for k, v in self.base_metrics.items()}
        out.update(self.last_eval if steps else {})
        losses = [r["train_loss"] for r in self.rows if r["step"] > 0]
        if losses:
            out["final_train_loss"] = losses[-1]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        samples = steps * cfg.batch_size
        out.update(steps_done=steps, trainable_params=trainable, total_params=total,
                   trainable_percent=100.0 * trainable / total, train_seconds=round(train_s, 4),
                   eval_seconds=round(self.seconds["eval"], 4), spectra_seconds=round(self.seconds["spectra"], 4),
                   steps_per_s=steps / train_s if train_s else None,
                   samples_per_s=samples / train_s if train_s else None, peak_rss_bytes=self.peak_rss,
                   device=str(device), **self.memory)
        if task.kind == "causal-lm":
            out["tokens_per_s"] = samples * task.data.seq_len / train_s if train_s else None
        if device.type == "cuda":
            out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        if cfg.method == "lora":
            layers = lora_layers(model)
            out["scaling"] = next(iter(layers.values())).scaling if layers else None
            out["lora_modules"] = len(layers)
        out["wall_seconds"] = round(time.perf_counter() - self.started, 4)   # steps + evaluations
        return out

    def _save_weights(self, model: nn.Module) -> None:
        writer, w0 = self.writer, self.w0
        if self.cfg.method == "lora":
            save_adapter(model, writer.dir / runstore.ADAPTER_DIR,
                         base_model_name_or_path=self.task.base_model_name_or_path or self.task.model_name,
                         task_type=self.task.task_type)
        else:
            modules = dict(model.named_modules())
            writer.save_tensors(runstore.FULL_WEIGHTS, {n: weight_copy(modules[n]) for n in w0})
            state = model.state_dict()
            if sum(t.numel() * 4 for t in state.values()) <= MAX_BASE_WEIGHTS_BYTES:
                # clones: safetensors refuses tensors that share memory (tied embeddings)
                writer.save_tensors(runstore.FULL_MODEL, {k: v.detach().clone() for k, v in state.items()})
        if sum(w.numel() * 4 for w in w0.values()) <= MAX_BASE_WEIGHTS_BYTES:
            writer.save_tensors(runstore.BASE_WEIGHTS, w0)
