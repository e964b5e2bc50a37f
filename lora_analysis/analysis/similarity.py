"""Subspace similarity between learned updates (LoRA paper, Hu et al. 2021, §7.2, Eq. 4).

    φ(U1, U2, i, j) = ‖U1[:, :i]ᵀ · U2[:, :j]‖_F² / min(i, j)   ∈ [0, 1]

U1: (d, r1) and U2: (d, r2) have orthonormal columns, ordered by importance (singular value). φ = 1 when
the smaller of the two top subspaces lies inside the other, 0 when they are orthogonal.

Convention (as in the paper): for two LoRA adapters, U are the *right*-singular vectors of the A
matrices, A: (r, in) → columns in R^in, i.e. input-side directions. The same φ is offered for ΔW's
input-side (right, V) and output-side (left, U) singular vectors, which also compares a LoRA update
with a full fine-tuning update of the same module.

Random baseline: for uniformly random subspaces of dimensions i and j in R^d,
E‖U1ᵀU2‖_F² = i·j/d, so E[φ] = max(i, j)/d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from ..weights import ModuleUpdate
from .spectra import Spectrum, base_spectrum, update_spectrum

SIDES = ("input", "output")
# Full fine-tuning has no rank: compare its top-k directions with this k unless told otherwise.
DEFAULT_FULL_TOP_K = 64


def _np(m) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().to("cpu", torch.float64).numpy()
    return np.asarray(m, dtype=np.float64)


def similarity_matrix(u1, u2, max_i: int | None = None, max_j: int | None = None) -> np.ndarray:
    """φ(i, j) for all i ≤ max_i, j ≤ max_j as an array ``phi[i-1, j-1]``, shape (max_i, max_j).

    u1: (d, r1), u2: (d, r2), orthonormal columns, most important first. Computed from M = U1ᵀU2 once:
    ‖U1[:, :i]ᵀU2[:, :j]‖_F² is the sum of M² over the top-left i×j block (a 2-D cumulative sum).
    """
    u1, u2 = _np(u1), _np(u2)
    if u1.ndim != 2 or u2.ndim != 2 or u1.shape[0] != u2.shape[0]:
        raise ValueError(f"subspaces must be (d, r) matrices in the same space, got {u1.shape} and {u2.shape}")
    max_i = u1.shape[1] if max_i is None else max_i
    max_j = u2.shape[1] if max_j is None else max_j
    if not (1 <= max_i <= u1.shape[1] and 1 <= max_j <= u2.shape[1]):
        raise ValueError(f"max_i={max_i}, max_j={max_j} must be in 1..{u1.shape[1]} and 1..{u2.shape[1]}")
    m2 = (u1[:, :max_i].T @ u2[:, :max_j]) ** 2
    block = m2.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, max_i + 1)[:, None]
    j = np.arange(1, max_j + 1)[None, :]
    return np.clip(block / np.minimum(i, j), 0.0, 1.0)   # clip: rounding can exceed 1 by ~1e-16


def subspace_similarity(u1, u2, i: int, j: int) -> float:
    """φ(U1, U2, i, j) of Eq. 4 for one (i, j)."""
    return float(similarity_matrix(u1, u2, i, j)[i - 1, j - 1])


def random_baseline(max_i: int, max_j: int, d: int) -> np.ndarray:
    """E[φ(i, j)] = max(i, j)/d for random subspaces of R^d, shape (max_i, max_j)."""
    i = np.arange(1, max_i + 1)[:, None]
    j = np.arange(1, max_j + 1)[None, :]
    return np.maximum(i, j) / d * np.ones((max_i, max_j))


def lora_a_subspace(lora_A) -> np.ndarray:
    """Right-singular vectors of A: (r, in) as an (in, r) matrix, by descending singular value."""
    a = _np(lora_A)
    _, _, vh = np.linalg.svd(a, full_matrices=False)
    return vh.T


def lora_a_similarity(lora_A1, lora_A2) -> np.ndarray:
    """φ matrix (r1, r2) between the A matrices of two adapters (the paper's Figure 3 convention)."""
    return similarity_matrix(lora_a_subspace(lora_A1), lora_a_subspace(lora_A2))


def _directions(spectrum: Spectrum, side: str) -> torch.Tensor:
    if side not in SIDES:
        raise ValueError(f"side={side!r} is not allowed: choose 'input' (right singular vectors) or 'output' "
                         "(left singular vectors)")
    return spectrum.V if side == "input" else spectrum.U


def _top_k(update: ModuleUpdate, top_k: int | None) -> int:
    if top_k is not None:
        return top_k
    return update.rank if update.kind == "lora" else min(DEFAULT_FULL_TOP_K, *update.shape)


@dataclass
class SimilarityResult:
    """φ between two updates of one module.

    Attributes:
        name: module name.
        side: "A" (right singular vectors of A), "input" (ΔW's V) or "output" (ΔW's U).
        phi: (k1, k2) array, phi[i-1, j-1] = φ(i, j).
        d: dimension of the space the directions live in (in or out features).
        baseline: (k1, k2) array max(i, j)/d.
    """

    name: str
    side: str
    phi: np.ndarray
    d: int
    baseline: np.ndarray

    def summary(self) -> dict:
        """Plain numbers: φ(1,1), φ at full ranks, mean φ, mean baseline, and the largest i with φ(i,i) > 0.5."""
        diag = np.diagonal(self.phi)
        above = np.nonzero(diag > 0.5)[0]
        return {"name": self.name, "side": self.side, "k1": int(self.phi.shape[0]), "k2": int(self.phi.shape[1]),
                "d": self.d, "phi_top1": float(self.phi[0, 0]), "phi_full": float(self.phi[-1, -1]),
                "phi_mean": float(self.phi.mean()), "baseline_mean": float(self.baseline.mean()),
                "shared_directions": int(above[-1] + 1) if len(above) else 0}


def update_similarity(u1: ModuleUpdate, u2: ModuleUpdate, side: str = "input", top_k1: int | None = None,
                      top_k2: int | None = None) -> SimilarityResult:
    """φ between ΔW's top singular directions of two updates of the same module (LoRA or full).

    ``side`` "input": right singular vectors V (in-dim); "output": left singular vectors U (out-dim).
    ``top_k`` defaults to the LoRA rank, or ``DEFAULT_FULL_TOP_K`` for full fine-tuning.
    """
    if u1.shape != u2.shape:
        raise ValueError(f"module '{u1.name}' has shape {u1.shape} in one update and {u2.shape} in the other")
    k1, k2 = _top_k(u1, top_k1), _top_k(u2, top_k2)
    d1, d2 = _directions(update_spectrum(u1), side), _directions(update_spectrum(u2), side)
    phi = similarity_matrix(d1, d2, min(k1, d1.shape[1]), min(k2, d2.shape[1]))
    d = int(d1.shape[0])
    return SimilarityResult(u1.name, side, phi, d, random_baseline(*phi.shape, d))


def a_similarity(u1: ModuleUpdate, u2: ModuleUpdate) -> SimilarityResult:
    """The paper's φ between the A matrices of two LoRA updates of one module."""
    if u1.kind != "lora" or u2.kind != "lora":
        raise ValueError(f"module '{u1.name}': A-matrix similarity needs two LoRA updates; use "
                         "update_similarity(side='input') to compare with full fine-tuning")
    if u1.shape != u2.shape:
        raise ValueError(f"module '{u1.name}' has shape {u1.shape} in one adapter and {u2.shape} in the other")
    phi = lora_a_similarity(u1.lora_A, u2.lora_A)
    d = int(u1.lora_A.shape[1])
    return SimilarityResult(u1.name, "A", phi, d, random_baseline(*phi.shape, d))


def adapter_similarity(updates1: Mapping[str, ModuleUpdate], updates2: Mapping[str, ModuleUpdate],
                       side: str = "A") -> dict[str, SimilarityResult]:
    """φ per module present in both (side "A", "input" or "output"); raises if none is shared."""
    common = [n for n in updates1 if n in updates2]
    if not common:
        raise ValueError("the two adapters share no adapted module: nothing to compare")
    if side == "A":
        return {n: a_similarity(updates1[n], updates2[n]) for n in common}
    return {n: update_similarity(updates1[n], updates2[n], side) for n in common}


def similarity_summary_frame(results: Mapping[str, SimilarityResult]) -> pd.DataFrame:
    """One row per module of :meth:`SimilarityResult.summary`."""
    return pd.DataFrame([r.summary() for r in results.values()])


def similarity_long_frame(result: SimilarityResult) -> pd.DataFrame:
    """φ matrix as long rows (i, j, phi, baseline) for tables and CSV."""
    i, j = np.meshgrid(np.arange(1, result.phi.shape[0] + 1), np.arange(1, result.phi.shape[1] + 1), indexing="ij")
    return pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "phi": result.phi.ravel(),
                         "baseline": result.baseline.ravel()})


def base_overlap(update: ModuleUpdate, k: int | None = None, delta: Spectrum | None = None,
                 base: Spectrum | None = None) -> pd.DataFrame:
    """How much ΔW's top-k directions lie in W0's top-k directions, for k = 1..k.

    Rows: k, ``phi_output`` = ‖U_ΔW[:, :k]ᵀ U_W0[:, :k]‖_F²/k (left, out-dim), ``phi_input`` the same with
    right singular vectors (in-dim), and the random baselines k/out and k/in. ``k`` defaults to the
    LoRA rank (or ``DEFAULT_FULL_TOP_K``). Needs W0.
    """
    base = base_spectrum(update) if base is None else base
    delta = update_spectrum(update) if delta is None else delta
    k = min(_top_k(update, k), delta.S.shape[0], base.S.shape[0])
    phi_out = np.diagonal(similarity_matrix(delta.U, base.U, k, k))
    phi_in = np.diagonal(similarity_matrix(delta.V, base.V, k, k))
    out_f, in_f = update.shape
    ks = np.arange(1, k + 1)
    return pd.DataFrame({"name": update.name, "k": ks, "phi_output": phi_out, "phi_input": phi_in,
                         "baseline_output": ks / out_f, "baseline_input": ks / in_f})
