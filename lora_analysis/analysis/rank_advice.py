"""Which rank each module needs, as a ready PEFT config, and shrinking a trained adapter to it.

Rank advice: per module, the smallest k whose top-k singular values hold a chosen share of ΔW's energy
Σσ² (``energy=0.9`` → rank_90). Exported as PEFT ``LoraConfig`` keyword arguments (JSON-ready dict) and as
a ``LoraConfig(...)`` snippet. ``alpha_mode="trained"`` (the registry's default) keeps each module's trained
scaling s: α' = s·k (α' = s·√k with rsLoRA), so the advised config scales its update exactly as the trained
run did; "ratio" and "fixed" change the scaling, and :func:`scaling_change` says by how much.

Rank reduction (as kohya's resize_lora, but exact about the scaling): from the factored SVD
ΔW = U·S·Vᵀ keep the top k and split the singular values evenly between the factors,

    B' = U_k·√S_k / √s',   A' = √S_k·V_kᵀ / √s',   so  s'·B'·A' = U_k·S_k·V_kᵀ,

where s' is the new scaling (α'/k, or α'/√k with rsLoRA). ``alpha_mode="ratio"`` keeps α/r fixed
(α' = α·k/r); ``"fixed"`` keeps α (so the scaling grows as the rank shrinks; the factors absorb it).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import torch

from ..lora.adapter_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter
from ..lora.config import LoRAConfig, alpha_for_scaling, effective_rank_alpha, exact_patterns, pattern_key
from ..lora.layer import compute_scaling
from ..store.files import atomic_save_tensors, atomic_write_text
from ..weights import ModuleUpdate, as_update_list
from .spectra import cumulative_energy, energy_rank, factored_svd, update_spectrum

ALPHA_MODES = ("ratio", "fixed")
# what peft_config_from_advice accepts: "trained" keeps each module's trained scaling (needs ``scalings``)
CONFIG_ALPHA_MODES = ("trained",) + ALPHA_MODES


def _check_alpha_mode(alpha_mode: str, allowed: tuple = ALPHA_MODES) -> None:
    if alpha_mode not in allowed:
        raise ValueError(f"alpha_mode={alpha_mode!r} is not allowed: "
                         + ("'trained' keeps each module's trained scaling, " if "trained" in allowed else "")
                         + "'ratio' keeps alpha/r fixed, 'fixed' keeps alpha fixed")


def _check_rank(rank, what: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what}={rank!r} is not allowed: a LoRA rank must be an integer ≥ 1")


def _mode(values: Iterable) -> float:
    """Most common value; ties go to the larger (fewer modules then need a pattern entry upward)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _retained(singular_values, k: int) -> float:
    cum = cumulative_energy(singular_values)
    if not len(cum) or cum[-1] == 0:
        return 1.0   # a zero update loses nothing at any rank
    return float(cum[min(k, len(cum)) - 1])


# ---- advice --------------------------------------------------------------------------------------

def rank_advice(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate], energy: float = 0.9,
                min_rank: int = 1, max_rank: int | None = None) -> pd.DataFrame:
    """Per module, the smallest rank holding ``energy`` of Σσ², clipped to [min_rank, max_rank].

    Rows: name, out_features, in_features, kind, rank (current; None for full fine-tuning), advised_rank,
    retained_energy (share of Σσ² the advised rank keeps), fro_norm. A zero update gets ``min_rank``.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} is not allowed: the energy share must be in (0, 1]")
    _check_rank(min_rank, "min_rank")
    if max_rank is not None:
        _check_rank(max_rank, "max_rank")
    items = as_update_list(updates)
    rows = []
    for u in items:
        s = update_spectrum(u).S
        k = max(energy_rank(s, energy), min_rank)
        k = min(k, max_rank) if max_rank is not None else k
        k, _ = effective_rank_alpha(LoRAConfig(rank=int(k), alpha=1.0, cap_rank=True), u.name, *u.shape)
        rows.append({"name": u.name, "out_features": u.shape[0], "in_features": u.shape[1], "kind": u.kind,
                     "rank": u.rank, "advised_rank": int(k), "retained_energy": _retained(s, k),
                     "fro_norm": float(torch.linalg.vector_norm(s))})
    return pd.DataFrame(rows, columns=["name", "out_features", "in_features", "kind", "rank", "advised_rank",
                                       "retained_energy", "fro_norm"])


def trained_scalings(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate]) -> dict[str, float]:
    """{module: trained scaling s} of the LoRA modules (full fine-tuning has none)."""
    return {u.name: float(u.scaling) for u in as_update_list(updates) if u.kind == "lora"}


def scaling_change(config: Mapping, scalings: Mapping[str, float]) -> pd.DataFrame:
    """Per module, the scaling the advised ``config`` gives against the trained one: rows name, rank, alpha,
    scaling, trained_scaling, factor (advised / trained; 1 keeps the trained update's scale)."""
    rows = []
    for name, trained in scalings.items():
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = int(ranks[key] if (key := pattern_key(ranks, name)) else config["r"])
        a = float(alphas[key] if (key := pattern_key(alphas, name)) else config["lora_alpha"])
        s = compute_scaling(r, a, bool(config.get("use_rslora")))
        rows.append({"name": name, "rank": r, "alpha": a, "scaling": s, "trained_scaling": trained,
                     "factor": s / trained if trained else float("nan")})
    return pd.DataFrame(rows, columns=["name", "rank", "alpha", "scaling", "trained_scaling", "factor"])


def peft_config_from_advice(advice: pd.DataFrame, alpha_mode: str = "ratio", ratio: float = 1.0,
                            alpha: float | None = None, target_modules: list[str] | str | None = None,
                            dropout: float = 0.0, use_rslora: bool = False,
                            scalings: Mapping[str, float] | None = None) -> dict:
    """PEFT ``LoraConfig`` keyword arguments for the ranks in ``advice`` (from :func:`rank_advice`).

    ``r`` is the most common advised rank; modules that differ go in ``rank_pattern`` under keys that match
    exactly that module in PEFT (``^`` + the escaped full name: a bare name would also match longer names
    ending with it). ``alpha_mode="ratio"``: α = ratio·r for every module (same α/r
    scaling everywhere; differing α in ``alpha_pattern``); ``"fixed"``: one α for all (``alpha``, default
    ratio·r), no ``alpha_pattern``. ``"trained"``: each module keeps its trained scaling ``scalings[name]``,
    α = s·k (s·√k with ``use_rslora``), so the config reproduces the trained update's scale at the advised
    ranks. ``target_modules`` defaults to the modules' last name parts
    (``["q_proj", "v_proj"]``); pass the source adapter's list to select exactly the same modules.
    """
    _check_alpha_mode(alpha_mode, CONFIG_ALPHA_MODES)
    if advice.empty:
        raise ValueError("rank advice is empty: no module to configure")
    ranks = {str(n): int(k) for n, k in zip(advice["name"], advice["advised_rank"])}
    r = int(_mode(ranks.values()))
    rank_pattern = exact_patterns(ranks, r)
    if alpha_mode == "trained":
        missing = sorted(set(ranks) - set(scalings or {}))
        if missing:
            raise ValueError(f"alpha_mode='trained' needs the trained scaling of every module; none for "
                             f"{missing[:5]} (full fine-tuning has no alpha: use alpha_mode='ratio')")
        alphas = {n: float(alpha_for_scaling(scalings[n], k, use_rslora)) for n, k in ranks.items()}
        lora_alpha = float(_mode(a for n, a in alphas.items() if ranks[n] == r))
        alpha_pattern = exact_patterns(alphas, lora_alpha)
    elif alpha_mode == "ratio":
        lora_alpha = float(ratio * r)
        alpha_pattern = exact_patterns({n: float(ratio * k) for n, k in ranks.items()}, lora_alpha)
    else:
        lora_alpha = float(ratio * r if alpha is None else alpha)
        alpha_pattern = {}
    if target_modules is None:
        target_modules = sorted({n.rpartition(".")[2] for n in ranks})
    return {"r": r, "lora_alpha": lora_alpha, "target_modules": target_modules, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "lora_dropout": float(dropout), "use_rslora": bool(use_rslora),
            "bias": "none"}


def peft_config_snippet(config: Mapping) -> str:
    """Python source that builds ``config`` (from :func:`peft_config_from_advice`) with PEFT."""
    lines = ["from peft import LoraConfig", "", "config = LoraConfig("]
    for key, value in config.items():
        lines.append(f"    {key}={value!r},")
    lines.append(")")
    return "\n".join(lines) + "\n"


# ---- rank reduction -------------------------------------------------------------------------------

@dataclass
class ReducedAdapter:
    """A rank-reduced adapter in memory.

    Attributes:
        config: the new ``adapter_config.json`` content (the source's, with r, lora_alpha, rank_pattern and
            alpha_pattern updated).
        factors: {module: (A' (k, in), B' (out, k))} in the source adapter's dtype.
        scalings: {module: s'}.
        extra: modules_to_save tensors copied from the source.
        report: one row per module: name, rank, new_rank, alpha, new_alpha, scaling, new_scaling,
            retained_energy (share of Σσ² kept), fro_error (‖ΔW − ΔW'‖_F, = √ of the dropped Σσ²).
    """

    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]
    extra: dict[str, torch.Tensor]
    report: pd.DataFrame

    def updates(self) -> dict[str, ModuleUpdate]:
        """The reduced adapter as LoRA :class:`ModuleUpdate`s (no W0)."""
        return {n: ModuleUpdate(n, lora_A=a, lora_B=b, scaling=self.scalings[n]) for n, (a, b) in self.factors.items()}


def reduce_rank(adapter: Adapter, rank: int | Mapping[str, int], alpha_mode: str = "ratio") -> ReducedAdapter:
    """Truncate every module of ``adapter`` to rank ``rank`` (one int, or ``{module: rank}`` for all
    modules) by the SVD of its factored ΔW. A rank at or above the module's rank keeps it whole (still
    re-factored through the SVD, so ΔW is reproduced to rounding). Raises ``ValueError`` for a rank < 1 or
    a mapping that misses a module.
    """
    _check_alpha_mode(alpha_mode)
    if isinstance(rank, Mapping):
        missing = sorted(set(adapter.modules) - set(rank))
        if missing:
            raise ValueError(f"rank mapping has no entry for modules {missing[:5]}")
        for name, k in rank.items():
            _check_rank(k, f"rank for module '{name}'")
    else:
        _check_rank(rank)
    rslora = adapter.config.rslora
    factors, scalings, rows = {}, {}, []
    for name, m in adapter.modules.items():
        k = min(rank[name] if isinstance(rank, Mapping) else rank, m.rank)        # never above the source
        k, _ = effective_rank_alpha(LoRAConfig(rank=k, alpha=1.0, cap_rank=True), name, *m.shape)
        spec = factored_svd(m.lora_A, m.lora_B, m.scaling).top(k)
        new_alpha = m.alpha * k / m.rank if alpha_mode == "ratio" else m.alpha
        new_scaling = compute_scaling(k, new_alpha, rslora)
        root = (spec.S / new_scaling).sqrt()                  # √(S_k / s')
        b = spec.U * root                                     # (out, k)
        a = root[:, None] * spec.V.T                          # (k, in)
        factors[name] = (a.to(m.lora_A.dtype).contiguous(), b.to(m.lora_B.dtype).contiguous())
        scalings[name] = new_scaling
        full = factored_svd(m.lora_A, m.lora_B, m.scaling).S
        kept = float((spec.S ** 2).sum())
        total = float((full ** 2).sum())
        rows.append({"name": name, "rank": m.rank, "new_rank": k, "alpha": m.alpha, "new_alpha": new_alpha,
                     "scaling": m.scaling, "new_scaling": new_scaling,
                     "retained_energy": kept / total if total > 0 else 1.0,
                     "fro_error": math.sqrt(max(total - kept, 0.0))})
    report = pd.DataFrame(rows)
    new_ranks = dict(zip(report["name"], report["new_rank"].astype(int)))
    new_alphas = dict(zip(report["name"], report["new_alpha"].astype(float)))
    r = int(_mode(new_ranks.values()))
    lora_alpha = float(_mode(a for n, a in new_alphas.items() if new_ranks[n] == r))
    config = dict(adapter.raw_config)
    config.update({"r": r, "lora_alpha": lora_alpha,
                   "rank_pattern": exact_patterns({n: int(k) for n, k in new_ranks.items()}, r),
                   "alpha_pattern": exact_patterns(new_alphas, lora_alpha)})
    return ReducedAdapter(config, factors, scalings, dict(adapter.extra), report)


def save_reduced_adapter(reduced: ReducedAdapter, directory: str | os.PathLike) -> Path:
    """Write ``reduced`` as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``
    with keys ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, (a, b) in reduced.factors.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for key, value in reduced.extra.items():
        state[f"{PREFIX}{key}"] = value.contiguous()
    atomic_save_tensors(directory / WEIGHTS_NAME, state)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(reduced.config, indent=2, sort_keys=True) + "\n")
    return directory
