"""Record a LoRA fine-tune that runs in your own code: Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``, a
``Trainer``), or a loop you wrote. Every ``every`` steps the LoRA modules' spectra are taken, factored
(:mod:`lora_analysis.analysis.history`: QR of B and Aᵀ and an r×r SVD per module, no dense ΔW, no gradient),
and written with the training metrics into the run store as one run, which then lists in
``lora-analysis runs list``, opens on every dashboard page and goes into the report like any run. The
Spectra page draws how effective rank and ‖ΔW‖_F grew step by step.

With ``transformers.Trainer``::

    from lora_analysis.training.callback import LoRASpectraCallback

    callback = LoRASpectraCallback(every=50)                    # runs_dir=None: the user's run store
    trainer = Trainer(model=peft_model, args=args, train_dataset=..., callbacks=[callback])
    with callback:                                              # a crash is recorded as "failed"
        trainer.train()

In a loop of your own::

    from lora_analysis.training.callback import SpectraRecorder

    with SpectraRecorder(model, every=50, name="my fine-tune") as recorder:
        for step, batch in enumerate(loader, start=1):
            loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
            recorder.step(step, {"loss": loss.item()})          # spectra on every 50th step
            if step % 500 == 0:
                recorder.step(step, {"val_loss": evaluate(model)})

What the run holds: run.json (status; config: the base model's name or path, rank, alpha, targets, rsLoRA and
init from the PEFT or LoRA config, plus what you pass as ``config``; ``source``: "transformers.Trainer" or
"custom loop"), metrics.csv (one row per step that had metrics: ``loss`` is written ``train_loss``,
``eval_<x>`` ``val_<x>``, ``learning_rate`` ``lr``; a causal LM's ``val_perplexity`` = exp(val_loss)),
spectra_history.csv (one row per recording and module: :data:`lora_analysis.store.runs.HISTORY_COLUMNS`
and the top singular values), and, when the run completes, adapter/ in PEFT format (a ``PeftModel`` saves
itself with ``save_pretrained``; this project's LoRA with :func:`lora_analysis.lora.save_adapter`) and the
base weights W0 of the adapted modules when they are small (at most 256 MiB), so the analyses that compare
with W0 run too; larger bases are named in the run (``base_model_name_or_path``) for ``--base``.

The state before the first step is recorded too (``start_step``, 0 by default): a fresh LoRA's ΔW is zero
there, and its numbers are 0 (see :mod:`lora_analysis.analysis.history`). Only the main process records
(``state.is_world_process_zero`` under ``Trainer``).
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..analysis.history import is_peft_lora, lora_factors, spectra_rows
from ..lora.layer import is_conv1d, weight_out_in
from ..store.runs import ADAPTER_DIR, BASE_WEIGHTS, CONFIG_TYPES, HISTORY_TOP_K, RunWriter, _type_ok, create_run

# Keep W0 beside the run when the adapted modules' weights are at most this big (as our trainer does).
MAX_BASE_WEIGHTS_BYTES = 256 * 2**20
# run.json's heartbeat is refreshed at least this often while steps go on without metrics
HEARTBEAT_S = 30.0
# Trainer's log keys written under our metric names; eval_<x> becomes val_<x> (see trainer_metrics)
RENAMES = {"loss": "train_loss", "eval_loss": "val_loss", "learning_rate": "lr"}
# Trainer's end-of-training summary (logged once, with train_runtime) and the final metrics it becomes
SUMMARY = {"train_runtime": "train_seconds", "train_samples_per_second": "samples_per_s",
           "train_steps_per_second": "steps_per_s", "train_loss": "mean_train_loss", "total_flos": "total_flos"}
# evaluation timings: not metrics of the model
SKIPPED = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
INIT_NAMES = {True: "kaiming", False: "zeros"}


def _number(key: str, value, strict: bool):
    """``value`` as a float (tensors and numpy scalars too); None (or ``ValueError`` when ``strict``) otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if strict:
            raise ValueError(f"metric {key!r}={value!r} is not allowed: a metric is a number (a float, an int or a "
                             "one-element tensor)")
        return None
    return float(value)


def metric_names(metrics: dict, strict: bool = True) -> dict[str, float]:
    """Metrics under the run store's names: loss → train_loss, eval_loss → val_loss, eval_<x> → val_<x>,
    learning_rate → lr; other names are kept, None values left out. ``strict``: a value that is not a number
    is a ``ValueError`` (else it is left out)."""
    out = {}
    for key, value in (metrics or {}).items():
        if key in SKIPPED or value is None:          # None: no value this step
            continue
        number = _number(key, value, strict)
        if number is None:
            continue
        name = RENAMES.get(key) or (f"val_{key[5:]}" if key.startswith("eval_") else key)
        out[name] = number
    return out


def trainer_metrics(logs: dict) -> tuple[dict, dict]:
    """(row, summary) of one ``Trainer`` log: the end-of-training summary (the log with ``train_runtime``:
    its ``train_loss`` is the mean over training) goes to the final metrics; any other log is a row."""
    if "train_runtime" in (logs or {}):
        return {}, {SUMMARY[k]: v for k, v in metric_names({k: logs[k] for k in SUMMARY if k in logs},
                                                              strict=False).items()}
    return metric_names(logs, strict=False), {}


def _peft_model_type():
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def _targets(targets):
    if targets is None or isinstance(targets, str):
        return targets
    return sorted(str(t) for t in targets)


def describe_model(model: nn.Module, adapter_name: str | None = None) -> tuple[dict, dict, str | None]:
    """(config, task, adapter name) of a LoRA model for its run record: the base model's name or path, rank,
    alpha, rsLoRA, init, dropout and targets from its PEFT ``LoraConfig`` or this project's ``LoRAConfig``."""
    factors = lora_factors(model, adapter_name)
    peft_configs = getattr(model, "peft_config", None)
    hf_config = getattr(model, "config", None)
    base = getattr(hf_config, "_name_or_path", None) or getattr(hf_config, "name_or_path", None)
    config: dict = {"method": "lora"}
    kind = None
    if isinstance(peft_configs, dict) and peft_configs:
        adapter_name = adapter_name or getattr(model, "active_adapter", None) or next(iter(peft_configs))
        pc = peft_configs[adapter_name]
        base = getattr(pc, "base_model_name_or_path", None) or base
        init = getattr(pc, "init_lora_weights", True)
        config.update(rank=int(pc.r), alpha=float(pc.lora_alpha), rslora=bool(getattr(pc, "use_rslora", False)),
                      targets=_targets(pc.target_modules), init=INIT_NAMES.get(init, str(init)),
                      dropout=float(getattr(pc, "lora_dropout", 0.0) or 0.0), peft_type=str(pc.peft_type.value
                      if hasattr(pc.peft_type, "value") else pc.peft_type))
        task_type = getattr(pc, "task_type", None)
        task_type = getattr(task_type, "value", task_type)
        kind = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}.get(str(task_type), None)
        modules_to_save = list(getattr(pc, "modules_to_save", None) or [])
    else:
        lc = getattr(model, "lora_config", None)
        if lc is not None:
            config.update(rank=int(lc.rank), alpha=float(lc.alpha), rslora=bool(lc.rslora),
                          targets=_targets(lc.targets), init=str(lc.init), dropout=float(lc.dropout))
        modules_to_save = list(getattr(lc, "modules_to_save", None) or [])
    if kind is None and type(model).__name__.endswith("ForCausalLM"):
        kind = "causal-lm"
    config["model"] = str(base) if base else type(model).__name__
    task = {"model": config["model"], "kind": kind, "base_model_name_or_path": str(base) if base else None,
            "modules_to_save": modules_to_save, "ranks": {n: f.rank for n, f in factors.items()},
            "scalings": {n: f.scaling for n, f in factors.items()}}
    return config, task, adapter_name


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class SpectraRecorder:
    """Records one LoRA fine-tune into the run store: metrics at every :meth:`step` that has some, the
    factored spectra of every LoRA module every ``every`` steps, the adapter at :meth:`close`.

    Args:
        model: a PEFT model (``get_peft_model``'s ``PeftModel``) or a model with this project's LoRA layers
            (``lora_analysis.apply_lora``). Read, never changed.
        every: record the spectra on each step that is a multiple of this (≥ 1).
        runs_dir: the runs root (default: ``$LORA_ANALYSIS_HOME/runs``, else the user data folder).
        name: the run's name (default: "<base> LoRA r=.. α=.. (<source>)").
        config: more settings to record (lr, steps, data, ...); they override what the model says.
        adapter_name: the PEFT adapter to record (default: the active one).
        start_step: record the state before training at this step (None: do not).
        keep_base_weights: save W0 of the adapted modules beside the run when at most 256 MiB.
        top_k: how many of each module's singular values the history keeps (at most 64).
        source: what trained the model, recorded as ``config["source"]``.

    Use it as a context manager: leaving the block normally completes the run (:meth:`close`), an exception
    records it as "failed" (Ctrl-C: "interrupted") and goes on.
    """

    def __init__(self, model: nn.Module, every: int = 50, *, runs_dir: str | os.PathLike | None = None,
                 name: str | None = None, config: dict | None = None, adapter_name: str | None = None,
                 start_step: int | None = 0, keep_base_weights: bool = True, top_k: int = HISTORY_TOP_K,
                 source: str = "custom loop") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is not allowed: record the spectra every N steps, N an integer >= 1")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= HISTORY_TOP_K:
            raise ValueError(f"top_k={top_k!r} is not allowed: keep 1 to {HISTORY_TOP_K} singular values per module")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"config={config!r} is not allowed: pass a dict of settings")
        self.model, self.every, self.top_k = model, every, top_k
        described, task, self.adapter_name = describe_model(model, adapter_name)
        self.peft = is_peft_lora(model)
        peft_model = _peft_model_type()
        if self.peft and (peft_model is None or not isinstance(model, peft_model)):
            raise ValueError(f"{type(model).__name__} holds PEFT LoRA layers but is not a PeftModel: pass the model "
                             "get_peft_model() returned (its save_pretrained writes the run's adapter)")
        self.task_kind = task["kind"]
        self.keep_base_weights = keep_base_weights
        settings = {**described, "source": source, "spectra_every": every, **(config or {})}
        for key, types in CONFIG_TYPES.items():      # what the pages read must have its type (else: a damaged run)
            if settings.get(key) is not None and not _type_ok(settings[key], types):
                raise ValueError(f"config {key}={settings[key]!r} is not allowed: it must be "
                                 f"{' or '.join(t.__name__ for t in types)}")
        scaling = "α/√r" if settings.get("rslora") else "α/r"
        model_name = str(settings["model"])
        model_name = Path(model_name).name if Path(model_name).is_dir() else model_name   # a folder: its name
        default = (f"{model_name} LoRA r={settings['rank']} α={settings['alpha']:g} ({scaling}, {source})"
                   if isinstance(settings.get("rank"), int) and isinstance(settings.get("alpha"), (int, float))
                   else f"{model_name} LoRA ({source})")
        self.writer: RunWriter = create_run(settings, runs_dir, name=name or default, task=task,
                                            device=_device_of(model))
        self.rows: list[dict] = []           # metric rows written (the final metrics read them)
        self._pending: dict | None = None    # the current step's metrics, written when the step changes
        self.last_step: int | None = None
        self.last_recorded: int | None = None
        self.calls, self.spectra_seconds = 0, 0.0
        self.started = time.perf_counter()
        self.closed = False
        if start_step is not None:
            try:
                self.last_step = self._check_step(start_step)
                self.record(self.last_step)
            except BaseException as exc:
                self.closed = True
                self.writer.finish("failed", error=f"{type(exc).__name__}: {exc}")
                raise

    # ---- while training ----------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.writer.id

    @property
    def run_dir(self) -> Path:
        return self.writer.dir

    def _check_step(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step={step!r} is not allowed: a step is an integer >= 0")
        step = int(step)
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step={step} is not allowed: steps only go forward (the last was {self.last_step})")
        return step

    def step(self, step: int, metrics: dict | None = None) -> None:
        """Step ``step`` (the optimizer steps done so far) is over: keep its ``metrics`` (names as in
        :func:`metric_names`), and record the spectra when ``step`` is a multiple of ``every``. Calls with the
        same step add to one metrics row."""
        if self.closed:
            raise ValueError(f"run {self.run_id} is closed: start a new SpectraRecorder for more steps")
        step = self._check_step(step)
        values = metric_names(metrics or {})
        if self._pending is not None and self._pending["step"] != step:
            self._write_pending()
        if values:
            if self._pending is None:
                self._pending = {"step": step}
            self._pending.update(values)
            if "val_loss" in values and self.task_kind == "causal-lm" and "val_perplexity" not in values:
                loss = values["val_loss"]
                self._pending["val_perplexity"] = math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan
        self.last_step = step
        if step % self.every == 0 and step != self.last_recorded:
            self.record(step)
        self.writer.touch(HEARTBEAT_S)

    def record(self, step: int) -> list[dict]:
        """Record the spectra of every LoRA module now, as step ``step``; returns the rows written."""
        t0 = time.perf_counter()
        rows = spectra_rows(lora_factors(self.model, self.adapter_name), step, self.top_k)
        self.writer.log_history(rows)
        self.spectra_seconds += time.perf_counter() - t0
        self.calls += 1
        self.last_recorded = step
        return rows

    def _write_pending(self) -> None:
        if self._pending:
            row = {**self._pending, "elapsed_s": round(time.perf_counter() - self.started, 4)}
            self.rows.append(row)
            self.writer.log(row)
        self._pending = None

    # ---- the end ------------------------------------------------------------------------------------------
    def final_metrics(self, extra: dict | None = None) -> dict:
        """The run's final metrics: the last value of every metric, the last training loss, step count,
        parameter counts, the spectra recordings' count and time, and ``extra`` (e.g. Trainer's summary)."""
        out: dict = {}
        for row in self.rows:
            out.update({k: v for k, v in row.items() if k not in ("step", "elapsed_s", "train_loss")
                        and v is not None and not (isinstance(v, float) and math.isnan(v))})
        losses = [r["train_loss"] for r in self.rows if r.get("train_loss") is not None]
        if losses:
            out["final_train_loss"] = losses[-1]
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        factors = lora_factors(self.model, self.adapter_name)
        scalings = {round(f.scaling, 12) for f in factors.values()}
        out.update(steps_done=self.last_step or 0, trainable_params=trainable, total_params=total,
                   trainable_percent=100.0 * trainable / total if total else None, lora_modules=len(factors),
                   scaling=scalings.pop() if len(scalings) == 1 else None, spectra_recordings=self.calls,
                   spectra_seconds=round(self.spectra_seconds, 4),
                   spectra_seconds_per_recording=self.spectra_seconds / self.calls if self.calls else None,
                   wall_seconds=round(time.perf_counter() - self.started, 4))
        out.update(extra or {})
        return out

    def close(self, status: str = "completed", error: str | None = None, metrics: dict | None = None) -> None:
        """End the run: write the last metrics row; a completed run also records the spectra at the last step
        (when not already recorded), then saves the adapter (PEFT format) and, when small, W0. ``metrics``
        are added to the final metrics. A second call does nothing. A failure while saving records the run
        as "failed" and is raised."""
        if self.closed:
            return
        self.closed = True
        self._write_pending()
        try:
            if status == "completed":
                if self.last_step is not None and self.last_step != self.last_recorded:
                    self.record(self.last_step)
                self._save_adapter()
                if self.keep_base_weights:
                    self._save_base_weights()
            self.writer.finish(status, self.final_metrics(metrics), error)
        except BaseException as exc:
            self.writer.finish("failed", error=f"saving the run failed: {type(exc).__name__}: {exc}")
            raise

    def _save_adapter(self) -> None:
        target = self.writer.dir / ADAPTER_DIR
        if not self.peft:
            from ..lora import save_adapter

            hf_config = getattr(self.model, "config", None)
            base = self.writer.record["config"].get("model")
            save_adapter(self.model, target, base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or base)
            return
        # a PeftModel saves itself; written beside the run first, then renamed: never half an adapter folder
        tmp = self.writer.dir / f".adapter-{secrets.token_hex(4)}"
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[self.adapter_name], safe_serialization=True)
            saved = tmp / self.adapter_name if (tmp / self.adapter_name).is_dir() else tmp
            (saved / "README.md").unlink(missing_ok=True)       # the model card: not part of the adapter
            os.replace(saved, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _save_base_weights(self) -> None:
        """W0 (out, in) float32 of each adapted Linear / Conv1D module, when all together are small."""
        from ..analysis.history import peft_lora_layer_type
        from ..lora import LoRALinear

        peft_layer, bases = peft_lora_layer_type(), {}
        for name, module in self.model.named_modules():
            if self.peft and isinstance(module, peft_layer):
                base, key = module.get_base_layer(), name.removeprefix("base_model.model.")
            elif not self.peft and isinstance(module, LoRALinear):
                base, key = module.base_layer, name
            else:
                continue
            if getattr(module, "merged", False):
                return                   # W holds W0 + ΔW: there is no W0 to keep
            if (isinstance(base, nn.Linear) or is_conv1d(base)) and base.weight.dtype.is_floating_point:
                bases[key] = base
        if bases and sum(b.weight.numel() * 4 for b in bases.values()) <= MAX_BASE_WEIGHTS_BYTES:
            self.writer.save_tensors(BASE_WEIGHTS, {k: weight_out_in(b).detach().to("cpu", torch.float32).clone()
                                                    for k, b in bases.items()})

    def __enter__(self) -> "SpectraRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", error="interrupted (KeyboardInterrupt)")
        else:
            self.close("failed", error=f"{exc_type.__name__}: {exc}")
        return False


class LoRASpectraCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that records the run with a :class:`SpectraRecorder`: it starts at
    ``on_train_begin`` (the state before the first step recorded at ``state.global_step``), records the
    spectra on every ``every``-th step (``on_step_end``), writes every log (``on_log``, ``on_evaluate``)
    under the run store's metric names and completes the run at ``on_train_end`` (Trainer's summary:
    train_seconds, samples_per_s, steps_per_s, mean_train_loss). The config records the Trainer's learning
    rate, seed, planned steps and batch size beside the model's LoRA settings.

    A ``Trainer`` has no hook for a crash: ``with callback: trainer.train()`` records one as "failed"
    (without it, the run reads "interrupted" once the process has ended). Arguments: as
    :class:`SpectraRecorder`'s (``config`` overrides what is read from the model and the Trainer)."""

    def __init__(self, every: int = 50, *, runs_dir: str | os.PathLike | None = None, name: str | None = None,
                 config: dict | None = None, adapter_name: str | None = None, keep_base_weights: bool = True,
                 top_k: int = HISTORY_TOP_K) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is not allowed: record the spectra every N steps, N an integer >= 1")
        self.every, self.runs_dir, self.name, self.config = every, runs_dir, name, dict(config or {})
        self.adapter_name, self.keep_base_weights, self.top_k = adapter_name, keep_base_weights, top_k
        self.recorder: SpectraRecorder | None = None
        self.summary: dict = {}

    @property
    def run_id(self) -> str | None:
        return self.recorder.run_id if self.recorder else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("LoRASpectraCallback got no model from the Trainer")
        settings = {"lr": float(args.learning_rate), "seed": int(args.seed), "steps": int(state.max_steps),
                    "batch_size": int(args.per_device_train_batch_size),
                    "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                    "weight_decay": float(args.weight_decay), "bf16": bool(args.bf16), "fp16": bool(args.fp16),
                    **self.config}
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.close("interrupted", error="a new training began before this one ended")
        self.summary = {}
        self.recorder = SpectraRecorder(model, self.every, runs_dir=self.runs_dir, name=self.name, config=settings,
                                        adapter_name=self.adapter_name, start_step=int(state.global_step),
                                        keep_base_weights=self.keep_base_weights, top_k=self.top_k,
                                        source="transformers.Trainer")

    def _live(self) -> bool:
        return self.recorder is not None and not self.recorder.closed

    def on_step_end(self, args, state, control, **kwargs):
        if self._live():
            self.recorder.step(int(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._live():
            row, summary = trainer_metrics(logs or {})
            self.summary.update(summary)
            self.recorder.step(int(state.global_step), row)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._live():
            self.recorder.step(int(state.global_step), trainer_metrics(metrics or {})[0])

    def on_train_end(self, args, state, control, **kwargs):
        if self._live():
            self.recorder.close("completed", metrics=self.summary)

    def __enter__(self) -> "LoRASpectraCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._live():
            self.recorder.__exit__(exc_type, exc, tb)
        return False
