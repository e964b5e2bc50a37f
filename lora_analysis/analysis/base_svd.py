"""The expensive part of the base-dependent analyses, computed once: W0's SVD, cached on disk; and the top-k
singular vectors of W0 + ΔW by subspace iteration instead of a full SVD.

Base SVD cache
--------------
Intruder dimensions compare W0 + ΔW's top left singular vectors with *all* of W0's; amplification needs
W0's singular values. Both come from :func:`base_svd`, which keeps ``U`` (out, m) and ``S`` (m,),
m = min(out, in), under ``<home>/cache/base_svd/<key>.safetensors``. The key is the SHA-256 of W0's bytes as
stored (dtype and shape included) and of the precision the SVD ran in: the same W0 read from another path,
a copy of the checkpoint, or a second adapter on the same base costs one hash (about 1 GB/s) instead of an
SVD; a changed checkpoint can never hit a stale entry. Matrices under ``CACHE_MIN_NUMEL`` elements are not
cached (their SVD costs less than the file). Written with :func:`lora_analysis.store.files.atomic_save_tensors`.

Truncated SVD of W0 + ΔW
------------------------
Only the top-k left singular vectors of W = W0 + s·B·A are tested, so :func:`top_left_singular` runs block
subspace iteration on W·Wᵀ (block k + ``OVERSAMPLE``, a Rayleigh–Ritz step each round) using only products
with W0 and the LoRA factors; W is never decomposed whole. It starts from W0's top left singular vectors and
B's columns (where W's top directions mostly lie), so a small ΔW converges in a few rounds. It stops when
every one of the top k Ritz pairs has a relative residual ‖W·Wᵀu − σ²u‖ / σ₁² ≤ ``tol`` (1e-8; the
iteration runs in float64, since float32 rounding alone leaves residuals near 1e-5 at n = 5000). A pair not converged after ``max_iter`` rounds, or whose residual does not shrink fast
enough to get there (a cluster of singular values around σ_k), falls back to the exact dense SVD, as do
small matrices (min(out, in) < ``TRUNCATE_MIN``), where the dense SVD is the faster. Measured against the
exact SVD (tests/test_base_svd.py; benchmarks/bench_base.py) the largest |cosine| of each of the top-k
vectors with W0's agrees to 1e-6 or better and the intruder counts are equal.

Both run on the GPU when one is present (``device="auto"``); results come back on the CPU.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import pick_device
from ..weights import ModuleUpdate
from .spectra import DENSE_FLOAT64_MAX

CACHE_VERSION = 1
CACHE_MIN_NUMEL = 256 * 256
OVERSAMPLE = 20
TOL = {torch.float32: 1e-6, torch.float64: 1e-8}      # the iteration itself runs in float64
TRUNCATE_MIN = 512        # below this min(out, in) the dense SVD is faster than iterating
ITER_PER_SIZE = 40        # rounds allowed: max(20, min(out, in) // 40), about the cost of one dense SVD


@dataclass
class BaseSVD:
    """W0 = U·diag(S)·Vᵀ without V: ``U`` (out, m) left singular vectors, ``S`` (m,) descending, on the CPU.
    ``cached``: whether it was read from the cache rather than computed."""

    U: torch.Tensor
    S: torch.Tensor
    cached: bool = False


def cache_dir() -> Path:
    from ..paths import home_dir

    return home_dir() / "cache" / "base_svd"


def _svd_dtype(w0: torch.Tensor) -> torch.dtype:
    return torch.float64 if w0.numel() <= DENSE_FLOAT64_MAX else torch.float32


def weight_key(w0: torch.Tensor, svd_dtype: torch.dtype) -> str:
    """SHA-256 of W0's bytes as stored, its dtype and shape, the SVD's precision and the cache version."""
    t = w0.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"v{CACHE_VERSION}|{t.dtype}|{tuple(t.shape)}|{svd_dtype}|".encode())
    h.update(memoryview(t.view(torch.uint8).numpy() if t.numel() else b""))
    return h.hexdigest()


def _read_cache(path: Path) -> BaseSVD | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        got = load_file(str(path))
        return BaseSVD(got["U"], got["S"], cached=True)
    except (SafetensorError, OSError, KeyError):     # a damaged or foreign entry: recompute and overwrite
        return None


def base_svd(w0: torch.Tensor, *, device: str | torch.device | None = "auto", cache: bool | None = None,
             directory: str | Path | None = None) -> BaseSVD:
    """W0's thin SVD (U and S), from the disk cache when this exact W0 was decomposed before.

    Args:
        w0: (out, in), any float dtype (bf16/fp16 checkpoints included).
        device: where to run the SVD ("auto": CUDA/MPS when present).
        cache: None caches matrices of at least ``CACHE_MIN_NUMEL`` elements; True/False always/never.
        directory: the cache folder (default ``<home>/cache/base_svd``).
    """
    if w0.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) W0, got shape {tuple(w0.shape)}")
    dtype = _svd_dtype(w0)
    use_cache = (w0.numel() >= CACHE_MIN_NUMEL) if cache is None else bool(cache)
    path = None
    if use_cache:
        path = Path(directory) if directory is not None else cache_dir()
        path = path / f"{weight_key(w0, dtype)}.safetensors"
        if path.is_file():
            hit = _read_cache(path)
            if hit is not None:
                return hit
    dev = pick_device(device)
    if dev.type == "mps":           # MPS has no float64 and no full SVD kernel of its own: the CPU does it
        dev = torch.device("cpu")
    w = w0.detach().to(dev, dtype)
    if w.shape[0] < w.shape[1]:     # wide (e.g. down_proj 4096×11008): the SVD of Wᵀ is about 2× faster on CPU,
        _, s, vh = torch.linalg.svd(w.T, full_matrices=False)      # and W's U is Wᵀ's V
        u = vh.T
    else:
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
    result = BaseSVD(u.contiguous().cpu(), s.cpu())
    if path is not None:
        from ..store.files import atomic_save_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, {"U": result.U, "S": result.S})
    return result


# ---- top-k of W0 + ΔW ------------------------------------------------------------------------------------

@dataclass
class TopK:
    """Top-k left singular vectors ``U`` (out, k) and values ``S`` (k,) of W0 + ΔW.
    ``method``: "truncated" (subspace iteration converged) or "exact" (dense SVD); ``iterations`` run."""

    U: torch.Tensor
    S: torch.Tensor
    method: str
    iterations: int = 0


def _operator(update: ModuleUpdate, dev: torch.device, dtype: torch.dtype):
    """(W·X, Wᵀ·Y) for W = W0 + ΔW without forming ΔW (LoRA) or with W = W_ft (full fine-tuning)."""
    if update.kind == "full":
        w = update.w_ft.detach().to(dev, dtype)
        return (lambda x: w @ x), (lambda y: w.T @ y)
    w0 = update.w0.detach().to(dev, dtype)
    a = update.lora_A.detach().to(dev, dtype)
    b = (float(update.scaling) * update.lora_B.detach().to(dev, torch.float64)).to(dtype)
    return (lambda x: w0 @ x + b @ (a @ x)), (lambda y: w0.T @ y + a.T @ (b.T @ y))


def _tensor_hash(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.view(torch.uint8).numpy() if t.numel() else b""))


def top_k_key(update: ModuleUpdate, k: int, tol: float, max_iter: int, seed: int) -> str:
    """SHA-256 of everything :func:`top_left_singular`'s answer depends on: W0's bytes and the LoRA factors
    with their scaling (or W_ft), k and the iteration's settings."""
    h = hashlib.sha256(f"topk-v{CACHE_VERSION}|{update.kind}|{k}|{tol!r}|{max_iter}|{seed}|{OVERSAMPLE}|".encode())
    if update.kind == "full":
        _tensor_hash(h, update.w0)
        _tensor_hash(h, update.w_ft)
    else:
        for t in (update.w0, update.lora_A, update.lora_B):
            _tensor_hash(h, t)
        h.update(repr(float(update.scaling)).encode())
    return h.hexdigest()


def _read_top_k(path: Path) -> TopK | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return TopK(f.get_tensor("U"), f.get_tensor("S"), meta["method"], int(meta["iterations"]))
    except (SafetensorError, OSError, KeyError, ValueError):   # damaged or foreign: recompute and overwrite
        return None


def top_left_singular(update: ModuleUpdate, k: int, *, device: str | torch.device | None = "auto",
                      tol: float | None = None, max_iter: int | None = None, seed: int = 0,
                      base_u: torch.Tensor | None = None, cache: bool | None = None,
                      directory: str | Path | None = None) -> TopK:
    """Top-k left singular vectors of W0 + ΔW by block subspace iteration (see the module docstring);
    the exact dense SVD when the matrix is small (min(out, in) < ``TRUNCATE_MIN``, or the block would cover
    half of it), or when iteration does not converge within ``max_iter`` rounds (default
    max(20, min(out, in) // ``ITER_PER_SIZE``), so that a failed attempt costs about one dense SVD).

    The answer for a large matrix is cached on disk beside the base SVDs (``cache``: None caches from
    ``CACHE_MIN_NUMEL`` elements up, as :func:`base_svd`; True/False always/never), keyed by :func:`top_k_key`: a second look at the same
    adapter on the same base reads it instead of iterating."""
    from .intruders import fine_tuned_weight      # the dense W, for the exact path

    out_f, in_f = update.shape
    m = min(out_f, in_f)
    k = min(k, m)
    block = min(k + OVERSAMPLE, m)
    # float64 always: a float32 product W·Wᵀu carries about eps·√n·σ₁² of rounding (1e-5 at n = 5000), above
    # any useful tolerance, so float32 iteration stalls; in float64 it converges in a few rounds.
    dtype = torch.float64
    if 2 * block >= m or m < TRUNCATE_MIN:
        return exact_top_left_singular(fine_tuned_weight(update), k, device=device)
    max_iter = max(20, m // ITER_PER_SIZE) if max_iter is None else max_iter
    tol = TOL[dtype] if tol is None else tol
    path = None
    if (update.w0.numel() >= CACHE_MIN_NUMEL) if cache is None else cache:
        path = (Path(directory) if directory is not None else cache_dir()) / \
            f"topk-{top_k_key(update, k, tol, max_iter, seed)}.safetensors"
        if path.is_file():
            hit = _read_top_k(path)
            if hit is not None:
                return hit
    top = _iterate(update, k, block, dtype, tol, max_iter, seed, base_u, device)
    if path is not None:
        from ..store.files import atomic_save_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, {"U": top.U, "S": top.S},
                            metadata={"method": top.method, "iterations": str(top.iterations)})
    return top


def _iterate(update: ModuleUpdate, k: int, block: int, dtype: torch.dtype, tol: float, max_iter: int, seed: int,
             base_u: torch.Tensor | None, device) -> TopK:
    """The subspace iteration itself (see :func:`top_left_singular`)."""
    from .intruders import fine_tuned_weight

    out_f, in_f = update.shape
    # ``base_u``: W0's left singular vectors. W0 + ΔW's top directions lie mostly in W0's top ones and ΔW's
    # column space (B's), so the iteration starts there rather than from a random block.
    dev = pick_device(device)
    if dev.type == "mps":           # no float64 and partial linalg there: the CPU does it
        dev = torch.device("cpu")
    mul, rmul = _operator(update, dev, dtype)
    g = torch.Generator().manual_seed(seed)
    if base_u is not None:
        extra = [] if update.kind == "full" else [update.lora_B.detach().to(dev, dtype)[:, :block // 2]]
        take = block - sum(e.shape[1] for e in extra)
        start = torch.cat([base_u[:, :take].to(dev, dtype)] + extra, dim=1)
        start = start + 1e-3 * torch.randn(start.shape, generator=g, dtype=dtype).to(dev) / out_f**0.5
        q, _ = torch.linalg.qr(start)
    else:
        q, _ = torch.linalg.qr(mul(torch.randn(in_f, block, generator=g, dtype=dtype).to(dev)))
    history: list[float] = []
    for it in range(1, max_iter + 1):
        y = rmul(q)                                   # Wᵀ Q   (in, b)
        ub, sb, _ = torch.linalg.svd(y.T, full_matrices=False)   # Qᵀ W = Ub Sb Vbᵀ: Rayleigh–Ritz
        z = mul(y)                                    # W Wᵀ Q (out, b)
        u = q @ ub
        resid = torch.linalg.vector_norm(z @ ub[:, :k] - u[:, :k] * sb[:k] ** 2, dim=0)
        scale = sb[0] ** 2 if float(sb[0]) > 0 else torch.ones((), dtype=dtype, device=dev)
        worst = float((resid / scale).max())
        if worst <= tol:
            return TopK(u[:, :k].cpu(), sb[:k].cpu(), "truncated", it)
        history.append(worst)
        if it >= 4:             # the residual shrinks geometrically: give up early when it cannot make it in time
            rate = (history[-1] / history[-4]) ** (1 / 3)
            if rate >= 1 or it + math.log(tol / worst) / math.log(rate) > max_iter:
                break
        q, _ = torch.linalg.qr(z)
    return exact_top_left_singular(fine_tuned_weight(update), k, device=device, iterations=it)


def exact_top_left_singular(w: torch.Tensor, k: int, *, device: str | torch.device | None = "auto",
                            iterations: int = 0) -> TopK:
    """The top-k of a full dense SVD of ``w`` (float64 up to ``DENSE_FLOAT64_MAX`` elements, float32 above)."""
    dev = pick_device(device)
    dtype = torch.float64 if w.numel() <= DENSE_FLOAT64_MAX else torch.float32
    if dev.type == "mps":
        dev = torch.device("cpu")
    u, s, _ = torch.linalg.svd(w.detach().to(dev, dtype), full_matrices=False)
    return TopK(u[:, :k].cpu(), s[:k].cpu(), "exact", iterations)
