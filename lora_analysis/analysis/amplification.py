"""How strongly ΔW amplifies directions W0 already has (LoRA paper §7.3, Table 7).

Project W0 onto ΔW's own top-r singular directions: U: (out, r), V: (in, r) from ΔW = U·S·Vᵀ, and

    amplification = ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F

A large factor means ΔW boosts directions that are weak in W0 (the paper: ≈21.5 at r=4, ≈2 at r=64 for
GPT-3 layer 48 W_q). Table 7's comparison rows are reproduced: ‖Uᵀ·W0·V‖_F with U, V taken from ΔW, from
W0's own top-r singular vectors (= √Σ_{k≤r} σ_k(W0)², the most W0 can put in r directions), and from
random orthonormal r-frames; plus ‖W0‖_F and ‖ΔW‖_F.

W0's singular values come from :func:`lora_analysis.analysis.base_svd.base_svd` (cached on disk, shared with
the intruder test); ``amplification_frame`` takes any iterable of updates and holds one at a time, so a
generator that loads W0 module by module keeps one module's W0 in memory.

Edge cases: a zero ΔW gives amplification 0; a non-zero ΔW orthogonal to W0's row/column spaces
(‖Uᵀ·W0·V‖ = 0) gives inf.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import pandas as pd
import torch

from ..weights import ModuleUpdate
from .base_svd import BaseSVD, base_svd
from .intruders import iter_updates_lazily
from .spectra import Spectrum, update_spectrum

# Full fine-tuning has no rank: project on this many top directions unless told otherwise.
DEFAULT_FULL_R = 16


def projection_norm(w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """‖Uᵀ·W0·V‖_F for W0: (out, in), U: (out, r), V: (in, r); computed in float64."""
    w0 = w0.detach().to("cpu", torch.float64)
    return float(torch.linalg.matrix_norm(u.to(torch.float64).T @ w0 @ v.to(torch.float64)))


def random_frame(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """(n, r) orthonormal columns spanning a uniformly random r-dim subspace (QR of a Gaussian)."""
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return q


def amplification(update: ModuleUpdate, r: int | None = None, seed: int = 0,
                  delta: Spectrum | None = None, base: Spectrum | BaseSVD | None = None, *,
                  device: str | None = "auto", cache: bool | None = None) -> dict:
    """Table 7 for one module.

    Args:
        update: needs W0 (``ValueError`` otherwise).
        r: number of top directions; defaults to the LoRA rank, or ``DEFAULT_FULL_R`` for full fine-tuning.
        seed: for the random directions.
        delta / base: precomputed spectra of ΔW / W0 (only W0's singular values are used), to avoid
            recomputing them; ``base`` defaults to the cached :func:`base_svd` (on ``device``, ``cache``).

    Returns a dict: name, kind, r, ``delta_fro`` ‖ΔW‖_F, ``w0_fro`` ‖W0‖_F, ``proj_delta`` /
    ``proj_w0`` / ``proj_random`` (‖Uᵀ·W0·V‖_F for U, V from ΔW / W0 / random), ``amplification``
    (delta_fro / proj_delta).
    """
    if update.w0 is None:
        raise ValueError(f"module '{update.name}' has no base weight W0: amplification compares ΔW with W0, "
                         "so it needs the base model")
    delta = update_spectrum(update) if delta is None else delta
    out_f, in_f = update.shape
    if r is None:  # the default never exceeds the matrix (a 10-class head has at most 10 directions)
        r = min(update.rank if update.kind == "lora" else DEFAULT_FULL_R, out_f, in_f)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(out_f, in_f):
        raise ValueError(f"r={r!r} is not allowed for module '{update.name}': r must be an integer from 1 to "
                         f"{min(out_f, in_f)}")
    r_delta = min(r, delta.S.shape[0])
    delta_fro = float(torch.linalg.vector_norm(delta.S))
    proj_delta = projection_norm(update.w0, delta.U[:, :r_delta], delta.V[:, :r_delta])
    base = base_svd(update.w0, device=device, cache=cache) if base is None else base
    proj_w0 = float(torch.linalg.vector_norm(base.S[:r].to(torch.float64)))   # = ‖U0ᵀ W0 V0‖_F exactly
    g = torch.Generator().manual_seed(seed)
    proj_random = projection_norm(update.w0, random_frame(out_f, r, g), random_frame(in_f, r, g))
    w0_fro = float(torch.linalg.vector_norm(base.S.to(torch.float64)))
    if delta_fro == 0:
        factor = 0.0
    elif proj_delta <= 1e-12 * w0_fro:   # rounding noise of an exact zero: ΔW is outside W0's spaces
        factor = math.inf
    else:
        factor = delta_fro / proj_delta
    return {"name": update.name, "kind": update.kind, "r": r, "delta_fro": delta_fro,
            "w0_fro": w0_fro, "proj_delta": proj_delta,
            "proj_w0": proj_w0, "proj_random": proj_random, "amplification": factor}


def amplification_frame(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate], r: int | None = None,
                        seed: int = 0, *, device: str | None = "auto",
                        progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One :func:`amplification` row per module (all need W0). ``updates`` may be a generator (one W0 alive
    at a time); ``progress(name)`` is called after each module."""
    rows = []
    for u in iter_updates_lazily(updates):
        rows.append(amplification(u, r, seed, device=device))
        if progress is not None:
            progress(u.name)
        del u                       # dropped before the next W0 is read
    return pd.DataFrame(rows,
                        columns=["name", "kind", "r", "delta_fro", "w0_fro", "proj_delta", "proj_w0",
                                 "proj_random", "amplification"])
