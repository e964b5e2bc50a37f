"""Intruder intervention (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
scale a fine-tuned model's intruder dimensions down step by step and measure the target task and the
source task at each step.

For each module with its base weight W0, take the SVD of the fine-tuned weight W = W0 + ΔW = Σ σ_i u_i v_iᵀ
and the intruders among its top k left singular vectors (largest |cosine| with every left singular vector
of W0 below ε: :mod:`.intruders`). At factor λ the weight becomes

    W(λ) = W + (λ − 1) · Σ_{i ∈ intruders} σ_i u_i v_iᵀ          (λ = 1: the fine-tuned model; λ = 0: none)

and the model is evaluated. The paper finds that shrinking LoRA's intruders restores much of the source
(pre-training) behaviour at a small cost on the target task: the intruders carry the forgetting.

    frame = run_intervention(run)                 # a run of the run store (rebuilt on the CPU)
    fig = plot_intervention(frame, "r=8")

Dense SVDs: for the built-in models' small matrices (and MiniLM's 384×384) this is cheap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from ..lora.layer import is_conv1d, weight_out_in
from ..plots.style import COLORS, apply_style
from ..weights import ModuleUpdate
from .intruders import DEFAULT_EPSILON, DEFAULT_K, fine_tuned_weight, max_cosines

FACTORS = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass
class IntruderDirections:
    """One module's fine-tuned weight and its intruders. ``weight``: W (out, in) float64; ``U`` (out, k),
    ``S`` (k,), ``V`` (in, k): its top-k singular triplets; ``intruders``: indices into them."""

    name: str
    weight: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    intruders: list[int]

    def scaled(self, factor: float) -> torch.Tensor:
        """W(λ) = W + (λ − 1)·Σ_{i ∈ intruders} σ_i u_i v_iᵀ, (out, in) float64."""
        idx = torch.tensor(self.intruders, dtype=torch.long)
        if not len(idx):
            return self.weight.clone()
        part = (self.U[:, idx] * self.S[idx]) @ self.V[:, idx].T
        return self.weight + (float(factor) - 1.0) * part


def intruder_directions(update: ModuleUpdate, k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON,
                        weight: torch.Tensor | None = None) -> IntruderDirections:
    """The module's W = W0 + ΔW (or ``weight`` (out, in), the model's own fine-tuned weight), its top-k singular
    triplets (exact dense SVD, float64) and which of them are intruders. Needs W0."""
    weight = fine_tuned_weight(update) if weight is None else weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    u0, _, _ = torch.linalg.svd(update.w0.detach().to("cpu", torch.float64), full_matrices=False)
    k = min(k, len(s))
    cos = max_cosines(u0, u[:, :k])
    return IntruderDirections(update.name, weight, u[:, :k], s[:k], vh[:k].T,
                              [int(i) for i in np.nonzero(cos < epsilon)[0]])


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write W (out, in) into a Linear (out, in) or a transformers Conv1D (in, out), in its own dtype."""
    target = module.weight
    value = weight.T if is_conv1d(module) else weight
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def plain_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every LoRA layer merged into its base layer (a full model as is)."""
    from ..lora import merge_and_unload
    from ..lora.model import lora_layers

    copied = copy.deepcopy(model)
    return merge_and_unload(copied) if lora_layers(copied) else copied


def intervention(model: nn.Module, updates: Mapping[str, ModuleUpdate],
                 evaluate: Callable[[nn.Module], dict[str, float]], factors: Sequence[float] = FACTORS,
                 k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON) -> pd.DataFrame:
    """Scale every module's intruders by each factor and evaluate: one row per factor with ``factor``,
    ``intruders`` (how many directions were scaled, over all modules), ``modules`` and the metrics
    ``evaluate(model)`` returns. ``model`` (LoRA or full) is not changed: a merged copy is, and W is read
    from it (so a PiSSA run's moved base is counted right). Modules without W0 are left as they are."""
    if not factors:
        raise ValueError("factors is empty: give at least one scaling factor, e.g. 1, 0.5, 0")
    bad = [f for f in factors if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1]
    if bad:
        raise ValueError(f"factor={bad[0]!r} is not allowed: scaling factors are numbers from 0 to 1")
    work = plain_model(model)
    modules = dict(work.named_modules())
    missing = [n for n, u in updates.items() if u.w0 is not None and u.name not in modules]
    if missing:
        raise ValueError(f"module '{missing[0]}' of the updates is not in the model")
    found = [intruder_directions(u, k, epsilon, weight_out_in(modules[u.name])) for u in updates.values()
             if u.w0 is not None]
    rows = []
    for factor in factors:
        for d in found:
            _set_weight(modules[d.name], d.scaled(factor))
        rows.append({"factor": float(factor), "intruders": sum(len(d.intruders) for d in found),
                     "modules": len(found), **evaluate(work)})
    return pd.DataFrame(rows)


def run_intervention(run, factors: Sequence[float] = FACTORS, k: int = DEFAULT_K,
                     epsilon: float = DEFAULT_EPSILON) -> pd.DataFrame:
    """:func:`intervention` on a run of the run store: its model rebuilt on the CPU (asked for by name: this
    rebuilds the base), its validation metrics and, for built-in models, its ``source_*`` metrics."""
    from .. import runstore
    from ..training.restore import restore_run

    restored = restore_run(run)
    cpu = torch.device("cpu")

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = restored.metric(model)
        if restored.task.source_metrics is not None:
            out.update(restored.task.source_metrics(model, cpu))
        return out

    return intervention(restored.model, runstore.load_updates(restored.run), evaluate, factors, k, epsilon)


def plot_intervention(frame: pd.DataFrame, label: str = "", target: str | None = None,
                      source: str | None = None) -> go.Figure:
    """Target metric (left axis) and source metric (right axis) against the intruders' scaling factor, from 1
    (the fine-tuned model) down to 0 (intruders removed)."""
    target = target or next((m for m in ("val_accuracy", "val_loss") if m in frame), None)
    source = source or next((m for m in ("source_accuracy", "source_embedding_cosine", "source_loss")
                             if m in frame), None)
    fig = go.Figure()
    if target:
        fig.add_scatter(x=frame["factor"], y=frame[target], mode="lines+markers", name=f"{target} (target task)",
                        line={"color": COLORS["lora"]})
    if source:
        fig.add_scatter(x=frame["factor"], y=frame[source], mode="lines+markers", name=f"{source} (source task)",
                        line={"color": COLORS["full"], "dash": "dash"}, yaxis="y2")
    count = int(frame["intruders"].iloc[0]) if len(frame) else 0
    fig.update_layout(xaxis={"title": "scale of the intruder directions (1: as fine-tuned, 0: removed)",
                             "autorange": "reversed"},
                      yaxis={"title": target or ""}, yaxis2={"title": source or "", "overlaying": "y", "side": "right"})
    return apply_style(fig, f"Scaling down {count} intruder dimension{'s' * (count != 1)}"
                            + (f": {label}" if label else ""))
