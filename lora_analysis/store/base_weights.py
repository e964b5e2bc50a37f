"""Base weights W0 (out, in) of named modules, read from a source the caller names.

    a ``.safetensors`` file          keys ``<module>.weight`` (a checkpoint) or ``<module>`` (a run's W0)
    a Hugging Face model folder      only the needed tensors, from model.safetensors or its sharded index;
                                     transformers loads the whole model only when the files cannot say
    a hub id (+ revision)            the folder's files fetched at that revision, then as a folder

Nothing here trains or rebuilds a model, and a hub id is only fetched when a caller names it. transformers
and huggingface_hub are imported only on the paths that need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

Shapes = Mapping[str, tuple[int, int]]
SAFETENSORS_FILE, SAFETENSORS_INDEX, CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"
# architectures whose transformers modules include Conv1D, which stores its weight (in, out)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})


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


def _match_key(name: str, keys: Iterable[str]) -> str | None:
    """The tensor key for ``<name>.weight``: exact, else the module name itself (a run's
    base_weights.safetensors is keyed by module), else the unique key equal up to leading path parts
    (a PEFT name ``transformer.h.0.attn.c_attn`` against a checkpoint key ``h.0.attn.c_attn.weight``)."""
    keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    exact = f"{name}.weight"
    if exact in keys:
        return exact
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith(".weight")
            and (exact.endswith("." + k) or k.endswith("." + exact))]
    return hits[0] if len(hits) == 1 else None


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"base weights '{path}' are not a readable safetensors file ({exc})") from exc


def _read(keys: Mapping[str, tuple[str, Path]], shapes: Shapes | None, fan_in_fan_out: bool
          ) -> dict[str, torch.Tensor]:
    """``{name: (key, file)}`` → ``{name: W0}``, each file opened once; oriented (out, in) when shapes are known.

    A run's base_weights.safetensors is keyed by bare module name and already (out, in); a checkpoint's
    ``<name>.weight`` of a Conv1D is (in, out), which ``fan_in_fan_out`` says for square weights.
    """
    by_file: dict[Path, list[str]] = {}
    for name, (_, path) in keys.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path, names in by_file.items():
        with _open(path) as handle:
            for name in names:
                key = keys[name][0]
                weight = handle.get_tensor(key)
                transposed = fan_in_fan_out and key != name
                if shapes is not None:
                    weight = orient_out_in(weight, shapes[name], name, transposed)
                elif transposed:
                    weight = weight.T
                out[name] = weight.contiguous()
    return out


def _from_safetensors(path: Path, names: list[str], shapes: Shapes | None,
                      fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    with _open(path) as handle:
        available = set(handle.keys())
    keys = {}
    for name in names:
        key = _match_key(name, available)
        if key is None:
            raise ValueError(f"base weights '{path}' hold no tensor '{name}.weight' for adapted module "
                             f"'{name}' (is this the right base model?)")
        keys[name] = (key, path)
    return _read(keys, shapes, fan_in_fan_out)


def _folder_keys(folder: Path) -> dict[str, Path] | None:
    """``{tensor key: file}`` of a model folder's safetensors weights, or None when it has none."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"'{index}' is not a safetensors index ({exc})") from exc
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        with _open(single) as handle:
            return {key: single for key in handle.keys()}
    return None


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _from_folder(folder: Path, names: list[str], shapes: Shapes | None, fan_in_fan_out: bool | None,
                 spec: str, revision: str | None) -> dict[str, torch.Tensor]:
    """The needed tensors straight from the folder's safetensors files. transformers loads the whole model
    (``spec`` at ``revision``) only when the files cannot answer: no safetensors weights, a module whose
    tensor is not stored (tied weights) or not there at all, or a Conv1D model's square weight whose
    orientation neither its shape nor ``fan_in_fan_out`` tells."""
    files = _folder_keys(folder)
    conv1d = _model_type(folder) in CONV1D_MODEL_TYPES
    ambiguous = conv1d and not fan_in_fan_out and (shapes is None or any(o == i for o, i in shapes.values()))
    if files is not None and not ambiguous:
        keys = {name: _match_key(name, files) for name in names}
        if all(keys.values()):
            return _read({n: (k, files[k]) for n, k in keys.items()}, shapes, bool(fan_in_fan_out and conv1d))
    return _from_transformers(spec, names, shapes, revision)


def _from_transformers(spec: str, names: list[str], shapes: Shapes | None,
                       revision: str | None = None) -> dict[str, torch.Tensor]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a requirement
        raise ValueError("loading a base model by name needs the transformers package") from exc
    from ..lora.layer import weight_out_in

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load base model '{spec}' with transformers: {str(exc).splitlines()[0]}") \
            from exc
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"adapted module '{name}' does not exist in base model '{spec}' (is this the "
                             "right base model?)")
        weight = weight_out_in(module).detach()          # Conv1D stores (in, out): known exactly here
        if shapes is not None:
            weight = orient_out_in(weight, shapes[name], name, fan_in_fan_out=False)
        out[name] = weight.contiguous().clone()
    return out


def _from_hub(repo_id: str, revision: str | None, names: list[str], shapes: Shapes | None,
              fan_in_fan_out: bool | None) -> dict[str, torch.Tensor]:
    """Fetch the config and safetensors weights of ``repo_id`` at ``revision`` (None: the current one)."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*-of-*.safetensors"])
    except (OSError, ValueError) as exc:      # hub errors are OSErrors; a malformed id is a ValueError
        at = f" at revision {revision}" if revision else ""
        raise ValueError(f"could not fetch base model '{repo_id}'{at} from the Hugging Face hub: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return _from_folder(Path(folder), names, shapes, fan_in_fan_out, repo_id, revision)


def load_base_weights(spec: str | os.PathLike, module_names: Iterable[str] | Shapes,
                      fan_in_fan_out: bool | None = None, revision: str | None = None) -> dict[str, torch.Tensor]:
    """W0 for the adapted modules, each (out, in), in the dtype stored.

    Args:
        spec: a ``.safetensors`` file with keys ``<module>.weight`` (or ``<module>``), a Hugging Face model
            folder, or a hub id.
        module_names: names of the adapted modules, or ``{name: (out, in)}``; with shapes, weights stored
            (in, out) (Conv1D) are transposed and a weight of neither shape raises ``ValueError``.
        fan_in_fan_out: whether the model stores its weights (in, out) (PEFT's flag, GPT-2's Conv1D); needed
            only for square weights, whose shape cannot tell. For a model folder, None lets its config decide.
        revision: for a hub id, the commit (or branch/tag) to fetch; ignored for local paths.

    Raises ``ValueError`` for a missing file, an unloadable model, a missing module or a wrong shape.
    """
    names, shapes = _names_and_shapes(module_names)
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise ValueError(f"base weights file '{path}' does not exist")
        if path.suffix != ".safetensors":
            raise ValueError(f"base weights '{path}' must be a .safetensors file or a model directory "
                             "(pickled .bin/.pt files are not loaded for safety)")
        return _from_safetensors(path, names, shapes, bool(fan_in_fan_out))
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _from_safetensors(files[0], names, shapes, bool(fan_in_fan_out))
        raise ValueError(f"base model directory '{path}' has no config.json (and not exactly one "
                         ".safetensors file): give a Hugging Face model directory or a .safetensors file")
    if path.is_dir():
        return _from_folder(path, names, shapes, fan_in_fan_out, str(path), None)
    text = str(spec)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"base model or weights '{spec}' does not exist")   # a path, not a hub id
    return _from_hub(str(spec), revision, names, shapes, fan_in_fan_out)
