"""Singular spectra of learned updates ΔW, and the numbers that summarise them.

Conventions
-----------
* Every matrix is in ``nn.Linear`` orientation, (out, in). For a LoRA update ΔW = s·B·A with
  A: (r, in), B: (out, r), s = scaling.
* A :class:`Spectrum` holds the thin SVD ΔW = U·diag(S)·Vᵀ: ``U`` (out, k) left singular vectors
  (output-side directions), ``S`` (k,) descending, ``V`` (in, k) right singular vectors (input-side
  directions), k = rank of the factorisation (r for LoRA, min(out, in) for dense matrices).
* LoRA spectra are computed *factored* and never build the dense (out, in) matrix:
  B = Q_B·R_B, Aᵀ = Q_A·R_A (reduced QR), so ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ; the SVD of the small
  r×r core, U_c·S·V_cᵀ, gives U = Q_B·U_c, V = Q_A·V_c. Cost O((out + in)·r²) instead of
  O(out·in·min(out, in)).

Precision
---------
Factored SVDs always run in float64: the work is tiny and the small core of a near-zero update needs the
extra digits. Dense SVDs run in float64 up to ``DENSE_FLOAT64_MAX`` elements (2048×2048) and in float32
above, where float64 would double memory and time for digits the metrics do not use (σ to ~1e-6
relative). Pass ``dtype=`` to force one.

Numerical rank
--------------
σ_k counts when σ_k > eps·max(out, in)·σ₁ with eps the machine epsilon of the dtype the update was
*stored* in (numpy.linalg.matrix_rank's rule): a float32 W_ft − W0 carries float32 rounding in every
entry, and an SVD run in float64 does not remove it.

Zero updates
------------
A zero ΔW (B = 0 at initialisation) has no spectrum to speak of. Its metrics are defined, not NaN:
all norms 0, stable rank 0, effective rank 0, rank_90 = rank_99 = 0 (no direction is needed to hold
90 % of zero energy) and a normalised spectrum of zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from ..weights import ModuleUpdate

DENSE_FLOAT64_MAX = 2048 * 2048


@dataclass
class Spectrum:
    """Thin SVD M = U·diag(S)·Vᵀ of one (out, in) matrix.

    Attributes:
        U: (out, k) left singular vectors (orthonormal columns), output-side directions.
        S: (k,) singular values, descending, ≥ 0.
        V: (in, k) right singular vectors (orthonormal columns), input-side directions.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def top(self, k: int) -> "Spectrum":
        """The first k triplets."""
        return Spectrum(self.U[:, :k], self.S[:k], self.V[:, :k])

    def dense(self) -> torch.Tensor:
        """U·diag(S)·Vᵀ as a dense (out, in) matrix (for tests and small matrices)."""
        return (self.U * self.S) @ self.V.T


def factored_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float = 1.0) -> Spectrum:
    """SVD of ΔW = scaling·B·A without forming ΔW, in float64.

    Args:
        lora_A: A, (r, in).
        lora_B: B, (out, r).
        scaling: s (α/r or α/√r).

    Returns:
        :class:`Spectrum` with k = min(r, out, in) triplets; U (out, k), S (k,), V (in, k).
    """
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not form B·A "
                         "(need A (r, in) and B (out, r))")
    a = _finite(lora_A.detach().to("cpu", torch.float64), "lora_A")
    b = _finite(lora_B.detach().to("cpu", torch.float64), "lora_B")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling={scaling!r} is not finite: the spectrum cannot be computed")
    q_b, r_b = torch.linalg.qr(b, mode="reduced")       # (out, kb), (kb, r)
    q_a, r_a = torch.linalg.qr(a.T, mode="reduced")     # (in, ka), (ka, r)
    core = _finite(float(scaling) * (r_b @ r_a.T), "scaling·B·A")   # (kb, ka): ΔW = Q_B·core·Q_Aᵀ
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    return Spectrum(q_b @ u_c, s, q_a @ vh_c.T)


def dense_svd(matrix: torch.Tensor, dtype: torch.dtype | None = None) -> Spectrum:
    """Thin SVD of a dense (out, in) matrix.

    ``dtype`` None picks float64 up to ``DENSE_FLOAT64_MAX`` elements and float32 above (see the module
    docstring). The result is on the CPU.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) matrix, got shape {tuple(matrix.shape)}")
    if dtype is None:
        dtype = torch.float64 if matrix.numel() <= DENSE_FLOAT64_MAX else torch.float32
    u, s, vh = torch.linalg.svd(_finite(matrix.detach().to("cpu", dtype), "the matrix"), full_matrices=False)
    return Spectrum(u, s, vh.T)


def _finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` when every value is finite; else ``ValueError`` (an SVD of NaN/inf fails with LinAlgError)."""
    if t.is_complex() or not t.dtype.is_floating_point:
        raise ValueError(f"{what} has dtype {str(t.dtype).removeprefix('torch.')}: a spectrum needs real "
                         "floating-point values")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{what} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or inf, or too large to "
                         "compute with): its spectrum cannot be computed")
    return t


def update_spectrum(update: ModuleUpdate) -> Spectrum:
    """Spectrum of ΔW for one module: factored for LoRA, dense ΔW = W_ft − W0 for full fine-tuning.

    The full fine-tuning difference is taken in float64 when the matrix is small enough (see
    ``dense_svd``), so the subtraction itself does not lose the digits of a small update.
    """
    try:
        if update.kind == "lora":
            return factored_svd(update.lora_A, update.lora_B, update.scaling)
        dtype = torch.float64 if update.w_ft.numel() <= DENSE_FLOAT64_MAX else torch.float32
        w_ft = _finite(update.w_ft.detach().to("cpu", dtype), "W_ft")
        return dense_svd(w_ft - _finite(update.w0.detach().to("cpu", dtype), "W0"), dtype)
    except ValueError as exc:      # say which module: a page or a report lists many
        raise ValueError(f"module '{update.name}': {exc}") from None


def base_spectrum(update: ModuleUpdate) -> Spectrum:
    """Spectrum of the base weight W0 (raises ``ValueError`` when the update has no W0)."""
    if update.w0 is None:
        raise ValueError(f"module '{update.name}' has no base weight W0: load the base model (e.g. --base) "
                         "for analyses that compare with W0")
    try:
        return dense_svd(_finite(update.w0, "W0"))
    except ValueError as exc:
        raise ValueError(f"module '{update.name}': {exc}") from None


# ---- metrics --------------------------------------------------------------------------------------

def _as_numpy(singular_values) -> np.ndarray:
    if isinstance(singular_values, torch.Tensor):
        singular_values = singular_values.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite and ≥ 0")
    return np.sort(s)[::-1]


def cumulative_energy(singular_values) -> np.ndarray:
    """Share of Σσ² held by the top-k directions, k = 1..len(σ); zeros for a zero matrix."""
    s = _as_numpy(singular_values)
    energy = np.cumsum(s**2)
    total = energy[-1] if len(energy) else 0.0
    return energy / total if total > 0 else np.zeros_like(energy)


def energy_rank(singular_values, share: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ share·Σσ² (0 for a zero matrix). ``share`` in (0, 1]."""
    if not 0 < share <= 1:
        raise ValueError(f"share={share!r} is not allowed: the energy share must be in (0, 1]")
    cum = cumulative_energy(singular_values)
    if not len(cum) or cum[-1] == 0:
        return 0
    # the tolerance keeps share=1.0 (or a share hit exactly) from failing on the last rounding bit
    return int(np.searchsorted(cum, share - 1e-12) + 1)


def effective_rank(singular_values) -> float:
    """Roy & Vetterli (2007): exp(−Σ p_k ln p_k), p_k = σ_k / Σσ; 0 for a zero matrix."""
    s = _as_numpy(singular_values)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def stable_rank(singular_values) -> float:
    """‖M‖_F² / ‖M‖_2² = Σσ² / σ₁²; 0 for a zero matrix."""
    s = _as_numpy(singular_values)
    if not len(s) or s[0] <= 0:
        return 0.0
    return float(np.sum(s**2) / s[0] ** 2)


def _eps(dtype) -> float:
    """Machine epsilon of a torch or numpy floating dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating dtype: numerical rank needs float data")
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def _source_dtype(singular_values):
    """The dtype of tensor/array input (float64 for plain lists)."""
    if isinstance(singular_values, torch.Tensor) and singular_values.dtype.is_floating_point:
        return singular_values.dtype
    if isinstance(singular_values, np.ndarray) and np.issubdtype(singular_values.dtype, np.floating):
        return singular_values.dtype
    return np.float64


def numerical_rank(singular_values, shape: tuple[int, int] | None = None, dtype=None) -> int:
    """Number of σ_k > eps·max(m, n)·σ₁ (numpy.linalg.matrix_rank's tolerance).

    ``shape`` (m, n) of the matrix (default: square, len(σ) wide); ``dtype`` the torch or numpy dtype the
    matrix was stored in, whose eps sets the cutoff (default: the dtype of ``singular_values`` when it is a
    tensor or array, else float64). 0 for a zero matrix.
    """
    dtype = _source_dtype(singular_values) if dtype is None else dtype
    s = _as_numpy(singular_values)
    if not len(s) or s[0] <= 0:
        return 0
    size = max(shape) if shape is not None else len(s)
    return int(np.sum(s > _eps(dtype) * size * s[0]))


def update_dtype(update: ModuleUpdate) -> torch.dtype:
    """The least precise floating dtype among the tensors that make ΔW (A and B, or W0 and W_ft): its
    rounding is in ΔW whatever precision the SVD runs in."""
    parts = [update.lora_A, update.lora_B] if update.kind == "lora" else [update.w0, update.w_ft]
    dtypes = [t.dtype for t in parts if t is not None and t.dtype.is_floating_point] or [torch.float32]
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def spectrum_metrics(singular_values, shape: tuple[int, int] | None = None, dtype=None) -> dict:
    """All per-module numbers of one spectrum.

    Returns a dict: ``fro_norm`` (√Σσ²), ``spectral_norm`` (σ₁), ``stable_rank``, ``effective_rank``,
    ``rank_90`` / ``rank_99`` (directions needed for 90 % / 99 % of Σσ²), ``numerical_rank`` (σ above
    eps·max(m, n)·σ₁, see :func:`numerical_rank` for ``shape`` and ``dtype``), ``normalized_spectrum``
    (σ/σ₁ as a list; zeros for a zero matrix) and ``singular_values`` (list, descending).
    """
    rank = numerical_rank(singular_values, shape, dtype)
    s = _as_numpy(singular_values)
    top = float(s[0]) if len(s) else 0.0
    return {
        "fro_norm": float(np.sqrt(np.sum(s**2))),
        "spectral_norm": top,
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "rank_90": energy_rank(s, 0.90),
        "rank_99": energy_rank(s, 0.99),
        "numerical_rank": rank,
        "normalized_spectrum": (s / top).tolist() if top > 0 else np.zeros_like(s).tolist(),
        "singular_values": s.tolist(),
    }


def base_norm(update: ModuleUpdate) -> float:
    """‖W0‖_F in float64 (nan when the update has no W0)."""
    if update.w0 is None:
        return float("nan")
    return float(torch.linalg.vector_norm(update.w0.detach().to("cpu", torch.float64)))


def module_spectrum_row(update: ModuleUpdate, spectrum: Spectrum | None = None) -> dict:
    """One row of :func:`spectra_frame` for ``update`` (pass ``spectrum`` if already computed)."""
    spectrum = update_spectrum(update) if spectrum is None else spectrum
    out_f, in_f = update.shape
    metrics = spectrum_metrics(spectrum.S, (out_f, in_f), update_dtype(update))
    w0 = base_norm(update)
    relative = (metrics["fro_norm"] / w0 if w0 > 0 else float("inf")) if math.isfinite(w0) else float("nan")
    return {"name": update.name, "kind": update.kind, "out_features": out_f, "in_features": in_f,
            "shape": [out_f, in_f], "rank": update.rank, "scaling": update.scaling, **metrics,
            "w0_norm": w0, "relative_norm": relative}


SPECTRA_COLUMNS = ["name", "kind", "out_features", "in_features", "shape", "rank", "scaling", "fro_norm",
                   "spectral_norm", "stable_rank", "effective_rank", "rank_90", "rank_99", "numerical_rank",
                   "normalized_spectrum", "singular_values", "w0_norm", "relative_norm"]


def spectra_frame(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate]) -> pd.DataFrame:
    """One row per module: name, kind ("lora"/"full"), out_features, in_features, shape [out, in], rank
    (None for full fine-tuning), scaling, the :func:`spectrum_metrics` numbers, ``singular_values`` of the
    scaled ΔW (a list, descending), ``w0_norm`` = ‖W0‖_F and ``relative_norm`` = ‖ΔW‖_F / ‖W0‖_F (both nan
    when the update has no W0; the papers' settings give about 0.1). Over all modules together:
    :func:`relative_norm_total`."""
    # one update at a time: a streamed mapping reads each module's W0 only while its row is computed
    rows = [module_spectrum_row(u) for u in (updates.values() if isinstance(updates, Mapping) else updates)]
    return pd.DataFrame(rows, columns=SPECTRA_COLUMNS)


def relative_norm_total(frame: pd.DataFrame) -> float:
    """‖ΔW‖_F / ‖W0‖_F over all modules of a :func:`spectra_frame`: √Σ‖ΔW‖²_F / √Σ‖W0‖²_F (nan without W0)."""
    from .answers import relative_norm_total as total

    return total(frame)
