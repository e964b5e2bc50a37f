"""Spectra over training: the factored spectrum of every LoRA module of a live model, cheap enough to take
every few steps, and what the recorded history says.

Reading a model (:func:`lora_factors`) takes each module's A (r, in), B (out, r) and scaling s, from PEFT's
``LoraLayer`` (the active adapter) or from this project's :class:`~lora_analysis.lora.LoRALinear`, as
detached views: no copy, no gradient. :func:`spectra_rows` then computes the singular values of
ΔW = s·B·A factored, as :func:`.spectra.factored_svd` does (QR of B and of Aᵀ, then the r×r core), never
forming the dense (out, in) ΔW; modules of one shape are stacked and done in batched calls, in float64
on the CPU (the stacked factors are the only copy: (out + in)·r numbers a module, at most
:data:`BATCH_BYTES` at a time). Cost per module
O((out + in)·r²): a Llama-2-7B adapter at r = 16 (224 modules) takes about 0.5 s a recording on one CPU core,
2 ms a module (benchmarks/bench_callback.py; a dense SVD of one 4096×4096 ΔW alone takes ~30 s there).

A recording is one row per module (:data:`lora_analysis.store.runs.HISTORY_COLUMNS`): step, module, rank,
effective_rank (Roy & Vetterli), stable_rank (Σσ²/σ₁²), norm (‖ΔW‖_F), spectral_norm (σ₁) and the top
singular values sigma_1 .. sigma_k. A zero ΔW (B = 0 before the first step) has every number 0, as in
:mod:`.spectra`: the step-0 row of a fresh LoRA says "nothing learned yet", not "unknown". A module whose
factors hold NaN or inf (a diverged run) gets NaN numbers and a warning, never an exception: recording must
not stop the training it watches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
# The float64 copy of stacked factors is done in batches of at most this many bytes (a Llama-2-7B adapter at
# r=16 holds ~300 MiB of factors in float64: never all at once)
BATCH_BYTES = 32 * 2**20


@dataclass
class LoRAFactors:
    """One adapted module as the model holds it now: ΔW = scaling·B·A, A (r, in), B (out, r) (views of the
    model's parameters, any device and dtype)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


def peft_lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:          # peft is optional: a model without it has none of its layers
        return None
    return LoraLayer


def is_peft_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT LoRA layers."""
    layer_type = peft_lora_layer_type()
    return layer_type is not None and any(isinstance(m, layer_type) for m in model.modules())


def _peft_factors(name: str, layer, adapter: str | None) -> tuple[str, LoRAFactors] | None:
    active = list(getattr(layer, "active_adapters", None) or [])
    adapter = adapter or (active[0] if active else None)
    if adapter is None:
        return None
    if adapter in getattr(layer, "lora_A", {}):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        # Conv layers: A (r, in, k, k) and B (out, r, 1, 1) act as the matrices (r, in·k·k) and (out, r)
        a, b = a.detach().flatten(1), b.detach().flatten(1)
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        # embeddings: A (r, vocab), B (dim, r); ΔW = (s·B·A)ᵀ has the same singular values
        a, b = layer.lora_embedding_A[adapter].detach(), layer.lora_embedding_B[adapter].detach()
    else:
        return None
    return name.removeprefix(PEFT_PREFIX), LoRAFactors(a, b, float(layer.scaling[adapter]))


def lora_factors(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoRAFactors]:
    """{module name: :class:`LoRAFactors`} of every LoRA module of ``model``, in the model's order.

    PEFT models: every ``LoraLayer`` holding ``adapter_name`` (default: each layer's first active adapter),
    named as in the saved adapter (``base_model.model.`` removed). DoRA's magnitude vector is not part of
    s·B·A: such modules are recorded without it (a warning says so). This project's LoRA layers: a PiSSA
    layer's update is s·(B·A − B0·A0), kept as the rank-2r factors [B, −B0]·[A; A0] (as its saved adapter).
    ``ValueError`` when the model has no LoRA module.
    """
    layer_type = peft_lora_layer_type()
    out: dict[str, LoRAFactors] = {}
    if layer_type is not None:
        dora = []
        for name, module in model.named_modules():
            if isinstance(module, layer_type):
                found = _peft_factors(name, module, adapter_name)
                if found is not None:
                    out[found[0]] = found[1]
                    if (getattr(module, "use_dora", None) or {}).get(adapter_name or module.active_adapters[0]):
                        dora.append(found[0])
        if dora:
            warnings.warn(f"{len(dora)} DoRA module(s) ({dora[0]}, ...): their spectra are those of s·B·A, without "
                          "DoRA's magnitude rescaling", stacklevel=2)
    if not out:
        from ..lora import lora_layers

        for name, layer in lora_layers(model).items():
            a, b = layer.update_factors()
            out[name] = LoRAFactors(a, b, float(layer.scaling))
    if not out:
        what = f" for the adapter {adapter_name!r}" if adapter_name else ""
        raise ValueError(f"{type(model).__name__} has no LoRA module{what}: wrap it with PEFT (get_peft_model) or "
                         "lora_analysis.apply_lora first")
    return out


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked as one float64 CPU tensor, each converted as it is copied (one pass, no
    intermediate stack in the source dtype)."""
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64)
    for i, t in enumerate(tensors):
        out[i].copy_(t.detach())
    return out


def _batched_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """Singular values (n, min(r, out, in)) of scaling_i·B_i·A_i for stacked A (n, r, in), B (n, out, r) in
    float64: QR of B and of Aᵀ (R only), then the singular values of the small core s·R_B·R_Aᵀ. A module
    whose factors hold NaN or inf gets NaN values (its R factors are not finite: checked there, where it
    is cheap)."""
    _, r_b = torch.linalg.qr(b, mode="r")                   # (n, kb, r)
    _, r_a = torch.linalg.qr(a.transpose(1, 2), mode="r")   # (n, ka, r)
    core = scaling[:, None, None] * (r_b @ r_a.transpose(1, 2))
    finite = torch.isfinite(core).flatten(1).all(1)
    s = torch.full((len(core), min(core.shape[1:])), math.nan, dtype=torch.float64)
    if bool(finite.any()):
        s[finite] = torch.linalg.svdvals(core[finite])       # descending
    return s


def spectrum_numbers(singular_values: np.ndarray) -> dict[str, np.ndarray]:
    """effective_rank, stable_rank, norm (‖·‖_F) and spectral_norm (σ₁) of each row of ``singular_values``
    (n, k), descending and ≥ 0; the definitions of :mod:`.spectra` (0 for a zero matrix), vectorised."""
    s = np.asarray(singular_values, dtype=np.float64)
    total = s.sum(axis=1)
    p = np.divide(s, total[:, None], out=np.zeros_like(s), where=total[:, None] > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    effective = np.where(total > 0, np.exp(-(p * logs).sum(axis=1)), 0.0)
    energy = (s**2).sum(axis=1)
    top = s[:, 0] if s.shape[1] else np.zeros(len(s))
    stable = np.divide(energy, top**2, out=np.zeros_like(energy), where=top > 0)
    bad = ~np.isfinite(s).all(axis=1)
    effective[bad] = stable[bad] = np.nan
    return {"effective_rank": effective, "stable_rank": stable, "norm": np.sqrt(energy), "spectral_norm": top}


def spectra_rows(factors: Mapping[str, LoRAFactors], step: int, top_k: int = 64) -> list[dict]:
    """One recording: a row per module (step, module, rank, effective_rank, stable_rank, norm, spectral_norm,
    sigma_1 .. sigma_min(r, top_k)), in the order of ``factors``. Modules of one shape are computed together
    (one batched QR and SVD); nothing dense is formed and no gradient is kept."""
    shapes: dict[tuple, list[str]] = {}
    for name, f in factors.items():
        shapes.setdefault((tuple(f.lora_A.shape), tuple(f.lora_B.shape)), []).append(name)
    groups = []
    for (a_shape, b_shape), names in shapes.items():
        per_module = 8 * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
        size = max(1, BATCH_BYTES // per_module)
        groups += [names[i:i + size] for i in range(0, len(names), size)]
    rows: dict[str, dict] = {}
    bad: list[str] = []
    with torch.no_grad():
        for names in groups:
            a = _stacked([factors[n].lora_A for n in names])
            b = _stacked([factors[n].lora_B for n in names])
            scaling = torch.tensor([factors[n].scaling for n in names], dtype=torch.float64)
            s = _batched_singular_values(a, b, scaling)
            bad += [n for n, row in zip(names, s) if not bool(torch.isfinite(row).all())]
            values = s.numpy()
            numbers = spectrum_numbers(values)
            for i, name in enumerate(names):
                row = {"step": int(step), "module": name, "rank": int(a.shape[1])}
                row.update({key: float(v[i]) for key, v in numbers.items()})
                row.update({f"sigma_{j + 1}": float(values[i, j]) for j in range(min(values.shape[1], top_k))})
                rows[name] = row
    if bad:
        warnings.warn(f"step {step}: {len(bad)} LoRA module(s) hold NaN or inf ({bad[0]}, ...): their spectra are "
                      "recorded as NaN", stacklevel=2)
    return [rows[n] for n in factors]


# ---- what a recorded history says --------------------------------------------------------------------------

def largest_modules(history: pd.DataFrame, n: int = 6) -> list[str]:
    """The ``n`` modules with the largest ‖ΔW‖_F at the last recorded step (the ones that learned most)."""
    if history is None or not len(history):
        return []
    last = history[history["step"] == history["step"].max()]
    return list(last.sort_values("norm", ascending=False, na_position="last")["module"].head(n))


def history_answer(history: pd.DataFrame) -> tuple[str, str]:
    """(answer, rule): how the spectrum grew, in one or two sentences computed from ``history``."""
    if history is None or not len(history):
        return "", ""
    steps = sorted(history["step"].dropna().unique())
    first, last = history[history["step"] == steps[0]], history[history["step"] == steps[-1]]
    n = last["module"].nunique()
    rank = last["rank"].median()
    eff_last = last["effective_rank"].median()
    top = last.loc[last["norm"].idxmax()] if last["norm"].notna().any() else None
    text = (f"Over {len(steps)} recordings (steps {int(steps[0])} to {int(steps[-1])}), the median effective rank of "
            f"ΔW across the {n} modules went from {first['effective_rank'].median():.3g} to {eff_last:.3g} "
            f"(of r = {rank:g})")
    if top is not None:
        grow = first.set_index("module")["norm"].reindex([top["module"]]).iloc[0]
        since = f" (from {grow:.3g})" if pd.notna(grow) else ""
        text += (f"; the largest update is {top['module']}, ‖ΔW‖_F = {top['norm']:.3g} at step {int(steps[-1])}"
                 f"{since}")
    rule = ("Effective rank exp(−Σ p_k ln p_k), p_k = σ_k/Σσ (Roy & Vetterli 2007), of each module's "
            "ΔW = s·B·A, from the factored SVD at each recorded step; the median is over modules. A zero update "
            "(B = 0 before training) counts as effective rank 0.")
    return text + ".", rule
