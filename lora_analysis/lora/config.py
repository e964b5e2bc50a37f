"""What a LoRA adapter is: the settings PEFT's ``LoraConfig`` holds, as a plain dataclass.

Every field matches the key of the same meaning in PEFT's ``adapter_config.json`` so that adapters move
both ways (see :mod:`lora_analysis.lora.adapter_io`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

Targets = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """Settings of one LoRA adapter.

    Args:
        targets: module-name suffixes (``["q_proj", "v_proj"]`` matches ``...attn.q_proj``), a regular
            expression matched against the whole module name (a ``str``), or ``"all-linear"`` (every
            Linear/Conv1D except the output head and ``modules_to_save``).
        rank: r, the inner dimension of B·A; default for modules not in ``rank_pattern``.
        alpha: the numerator of the scaling α/r (or α/√r with ``rslora``).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        rslora: rank-stabilised scaling α/√r (Kalajdzievski 2023) instead of α/r.
        init: "kaiming" (A Kaiming-uniform, B zeros; PEFT's default), "gaussian" or "pissa".
        rank_pattern / alpha_pattern: ``{pattern: value}`` overrides; a pattern matches a module whose
            name ends with it (after a dot), as in PEFT.
        modules_to_save: modules (name suffixes) kept fully trainable and saved with the adapter,
            e.g. a new classifier head.
        bias: "none" only (LoRA bias training is not supported).
    """

    targets: Targets = ALL_LINEAR
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"

    def rank_for(self, module_name: str) -> int:
        return self.rank_pattern[key] if (key := pattern_key(self.rank_pattern, module_name)) else self.rank

    def alpha_for(self, module_name: str) -> float:
        return self.alpha_pattern[key] if (key := pattern_key(self.alpha_pattern, module_name)) else self.alpha

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return d


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first pattern of ``patterns`` that matches ``module_name`` as PEFT matches it, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def matches_target(targets: Targets, module_name: str) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches names equal to an
    entry or ending with ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def matches_module_to_save(modules_to_save: Sequence[str], module_name: str) -> bool:
    """True if ``module_name`` is, or is inside, a module listed in ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module_name) for m in modules_to_save)
