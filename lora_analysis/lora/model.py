"""Rewriting a model: put LoRA layers in, merge them, take them out.

``apply_lora`` replaces each targeted Linear/Conv1D with a :class:`LoRALinear` in place, freezes every
base parameter and returns the model. Validation happens before anything is replaced, so a bad call
leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from .config import (ALL_LINEAR, LoRAConfig, Targets, effective_rank_alpha, matches_module_to_save,
                     matches_target)
from .layer import LoRALinear, is_adaptable, linear_shape, validate_hyperparameters


@dataclass(frozen=True)
class ReplacedModule:
    """One row of the report ``apply_lora`` leaves on ``model.lora_report``."""

    name: str
    kind: str            # "Linear" or "Conv1D"
    out_features: int
    in_features: int
    rank: int
    alpha: float
    scaling: float
    full_params: int     # out·in (the weight ΔW would update under full fine-tuning)
    lora_params: int     # r·(in + out)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out, as PEFT does (the LM head)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name == "lm_head" or name.endswith(".lm_head"):
            heads.add(name)
    return heads


def _mha_out_proj_names(model: nn.Module) -> set[str]:
    """The ``out_proj`` Linears of ``nn.MultiheadAttention`` modules: MHA's forward reads ``out_proj.weight``
    directly and never calls ``out_proj``, so a LoRA there changes outputs only once merged."""
    return {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the modules ``config.targets`` selects; raises ``ValueError`` when one is not adaptable
    or nothing matches (the message lists the Linear/Conv1D modules that do exist). ``"all-linear"``
    leaves out the output head and MultiheadAttention's ``out_proj``; naming such an ``out_proj``
    explicitly (as a PEFT "all-linear" adapter does) is allowed, with a warning."""
    adaptable = [n for n, m in model.named_modules() if n and is_adaptable(m)
                 and not matches_module_to_save(config.modules_to_save, n)]
    targets: Targets = config.targets
    mha_out = _mha_out_proj_names(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        skipped = _output_head_names(model) | mha_out
        chosen = [n for n in adaptable if n not in skipped]
    else:
        if not isinstance(targets, str) and (not targets or not all(isinstance(t, str) for t in targets)):
            raise ValueError(f"targets={targets!r} is not allowed: give module-name suffixes, a regex "
                             f"string, or '{ALL_LINEAR}'")
        chosen = []
        for name, module in model.named_modules():
            if not name or matches_module_to_save(config.modules_to_save, name):
                continue
            if not matches_target(targets, name):
                continue
            if not is_adaptable(module):
                raise ValueError(f"target module '{name}' is a {type(module).__name__}, not a Linear or "
                                 "Conv1D: LoRA can only wrap Linear/Conv1D layers")
            chosen.append(name)
        for name in sorted(mha_out & set(chosen)):
            warnings.warn(f"target '{name}' is the out_proj of an nn.MultiheadAttention, whose forward reads "
                          "out_proj.weight directly: its LoRA update takes effect only when merged (as in PEFT)",
                          stacklevel=3)
    if not chosen:
        listing = ", ".join(adaptable[:40]) + (" ..." if len(adaptable) > 40 else "")
        raise ValueError(f"targets={targets!r} matched no Linear/Conv1D module. Modules that exist: "
                         f"{listing or '(none)'}")
    return chosen


def apply_lora(model: nn.Module, targets: Targets = ALL_LINEAR, rank: int = 8, alpha: float | None = None,
               dropout: float = 0.0, rslora: bool = False, init: str = "kaiming",
               rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
               modules_to_save: list[str] | None = None, config: LoRAConfig | None = None,
               cap_rank: bool = False, generator: torch.Generator | None = None) -> nn.Module:
    """Wrap the targeted layers of ``model`` with LoRA, in place, and return ``model``.

    Either pass the settings as keyword arguments or a whole :class:`LoRAConfig` as ``config``.
    ``alpha`` defaults to ``rank`` (scaling 1). Each module's rank and alpha come from
    :func:`~.config.effective_rank_alpha` (patterns, then ``cap_rank``). ``generator`` draws A's init and
    the dropout masks (a run's own RNG; default: the global one). Every base parameter is frozen; LoRA
    factors and ``modules_to_save`` are trainable. ``model.lora_report`` lists what was replaced
    (:class:`ReplacedModule` rows; ``lora_report_frame(model)`` gives a DataFrame) and
    ``model.lora_config`` holds the settings.
    """
    if config is None:
        config = LoRAConfig(targets=targets, rank=rank, alpha=float(rank if alpha is None else alpha),
                            dropout=dropout, rslora=rslora, init=init, rank_pattern=dict(rank_pattern or {}),
                            alpha_pattern=dict(alpha_pattern or {}), modules_to_save=list(modules_to_save or []),
                            cap_rank=cap_rank)
    _check_model(model, config)
    modules = dict(model.named_modules())
    plan = {}
    for name in find_targets(model, config):
        out_f, in_f = linear_shape(modules[name])
        plan[name] = effective_rank_alpha(config, name, out_f, in_f)
    return install_lora(model, config, plan, generator)


def _check_model(model: nn.Module, config: LoRAConfig) -> None:
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: call merge_and_unload() or use a fresh model first")
    if config.bias != "none":
        raise ValueError(f"bias={config.bias!r} is not supported: only 'none'")


def install_lora(model: nn.Module, config: LoRAConfig, plan: dict[str, tuple[int, float]],
                 generator: torch.Generator | None = None) -> nn.Module:
    """Wrap each module of ``plan`` (``{name: (rank, alpha)}``) in a :class:`LoRALinear` with ``config``'s
    dropout, rslora and init; freeze the base and train LoRA and ``modules_to_save``. Everything is
    validated before anything is replaced. :func:`apply_lora` plans new adapters; loading plans from the
    saved tensors (any rank >= 1)."""
    _check_model(model, config)
    modules = dict(model.named_modules())
    for name, (r, a) in plan.items():  # validate everything before replacing anything
        out_f, in_f = linear_shape(modules[name])
        validate_hyperparameters(name, r, a, config.dropout, out_f, in_f, config.init)
    missing = [m for m in config.modules_to_save
               if not any(matches_module_to_save([m], n) for n in modules if n)]
    if missing:
        raise ValueError(f"modules_to_save={missing!r} matched no module of the model")

    for p in model.parameters():
        p.requires_grad_(False)
    report = []
    for name, (r, a) in plan.items():
        layer = LoRALinear(modules[name], r, a, config.dropout, config.rslora, config.init, name=name,
                           generator=generator)
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, layer)
        if isinstance(parent, nn.TransformerEncoderLayer):
            # torch's fused encoder path (eval mode) reads linear1/linear2.weight itself and never calls them, so
            # this update would vanish at inference; any forward hook inside the block turns that path off
            layer.register_forward_pre_hook(_no_op_hook)
        report.append(ReplacedModule(name, "Conv1D" if layer.fan_in_fan_out else "Linear", layer.out_features,
                                     layer.in_features, layer.rank, layer.alpha, layer.scaling,
                                     layer.out_features * layer.in_features,
                                     layer.rank * (layer.in_features + layer.out_features)))
    for name, module in model.named_modules():
        if name and any(matches_module_to_save([m], name) for m in config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    model.lora_config = replace(config, targets=config.targets if isinstance(config.targets, str)
                                else list(config.targets))
    model.lora_report = report
    return model


def _no_op_hook(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing (module-level so that the model still pickles)."""


def lora_report_frame(model: nn.Module) -> pd.DataFrame:
    """``model.lora_report`` as a DataFrame (one row per replaced module)."""
    rows = getattr(model, "lora_report", None)
    if rows is None:
        raise ValueError("model has no LoRA report: call apply_lora() first")
    return pd.DataFrame([r.__dict__ for r in rows])


def merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (W ← W + ΔW); outputs are unchanged, the LoRA path is skipped."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every merged LoRA layer (W ← W − ΔW)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and replace it by its base layer: a plain model with no LoRA modules whose
    outputs equal the adapted model's (PEFT's ``merge_and_unload``). Works in place; returns ``model``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
    for attr in ("lora_config", "lora_report"):
        model.__dict__.pop(attr, None)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything but the LoRA factors and ``modules_to_save`` (what apply_lora already does)."""
    config = getattr(model, "lora_config", None)
    keep = config.modules_to_save if config else []
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in f".{name}" or ".lora_B." in f".{name}" or matches_module_to_save(keep, name))
    return model
