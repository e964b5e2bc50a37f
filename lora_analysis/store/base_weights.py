"""Base weights W0 (out, in) of named modules, streamed one module at a time from checkpoint files.

Where W0 comes from (what ``spec`` may name):

    a ``.safetensors`` file          keys ``<module>.weight`` (a checkpoint) or ``<module>`` (a run's W0)
    a Hugging Face model folder      model.safetensors, or the shards listed by model.safetensors.index.json
    a hub id (+ revision)            the local Hugging Face cache first (offline), else fetched from the hub;
                                     the commit actually read is recorded (``BaseSource.revision``)

Only the adapted modules' tensors are read, each through ``safetensors.safe_open`` (a memory map of the
file, opened for that one tensor and closed again), and :func:`iter_base_weights` yields them one by one:
a caller that keeps only the current one holds one module's W0 at a time, whatever the model's size. The
model itself is never built. transformers loads the whole model only when the files cannot answer: a
folder with no safetensors weights (pytorch_model.bin only), or a square weight of a Conv1D model
(GPT-2 family) whose orientation neither its module name nor ``fan_in_fan_out`` tells.

Key matching (exact, and explained when it fails): the adapter's module name, with PEFT's
``base_model.model.`` prefix removed, is looked up as ``<name>.weight``, then under the name with a leading
``model.``/``transformer.`` added or removed, then as the unique key equal up to leading path parts; an
untied checkpoint's missing ``lm_head`` is read from the input embedding when the config ties them. A kohya
module name (``lora_unet_...``, ``lora_te_...``: the module path with dots written as underscores) matches the
one key whose path, dots replaced by underscores and leading path parts optionally dropped, equals the name
after its prefix; so a kohya adapter's W0 comes from the UNet's or the text encoder's own safetensors file
(or folder), whichever holds its modules. A module found nowhere raises ``ValueError`` naming it and the
nearest keys the checkpoint has (for a kohya name: which model it belongs to).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

Shapes = Mapping[str, tuple[int, int]]
SAFETENSORS_FILE, SAFETENSORS_INDEX, CONFIG_FILE = "model.safetensors", "model.safetensors.index.json", "config.json"
PEFT_PREFIX = "base_model.model."
MODEL_PREFIXES = ("model.", "transformer.")
# architectures whose transformers modules include Conv1D, which stores its weight (in, out) ...
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
# ... and the module names of their Conv1D layers (GPT-2's attention and MLP): the rest are nn.Linear
CONV1D_LEAVES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
# kohya's module-name prefixes and the model each names (their modules need that model's weights as the base)
KOHYA_PREFIX = re.compile(r"^lora_(?P<model>unet|te[12]?)_(?P<path>.+)$")
KOHYA_MODELS = {"unet": "the UNet (e.g. unet/diffusion_pytorch_model.safetensors)",
                "te": "the text encoder (e.g. text_encoder/model.safetensors)",
                "te1": "the first text encoder (e.g. text_encoder/model.safetensors)",
                "te2": "the second text encoder (e.g. text_encoder_2/model.safetensors)"}
OUTPUT_EMBEDDINGS = frozenset({"lm_head", "embed_out"})
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def orient_out_in(weight: torch.Tensor, shape: tuple[int, int], name: str,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """Return ``weight`` as (out, in) = ``shape``.

    A Conv1D weight is stored (in, out): a non-square one is recognised by its shape; a square one
    only by ``fan_in_fan_out`` (PEFT's flag for Conv1D models), since its shape says nothing. A conv kernel
    (out, in, kh, kw) is flattened to (out, in·kh·kw), the matrix a conv LoRA factors (:mod:`..lora.formats`).
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
    if weight.ndim > 2 and got[0] == out_f and math.prod(got[1:]) == in_f:
        return weight.reshape(out_f, in_f)    # a conv kernel (out, in, kh, kw) as the matrix its LoRA factors
    raise ValueError(f"base weight for module '{name}' has shape {got}, which fits neither the adapter's "
                     f"(out, in) = ({out_f}, {in_f}) nor its transpose: is this the right base model?")


def _names_and_shapes(module_names: Iterable[str] | Shapes) -> tuple[list[str], Shapes | None]:
    if isinstance(module_names, Mapping):
        return list(module_names), dict(module_names)
    return list(module_names), None


# ---- where the tensors are ------------------------------------------------------------------------------

@dataclass
class BaseSource:
    """A resolved base model: which file holds each tensor key, and what the checkpoint says about itself.

    Attributes:
        spec: what the caller named (path or hub id).
        kind: ``"file"`` (one .safetensors file), ``"folder"`` (a model folder), ``"hub"`` (a hub id, read
            from the local cache or fetched).
        files: {tensor key: safetensors file}; empty when the folder has no safetensors weights.
        folder: the model folder (None for a single file).
        model_type: config.json's ``model_type`` (None without a config).
        revision: for a hub id, the commit whose files were read.
        tied_embeddings: config.json's ``tie_word_embeddings`` (transformers' default: True).
    """

    spec: str
    kind: str
    files: dict[str, Path] = field(repr=False)
    folder: Path | None = None
    model_type: str | None = None
    revision: str | None = None
    tied_embeddings: bool = True

    @property
    def conv1d(self) -> bool:
        return self.model_type in CONV1D_MODEL_TYPES

    def describe(self) -> str:
        """One line saying what was read, e.g. for a page or a JSON result."""
        n_files = len(set(self.files.values()))
        where = {"file": f"file {self.spec}", "folder": f"model folder {self.folder}",
                 "hub": f"hub model {self.spec} at revision {self.revision} ({self.folder})"}[self.kind]
        return f"{where}: {len(self.files)} tensors in {n_files} safetensors file(s)"

    def __str__(self) -> str:
        return self.describe()


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"base weights '{path}' are not a readable safetensors file ({exc})") from exc


def _file_keys(path: Path) -> dict[str, Path]:
    with _open(path) as handle:
        return {key: path for key in handle.keys()}


def _folder_keys(folder: Path) -> dict[str, Path]:
    """``{tensor key: file}`` of a model folder's safetensors weights ({} when it has none)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {str(key): folder / str(file) for key, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"'{index}' is not a safetensors index ({exc})") from exc
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"'{index}' lists shard(s) {', '.join(missing)} that are not in {folder}")
        return files
    single = folder / SAFETENSORS_FILE
    return _file_keys(single) if single.is_file() else {}


def _config(folder: Path) -> dict:
    try:
        value = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _folder_source(folder: Path, spec: str, kind: str = "folder", revision: str | None = None) -> BaseSource:
    config = _config(folder)
    return BaseSource(spec, kind, _folder_keys(folder), folder, config.get("model_type"), revision,
                      bool(config.get("tie_word_embeddings", True)))


def _hub_source(repo_id: str, revision: str | None) -> BaseSource:
    """The local cache's snapshot of ``repo_id`` at ``revision`` (None: the cached ``main``); fetched from the
    hub only when it is not cached. The snapshot folder's name is the commit that was read."""
    import huggingface_hub

    patterns = [CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*-of-*.safetensors"]
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                   local_files_only=True)
    except (OSError, ValueError):             # not cached (LocalEntryNotFoundError is an OSError)
        try:
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except (OSError, ValueError) as exc:  # hub errors are OSErrors; a malformed id is a ValueError
            at = f" at revision {revision}" if revision else ""
            raise ValueError(f"base model '{repo_id}'{at} is neither in the local Hugging Face cache nor could it "
                             f"be fetched from the hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from exc
    folder = Path(folder)
    return _folder_source(folder, repo_id, "hub", folder.name)


def open_base(spec: str | os.PathLike | BaseSource, revision: str | None = None) -> BaseSource:
    """Resolve ``spec`` (a .safetensors file, a model folder, a hub id) to a :class:`BaseSource`, reading only
    file headers, the index and config.json. Raises ``ValueError`` when it names nothing usable."""
    if isinstance(spec, BaseSource):
        return spec
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise ValueError(f"base weights file '{path}' does not exist")
        if path.suffix != ".safetensors":
            raise ValueError(f"base weights '{path}' must be a .safetensors file or a model directory "
                             "(pickled .bin/.pt files are not loaded for safety)")
        return BaseSource(str(spec), "file", _file_keys(path))
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return BaseSource(str(files[0]), "file", _file_keys(files[0]))
        if (path / SAFETENSORS_INDEX).is_file():
            return _folder_source(path, str(spec))
        raise ValueError(f"base model directory '{path}' has no config.json (and not exactly one "
                         ".safetensors file): give a Hugging Face model directory or a .safetensors file")
    if path.is_dir():
        return _folder_source(path, str(spec))
    text = str(spec)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"base model or weights '{spec}' does not exist")   # a path, not a hub id
    return _hub_source(text, revision)


# ---- which key holds each module ------------------------------------------------------------------------

def _candidates(name: str) -> list[str]:
    """Module paths to try for an adapter's module ``name``, most literal first."""
    bare = name.removeprefix(PEFT_PREFIX)
    out = [name, bare]
    for prefix in MODEL_PREFIXES:
        out.append(bare.removeprefix(prefix) if bare.startswith(prefix) else prefix + bare)
    return list(dict.fromkeys(out))


def _match_key(name: str, keys: Iterable[str]) -> str | None:
    """The tensor key holding module ``name``'s weight, or None: ``<path>.weight`` for the candidate paths
    (see :func:`_candidates`), else the module name itself (a run's base_weights.safetensors is keyed by
    module), else the unique key equal up to leading path parts (``transformer.h.0.attn.c_attn`` against
    ``h.0.attn.c_attn.weight``). Several such keys raise ``ValueError`` listing them."""
    keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    for path in _candidates(name):
        if f"{path}.weight" in keys:
            return f"{path}.weight"
    if name in keys:
        return name
    exact = f"{name.removeprefix(PEFT_PREFIX)}.weight"
    hits = sorted(k for k in keys if k.endswith(".weight") and (exact.endswith("." + k) or k.endswith("." + exact)))
    if len(hits) > 1:
        raise ValueError(f"adapted module '{name}' matches several base tensors ({', '.join(hits[:5])}): "
                         "name the module by its full path")
    return hits[0] if hits else None


def kohya_index(keys: Iterable[str]) -> dict[str, list[str]]:
    """{path with dots as underscores: [keys]} for every ``<path>.weight`` key and each of its tails after
    dropping leading path parts (so ``unet.down_blocks.0.proj_in.weight`` answers both
    ``unet_down_blocks_0_proj_in`` and ``down_blocks_0_proj_in``)."""
    index: dict[str, list[str]] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        parts = key[: -len(".weight")].split(".")
        for i in range(len(parts)):
            index.setdefault("_".join(parts[i:]), []).append(key)
    return index


def _kohya_key(name: str, index: dict[str, list[str]]) -> str | None:
    """The key of kohya module ``name`` (None when it is no kohya name or nothing matches); several keys
    reading the same raise ``ValueError`` naming them."""
    m = KOHYA_PREFIX.match(name)
    if m is None:
        return None
    hits = sorted(set(index.get(m["path"], [])))
    if len(hits) > 1:
        raise ValueError(f"kohya module '{name}' reads as several base tensors ({', '.join(hits[:5])}): give the "
                         f"weights of {KOHYA_MODELS[m['model']]} alone as the base")
    return hits[0] if hits else None


def _tied_key(name: str, source: BaseSource) -> str | None:
    """For an output embedding (lm_head) the checkpoint leaves out because it is tied: the input embedding."""
    if name.rsplit(".", 1)[-1] not in OUTPUT_EMBEDDINGS or not source.tied_embeddings:
        return None
    hits = [k for k in source.files if k.endswith(INPUT_EMBEDDINGS)]
    return hits[0] if len(hits) == 1 else None


def _missing(name: str, source: BaseSource) -> ValueError:
    bare = name.removeprefix(PEFT_PREFIX)
    kohya = KOHYA_PREFIX.match(name)
    if kohya:
        return ValueError(f"kohya module '{name}' belongs to {KOHYA_MODELS[kohya['model']]}, and base model "
                          f"'{source.spec}' holds no tensor whose path reads '{kohya['path']}' with its dots as "
                          "underscores. kohya names have no Hugging Face model to stream against: give --base the "
                          "safetensors file (or folder) of that model, or for an adapter of both the UNet and a "
                          "text encoder one .safetensors file holding both models' tensors (e.g. keys unet.* and "
                          "text_encoder.*)")
    near = difflib.get_close_matches(f"{bare}.weight", list(source.files), n=3, cutoff=0.5)
    hint = f"; nearest keys: {', '.join(near)}" if near else ""
    tried = ", ".join(f"'{c}.weight'" for c in _candidates(name) if c != bare)
    return ValueError(f"adapted module '{name}' does not exist in base model '{source.spec}': it holds no tensor "
                      f"'{bare}.weight' (also tried {tried} and any key ending so){hint}. Is this the right "
                      "base model?")


@dataclass(frozen=True)
class _Plan:
    name: str
    key: str
    file: Path
    stored_in_out: bool | None      # True: Conv1D (in, out); False: (out, in); None: by shape (not square)


def _plan(source: BaseSource, names: list[str], shapes: Shapes | None, fan_in_fan_out: bool | None
          ) -> list[_Plan] | None:
    """Where each module's W0 is and how it is stored, before any tensor is read; None when only
    transformers can tell (no safetensors weights, or a Conv1D model's square weight of unknown layout)."""
    if not source.files:
        return None
    plans = []
    index = kohya_index(source.files) if any(KOHYA_PREFIX.match(n) for n in names) else {}
    for name in names:
        key = _match_key(name, source.files) or _kohya_key(name, index) or _tied_key(name, source)
        if key is None:
            raise _missing(name, source)
        if key == name:                         # a run's own W0: stored (out, in) under the bare name
            stored = False
        elif source.kind == "file" or source.model_type is None:
            stored = bool(fan_in_fan_out)       # no config to ask: PEFT's flag says it
        elif source.conv1d:
            leaf = name.rsplit(".", 1)[-1]
            stored = True if leaf in CONV1D_LEAVES else (False if key.endswith(INPUT_EMBEDDINGS) else None)
            square = shapes is None or shapes[name][0] == shapes[name][1]
            if stored is None and square:
                return None                     # a square weight of an unknown layer of a Conv1D model
        else:
            stored = False
        plans.append(_Plan(name, key, source.files[key], stored))
    if shapes is not None:
        _check_shapes(plans, shapes)
    return plans


def _check_shapes(plans: list[_Plan], shapes: Shapes) -> None:
    """Every stored shape against the adapter's, from the file headers alone (no tensor is read), so a wrong
    base fails before any work."""
    by_file: dict[Path, list[_Plan]] = {}
    for plan in plans:
        by_file.setdefault(plan.file, []).append(plan)
    for path, group in by_file.items():
        with _open(path) as handle:
            for plan in group:
                stored = tuple(handle.get_slice(plan.key).get_shape())
                orient_out_in(torch.empty(stored, device="meta"), shapes[plan.name], plan.name,
                              bool(plan.stored_in_out))


def _read_one(plan: _Plan, shapes: Shapes | None) -> torch.Tensor:
    with _open(plan.file) as handle:            # a memory map of this one tensor's file, closed at once
        weight = handle.get_tensor(plan.key)
    if shapes is not None:
        weight = orient_out_in(weight, shapes[plan.name], plan.name, bool(plan.stored_in_out))
    elif plan.stored_in_out:
        weight = weight.T
    return weight.contiguous()


class BaseReader:
    """The adapted modules' W0, each read from the checkpoint only when asked for (:meth:`read`), or one by
    one in file order (iterating it). Every key is matched and every stored shape checked when it is made,
    before any tensor is read; it holds no tensor itself, except in transformers' fallback (see the module
    docstring), which holds every adapted module's W0 from the start.

    Arguments as for :func:`load_base_weights`; ``reader.source`` says what was read.
    """

    def __init__(self, spec: str | os.PathLike | BaseSource, module_names: Iterable[str] | Shapes,
                 fan_in_fan_out: bool | None = None, revision: str | None = None) -> None:
        self.names, self._shapes = _names_and_shapes(module_names)
        self.source = open_base(spec, revision)
        plans = _plan(self.source, self.names, self._shapes, fan_in_fan_out)
        self._plans = None if plans is None else {p.name: p for p in plans}
        self._loaded = (_from_transformers(self.source, self.names, self._shapes, revision) if plans is None
                        else None)

    def read(self, name: str) -> torch.Tensor:
        """W0 (out, in) of module ``name``, in the dtype stored."""
        if self._loaded is not None:
            return self._loaded[name]
        if name not in self._plans:
            raise ValueError(f"module '{name}' is not one of the {len(self._plans)} modules this reader was made for")
        return _read_one(self._plans[name], self._shapes)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._loaded is not None:
            yield from self._loaded.items()
            return
        plans = list(self._plans.values())
        order = {f: i for i, f in enumerate(dict.fromkeys(p.file for p in plans))}
        for plan in sorted(plans, key=lambda p: order[p.file]):
            yield plan.name, _read_one(plan, self._shapes)


def iter_base_weights(spec: str | os.PathLike | BaseSource, module_names: Iterable[str] | Shapes,
                      fan_in_fan_out: bool | None = None, revision: str | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(module name, W0)`` for each adapted module, one at a time, W0 (out, in) in the dtype stored.

    Every key is matched (and every mismatch raised) before the first tensor is read; then each tensor is
    read alone, so the generator itself holds one module's weight at a time. Modules come grouped by
    file (shard by shard), in the order asked within each. Same arguments as :func:`load_base_weights`;
    ``spec`` may also be an already resolved :class:`BaseSource`.
    """
    yield from BaseReader(spec, module_names, fan_in_fan_out, revision)


def _from_transformers(source: BaseSource, names: list[str], shapes: Shapes | None,
                       revision: str | None = None) -> dict[str, torch.Tensor]:
    """The fallback that builds the model: only for folders the files alone cannot answer for."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a requirement
        raise ValueError("loading a base model without safetensors weights needs the transformers package") from exc
    from ..lora.layer import weight_out_in

    spec = str(source.folder) if source.folder is not None else source.spec
    if source.folder is not None:
        from ..training.hf import check_no_pickle_only
        check_no_pickle_only(source.folder)          # pickles are never loaded (unpickling can run code)
    model, errors = None, []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):   # an encoder is no causal LM
        try:
            model = auto.from_pretrained(spec, revision=None if source.kind != "hub" else source.revision,
                                         use_safetensors=True)
            break
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if model is None:
        raise ValueError(f"could not load base model '{source.spec}' with transformers: {errors[0]}")
    modules = dict(model.named_modules())
    weights = {f"{n}.weight" for n, m in modules.items() if hasattr(m, "weight")}
    out = {}
    for name in names:
        key = _match_key(name, weights)            # the same matching as for checkpoint keys
        module = modules.get(key.removesuffix(".weight")) if key else None
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"adapted module '{name}' does not exist in base model '{source.spec}' (is this the "
                             "right base model?)")
        weight = weight_out_in(module).detach()          # Conv1D stores (in, out): known exactly here
        if shapes is not None:
            weight = orient_out_in(weight, shapes[name], name, fan_in_fan_out=False)
        out[name] = weight.contiguous().clone()
    return out


def load_base_weights(spec: str | os.PathLike | BaseSource, module_names: Iterable[str] | Shapes,
                      fan_in_fan_out: bool | None = None, revision: str | None = None) -> dict[str, torch.Tensor]:
    """W0 for the adapted modules, each (out, in), in the dtype stored, all at once (see
    :func:`iter_base_weights` to hold one at a time).

    Args:
        spec: a ``.safetensors`` file with keys ``<module>.weight`` (or ``<module>``), a Hugging Face model
            folder (single file or sharded), or a hub id (the local cache first).
        module_names: names of the adapted modules, or ``{name: (out, in)}``; with shapes, weights stored
            (in, out) (Conv1D) are transposed and a weight of neither shape raises ``ValueError``.
        fan_in_fan_out: whether the model stores its weights (in, out) (PEFT's flag, GPT-2's Conv1D); needed
            only for square weights of a bare .safetensors file. A model folder's config decides by itself.
        revision: for a hub id, the commit (or branch/tag) to read; ignored for local paths.

    Raises ``ValueError`` for a missing file, an unloadable model, a missing module or a wrong shape.
    """
    names, _ = _names_and_shapes(module_names)
    got = dict(iter_base_weights(spec, module_names, fan_in_fan_out, revision))
    return {name: got[name] for name in names}
