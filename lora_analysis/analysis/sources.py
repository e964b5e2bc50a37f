"""Where the analyses get their inputs: adapters on disk (+ optional base weights) → ``ModuleUpdate``s.

The analyses themselves take :class:`lora_analysis.weights.ModuleUpdate` (or plain tensors); this module
only turns files into those. Base weights come from a ``.safetensors`` file (keys ``<module>.weight``),
a Hugging Face model folder (single file or sharded) or a hub id (the local cache first); reading them lives
in the storage floor (:mod:`lora_analysis.store.base_weights`), which the run store shares.

:func:`load_updates` holds every adapted module's W0 at once (fine for small models); :func:`iter_updates`
yields the updates one by one, each with its W0 read just then, for analyses over a large base;
:class:`StreamedUpdates` is the same as a ``{module: ModuleUpdate}`` mapping whose W0 is read each time an
update is asked for (what the registry's analyses and the report take, one module's W0 alive at a time).

An adapter is a PEFT folder or one ``.safetensors`` file in the kohya / diffusers / loralib format
(:mod:`lora_analysis.lora.formats`); ``alpha`` is for files that store none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch

from ..lora.adapter_io import Adapter
from ..store.base_weights import (BaseReader, BaseSource, Shapes, iter_base_weights, load_base_weights, open_base,
                                  orient_out_in)
from ..weights import ModuleUpdate

__all__ = ["BaseSource", "Shapes", "StreamedUpdates", "adapter_shapes", "iter_updates", "load_base_weights",
           "load_updates", "open_base", "orient_out_in", "updates_from_adapter"]


def adapter_shapes(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every adapted module."""
    return {name: m.shape for name, m in adapter.modules.items()}


def updates_from_adapter(adapter: Adapter, base_weights: Mapping[str, torch.Tensor] | None = None
                         ) -> dict[str, ModuleUpdate]:
    """One LoRA :class:`ModuleUpdate` per adapted module (A (r, in), B (out, r), scaling), with W0 from
    ``base_weights`` when given.

    ``base_weights`` are expected (out, in), as :func:`load_base_weights` returns them; a non-square
    weight stored (in, out) is transposed by its shape (a square one cannot be told apart).

    Raises ``ValueError`` when ``base_weights`` lacks an adapted module or a weight's shape does not fit.
    """
    updates = {}
    for name, module in adapter.modules.items():
        w0 = None
        if base_weights is not None:
            if name not in base_weights:
                raise ValueError(f"base weights have no entry for adapted module '{name}'")
            w0 = orient_out_in(base_weights[name], module.shape, name)
        updates[name] = ModuleUpdate(name, w0=w0, lora_A=module.lora_A, lora_B=module.lora_B,
                                     scaling=module.scaling)
    return updates


def _fan_in_fan_out(adapter: Adapter) -> bool:
    return bool(adapter.raw_config.get("fan_in_fan_out", False))


def load_updates(adapter_dir: str | os.PathLike | Adapter, base: str | os.PathLike | BaseSource | None = None,
                 alpha: float | None = None) -> tuple[Adapter, dict[str, ModuleUpdate]]:
    """Read an adapter (folder or file; see :func:`~lora_analysis.lora.adapter_io.read_adapter`) and, when
    ``base`` is given, every adapted module's W0 at once into updates."""
    from ..lora.adapter_io import read_adapter

    adapter = adapter_dir if isinstance(adapter_dir, Adapter) else read_adapter(adapter_dir, alpha)
    base_weights = None
    if base is not None:
        base_weights = load_base_weights(base, adapter_shapes(adapter), _fan_in_fan_out(adapter))
    return adapter, updates_from_adapter(adapter, base_weights)


def iter_updates(adapter: Adapter | str | os.PathLike, base: str | os.PathLike | BaseSource,
                 revision: str | None = None) -> Iterator[ModuleUpdate]:
    """One :class:`ModuleUpdate` per adapted module, W0 included, read from ``base`` module by module.

    Every module's key is matched (and a mismatch raised) before the first W0 is read. A caller that keeps
    only the current update holds one module's W0 at a time. ``base``: as for :func:`load_base_weights`, or
    a :class:`BaseSource` from :func:`open_base` (whose ``describe()`` says what was read).
    """
    from ..lora.adapter_io import read_adapter

    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    for name, w0 in iter_base_weights(base, adapter_shapes(adapter), _fan_in_fan_out(adapter), revision):
        module = adapter.modules[name]
        update = ModuleUpdate(name, w0=w0, lora_A=module.lora_A, lora_B=module.lora_B, scaling=module.scaling)
        del w0                      # the caller's update is the only holder while the next W0 is read
        yield update
        del update


class StreamedUpdates(Mapping):
    """``{module: ModuleUpdate}`` of an adapter against a base whose W0 is read each time an update is asked
    for (``updates[name]``, ``updates.values()``): a loop over ``values()`` that keeps only the current update
    holds one module's W0 at a time (two while the next is read), whatever the model's size. Keys are
    matched and shapes checked when it is made, before any W0 is read.

    ``has_w0`` is True without reading anything; :meth:`factors` gives the updates without W0 (what the
    spectra, similarity and rank analyses need). Each pass over ``values()`` reads W0 again from the files
    (a memory map: the OS cache makes a second pass cheap; base SVDs are cached on disk by content).
    """

    has_w0 = True

    def __init__(self, adapter: Adapter | str | os.PathLike, base: str | os.PathLike | BaseSource,
                 revision: str | None = None, alpha: float | None = None) -> None:
        from ..lora.adapter_io import read_adapter

        self.adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter, alpha)
        self.reader = BaseReader(base, adapter_shapes(self.adapter), _fan_in_fan_out(self.adapter), revision)
        self.source = self.reader.source

    def _update(self, name: str, w0: torch.Tensor | None) -> ModuleUpdate:
        module = self.adapter.modules[name]
        return ModuleUpdate(name, w0=w0, lora_A=module.lora_A, lora_B=module.lora_B, scaling=module.scaling)

    def __getitem__(self, name: str) -> ModuleUpdate:
        if name not in self.adapter.modules:
            raise KeyError(name)
        return self._update(name, self.reader.read(name))

    def __contains__(self, name) -> bool:          # Mapping's default would read W0 to answer
        return name in self.adapter.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapter.modules)

    def __len__(self) -> int:
        return len(self.adapter.modules)

    def factors(self) -> dict[str, ModuleUpdate]:
        """The updates without W0 (A, B and scaling only: nothing is read)."""
        return {name: self._update(name, None) for name in self.adapter.modules}
