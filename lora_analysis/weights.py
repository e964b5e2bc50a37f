"""The hand-off between training runs / adapter files and the analyses: one learned update per module.

A LoRA update is kept factored (A, B, scaling) so analyses never need the dense ΔW; a full fine-tuning
update is the dense pair (W0, W_ft). All matrices use the nn.Linear orientation (out, in), float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch


@dataclass
class ModuleUpdate:
    """What one module learned.

    Attributes:
        name: module path in the model, e.g. ``"blocks.0.attn.q_proj"``.
        w0: base weight W0, (out, in), or None when the base is not known.
        lora_A: A, (r, in) — LoRA updates only.
        lora_B: B, (out, r) — LoRA updates only.
        scaling: α/r (or α/√r with rsLoRA) — LoRA updates only.
        w_ft: fine-tuned weight W_ft, (out, in) — full fine-tuning updates only.
    """

    name: str
    w0: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float | None = None
    w_ft: torch.Tensor | None = None

    def __post_init__(self) -> None:
        is_lora = self.lora_A is not None and self.lora_B is not None and self.scaling is not None
        if is_lora == (self.w_ft is not None):
            raise ValueError(f"module '{self.name}': give either lora_A, lora_B and scaling, or w_ft "
                             "(with w0), not both or neither")
        if self.w_ft is not None and self.w0 is None:
            raise ValueError(f"module '{self.name}': a full fine-tuning update needs w0 as well as w_ft")
        if self.w0 is not None and tuple(self.w0.shape) != self.shape:
            raise ValueError(f"module '{self.name}': w0 has shape {tuple(self.w0.shape)} but the update has "
                             f"shape {self.shape}")

    @property
    def kind(self) -> str:
        """"lora" or "full"."""
        return "full" if self.w_ft is not None else "lora"

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        if self.w_ft is not None:
            return tuple(self.w_ft.shape)
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def rank(self) -> int | None:
        """r for LoRA updates, None for full fine-tuning."""
        return int(self.lora_A.shape[0]) if self.lora_A is not None else None

    def dense_delta(self) -> torch.Tensor:
        """ΔW as a dense (out, in) float32 matrix. Avoid for large LoRA modules: analyses use the factors."""
        if self.w_ft is not None:
            return self.w_ft.float() - self.w0.float()
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


def as_update_list(updates: "Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate]") -> list[ModuleUpdate]:
    """Analyses accept ``{name: update}`` or any iterable of updates."""
    return list(updates.values()) if isinstance(updates, Mapping) else list(updates)
