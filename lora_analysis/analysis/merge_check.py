"""Is the merged model the same model? Output drift of merging per dtype and adapter setup, and its latency.

What users run decides what to compare, so every low-precision dtype is checked in two *setups*:

* ``float32`` factors on a base in the dtype: PEFT's default (``autocast_adapter_dtype=True`` upcasts the
  adapter to float32) and this library's ``LoRALinear``, which always keeps its factors in float32;
* factors in the base's dtype: PEFT with ``autocast_adapter_dtype=False``, or an adapted model cast whole
  with ``.to(dtype)``: neither this library's training nor PEFT's default.

In float32 the two are one setup: what this library trains, saves and evaluates. Each setup runs on its own
deep copy (:func:`setup_model`) and compares, against the *unmerged* output of the same setup:

* ``merged``           – ``merge`` (ΔW computed in float32, added to W in float32, cast back once: what
                         ``LoRALinear.merge`` does, and PEFT's merge of float32 factors),
* ``merged_unmerged``  – merge then ``unmerge`` (the LoRA path is used again on a W that went through
                         two roundings),
* ``merge_and_unload`` – merged and unwrapped to plain layers,
* ``naive_merge``      – W.add_(s·B·A) computed entirely in the dtype, as a hand-written merge (or PEFT
                         merging factors stored in bf16/fp16) does: the product and the sum are both
                         rounded to the dtype, where bf16/fp16 merge drift (peft#1388, #1035, #1836)
                         mostly comes from.

Every variant is also compared with the float32 unmerged output (``*_vs_fp32``), which separates the
dtype's own error from the merge's. Errors: ``max_abs`` = max |y − y_ref|; ``max_rel`` = max_abs /
max |y_ref|; ``allclose`` = PEFT's element-wise test ``torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)``;
``tol_ratio`` = max |y − y_ref| / (atol + rtol·|y_ref|) element-wise (≤ 1 when ``allclose`` holds).

A dtype whose ops the device lacks (float16 matmul on some CPUs) is reported as skipped with the reason,
never raised. Latency: base (LoRA removed, original W), unmerged and merged (``merge_and_unload``)
forward passes on the same inputs, repeats interleaved so that machine noise hits all variants alike, each
repeat a block of calls long enough for the clock (``timeit``'s way), median and interquartile range
reported; CUDA timings synchronise before reading the clock. :func:`latency_verdicts` states a difference
only when the interquartile ranges do not overlap.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from ..lora.model import lora_layers, merge, merge_and_unload, unmerge
from .answers import timing_stats

DTYPES = ("float32", "bfloat16", "float16")
# "float32": factors kept in float32 (PEFT's default, this library); "base": factors in the base's dtype
ADAPTER_DTYPES = ("float32", "base")
# PEFT's merge tests: merged and unmerged outputs allclose with atol = rtol = 1e-4
ATOL = RTOL = 1e-4


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


def _tolerance(y: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """PEFT's ``torch.allclose(y, ref, atol=ATOL, rtol=RTOL)`` and the worst element's share of its own
    tolerance, max |y − ref| / (ATOL + RTOL·|ref|) (inf when an output is not finite)."""
    if not y.numel():
        return True, 0.0
    ratio = float(((y - ref).abs() / (ATOL + RTOL * ref.abs())).max())
    return bool(torch.allclose(y, ref, atol=ATOL, rtol=RTOL)), ratio if ratio == ratio else float("inf")


def _adapter_dtype(adapter: str | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if isinstance(adapter, str) and adapter == "base":
        return dtype
    return _dtype(adapter)


def setup_model(model: nn.Module, dtype: str | torch.dtype, adapter_dtype: str | torch.dtype = "float32"
                ) -> nn.Module:
    """A deep copy of ``model`` with everything but the LoRA factors in ``dtype`` and the factors
    (``lora_A``, ``lora_B``) in ``adapter_dtype``: "float32" (PEFT's default and this library's layers),
    "base" (the base's dtype: PEFT's ``autocast_adapter_dtype=False``) or any floating dtype.

    The factors are copied from ``model`` itself, never through ``dtype``: float32 factors keep every bit.
    """
    dt = _dtype(dtype)
    adapter_dt = _adapter_dtype(adapter_dtype, dt)
    copied = copy.deepcopy(model).to(dt)
    originals = lora_layers(model)
    for name, layer in lora_layers(copied).items():
        layer.lora_A = copy.deepcopy(originals[name].lora_A).to(adapter_dt)
        layer.lora_B = copy.deepcopy(originals[name].lora_B).to(adapter_dt)
    return copied


def setup_label(dtype: str, adapter_dtype: str) -> str:
    """Short name of a setup, e.g. "bfloat16 · float32 LoRA" (base dtype · factor dtype)."""
    return f"{dtype} · {adapter_dtype} LoRA"


def who_runs(dtype: str, adapter_dtype: str) -> str:
    """Which real configuration a (base dtype, factor dtype) setup is."""
    if dtype == adapter_dtype == "float32":
        return ("float32 weights and factors: what this library trains, saves and evaluates "
                "(and PEFT on a float32 model)")
    if adapter_dtype == "float32":
        return (f"{dtype} base, float32 factors: PEFT's default (autocast_adapter_dtype=True upcasts the "
                f"adapter to float32) and this library's LoRALinear on a base loaded in {dtype}")
    if adapter_dtype == dtype:
        return (f"{dtype} base and factors: PEFT with autocast_adapter_dtype=False, or an adapted model cast "
                f"whole with .to({dtype}); neither this library's training nor PEFT's default")
    return f"{dtype} base, {adapter_dtype} factors"


@torch.no_grad()
def naive_merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer with W.add_(s·B·A) computed in W's dtype (the drift-prone way): the product,
    the scaling and the sum are each rounded to W's dtype, as in a hand-written merge or PEFT merging factors
    stored in bf16/fp16. In place; returns ``model``."""
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


ERROR_COLUMNS = ["dtype", "adapter_dtype", "setup", "variant", "max_abs", "max_rel", "allclose", "tol_ratio",
                 "max_abs_vs_fp32", "max_rel_vs_fp32", "allclose_vs_fp32"]
SETUP_COLUMNS = ["setup", "dtype", "adapter_dtype", "who"]


@dataclass
class MergeCheck:
    """Result of :func:`merge_check`.

    Attributes:
        errors: one row per (dtype, adapter_dtype, variant): dtype (of the base weights), adapter_dtype (of
            the LoRA factors), setup (:func:`setup_label`), variant; max_abs, max_rel, allclose, tol_ratio
            (vs the unmerged output of the same setup, PEFT's atol = rtol = 1e-4 for the last two);
            max_abs_vs_fp32, max_rel_vs_fp32, allclose_vs_fp32 (vs the unmerged float32 model).
        roundtrip: one row per dtype (float32 factors, the library's setup): max |W − unmerge(merge(W))|
            over all LoRA layers, absolute and relative to max |W|, and the number of entries that changed.
        params: one row per state (with LoRA unmerged / after merge_and_unload): total and LoRA parameters.
        skipped: {dtype: reason} for dtypes that could not run here.
        setups: one row per setup checked: setup, dtype, adapter_dtype, who (:func:`who_runs`).
    """

    errors: pd.DataFrame
    roundtrip: pd.DataFrame
    params: pd.DataFrame
    skipped: dict[str, str]
    setups: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SETUP_COLUMNS))


def _variants(m: nn.Module, x) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Outputs of the unmerged model and of every merge variant (each on its own copy), and the copy that
    went through merge → unmerge (for the round trip of W)."""
    outs = {"unmerged": _forward(m, x)}
    merged = merge(copy.deepcopy(m))
    outs["merged"] = _forward(merged, x)
    outs["merged_unmerged"] = _forward(unmerge(merged), x)
    outs["merge_and_unload"] = _forward(merge_and_unload(copy.deepcopy(m)), x)
    outs["naive_merge"] = _forward(naive_merge(copy.deepcopy(m)), x)
    return outs, merged


def _roundtrip_row(name: str, before_model: nn.Module, after_model: nn.Module) -> dict:
    before = {n: l.base_layer.weight for n, l in lora_layers(before_model).items()}
    after = {n: l.base_layer.weight for n, l in lora_layers(after_model).items()}
    worst_abs = max(float((after[n].float() - before[n].float()).abs().max()) for n in before)
    scale = max(float(before[n].float().abs().max()) for n in before)
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    total = sum(before[n].numel() for n in before)
    return {"dtype": name, "adapter_dtype": "float32", "max_abs": worst_abs,
            "max_rel": worst_abs / scale if scale else 0.0, "changed_entries": changed, "entries": total}


def merge_check(model: nn.Module, inputs, dtypes: Sequence[str | torch.dtype] = DTYPES,
                adapter_dtypes: Sequence[str | torch.dtype] = ADAPTER_DTYPES) -> MergeCheck:
    """Compare unmerged, merged, merged→unmerged, merge_and_unload and a naive in-dtype merge, per dtype
    and per adapter setup (see the module docstring).

    ``model`` must hold unmerged LoRA layers; it is never modified (every variant runs on a deep copy).
    ``inputs``: a tensor (or tuple / dict of them) the model takes; float inputs are cast to each dtype.
    ``adapter_dtypes``: the factor dtypes to check for each base dtype: "float32", "base" (the base's dtype)
    or a dtype name; setups that coincide (float32 base) run once.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: apply_lora() or load_adapter() first")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("model is merged: pass the unmerged model (unmerge() it first)")
    for adapter in adapter_dtypes:
        if not (isinstance(adapter, str) and adapter == "base"):
            _dtype(adapter)
    model = copy.deepcopy(model).eval()
    reference = _forward(setup_model(model, torch.float32, torch.float32), _cast_inputs(inputs, torch.float32))
    error_rows, trip_rows, setup_rows, skipped = [], [], [], {}
    for spec in dtypes:
        dt = _dtype(spec)
        name = _dtype_name(dt)
        adapter_dts = list(dict.fromkeys(_adapter_dtype(a, dt) for a in adapter_dtypes))
        rows, setups = [], []
        try:
            x = _cast_inputs(inputs, dt)
            for adapter_dt in adapter_dts:
                adapter = _dtype_name(adapter_dt)
                m = setup_model(model, dt, adapter_dt)
                outs, merged = _variants(m, x)
                label = setup_label(name, adapter)
                setups.append({"setup": label, "dtype": name, "adapter_dtype": adapter, "who": who_runs(name, adapter)})
                for variant, y in outs.items():
                    abs_same, rel_same = _errors(y, outs["unmerged"])
                    close_same, ratio_same = _tolerance(y, outs["unmerged"])
                    abs_fp32, rel_fp32 = _errors(y, reference)
                    close_fp32, _ = _tolerance(y, reference)
                    rows.append({"dtype": name, "adapter_dtype": adapter, "setup": label, "variant": variant,
                                 "max_abs": abs_same, "max_rel": rel_same, "allclose": close_same,
                                 "tol_ratio": ratio_same, "max_abs_vs_fp32": abs_fp32,
                                 "max_rel_vs_fp32": rel_fp32, "allclose_vs_fp32": close_fp32})
                if adapter_dt == torch.float32:
                    # W itself after merge → unmerge (the merged copy was unmerged in place)
                    trip_rows.append(_roundtrip_row(name, m, merged))
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            # a dtype the device lacks fails in every setup: skip the dtype as a whole
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            continue
        error_rows += rows
        setup_rows += setups
    lora_params = sum(l.lora_A.weight.numel() + l.lora_B.weight.numel() for l in layers.values())
    params = pd.DataFrame([
        {"state": "with LoRA (unmerged)", "total_params": _param_count(model), "lora_params": lora_params},
        {"state": "merge_and_unload", "total_params": _param_count(merge_and_unload(copy.deepcopy(model))),
         "lora_params": 0},
    ])
    return MergeCheck(pd.DataFrame(error_rows, columns=ERROR_COLUMNS),
                      pd.DataFrame(trip_rows, columns=["dtype", "adapter_dtype", "max_abs", "max_rel",
                                                       "changed_entries", "entries"]),
                      params, skipped, pd.DataFrame(setup_rows, columns=SETUP_COLUMNS))


# ---- verdict ---------------------------------------------------------------------------------------

@dataclass
class MergeVerdict:
    """Whether merging keeps the model, by PEFT's element-wise rule, in the setup this library runs.

    Attributes:
        same: float32 ``merged`` and ``merge_and_unload`` outputs pass ``allclose(atol=rtol=1e-4)``
            against the unmerged float32 output (False when float32 was not checked).
        max_abs: their largest |merged − unmerged| (nan when not checked).
        tol_ratio: their worst element's |Δ| / (atol + rtol·|y|); ≤ 1 passes (nan when not checked).
        text: one paragraph (Markdown) that says so, with the low-precision setups' results.
    """

    same: bool
    max_abs: float
    tol_ratio: float
    text: str


def _tolerance_phrase(allclose: bool, ratio: float) -> str:
    where = "within" if allclose else "outside"
    return f"{where} PEFT's element-wise tolerance (worst element at {ratio:.2g}× its tolerance)"


def merge_verdict(errors: pd.DataFrame) -> MergeVerdict:
    """The verdict on ``MergeCheck.errors``, computed from its numbers only (see :class:`MergeVerdict`)."""
    rule = f"|merged − unmerged| ≤ {ATOL:g} + {RTOL:g}·|unmerged| for every output"
    fp32 = errors[(errors["dtype"] == "float32") & (errors["adapter_dtype"] == "float32")
                  & errors["variant"].isin(["merged", "merge_and_unload"])]
    if not len(fp32):
        return MergeVerdict(False, float("nan"), float("nan"),
                            "**Verdict.** float32, the setup this library trains and evaluates in, was not checked "
                            "here: no verdict on merging.")
    same = bool(fp32["allclose"].all())
    worst = float(fp32["max_abs"].max())
    ratio = float(fp32["tol_ratio"].max())
    ratio_text = f"{ratio:.2g}×"
    text = (f"**Verdict.** Merged and unmerged outputs {'agree' if same else 'differ'} in float32, the setup "
            f"this library trains and evaluates in: max |Δ| = {worst:.2g}, "
            f"{'within' if same else 'outside'} PEFT's element-wise tolerance ({rule}; worst element at "
            f"{ratio_text} its tolerance).")
    low = errors[(errors["dtype"] != "float32") & (errors["variant"] == "merged")]
    for _, row in low.iterrows():
        text += (f" {row['setup']}: max |Δ| = {row['max_abs']:.2g}, "
                 f"{_tolerance_phrase(bool(row['allclose']), float(row['tol_ratio']))}.")
    return MergeVerdict(same, worst, ratio, text)


# ---- latency --------------------------------------------------------------------------------------

def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


LATENCY_COLUMNS = ["device", "variant", "median_ms", "min_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats", "number",
                   "relative"]
# a timed block lasts at least this long, so that the clock's resolution and call overhead do not dominate
MIN_BLOCK_S = 2e-3
MAX_NUMBER = 1000


def _block_size(call: Callable[[], object], now: Callable[[], float]) -> int:
    """How many calls make one timed block of at least MIN_BLOCK_S (timeit's autorange, capped)."""
    number = 1
    while number < MAX_NUMBER:
        start = now()
        for _ in range(number):
            call()
        if now() - start >= MIN_BLOCK_S:
            break
        number *= 2
    return min(number, MAX_NUMBER)


def latency_verdicts(latency: pd.DataFrame) -> pd.DataFrame:
    """Per device, each variant against the base: is the difference beyond the measured spread?
    Rows: device, variant, versus ("base"), median_ms, other_ms, measurable (the interquartile ranges do
    not overlap), text (one sentence, :func:`~lora_analysis.analysis.answers.timing_verdict`)."""
    from .answers import timing_verdict

    rows = []
    for device, part in latency.groupby("device", sort=False):
        by = part.set_index("variant")
        if "base" not in by.index:
            continue
        for variant in by.index:
            if variant == "base":
                continue
            measurable, text = timing_verdict(by.loc[variant].to_dict(), by.loc["base"].to_dict(),
                                              f"{variant} ({device})", f"base ({device})")
            rows.append({"device": device, "variant": variant, "versus": "base",
                         "median_ms": float(by.at[variant, "median_ms"]), "other_ms": float(by.at["base", "median_ms"]),
                         "measurable": measurable, "text": text})
    return pd.DataFrame(rows, columns=["device", "variant", "versus", "median_ms", "other_ms", "measurable", "text"])


def latency_check(model: nn.Module, inputs, repeats: int = 20, warmup: int = 3,
                  devices: Sequence[str] | None = None, dtype: str | torch.dtype = "float32",
                  number: int | None = None) -> pd.DataFrame:
    """Forward latency of base (LoRA removed), unmerged LoRA and merged (``merge_and_unload``) models, with
    the weights in ``dtype`` and the LoRA factors in float32 (:func:`setup_model`).

    Each device (default: CPU, plus CUDA when available) runs ``warmup`` untimed passes per variant, then
    ``repeats`` rounds in which each variant runs one timed block of ``number`` calls (default: enough calls
    for a block of at least 2 ms, found on the base model), in an order that rotates every round. Rows:
    device, variant, median_ms, min_ms, q1_ms, q3_ms, iqr_ms (per call, over the repeats), repeats, number,
    relative (median / base median). Compare variants with :func:`latency_verdicts`, never by the medians
    alone.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be ≥ 1 and warmup={warmup} ≥ 0")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
        raise ValueError(f"number={number!r} is not allowed: calls per timed block must be an integer ≥ 1")
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers: apply_lora() or load_adapter() first")
    dt = _dtype(dtype)
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        # float32 factors on a base in ``dtype``: what this library and PEFT's default run
        variants = {"base": _unload_without_merge(setup_model(model, dt)),
                    "unmerged": unmerge(setup_model(model, dt)),   # no-op unless the caller merged it
                    "merged": merge_and_unload(setup_model(model, dt))}
        variants = {k: v.to(device=device).eval() for k, v in variants.items()}
        x = _cast_inputs(inputs, dt, device)
        now = _timer(device)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        with torch.inference_mode():
            for _ in range(warmup):
                for k in order:
                    _call(variants[k], x)
            n = number or _block_size(lambda: _call(variants["base"], x), now)
            for i in range(repeats):
                for k in order[i % len(order):] + order[:i % len(order)]:
                    start = now()
                    for _ in range(n):
                        _call(variants[k], x)
                    times[k].append((now() - start) * 1e3 / n)
        base = statistics.median(times["base"])
        for k, ts in times.items():
            stats = timing_stats(ts)
            rows.append({"device": device.type, "variant": k, **stats, "min_ms": min(ts), "repeats": repeats,
                         "number": n, "relative": stats["median_ms"] / base if base > 0 else float("nan")})
    return pd.DataFrame(rows, columns=LATENCY_COLUMNS)
