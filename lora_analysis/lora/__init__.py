"""The LoRA core: one layer (layer.py), its settings (config.py), how a model is rewritten (model.py),
and PEFT-format adapters on disk (adapter_io.py)."""

from .adapter_io import Adapter, AdapterModule, load_adapter, read_adapter, save_adapter
from .config import LoRAConfig, effective_rank_alpha, format_targets, parse_targets
from .layer import LoRALinear, compute_scaling
from .model import (ReplacedModule, apply_lora, lora_layers, lora_report_frame, mark_only_lora_as_trainable,
                    merge, merge_and_unload, unmerge)

__all__ = ["Adapter", "AdapterModule", "LoRAConfig", "LoRALinear", "ReplacedModule", "apply_lora",
           "compute_scaling", "effective_rank_alpha", "format_targets", "load_adapter",
           "lora_layers", "lora_report_frame", "mark_only_lora_as_trainable", "merge", "merge_and_unload",
           "parse_targets", "read_adapter", "save_adapter", "unmerge"]
