"""How a run uses the machine: one rule for torch's thread count, deterministic algorithms, and the record
of what a run's numbers depend on.

**Threads.** A tiny model's matrices are too small for a thread pool to pay for its synchronisation: on
torch's default thread count the toy built-ins spend most of their time waiting on each other's threads,
and on a busy machine a seconds-long demo takes minutes (tiny-gpt on 2 busy cores: 2.2 s on one thread,
152 s on the default). Results also depend on the thread count (a reduction split over more threads
adds in another order). So small models train on ONE thread:

    threads_for("mlp-digits")                      # 1
    threads_for("some/hub-model", n_params=3e6)     # 1: below SMALL_MODEL_PARAMS
    threads_for("minilm")                          # None: torch's default (22M parameters)
    threads_for("minilm", requested=4)             # 4: a run's ``threads`` setting wins

:func:`use_threads` applies the rule for the whole process (a job worker, a CLI command),
:func:`threads_scope` for a block (restoring torch's count after). :func:`~.trainer.train` and
:func:`~.trainer.task_for` apply it themselves; nothing else in the project calls ``torch.set_num_threads``.

**Determinism.** :func:`deterministic_scope` turns on ``torch.use_deterministic_algorithms(True,
warn_only=True)`` for a run: an operation without a deterministic implementation warns instead of failing
(none of the built-ins' operations do on CPU). On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before
its first use; it is set here when unset (a process that used CUDA before cannot be made deterministic
afterwards: the run's record says whether it was set in time). Across machines, a run on one thread with
the same torch build, BLAS and CPU instruction set gives the same bits; another BLAS (MKL vs OpenBLAS) or
CPU capability (AVX2 vs AVX-512) changes the last bits, which is why the record keeps them.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

SINGLE_THREAD_MODELS = ("mlp-digits", "tiny-gpt")
# Below this many parameters a model trains on one thread (the toy built-ins have 44k and ~0.2M; MiniLM
# has 22M and keeps torch's default, where more threads do pay off on its 384-wide matrices).
SMALL_MODEL_PARAMS = 5_000_000
CUBLAS_WORKSPACE = ":4096:8"


def threads_for(model: str | None, n_params: int | None = None, requested: int | None = None) -> int | None:
    """The thread count a run of ``model`` should use: ``requested`` when > 0; else 1 for the toy built-ins
    and for any model with fewer than :data:`SMALL_MODEL_PARAMS` parameters (when ``n_params`` is known);
    else None (torch's default, as the process started with)."""
    if requested is not None and not isinstance(requested, bool) and requested > 0:
        return int(requested)
    if model in SINGLE_THREAD_MODELS:
        return 1
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    return None


_DEFAULT_THREADS = torch.get_num_threads()     # torch's count when this process started
_lock = threading.Lock()
_scopes: list[int | None] = []                  # thread counts asked for by the scopes now open
_outside = [_DEFAULT_THREADS]                   # the count in effect before the first open scope


def use_threads(model: str | None, n_params: int | None = None, requested: int | None = None) -> int:
    """Apply :func:`threads_for` to this whole process and return the thread count now in effect (a model
    the rule leaves alone gets torch's default back)."""
    n = threads_for(model, n_params, requested) or _DEFAULT_THREADS
    with _lock:
        if _scopes:
            _outside[0] = n         # taken up when the open scopes close
        else:
            torch.set_num_threads(n)
    return torch.get_num_threads()


@contextmanager
def threads_scope(model: str | None, n_params: int | None = None, requested: int | None = None):
    """Apply :func:`threads_for` for the block and restore torch's thread count after it; yields the count
    in effect. Scopes open in several threads of one process share torch's one thread pool: the latest
    one sets it, and the count from before the first is restored when the last closes."""
    n = threads_for(model, n_params, requested)
    with _lock:
        if not _scopes:
            _outside[0] = torch.get_num_threads()
        _scopes.append(n)
        if n is not None:
            torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        with _lock:
            _scopes.remove(n)
            if not _scopes:
                torch.set_num_threads(_outside[0])


_det_lock = threading.Lock()
_det_depth = [0]
_det_before: list[tuple[bool, bool]] = []


@contextmanager
def deterministic_scope():
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the block (nested and threaded
    scopes share it; the setting from before the first is restored after the last). Yields a dict for the
    run's record: ``deterministic`` and, on CUDA builds, whether ``CUBLAS_WORKSPACE_CONFIG`` was in time."""
    with _det_lock:
        if _det_depth[0] == 0:
            _det_before[:] = [(torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled())]
            if torch.cuda.is_available() and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                # read by cuBLAS when its first handle is made: in time unless CUDA was used before
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
            torch.use_deterministic_algorithms(True, warn_only=True)
        _det_depth[0] += 1
    try:
        yield {"deterministic": True, "warn_only": True}
    finally:
        with _det_lock:
            _det_depth[0] -= 1
            if _det_depth[0] == 0:
                enabled, warn_only = _det_before[0]
                torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
