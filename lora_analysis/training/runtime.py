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

**The device.** :func:`prepare_for_device` applies a run's ``gradient_checkpointing`` and ``compile``
settings to the prepared model (after LoRA is in place) and returns what it applied, for the record:

    prepare_for_device(model, cfg, device)
    # {"gradient_checkpointing": {"how": "transformers", "layers": 12}, "compile": {"backend": "inductor"}}

Gradient checkpointing keeps only each block's input in the forward pass and recomputes the block in the
backward pass: activation memory drops from (layers × activations per block) to (layers × one hidden state
+ one block's activations), for about a third more compute. It uses torch's non-reentrant checkpoint
(``use_reentrant=False``), which gives gradients to the LoRA factors inside a block even though the frozen
embeddings' output does not require grad. The recomputation must see the same dropout masks as the
forward pass: torch restores the global RNG for it, and :func:`lora_dropout_replay` does the same for the
run's own generator that LoRA's dropout draws from. ``compile`` is ``model.compile()``: in place, so the
parameter names, the state dict and the saved adapter are those of the uncompiled model.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


# ---- the device: gradient checkpointing and torch.compile ---------------------------------------------

COMPILE_BACKEND = "inductor"    # torch.compile's default backend (tests pass "eager": no compiler needed)


def prepare_for_device(model: nn.Module, cfg, device: torch.device, *,
                       compile_backend: str | None = None) -> dict:
    """Apply ``cfg.gradient_checkpointing`` and ``cfg.compile`` to ``model`` (in place, after
    ``prepare_model``) and return what was applied, for the run's record: ``{}`` when both are off, else
    ``{"gradient_checkpointing": {...}, "compile": {...}}`` (see :func:`enable_gradient_checkpointing`,
    :func:`compile_model`). ``device`` is where the model lives (recorded with the compile settings).
    A model without checkpointing support raises ``ValueError`` naming it."""
    applied: dict = {}
    if cfg.gradient_checkpointing:
        applied["gradient_checkpointing"] = enable_gradient_checkpointing(model, name=cfg.model)
    if cfg.compile:
        applied["compile"] = compile_model(model, backend=compile_backend or COMPILE_BACKEND, device=device)
    return applied


def lora_dropout_generators(model: nn.Module) -> list[torch.Generator]:
    """The distinct generators LoRA's dropout layers draw their masks from (layers with p > 0 only)."""
    from ..lora.layer import LoRADropout     # the LoRA core sits above this module; imported when needed
    found: dict[int, torch.Generator] = {}
    for m in model.modules():
        if isinstance(m, LoRADropout) and m.p > 0 and m.generator is not None:
            found.setdefault(id(m.generator), m.generator)
    return list(found.values())


def lora_dropout_replay(generators: list[torch.Generator]):
    """A ``context_fn`` for :func:`torch.utils.checkpoint.checkpoint`: the recomputation of a block starts
    from the generators' states at the start of its forward pass (the same dropout masks, as torch does for
    the global RNG), and leaves them as it found them. Returns (forward context, recompute context)."""
    states = [g.get_state() for g in generators]     # called as the checkpointed forward begins

    @contextmanager
    def replay():
        now = [g.get_state() for g in generators]
        for g, s in zip(generators, states):
            g.set_state(s)
        try:
            yield
        finally:
            for g, s in zip(generators, now):
                g.set_state(s)

    return nullcontext(), replay()


def checkpoint_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint``: non-reentrant, and LoRA's dropout masks
    replayed when its layers draw them from a generator of their own."""
    generators = lora_dropout_generators(model)
    kwargs: dict = {"use_reentrant": False}
    if generators:
        kwargs["context_fn"] = LoRADropoutReplay(generators)
    return kwargs


class LoRADropoutReplay:
    """``context_fn`` of :func:`checkpoint_kwargs`: :func:`lora_dropout_replay` of the given generators
    (a class, not a lambda, so that a checkpointed model still pickles)."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __call__(self):
        return lora_dropout_replay(self.generators)


class CheckpointedForward:
    """A block's own ``forward`` run under :func:`torch.utils.checkpoint.checkpoint` in training (with
    gradients on), plainly otherwise. Set as the block's instance attribute ``forward``: the module tree,
    the parameter names and the state dict stay as they were."""

    def __init__(self, block: nn.Module, kwargs: dict) -> None:
        self.block, self.kwargs = block, kwargs

    def __call__(self, *args, **kwargs):
        block, forward = self.block, type(self.block).forward
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, block, *args, **kwargs, **self.kwargs)
        return forward(block, *args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, name: str | None = None) -> dict:
    """Turn on gradient checkpointing (non-reentrant) in place and return ``{"how", "layers"}``:

    * a Hugging Face model that supports it (``supports_gradient_checkpointing``): its own
      ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers 5), with
      ``use_reentrant=False``; its ``config.use_cache`` is turned off (a cache is not kept under it anyway);
    * tiny-gpt: each of its ``blocks`` (:class:`CheckpointedForward`).

    Any other model raises ``ValueError`` naming it (``name``: the run's model setting)."""
    from .gpt import TinyGPT
    label = f"{name!r} ({type(model).__name__})" if name else type(model).__name__
    kwargs = checkpoint_kwargs(model)
    if isinstance(model, TinyGPT):
        for block in model.blocks:
            block.forward = CheckpointedForward(block, kwargs)
        return {"how": "torch.utils.checkpoint per block", "layers": len(model.blocks)}
    if not getattr(model, "supports_gradient_checkpointing", False):   # a transformers PreTrainedModel's flag
        raise ValueError(f"gradient_checkpointing is not supported for the model {label}: it works on Hugging "
                         "Face models that support it (supports_gradient_checkpointing) and on tiny-gpt; "
                         "leave gradient_checkpointing off")
    if hasattr(model, "activation_checkpointing_enable"):       # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False
    # the checkpointed blocks (the model classes carry the flag too, for their own forward)
    layers = sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
                 and not hasattr(m, "supports_gradient_checkpointing"))
    return {"how": "transformers", "layers": layers}


def compile_model(model: nn.Module, backend: str = COMPILE_BACKEND, device: torch.device | None = None) -> dict:
    """``model.compile(backend=backend)``: in place (``torch.compile`` of its call), so parameter names, the
    state dict and a saved adapter are unchanged. Compilation itself happens at the first forward pass.
    Returns ``{"backend", "device"}``."""
    model.compile(backend=backend)
    return {"backend": backend, "device": str(device) if device is not None else None}
