"""Which device to compute on: CUDA when present, then Apple MPS, then CPU; any of them can be forced."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Device types usable here, best first (``"cpu"`` always last and always present)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


def pick_device(requested: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``requested`` to a ``torch.device``.

    ``"auto"`` (or None) picks cuda > mps > cpu. A forced device (``"cuda"``, ``"cuda:1"``, ``"mps"``,
    ``"cpu"``) is checked: asking for one this machine lacks raises ``ValueError`` naming what is available.
    """
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        return torch.device(available_devices()[0])
    try:
        device = torch.device(requested.strip().lower() if isinstance(requested, str) else requested)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={requested!r} is not a device: choose one of {', '.join(DEVICES)}") from exc
    have = available_devices()
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device={requested!r} is not supported: choose one of {', '.join(DEVICES)}")
    if device.type not in have:
        raise ValueError(f"device={requested!r} is not available on this machine: available are "
                         f"{', '.join(['auto'] + have)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={requested!r} does not exist: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
