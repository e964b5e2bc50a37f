"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Take the top-k *left* singular vectors (output-side, (out,)-vectors) of the fine-tuned weight
W = W0 + ΔW. One of them is an intruder when its largest |cosine| with every left singular vector of
W0 is below ε:  max_j |⟨u_i(W), u_j(W0)⟩| < ε. Defaults k = 10, ε = 0.5 as in the paper. Singular
vectors have unit norm, so the cosine is the dot product.

The fine-tuned weight is formed densely: it is W0-sized, and W0's full SVD is needed anyway. For LoRA,
ΔW = s·B·A; for full fine-tuning, W = W_ft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..weights import ModuleUpdate, as_update_list
from .spectra import Spectrum, base_spectrum, dense_svd

DEFAULT_K = 10
DEFAULT_EPSILON = 0.5


def _check(k: int, eps: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is not allowed: k (how many top singular vectors to test) must be an integer ≥ 1")
    if not 0 < eps <= 1:
        raise ValueError(f"epsilon={eps!r} is not allowed: the cosine threshold must be in (0, 1]")


def fine_tuned_weight(update: ModuleUpdate) -> torch.Tensor:
    """W0 + ΔW as a dense (out, in) matrix in float64 (W_ft for full fine-tuning). Needs W0."""
    if update.w0 is None:
        raise ValueError(f"module '{update.name}' has no base weight W0: intruder dimensions compare with W0's "
                         "singular vectors, so they need the base model")
    if update.kind == "full":
        return update.w_ft.detach().to("cpu", torch.float64)
    a = update.lora_A.detach().to("cpu", torch.float64)
    b = update.lora_B.detach().to("cpu", torch.float64)
    return update.w0.detach().to("cpu", torch.float64) + update.scaling * (b @ a)


def max_cosines(w0_left: torch.Tensor, ft_left: torch.Tensor) -> np.ndarray:
    """For each column u_i of ``ft_left`` (out, k): max_j |u_iᵀ u0_j| over the columns of ``w0_left``
    (out, m). Returns (k,)."""
    cos = (ft_left.to(torch.float64).T @ w0_left.to(torch.float64)).abs()
    return cos.max(dim=1).values.numpy()


@dataclass
class IntruderResult:
    """Intruder test for one module.

    Attributes:
        name: module name.
        kind: "lora" or "full".
        max_cos: (k,) largest |cosine| of each top-k left singular vector of W0+ΔW with W0's.
        epsilon: the threshold.
        intruders: indices (0-based, by singular value rank) of the intruders.
    """

    name: str
    kind: str
    max_cos: np.ndarray
    epsilon: float

    @property
    def k(self) -> int:
        return int(len(self.max_cos))

    @property
    def intruders(self) -> list[int]:
        return [int(i) for i in np.nonzero(self.max_cos < self.epsilon)[0]]

    @property
    def count(self) -> int:
        return len(self.intruders)


def intruder_dimensions(update: ModuleUpdate, k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON,
                        base: Spectrum | None = None) -> IntruderResult:
    """Count the intruders among the top-k left singular vectors of W0 + ΔW (``base``: W0's spectrum,
    if already computed)."""
    _check(k, epsilon)
    base = base_spectrum(update) if base is None else base
    ft = dense_svd(fine_tuned_weight(update), torch.float64 if update.w0.numel() <= 2048 * 2048 else None)
    k_eff = min(k, ft.U.shape[1])
    return IntruderResult(update.name, update.kind, max_cosines(base.U, ft.U[:, :k_eff]), float(epsilon))


def intruders_frame(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate], k: int = DEFAULT_K,
                    epsilon: float = DEFAULT_EPSILON) -> pd.DataFrame:
    """One row per module: name, kind, k, epsilon, intruders (count), intruder_indices, min_max_cos.
    The total is ``frame["intruders"].sum()``."""
    rows = []
    for u in as_update_list(updates):
        res = intruder_dimensions(u, k, epsilon)
        rows.append({"name": res.name, "kind": res.kind, "k": res.k, "epsilon": res.epsilon, "intruders": res.count,
                     "intruder_indices": res.intruders,
                     "min_max_cos": float(res.max_cos.min()) if res.k else float("nan")})
    return pd.DataFrame(rows, columns=["name", "kind", "k", "epsilon", "intruders", "intruder_indices",
                                       "min_max_cos"])


def intruder_sweep(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate],
                   epsilons: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                   ks: Sequence[int] = (DEFAULT_K,), label: str | None = None) -> pd.DataFrame:
    """Intruder counts over a grid of ε and k, one SVD per module (the cosines for the largest k are
    reused for every smaller k and every ε).

    Rows: label (``label`` or the update kind), name, kind, k, epsilon, intruders. Sum over ``name`` for
    totals: ``frame.groupby(["label", "k", "epsilon"])["intruders"].sum()``.
    """
    for k in ks:
        for e in epsilons:
            _check(k, e)
    k_max = max(ks)
    rows = []
    for u in as_update_list(updates):
        res = intruder_dimensions(u, k_max, DEFAULT_EPSILON)
        for k in ks:
            head = res.max_cos[:k]
            for e in epsilons:
                rows.append({"label": label or u.kind, "name": u.name, "kind": u.kind, "k": k,
                             "epsilon": float(e), "intruders": int(np.sum(head < e))})
    return pd.DataFrame(rows, columns=["label", "name", "kind", "k", "epsilon", "intruders"])
