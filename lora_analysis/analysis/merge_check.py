"""Is the merged model the same model? Output drift of merging per dtype, and its latency.

For a model with LoRA layers (``lora_analysis.lora.apply_lora``) and held-out inputs, each dtype runs on
its own deep copy cast to that dtype and compares, against the *unmerged* output in the same dtype:

* ``merged``           – ``merge`` (ΔW computed in float32, added to W in float32, cast back once:
                         what ``LoRALinear.merge`` does),
* ``merged_unmerged``  – merge then ``unmerge`` (the LoRA path is used again on a W that went through
                         two roundings),
* ``merge_and_unload`` – merged and unwrapped to plain layers,
* ``naive_merge``      – W.add_(s·B·A) computed entirely in the dtype, as a hand-written merge does: the
                         product and the sum are both rounded to the dtype, which is where bf16/fp16
                         merge drift (peft#1388, #1035, #1836) mostly comes from.

Every variant is also compared with the float32 unmerged output (``*_vs_fp32``), which separates the
dtype's own error from the merge's. Errors: ``max_abs`` = max |y − y_ref|; ``max_rel`` = max_abs /
max |y_ref| (relative to the output's scale: element-wise ratios blow up near zero outputs).

A dtype whose ops the device lacks (float16 matmul on some CPUs) is reported as skipped with the reason,
never raised. Latency: base (LoRA removed, original W), unmerged and merged (``merge_and_unload``)
forward passes on the same inputs, repeats interleaved so that machine noise hits all variants alike,
median reported; CUDA timings synchronise before reading the clock.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from ..lora.model import lora_layers, merge, merge_and_unload, unmerge

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating torch dtype (use e.g. float32, bfloat16, float16)")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _cast_inputs(inputs, dtype: torch.dtype, device: torch.device | str | None = None):
    """Float tensors to ``dtype`` (integer inputs such as token ids are kept), recursively."""
    if isinstance(inputs, torch.Tensor):
        t = inputs.to(device) if device is not None else inputs
        return t.to(dtype) if t.is_floating_point() else t
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_cast_inputs(x, dtype, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _cast_inputs(v, dtype, device) for k, v in inputs.items()}
    return inputs


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = model(*inputs)
    else:
        out = model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def _forward(model: nn.Module, inputs) -> torch.Tensor:
    return _call(model, inputs).detach().float().cpu()


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = float((y - ref).abs().max()) if y.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return diff, (diff / scale if scale > 0 else diff)


@torch.no_grad()
def naive_merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer with W.add_(s·B·A) computed in W's dtype (the drift-prone way)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            continue
        w = layer.base_layer.weight
        delta = layer.scaling * (layer.lora_B.weight.to(w.dtype) @ layer.lora_A.weight.to(w.dtype))
        w.add_(delta.T if layer.fan_in_fan_out else delta)
        layer.merged = True
    return model


def _unload_without_merge(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its untouched base layer: the model before LoRA (in place)."""
    modules = dict(model.named_modules())
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer.base_layer)
    return model


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class MergeCheck:
    """Result of :func:`merge_check`.

    Attributes:
        errors: one row per (dtype, variant): dtype, variant, max_abs, max_rel (vs unmerged in that dtype),
            max_abs_vs_fp32, max_rel_vs_fp32 (vs unmerged float32).
        roundtrip: one row per dtype: max |W − unmerge(merge(W))| over all LoRA layers, absolute and relative
            to max |W|, and the number of weight entries that changed.
        params: one row per state (with LoRA unmerged / after merge_and_unload): total and LoRA parameters.
        skipped: {dtype: reason} for dtypes that could not run here.
    """

    errors: pd.DataFrame
    roundtrip: pd.DataFrame
    params: pd.DataFrame
    skipped: dict[str, str]


def merge_check(model: nn.Module, inputs, dtypes: Sequence[str | torch.dtype] = DTYPES) -> MergeCheck:
    """Compare unmerged, merged, merged→unmerged, merge_and_unload and a naive in-dtype merge, per dtype.

    ``model`` must hold unmerged LoRA layers; it is never modified (every variant runs on a deep copy).
    ``inputs``: a tensor (or tuple / dict of them) the model takes; float inputs are cast to each dtype.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: apply_lora() or load_adapter() first")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("model is merged: pass the unmerged model (unmerge() it first)")
    model = copy.deepcopy(model).eval()
    reference = _forward(model.float(), _cast_inputs(inputs, torch.float32))
    error_rows, trip_rows, skipped = [], [], {}
    for spec in dtypes:
        dt = _dtype(spec)
        name = _dtype_name(dt)
        try:
            m = copy.deepcopy(model).to(dt)
            x = _cast_inputs(inputs, dt)
            outs = {"unmerged": _forward(m, x)}
            merged = merge(copy.deepcopy(m))
            outs["merged"] = _forward(merged, x)
            outs["merged_unmerged"] = _forward(unmerge(merged), x)
            outs["merge_and_unload"] = _forward(merge_and_unload(copy.deepcopy(m)), x)
            outs["naive_merge"] = _forward(naive_merge(copy.deepcopy(m)), x)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            continue
        for variant, y in outs.items():
            abs_same, rel_same = _errors(y, outs["unmerged"])
            abs_fp32, rel_fp32 = _errors(y, reference)
            error_rows.append({"dtype": name, "variant": variant, "max_abs": abs_same, "max_rel": rel_same,
                               "max_abs_vs_fp32": abs_fp32, "max_rel_vs_fp32": rel_fp32})
        # W itself after merge → unmerge (the merged copy above was unmerged in place)
        before = {n: l.base_layer.weight for n, l in lora_layers(m).items()}
        after = {n: l.base_layer.weight for n, l in lora_layers(merged).items()}
        worst_abs = max(float((after[n].float() - before[n].float()).abs().max()) for n in before)
        scale = max(float(before[n].float().abs().max()) for n in before)
        changed = sum(int((after[n] != before[n]).sum()) for n in before)
        total = sum(before[n].numel() for n in before)
        trip_rows.append({"dtype": name, "max_abs": worst_abs, "max_rel": worst_abs / scale if scale else 0.0,
                          "changed_entries": changed, "entries": total})
    lora_params = sum(l.lora_A.weight.numel() + l.lora_B.weight.numel() for l in layers.values())
    params = pd.DataFrame([
        {"state": "with LoRA (unmerged)", "total_params": _param_count(model), "lora_params": lora_params},
        {"state": "merge_and_unload", "total_params": _param_count(merge_and_unload(copy.deepcopy(model))),
         "lora_params": 0},
    ])
    return MergeCheck(pd.DataFrame(error_rows, columns=["dtype", "variant", "max_abs", "max_rel",
                                                        "max_abs_vs_fp32", "max_rel_vs_fp32"]),
                      pd.DataFrame(trip_rows, columns=["dtype", "max_abs", "max_rel", "changed_entries",
                                                       "entries"]),
                      params, skipped)


# ---- latency --------------------------------------------------------------------------------------

def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def latency_check(model: nn.Module, inputs, repeats: int = 20, warmup: int = 3,
                  devices: Sequence[str] | None = None, dtype: str | torch.dtype = "float32") -> pd.DataFrame:
    """Forward latency of base (LoRA removed), unmerged LoRA and merged (``merge_and_unload``) models.

    Each device (default: CPU, plus CUDA when available) runs ``warmup`` untimed passes per variant, then
    ``repeats`` rounds in which each variant runs once, in an order that rotates every round. Rows: device,
    variant, median_ms, min_ms, repeats, relative (median / base median).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be ≥ 1 and warmup={warmup} ≥ 0")
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers: apply_lora() or load_adapter() first")
    dt = _dtype(dtype)
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        variants = {"base": _unload_without_merge(copy.deepcopy(model)),
                    "unmerged": unmerge(copy.deepcopy(model)),   # no-op unless the caller merged it
                    "merged": merge_and_unload(copy.deepcopy(model))}
        variants = {k: v.to(device=device, dtype=dt).eval() for k, v in variants.items()}
        x = _cast_inputs(inputs, dt, device)
        now = _timer(device)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        with torch.inference_mode():
            for _ in range(warmup):
                for k in order:
                    _call(variants[k], x)
            for i in range(repeats):
                for k in order[i % len(order):] + order[:i % len(order)]:
                    start = now()
                    _call(variants[k], x)
                    times[k].append((now() - start) * 1e3)
        base = statistics.median(times["base"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append({"device": device.type, "variant": k, "median_ms": med, "min_ms": min(ts),
                         "repeats": repeats, "relative": med / base if base > 0 else float("nan")})
    return pd.DataFrame(rows, columns=["device", "variant", "median_ms", "min_ms", "repeats", "relative"])
