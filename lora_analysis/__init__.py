"""lora-analysis: what Low-Rank Adaptation really does.

The library (this package) trains, measures and explains LoRA; the Streamlit dashboard (``dashboard/``)
only draws what it returns. Nothing in this package imports streamlit.

The public names below are imported on first use (PEP 562), so ``import lora_analysis.store.runs`` or
``python -m lora_analysis --help`` does not pull in torch, the trainer or transformers until a name that
needs them is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(["Adapter", "AdapterModule", "LoRAConfig", "LoRALinear", "apply_lora", "effective_rank_alpha",
                     "format_targets", "load_adapter", "lora_layers", "lora_report_frame", "merge",
                     "merge_and_unload", "parse_targets", "read_adapter", "save_adapter", "unmerge"], "lora"),
    **dict.fromkeys(["ParameterCount", "count_parameters"], "params"),
    **dict.fromkeys(["list_runs", "load_run", "load_updates"], "runstore"),
    **dict.fromkeys(["TrainConfig", "SweepSpec", "run_sweep", "sweep_settings", "train"], "training"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value          # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
