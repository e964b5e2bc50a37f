"""Rebuild what a run trained: its task, the base model, and the fine-tuned model (LoRA unmerged, or the
fully fine-tuned weights), plus held-out inputs, for analyses that need a working model (merge checks,
latency, task metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import runstore
from ..lora import load_adapter
from .data import ClassificationSplit, TextClassificationSplit, classification_inputs
from .models import TASK_SETTINGS, Task, prepare_task
from .trainer import evaluate


@dataclass
class RestoredRun:
    run: runstore.Run
    task: Task
    model: nn.Module        # LoRA runs: base + adapter, unmerged; full runs: the fine-tuned model

    def base_model(self) -> nn.Module:
        return self.task.build_model().eval()

    def held_out_inputs(self, n: int = 64):
        """Validation inputs: (n, features) for classification; for texts a dict of input_ids and
        attention_mask (n/4, T) (a transformer's pass costs per token: a merge audit needs its numbers, not
        many rows); (n/8, seq_len) token windows for LMs."""
        data = self.task.data
        if isinstance(data, TextClassificationSplit):
            return classification_inputs(data, slice(0, max(1, n // 4)))
        if isinstance(data, ClassificationSplit):
            return classification_inputs(data, slice(0, n))
        if hasattr(data, "held_out_inputs"):          # tokenised examples (packed, instruction or chat data)
            return data.held_out_inputs(max(1, n // 8))
        seq = data.seq_len
        windows = data.val[: (len(data.val) // seq) * seq].view(-1, seq)
        return windows[: max(1, min(n // 8, len(windows)))]

    def metric(self, model: nn.Module) -> dict[str, float]:
        """The run's validation metrics (loss plus accuracy or perplexity) for ``model``."""
        return evaluate(self.task, model, torch.device("cpu"), batch_size=32,
                        max_eval_tokens=int(self.run.config.get("max_eval_tokens") or 16384))


def task_for_run(run: runstore.Run) -> Task:
    c = run.config
    if c.get("source"):
        raise ValueError(f"run {run.id} was recorded from a training loop outside lora-analysis ({c['source']}): its "
                         "data is not known here, so its model is not rebuilt (merge checks need it); every analysis "
                         "of its adapter works")
    return prepare_task(**{k: c.get(k) for k in TASK_SETTINGS})


def restore_run(run: runstore.Run | str, task: Task | None = None) -> RestoredRun:
    """The run's fine-tuned model on the CPU in float32, in eval mode. ``task`` may be passed to reuse one."""
    run = run if isinstance(run, runstore.Run) else runstore.load_run(run)
    if run.status != "completed":
        raise ValueError(f"run {run.id} is {run.status}: only completed runs can be restored")
    task = task or task_for_run(run)
    model = task.build_model()
    if run.method == "lora":
        load_adapter(model, run.dir / runstore.ADAPTER_DIR)
    elif (run.dir / runstore.FULL_MODEL).is_file():
        state = runstore.read_tensors(run.dir / runstore.FULL_MODEL)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"run {run.id}: its saved weights do not fit the base model ({exc})") from exc
    else:
        raise ValueError(f"run {run.id} kept only the adapted weights (its model was too large to store whole), "
                         "so the fully fine-tuned model cannot be rebuilt")
    return RestoredRun(run, task, model.eval())
