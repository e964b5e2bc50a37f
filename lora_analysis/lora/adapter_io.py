"""PEFT-format adapters on disk, both ways.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` keys) and ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r),
plus ``base_model.model.<path>.<param>`` for ``modules_to_save``. That is exactly what PEFT's
``save_pretrained`` writes, so ``PeftModel.from_pretrained`` loads our adapters and we load PEFT's.
Pickled ``.bin`` adapters are refused: we never unpickle files users give us. :func:`read_adapter` also reads a
single ``.safetensors`` file in the kohya / diffusers / loralib formats (:mod:`.formats`) into the same
:class:`Adapter`; every adapter's factors are analysed in float32 (bf16/fp16 upcast, the stored dtype recorded).
Every adapter read goes through one validation, :func:`validate_config` (types and ranges of every value;
pattern keys and a regex ``target_modules`` bounded so no key can match for minutes) and
:func:`check_lora_tensors` (real floating point, A (r, in) and B (out, r) with r >= 1, every value finite): each
problem is one ``ValueError``.

Loading takes each module's rank from its tensors: any r >= 1 is legal (PEFT adapters with r > min(in, out),
our PiSSA adapters saved at rank 2r); the cap at min(in, out) is a creation-time policy. Saving writes each
module whose rank or alpha differs from ``r``/``lora_alpha`` under a key matching exactly that module in PEFT
(``^`` + the escaped name). PEFT >= 0.15 reads such keys; 0.14 and older ignore them: a rank key then fails
to load there and an alpha key is silently dropped (other outputs), so these files need PEFT >= 0.15.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..store.files import atomic_save_tensors, atomic_write_text
from .config import (ALL_LINEAR, LoRAConfig, alpha_for_scaling, check_module_name, check_pattern_keys, exact_patterns,
                     matches_module_to_save, safe_regex)
from .layer import compute_scaling, linear_shape
from .model import find_targets, install_lora, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 * 2**20      # an adapter_config.json is a few KiB
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _compact_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """Shortest target list that selects exactly ``chosen``: leaf names when they are unambiguous."""
    leaves = sorted({n.rpartition(".")[2] for n in chosen})
    selected = {n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in leaves)}
    return leaves if selected == set(chosen) else sorted(chosen)


def peft_config_dict(model: nn.Module, base_model_name_or_path: str | None = None,
                     task_type: str | None = None) -> dict:
    """The ``adapter_config.json`` content PEFT would write for ``model``'s adapter."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if config is None or not layers:
        raise ValueError("model has no LoRA adapter to save: call apply_lora() first")
    # "all-linear" is written as the modules it selected: PEFT's own expansion differs (it keeps MHA's out_proj)
    targets = config.targets if isinstance(config.targets, str) and config.targets.lower() != ALL_LINEAR \
        else _compact_targets(model, list(layers))
    # Each layer's actual (rank, alpha) is written, so caps and patterns become explicit per-module entries
    # whose keys match exactly one module in PEFT (never a longer name ending the same way).
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    rank, alpha = config.rank, config.alpha
    if config.init == "pissa":
        # A PiSSA adapter is saved as the equivalent plain LoRA adapter of rank 2r against the original
        # weights (PEFT's conversion): ΔW = s·(B·A − B0·A0) = s'·[B, −B0]·[A; A0], alpha chosen so s' = s.
        rank, alpha = 2 * rank, alpha_for_scaling(compute_scaling(rank, alpha, config.rslora), 2 * rank, config.rslora)
        ranks = {name: 2 * layer.rank for name, layer in layers.items()}
        alphas = {name: alpha_for_scaling(layer.scaling, 2 * layer.rank, config.rslora)
                  for name, layer in layers.items()}
    rank_pattern, alpha_pattern = exact_patterns(ranks, rank), exact_patterns(alphas, alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves: LoRA factors and ``modules_to_save`` parameters, under PEFT's key names."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.update_factors()
        state[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    if config and config.modules_to_save:
        for pname, p in model.named_parameters():
            if matches_module_to_save(config.modules_to_save, pname) and ".lora_" not in pname:
                state[f"{PREFIX}{pname}"] = p.detach().contiguous()
    return {k: v.cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write ``model``'s adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``).

    Each file is written atomically (:mod:`lora_analysis.store.files`): a crash never leaves half a file.
    """
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("model is merged: unmerge() it before saving the adapter")
    config = peft_config_dict(model, base_model_name_or_path, task_type)
    state = adapter_state_dict(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(directory / WEIGHTS_NAME, state)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


# ---- reading ----------------------------------------------------------------------------------------

@dataclass
class AdapterModule:
    """One adapted module as stored: A (r, in), B (out, r), ΔW = scaling·B·A of shape (out, in).

    ``kernel``: a conv layer's (kh, kw), whose factors are held as matrices: A (r, in·kh·kw), B (out, r), so
    ΔW is the kernel (out, in, kh, kw) flattened to (out, in·kh·kw); None for a linear layer."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    scaling: float
    kernel: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])


@dataclass
class Adapter:
    """An adapter read from disk without a base model: its config and its factors per module.

    ``format``: "peft" (a folder), or "kohya" / "diffusers" / "loralib" (one file, :mod:`.formats`; its
    ``raw_config`` is the PEFT config that describes the same ranks and scalings). ``dtype``: how the factors
    were stored ("float32", "bfloat16", ...; "mixed (...)"), whereas the factors held are float32 (float64
    kept). ``notes``: what was assumed in reading it (a scaling taken as 1, conv layers as matrices, an upcast).
    """

    path: Path
    config: LoRAConfig
    raw_config: dict
    modules: dict[str, AdapterModule]
    extra: dict[str, torch.Tensor]     # modules_to_save tensors, keyed by parameter path
    format: str = "peft"
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)


def read_config(directory: str | os.PathLike) -> tuple[LoRAConfig, dict]:
    """Parse ``adapter_config.json`` into a :class:`LoRAConfig` (and the raw dict), with clear errors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter directory '{directory}' does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"'{directory}' has no {CONFIG_NAME}: an adapter directory needs {CONFIG_NAME} "
                         f"and {WEIGHTS_NAME}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} holds {path.stat().st_size:,} bytes: an {CONFIG_NAME} is at most "
                         f"{MAX_CONFIG_BYTES:,} bytes")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type={raw.get('peft_type')!r} is not supported: only LORA adapters")
    if raw.get("use_dora"):
        raise ValueError(f"{path}: use_dora=true (DoRA) is not supported: only plain LoRA adapters")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={raw.get('bias')!r} is not supported: only 'none'")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise ValueError(f"{path} has no '{key}' key: is it a LoRA adapter_config.json?")
    return validate_config(raw, path), raw


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(raw: dict, path: str | os.PathLike = CONFIG_NAME) -> LoRAConfig:
    """THE check of an ``adapter_config.json``'s values (every reader of adapters goes through it): each
    value of the wrong type or out of range is one ``ValueError`` naming the key, the value and what is
    allowed. Returns the :class:`LoRAConfig` it describes."""
    def bad(key: str, allowed: str):
        value = raw.get(key)
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return ValueError(f"{path}: {key}={shown} is not allowed: {allowed}")

    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad("r", "the rank must be an integer >= 1 (a number, not text)")
    alpha = raw.get("lora_alpha")
    if not _is_number(alpha) or alpha <= 0:
        raise bad("lora_alpha", "alpha must be a finite number > 0")
    dropout = raw.get("lora_dropout") or 0.0
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise bad("lora_dropout", "the dropout must be a number in [0, 1)")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if raw.get(key) is not None and not isinstance(raw.get(key), bool):
            raise bad(key, "true or false")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() != ALL_LINEAR:
            safe_regex(targets, f"{path}: target_modules regular expression")
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise bad("target_modules", "a list of module names, a regular expression (text) or 'all-linear'")
    patterns = {}
    for key, check, allowed in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                                  and v >= 1, "an integer rank >= 1"),
                                 ("alpha_pattern", lambda v: _is_number(v) and v > 0, "a finite number > 0")):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, "a JSON object {pattern: value}")
        check_pattern_keys(value, f"{path}: {key}")
        for k, v in value.items():
            if not check(v):
                raise ValueError(f"{path}: {key}[{k!r}]={v!r} is not allowed: each value must be {allowed}")
        patterns[key] = dict(value)
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) and m for m in to_save):
        raise bad("modules_to_save", "a list of module names, or null")
    return LoRAConfig(targets=targets if isinstance(targets, str) else list(targets), rank=rank, alpha=alpha,
                      dropout=float(dropout), rslora=bool(raw.get("use_rslora", False)), init="kaiming",
                      rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
                      modules_to_save=list(to_save))


def check_lora_tensors(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """THE check of one module's factors as read from a file: real floating point, 2-D, A (r, in) and
    B (out, r) with r >= 1, every value finite; one ``ValueError`` naming the module otherwise."""
    check_module_name(name)
    for which, t in (("lora_A", a), ("lora_B", b)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"module '{name}': {which} has dtype {str(t.dtype).removeprefix('torch.')}: LoRA "
                             "weights must be real floating point (float32, float16, bfloat16 or float64)")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"module '{name}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                         "form B·A (need A (r, in) and B (out, r))")
    if a.shape[0] < 1 or a.shape[1] < 1 or b.shape[0] < 1:
        raise ValueError(f"module '{name}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are empty: "
                         "the rank and both sizes must be >= 1")
    for which, t in (("lora_A", a), ("lora_B", b)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"module '{name}': {which} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or "
                             "inf): the adapter is broken (did its training diverge?)")


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``; a pickled ``.bin`` is refused, never unpickled."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(f"'{directory}' holds adapter_model.bin, a pickle file, which is not loaded for "
                             "safety: convert it to safetensors (in PEFT: save_pretrained(..., "
                             "safe_serialization=True))")
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"'{directory}' has no {CONFIG_NAME}: an adapter directory needs {CONFIG_NAME} "
                             f"and {WEIGHTS_NAME}")
        raise ValueError(f"'{directory}' has no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def read_adapter(directory: str | os.PathLike, alpha: float | None = None) -> Adapter:
    """Read an adapter into per-module factors, no base model needed: a PEFT directory (ours or PEFT's), or
    one ``.safetensors`` file in the kohya / diffusers / loralib format (:func:`.formats.read_adapter_file`;
    ``alpha`` is for files that store none). Factors come back float32 (float64 kept); ``Adapter.dtype``
    says how they were stored. A pickle (``.bin``/``.pt``) is refused, never unpickled."""
    from .formats import PICKLE_SUFFIXES, read_adapter_file, refuse_pickle

    path = Path(directory)
    if path.is_file() and path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        path = directory = path.parent          # a PEFT folder's weights file: the folder, config included
    elif path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir():
        raise refuse_pickle(path)
    elif path.is_file() or path.suffix.lower() == ".safetensors":
        return read_adapter_file(path, alpha)
    if alpha is not None:
        raise ValueError(f"alpha={alpha!r} was given for '{path}', a PEFT adapter folder, whose "
                         f"{CONFIG_NAME} states lora_alpha: a hand-given alpha is only for files that store none")
    config, raw = read_config(directory)
    tensors = read_weights(directory)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = LORA_KEY.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["which"]] = value
        elif "lora_" in key:
            raise ValueError(f"adapter tensor '{key}' is not a LoRA A/B weight (embedding or DoRA adapters "
                             "are not supported)")
        else:
            extra[key.removeprefix(PREFIX)] = value
    if not factors:
        raise ValueError(f"'{directory}' holds no lora_A/lora_B weights")
    modules = {}
    dtypes = set()
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module '{name}' has lora_{'A' if 'A' in pair else 'B'} but no "
                             f"lora_{'B' if 'A' in pair else 'A'} weight")
        a, b = pair["A"], pair["B"]
        check_lora_tensors(name, a, b)
        dtypes.update({a.dtype, b.dtype})
        r = int(a.shape[0])
        alpha = _saved_alpha(config, name, r)
        modules[name] = AdapterModule(name, upcast(a), upcast(b), alpha, compute_scaling(r, alpha, config.rslora))
    dtype, notes = stored_dtype(dtypes)
    return Adapter(Path(directory), config, raw, modules, extra, "peft", dtype, notes)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 factors as float32 (exactly); float32/float64 as stored."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def stored_dtype(dtypes: set[torch.dtype]) -> tuple[str, list[str]]:
    """("bfloat16" / "float32" / "mixed (bfloat16, float32)", [a note when factors were upcast])."""
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    dtype = names[0] if len(names) == 1 else "mixed (" + ", ".join(names) + ")"
    half = any(d in (torch.float16, torch.bfloat16) for d in dtypes)
    return dtype, [f"factors stored in {dtype}, analysed in float32 (upcast exactly)"] if half else []


def synthetic_config(modules: dict[str, AdapterModule]) -> dict:
    """The ``adapter_config.json`` PEFT would need for ``modules`` (read from a file with no config): the
    most common rank and alpha as ``r`` / ``lora_alpha``, every other module's as an exact pattern key, so
    that the config gives each module its rank and scaling back (and :func:`.rank_advice.reduce_rank` can
    write a PEFT folder from it)."""
    from collections import Counter

    ranks = {n: m.rank for n, m in modules.items()}
    alphas = {n: m.alpha for n, m in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": rank, "lora_alpha": alpha,
            "target_modules": sorted(modules), "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
            "rank_pattern": exact_patterns(ranks, rank), "alpha_pattern": exact_patterns(alphas, alpha),
            "lora_dropout": 0.0, "modules_to_save": None, "use_dora": False}


def _saved_alpha(config: LoRAConfig, name: str, rank: int) -> float:
    """The alpha of saved module ``name`` whose tensors have rank ``rank`` (any rank >= 1 is legal).

    The patterns are read as PEFT reads them. Older versions of this library wrote plain full module names
    as keys, which PEFT's suffix rule also applies to a longer name ending the same way (a key ``fc`` also
    matches ``sub.fc``); when PEFT's reading contradicts the tensors' rank, the reading with each key naming
    exactly its module is used if it agrees with them.
    """
    if config.rank_for(name) == rank:
        return float(config.alpha_for(name))
    if config.rank_pattern.get(name, config.rank) == rank:
        return float(config.alpha_pattern.get(name, config.alpha))
    raise ValueError(f"module '{name}': the weights have rank {rank} but the config says r={config.rank_for(name)}")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the adapter in ``directory`` (ours or PEFT's) to ``model`` and load its weights.

    Every check (config, file, module names, shapes) runs before the model is touched: on any error the
    model is left unchanged.
    """
    adapter = read_adapter(directory)
    config = adapter.config
    modules = dict(model.named_modules())
    for name in adapter.modules:
        if name not in modules:
            raise ValueError(f"adapter module '{name}' does not exist in the model (is this the right base "
                             "model?)")
    targets = find_targets(model, config)
    missing = sorted(set(targets) - set(adapter.modules))
    unexpected = sorted(set(adapter.modules) - set(targets))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: target_modules select {missing[:5]} that have no "
                         f"weights, and the weights hold {unexpected[:5]} that target_modules do not select")
    for name, mod in adapter.modules.items():
        out_f, in_f = linear_shape(modules[name])
        want_a, want_b = (mod.rank, in_f), (out_f, mod.rank)
        if tuple(mod.lora_A.shape) != want_a or tuple(mod.lora_B.shape) != want_b:
            raise ValueError(f"adapter does not fit module '{name}': the adapter has lora_A "
                             f"{tuple(mod.lora_A.shape)} and lora_B {tuple(mod.lora_B.shape)}, the model's "
                             f"{out_f}x{in_f} layer needs {want_a} and {want_b}")
    params = dict(model.named_parameters())
    for key, value in adapter.extra.items():
        if key not in params:
            raise ValueError(f"adapter tensor '{key}' (modules_to_save) has no parameter in the model")
        if params[key].shape != value.shape:
            raise ValueError(f"adapter tensor '{key}' has shape {tuple(value.shape)}, the model's parameter "
                             f"has {tuple(params[key].shape)}")
    # the saved tensors fix each module's rank: the creation-time cap at min(in, out) does not apply
    install_lora(model, config, {n: (adapter.modules[n].rank, adapter.modules[n].alpha) for n in targets})
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(adapter.modules[name].lora_A)
            layer.lora_B.weight.copy_(adapter.modules[name].lora_B)
        for key, value in adapter.extra.items():
            params[key].copy_(value)
    return model
