"""lora-analysis: what Low-Rank Adaptation really does.

The library (this package) trains, measures and explains LoRA; the Streamlit dashboard (``dashboard/``)
only draws what it returns. Nothing in this package imports streamlit.
"""

from .lora import (Adapter, AdapterModule, LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_layers,
                   lora_report_frame, merge, merge_and_unload, read_adapter, save_adapter, unmerge)
from .params import ParameterCount, count_parameters
from .runstore import list_runs, load_run, load_updates
from .training import TrainConfig, run_sweep, sweep_settings, train


__version__ = "0.1.0"

__all__ = ["Adapter", "AdapterModule", "LoRAConfig", "LoRALinear", "ParameterCount", "apply_lora",
           "count_parameters", "load_adapter", "lora_layers", "lora_report_frame", "merge", "merge_and_unload",
           "read_adapter", "save_adapter", "unmerge", "list_runs", "load_run", "load_updates", "TrainConfig",
           "run_sweep", "sweep_settings", "train"]
