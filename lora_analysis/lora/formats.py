"""Adapter files in the formats users bring, read into the same :class:`~.adapter_io.Adapter`.

A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) is read by
:func:`~.adapter_io.read_adapter` itself. A single ``.safetensors`` FILE is read here; its format is told by its
tensor keys (per module ``<name>``):

=========  ==========================================================  =============================================
format     keys                                                        scaling of ΔW = scaling·B·A
=========  ==========================================================  =============================================
kohya      ``<name>.lora_down.weight`` A (r, in[, kh, kw]),            ``alpha / r``; no alpha (or alpha 0): 1, as
           ``<name>.lora_up.weight`` B (out, r[, 1, 1]),               kohya's ``networks/lora.py`` does
           optional ``<name>.alpha`` (a scalar); diffusers' older
           ``<name>.lora.down.weight`` / ``.lora.up.weight`` likewise
diffusers  ``<name>.lora_A.weight`` (r, in[, kh, kw]),                 ``alpha / r`` with ``<name>.alpha`` when the
           ``<name>.lora_B.weight`` (out, r[, 1, 1]): PEFT's keys in   file has it, else 1 (there is no config to say
           a bare file (diffusers' ``save_lora_weights``), no config   ``lora_alpha``): the adapter's ``notes`` say so
loralib    ``<name>.lora_A`` (r, in), ``<name>.lora_B`` (out, r):      ``alpha / r``; alpha from the caller
           ``loralib.lora_state_dict`` saved as safetensors             (``alpha=``, CLI ``--alpha``), else a sidecar
                                                                       ``<file stem>.json`` ``{"lora_alpha": ...}``,
                                                                       else the file's metadata ``lora_alpha``, else
                                                                       alpha = r (scaling 1), said in ``notes``
=========  ==========================================================  =============================================

Why alpha = r when a loralib file does not say: loralib stores no alpha, and its own default (``lora_alpha=1``,
scaling 1/r) is one nobody trains with. Scaling 1 analyses ΔW = B·A exactly as stored: ranks, spectra shapes and
subspaces (φ) do not depend on the scaling at all; norms, amplification and ‖ΔW‖/‖W0‖ scale linearly with it,
and intruders can change with it, so the assumption is written in the adapter's notes and the CLI output.

Conv layers (kohya's LoCon, diffusers' UNet convs) are analysed as the matrices they factor: A (r, in, kh, kw)
becomes (r, in·kh·kw) and B (out, r, 1, 1) becomes (out, r), so ΔW is (out, in·kh·kw), the conv kernel
(out, in, kh, kw) flattened as ``weight.reshape(out, -1)`` (W0 is flattened the same way when read).

Module names are kept as the file gives them. kohya writes a module's diffusers/transformers path with its dots
replaced by underscores behind a prefix naming the model: ``lora_unet_`` (the UNet: ``lora_unet_down_blocks_0_
attentions_0_proj_in`` is ``down_blocks.0.attentions.0.proj_in``), ``lora_te_`` / ``lora_te1_`` (the text
encoder: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` is ``text_model.encoder.layers.0.self_attn.
q_proj``), ``lora_te2_`` (SDXL's second text encoder). Underscores inside names make the way back ambiguous, so
the base reader (:mod:`lora_analysis.store.base_weights`) matches the other way: each checkpoint key with its
dots replaced by underscores, compared with the kohya name.

Every adapter's factors are analysed in float32 (float64 kept): bf16/fp16 factors are upcast exactly, and the
dtype they were stored in is recorded (``Adapter.dtype``). Anything else is refused with a ``ValueError``
naming a few keys and the key suffixes found, and the formats accepted; pickles (``.bin``/``.pt``/``.ckpt``)
are never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FORMATS = ("peft", "kohya", "diffusers", "loralib")
ACCEPTED = ("a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or one .safetensors file in "
            "the kohya/diffusers Stable-Diffusion format (<module>.lora_down.weight, <module>.lora_up.weight, "
            "optional <module>.alpha), PEFT-style keys without a config (<module>.lora_A.weight, "
            "<module>.lora_B.weight) or a loralib state dict (<module>.lora_A, <module>.lora_B)")
PICKLE_REFUSED = ("'{path}' is a pickle file, which is not loaded for safety (unpickling can run code): convert it "
                  "to safetensors (in PEFT: save_pretrained(..., safe_serialization=True); any state dict: "
                  "safetensors.torch.save_file(state_dict, 'adapter.safetensors'))")

# (regex, format, which factor): the first that matches a key classifies it
KEY_RULES = (
    (re.compile(r"^(?P<module>.+)\.lora_(?P<which>down|up)\.weight$"), "kohya"),
    (re.compile(r"^(?P<module>.+)\.lora\.(?P<which>down|up)\.weight$"), "kohya"),
    (re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$"),
     "diffusers"),
    (re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])$"), "loralib"),
)
ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
WHICH = {"down": "A", "up": "B", "A": "A", "B": "B"}


def refuse_pickle(path: str | os.PathLike) -> ValueError:
    """The error for a pickled adapter file: never unpickled, with how to convert it."""
    return ValueError(PICKLE_REFUSED.format(path=path))


def _suffix(key: str) -> str:
    parts = key.split(".")
    return "." + ".".join(parts[-2:]) if parts[-1] == "weight" and len(parts) > 2 else "." + parts[-1]


def unknown_format(path: str | os.PathLike, keys: list[str], why: str = "") -> ValueError:
    """A ``ValueError`` naming a few keys, the suffixes seen and the formats accepted."""
    suffixes = Counter(_suffix(k) for k in keys)
    shown = ", ".join(f"{s} ({n})" for s, n in suffixes.most_common(8))
    sample = ", ".join(repr(k) for k in sorted(keys)[:3])
    why = why or "no LoRA factor pair was recognised"
    return ValueError(f"'{path}' is not an adapter format this library reads ({why}): it holds {len(keys)} tensors, "
                      f"e.g. {sample}; key suffixes seen: {shown or 'none'}. Accepted: {ACCEPTED}")


def classify(path: str | os.PathLike, keys: list[str]) -> tuple[str, dict[str, dict[str, str]], dict[str, str]]:
    """The format of a bare safetensors file from its keys alone.

    Returns ``(format, {module: {"A": key, "B": key}}, {module: alpha key})``. Raises ``ValueError``
    (:func:`unknown_format`) when no key is a LoRA factor, when the file mixes formats, or when keys are left
    that no format explains (e.g. LoHa's ``hada_w1_a``, DoRA's ``dora_scale``: those methods are not plain
    LoRA, and ignoring their tensors would misreport the update).
    """
    factors: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    formats: Counter = Counter()
    unknown = []
    for key in keys:
        for rule, fmt in KEY_RULES:
            m = rule.match(key)
            if m:
                factors.setdefault(m["module"], {})[WHICH[m["which"]]] = key
                formats[fmt] += 1
                break
        else:
            m = ALPHA_KEY.match(key)
            if m:
                alphas[m["module"]] = key
            else:
                unknown.append(key)
    if not factors:
        raise unknown_format(path, keys)
    if len(formats) > 1:
        raise unknown_format(path, keys, "it mixes the key styles of " + " and ".join(sorted(formats)))
    if unknown:
        raise unknown_format(path, keys, f"{len(unknown)} tensor(s) are no LoRA factor or alpha, e.g. "
                                         f"{unknown[0]!r} (LoHa, LoKr, DoRA and full-weight diffs are not LoRA)")
    stray = sorted(set(alphas) - set(factors))
    if stray:
        raise unknown_format(path, keys, f"alpha '{alphas[stray[0]]}' belongs to no module with LoRA factors")
    return next(iter(formats)), factors, alphas


def as_matrices(name: str, a: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
    """A (r, in[, kh, kw]) and B (out, r[, 1, 1]) as the matrices A (r, in·kh·kw) and B (out, r), plus the
    conv kernel size (None for a linear layer). ``ValueError`` for a B whose trailing sizes are not 1."""
    kernel = tuple(int(s) for s in a.shape[2:]) if a.ndim > 2 else None
    if b.ndim > 2:
        if any(s != 1 for s in b.shape[2:]):
            raise ValueError(f"module '{name}': lora_B/lora_up has shape {tuple(b.shape)}: a conv LoRA's up "
                             "factor must be (out, r, 1, 1)")
        b = b.reshape(b.shape[0], b.shape[1])
    if a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    return a, b, kernel


def _alpha_value(name: str, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1 or not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.int16)):
        raise ValueError(f"'{key}' must be one number (the module's alpha), got a {str(t.dtype)[6:]} tensor of "
                         f"shape {tuple(t.shape)}")
    value = float(t.double().reshape(()))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"module '{name}': alpha {value!r} ('{key}') is not allowed: alpha must be a finite "
                         "number >= 0")
    return value


def _check_alpha(alpha, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: alpha={alpha!r} is not allowed: alpha must be a finite number > 0")
    return float(alpha)


def _loralib_alpha(path: Path, metadata: dict | None) -> tuple[float | None, str]:
    """alpha from a sidecar ``<stem>.json`` or the file's metadata (None: neither says)."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ValueError(f"{sidecar} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or "lora_alpha" not in raw:
            raise ValueError(f"{sidecar} must be a JSON object with a 'lora_alpha' number (loralib's name)")
        return _check_alpha(raw["lora_alpha"], str(sidecar)), f"lora_alpha from {sidecar.name}"
    if metadata and "lora_alpha" in metadata:
        try:
            value = float(metadata["lora_alpha"])
        except ValueError:
            raise ValueError(f"{path}: metadata lora_alpha={metadata['lora_alpha']!r} is not a number") from None
        return _check_alpha(value, f"{path} metadata"), "lora_alpha from the file's metadata"
    return None, ""


def read_adapter_file(path: str | os.PathLike, alpha: float | None = None):
    """Read one ``.safetensors`` adapter file (kohya, diffusers or loralib; see the module docstring) into an
    :class:`~.adapter_io.Adapter` whose factors are float32 (float64 kept) and whose ``format``, ``dtype``
    and ``notes`` say what was read and assumed.

    ``alpha``: for a file that stores no alpha (loralib, or kohya/diffusers without ``.alpha`` tensors), the
    alpha every module was trained with (scaling alpha/r). Giving it for a file that stores alphas is an error.
    """
    from safetensors import SafetensorError, safe_open

    from .adapter_io import (Adapter, AdapterModule, check_lora_tensors, stored_dtype, synthetic_config, upcast,
                             validate_config)

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if not path.is_file():
        raise ValueError(f"adapter file '{path}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter file '{path}' is not a .safetensors file. Accepted: {ACCEPTED}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata()
            fmt, factors, alpha_keys = classify(path, keys)
            tensors = {k: handle.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if alpha is not None:
        _check_alpha(alpha, str(path))
        if alpha_keys:
            raise ValueError(f"{path} stores each module's alpha ({len(alpha_keys)} '.alpha' tensors): an alpha "
                             "given by hand applies only to files without them")
    notes: list[str] = []
    given, told = alpha, "the alpha given"
    if fmt == "loralib" and alpha is None:
        given, told = _loralib_alpha(path, metadata)
    modules = {}
    dtypes = set()
    defaulted = []
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in pair else ("B", "A")
            raise ValueError(f"module '{name}' has lora_{have} ({pair[have]}) but no lora_{lack} factor in {path}")
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        for which, t in (("lora_A", a), ("lora_B", b)):
            if t.ndim not in (2, 4):
                raise ValueError(f"module '{name}': {which} ({pair[which[-1]]}) has shape {tuple(t.shape)}: LoRA "
                                 "factors are 2-D (linear layers) or 4-D (conv layers)")
        a, b, kernel = as_matrices(name, a, b)
        check_lora_tensors(name, a, b)
        dtypes.update({a.dtype, b.dtype})
        r = int(a.shape[0])
        if name in alpha_keys:
            module_alpha = _alpha_value(name, alpha_keys[name], tensors[alpha_keys[name]])
            if module_alpha == 0:           # kohya reads alpha 0 as "no alpha": alpha = r
                module_alpha = float(r)
                defaulted.append(name)
        elif given is not None:
            module_alpha = float(given)
        else:
            module_alpha = float(r)
            defaulted.append(name)
        modules[name] = AdapterModule(name, upcast(a), upcast(b), module_alpha, module_alpha / r, kernel)
    if defaulted:
        why = {"kohya": "kohya's rule for a missing alpha",
               "diffusers": "PEFT-style keys without adapter_config.json: no lora_alpha is known",
               "loralib": "loralib files store no alpha; pass --alpha (alpha=...) or write {\"lora_alpha\": ...} "
                          f"in {path.with_suffix('.json').name}"}[fmt]
        notes.append(f"scaling taken as 1 (alpha = r) for {len(defaulted)} of {len(modules)} modules ({why}): "
                     "ΔW = B·A as stored; norms and amplification scale with the true alpha/r, ranks and "
                     "directions do not")
    elif given is not None and fmt in ("loralib", "kohya", "diffusers") and not alpha_keys:
        notes.append(f"scaling alpha/r with alpha={given:g} ({told})")
    convs = [m for m in modules.values() if m.kernel]
    if convs:
        notes.append(f"{len(convs)} conv module(s) analysed as matrices (out, in·kh·kw), e.g. '{convs[0].name}' "
                     f"with kernel {'x'.join(map(str, convs[0].kernel))}")
    dtype, upcast_note = stored_dtype(dtypes)
    raw = synthetic_config(modules)
    return Adapter(path, validate_config(raw, path), raw, modules, {}, format=fmt, dtype=dtype,
                   notes=notes + upcast_note)


