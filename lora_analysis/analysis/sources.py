"""Where the analyses get their inputs: adapters on disk (+ optional base weights) → ``ModuleUpdate``s.

The analyses themselves take :class:`lora_analysis.weights.ModuleUpdate` (or plain tensors); this module
only turns files into those. Base weights come from a ``.safetensors`` file (keys ``<module>.weight``)
or a Hugging Face model directory / hub id (loaded with transformers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..lora.adapter_io import Adapter
from ..lora.layer import is_conv1d
from ..weights import ModuleUpdate

Shapes = Mapping[str, tuple[int, int]]


def orient_out_in(weight: torch.Tensor, shape: tuple[int, int], name: str,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """Return ``weight`` as (out, in) = ``shape``.

    A Conv1D weight is stored (in, out): a non-square one is recognised by its shape; a square one
    only by ``fan_in_fan_out`` (PEFT's flag for Conv1D models), since its shape says nothing.
    Raises ``ValueError`` naming the module and both shapes when neither orientation fits.
    """
    out_f, in_f = shape
    got = tuple(weight.shape)
    if weight.ndim == 2 and out_f == in_f and got == (out_f, in_f):
        return weight.T if fan_in_fan_out else weight
    if got == (out_f, in_f):
        return weight
    if got == (in_f, out_f):
        return weight.T
    raise ValueError(f"base weight for module '{name}' has shape {got}, which fits neither the adapter's "
                     f"(out, in) = ({out_f}, {in_f}) nor its transpose: is this the right base model?")


def _names_and_shapes(module_names: Iterable[str] | Shapes) -> tuple[list[str], Shapes | None]:
    if isinstance(module_names, Mapping):
        return list(module_names), dict(module_names)
    return list(module_names), None


def _match_key(name: str, keys: set[str]) -> str | None:
    """The tensor key for ``<name>.weight``: exact, else the module name itself (a run's
    base_weights.safetensors is keyed by module), else the unique key equal up to leading path parts
    (a PEFT name ``transformer.h.0.attn.c_attn`` against a checkpoint key ``h.0.attn.c_attn.weight``)."""
    exact = f"{name}.weight"
    if exact in keys:
        return exact
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith(".weight")
            and (exact.endswith("." + k) or k.endswith("." + exact))]
    return hits[0] if len(hits) == 1 else None


def _from_safetensors(path: Path, names: list[str], shapes: Shapes | None,
                      fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"base weights '{path}' are not a readable safetensors file ({exc})") from exc
    out = {}
    with handle:
        keys = set(handle.keys())
        for name in names:
            key = _match_key(name, keys)
            if key is None:
                raise ValueError(f"base weights '{path}' hold no tensor '{name}.weight' for adapted module "
                                 f"'{name}' (is this the right base model?)")
            weight = handle.get_tensor(key)
            # a run's base_weights.safetensors is keyed by bare module name and already (out, in);
            # a checkpoint's "<name>.weight" of a Conv1D is (in, out)
            transposed = fan_in_fan_out and key != name
            if shapes is not None:
                weight = orient_out_in(weight, shapes[name], name, transposed)
            elif transposed:
                weight = weight.T
            out[name] = weight.contiguous()
    return out


def _from_transformers(spec: str, names: list[str], shapes: Shapes | None) -> dict[str, torch.Tensor]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a requirement
        raise ValueError("loading a base model by name needs the transformers package") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(spec)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ValueError(f"could not load base model '{spec}' with transformers: {str(exc).splitlines()[0]}") \
            from exc
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"adapted module '{name}' does not exist in base model '{spec}' (is this the "
                             "right base model?)")
        weight = module.weight.detach()
        weight = weight.T if is_conv1d(module) else weight   # Conv1D stores (in, out): known exactly here
        if shapes is not None:
            weight = orient_out_in(weight, shapes[name], name, fan_in_fan_out=False)
        out[name] = weight.contiguous().clone()
    return out


def load_base_weights(spec: str | os.PathLike, module_names: Iterable[str] | Shapes,
                      fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """W0 for the adapted modules, each (out, in).

    Args:
        spec: a ``.safetensors`` file with keys ``<module>.weight``, or a Hugging Face model directory or
            hub id (loaded with ``AutoModelForCausalLM.from_pretrained``).
        module_names: names of the adapted modules, or ``{name: (out, in)}``; with shapes, weights stored
            (in, out) (Conv1D) are transposed and a weight of neither shape raises ``ValueError``.
        fan_in_fan_out: for a safetensors file, whether the model stores its weights (in, out) (GPT-2
            Conv1D); needed only for square weights, whose shape cannot tell.

    Raises ``ValueError`` for a missing file, an unloadable model, a missing module or a wrong shape.
    """
    names, shapes = _names_and_shapes(module_names)
    path = Path(spec)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise ValueError(f"base weights file '{path}' does not exist")
        if path.suffix != ".safetensors":
            raise ValueError(f"base weights '{path}' must be a .safetensors file or a model directory "
                             "(pickled .bin/.pt files are not loaded for safety)")
        return _from_safetensors(path, names, shapes, fan_in_fan_out)
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _from_safetensors(files[0], names, shapes, fan_in_fan_out)
        raise ValueError(f"base model directory '{path}' has no config.json (and not exactly one "
                         ".safetensors file): give a Hugging Face model directory or a .safetensors file")
    if not path.exists() and (path.is_absolute() or str(spec).startswith((".", "~"))):
        raise ValueError(f"base model or weights '{spec}' does not exist")   # a path, not a hub id
    return _from_transformers(str(spec), names, shapes)


def adapter_shapes(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every adapted module."""
    return {name: m.shape for name, m in adapter.modules.items()}


def updates_from_adapter(adapter: Adapter, base_weights: Mapping[str, torch.Tensor] | None = None
                         ) -> dict[str, ModuleUpdate]:
    """One LoRA :class:`ModuleUpdate` per adapted module (A (r, in), B (out, r), scaling), with W0 from
    ``base_weights`` when given.

    ``base_weights`` are expected (out, in), as :func:`load_base_weights` returns them; a non-square
    weight stored (in, out) is transposed by its shape (a square one cannot be told apart).

    Raises ``ValueError`` when ``base_weights`` lacks an adapted module or a weight's shape does not fit.
    """
    updates = {}
    for name, module in adapter.modules.items():
        w0 = None
        if base_weights is not None:
            if name not in base_weights:
                raise ValueError(f"base weights have no entry for adapted module '{name}'")
            w0 = orient_out_in(base_weights[name], module.shape, name)
        updates[name] = ModuleUpdate(name, w0=w0, lora_A=module.lora_A, lora_B=module.lora_B,
                                     scaling=module.scaling)
    return updates


def load_updates(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None
                 ) -> tuple[Adapter, dict[str, ModuleUpdate]]:
    """Read an adapter directory (and its base weights when ``base`` is given) into updates."""
    from ..lora.adapter_io import read_adapter

    adapter = read_adapter(adapter_dir)
    base_weights = None
    if base is not None:
        base_weights = load_base_weights(base, adapter_shapes(adapter),
                                         bool(adapter.raw_config.get("fan_in_fan_out", False)))
    return adapter, updates_from_adapter(adapter, base_weights)
