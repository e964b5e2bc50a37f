"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Take the top-k *left* singular vectors (output-side, (out,)-vectors) of the fine-tuned weight
W = W0 + ΔW. One of them is an intruder when its largest |cosine| with every left singular vector of
W0 is below ε:  max_j |⟨u_i(W), u_j(W0)⟩| < ε. Defaults k = 10, ε = 0.5 as in the paper. Singular
vectors have unit norm, so the cosine is the dot product.

For LoRA, ΔW = s·B·A; for full fine-tuning, W = W_ft. W0's SVD comes from
:func:`lora_analysis.analysis.base_svd.base_svd` (computed once per distinct W0 and cached on disk); the top-k
of W0 + ΔW from :func:`~lora_analysis.analysis.base_svd.top_left_singular` (``method="auto"``: subspace
iteration with products by W0 and the factors, the exact dense SVD for small matrices or when it does not
converge; ``method="exact"``: always the dense SVD). The frames take any iterable of updates and hold one
at a time, so a generator that loads W0 module by module (:func:`lora_analysis.analysis.sources.iter_updates`)
keeps one module's W0 in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..weights import ModuleUpdate
from .base_svd import BaseSVD, base_svd, exact_top_left_singular, top_left_singular
from .spectra import Spectrum

DEFAULT_K = 10
DEFAULT_EPSILON = 0.5
METHODS = ("auto", "exact")


def iter_updates_lazily(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate]) -> Iterator[ModuleUpdate]:
    """Updates one at a time, without listing them first (a generator's W0s are never all alive at once)."""
    yield from (updates.values() if isinstance(updates, Mapping) else updates)


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
                        base: Spectrum | BaseSVD | None = None, *, method: str = "auto",
                        device: str | None = "auto", cache: bool | None = None) -> IntruderResult:
    """Count the intruders among the top-k left singular vectors of W0 + ΔW.

    ``base``: W0's SVD if already at hand (else :func:`base_svd`, cached by ``cache``); ``method``: "auto"
    (truncated where it converges, see :mod:`lora_analysis.analysis.base_svd`) or "exact"; ``device``: where
    the SVDs run ("auto": a GPU when present).
    """
    _check(k, epsilon)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: choose one of {', '.join(METHODS)}")
    if update.w0 is None:
        fine_tuned_weight(update)          # raises the "needs the base model" error
    base = base_svd(update.w0, device=device, cache=cache) if base is None else base
    if method == "exact":
        top = exact_top_left_singular(fine_tuned_weight(update), k, device=device)
    else:
        top = top_left_singular(update, k, device=device, base_u=base.U, cache=cache)
    return IntruderResult(update.name, update.kind, max_cosines(base.U, top.U), float(epsilon))


def intruders_frame(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate], k: int = DEFAULT_K,
                    epsilon: float = DEFAULT_EPSILON, *, method: str = "auto", device: str | None = "auto",
                    progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per module: name, kind, k, epsilon, intruders (count), intruder_indices, min_max_cos.
    The total is ``frame["intruders"].sum()``. ``updates`` may be a generator (one W0 alive at a time);
    ``progress(name)`` is called after each module."""
    rows = []
    for u in iter_updates_lazily(updates):
        res = intruder_dimensions(u, k, epsilon, method=method, device=device)
        if progress is not None:
            progress(u.name)
        del u                       # dropped before the next W0 is read
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
    for u in iter_updates_lazily(updates):
        res = intruder_dimensions(u, k_max, DEFAULT_EPSILON)
        for k in ks:
            head = res.max_cos[:k]
            for e in epsilons:
                rows.append({"label": label or u.kind, "name": u.name, "kind": u.kind, "k": k,
                             "epsilon": float(e), "intruders": int(np.sum(head < e))})
        del u                       # dropped before the next W0 is read
    return pd.DataFrame(rows, columns=["label", "name", "kind", "k", "epsilon", "intruders"])
