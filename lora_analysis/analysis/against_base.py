"""Every base-dependent number of an adapter in one streamed pass: per module, W0 is read, its SVD taken once
(or found in the cache), amplification, intruders and ‖ΔW‖/‖W0‖ computed, and W0 dropped before the next.

    from lora_analysis.analysis.against_base import analyse_against_base
    from lora_analysis.analysis.sources import iter_updates, open_base

    source = open_base("path/to/Llama-2-7b-hf")            # or a hub id in the local cache, or a .safetensors
    result = analyse_against_base(iter_updates("my-adapter", source), progress=True)
    result.amplification, result.intruders, result.norms    # pandas frames, one row per module

Peak memory is one module's W0 (plus its SVD factors), whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import pandas as pd
import torch

from ..weights import ModuleUpdate
from .amplification import amplification
from .base_svd import base_svd
from .intruders import DEFAULT_EPSILON, DEFAULT_K, intruder_dimensions, iter_updates_lazily
from .spectra import update_spectrum

INTRUDER_COLUMNS = ["name", "kind", "k", "epsilon", "intruders", "intruder_indices", "min_max_cos"]
AMPLIFICATION_COLUMNS = ["name", "kind", "r", "delta_fro", "w0_fro", "proj_delta", "proj_w0", "proj_random",
                         "amplification"]


@dataclass
class BaseAnalyses:
    """One row per module in each frame: ``amplification`` (amplification_frame's columns), ``intruders``
    (intruders_frame's), ``norms`` (name, delta_fro, w0_fro, relative = ‖ΔW‖_F/‖W0‖_F, base_svd_cached)."""

    amplification: pd.DataFrame
    intruders: pd.DataFrame
    norms: pd.DataFrame


def analyse_against_base(updates: Mapping[str, ModuleUpdate] | Iterable[ModuleUpdate], k: int = DEFAULT_K,
                         epsilon: float = DEFAULT_EPSILON, r: int | None = None, seed: int = 0, *,
                         method: str = "auto", device: str | None = "auto", cache: bool | None = None,
                         progress: bool | Callable[[int, str], None] = False, total: int | None = None
                         ) -> BaseAnalyses:
    """Amplification, intruder dimensions and ‖ΔW‖/‖W0‖ per module, holding one update at a time.

    ``progress``: True shows a tqdm bar (on stderr); a callable gets ``(modules done, name)`` after each
    module (a page's progress bar). ``total``: the number of modules, for the bar. Other arguments as for
    :func:`~lora_analysis.analysis.intruders.intruder_dimensions` and
    :func:`~lora_analysis.analysis.amplification.amplification`.
    """
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="W0 SVD + analyses", unit="module")
    amp, intr, norms = [], [], []
    done = 0
    try:
        # no enumerate(): it keeps its last (index, update) tuple, so the previous W0, alive while the next is read
        for u in iter_updates_lazily(updates):
            done += 1
            base = base_svd(u.w0, device=device, cache=cache)
            delta = update_spectrum(u)
            row = amplification(u, r, seed, delta=delta, base=base)
            res = intruder_dimensions(u, k, epsilon, base=base, method=method, device=device)
            amp.append(row)
            intr.append({"name": res.name, "kind": res.kind, "k": res.k, "epsilon": res.epsilon,
                         "intruders": res.count, "intruder_indices": res.intruders,
                         "min_max_cos": float(res.max_cos.min()) if res.k else float("nan")})
            w0_fro = float(torch.linalg.vector_norm(base.S.to(torch.float64)))
            norms.append({"name": u.name, "delta_fro": row["delta_fro"], "w0_fro": w0_fro,
                          "relative": row["delta_fro"] / w0_fro if w0_fro > 0 else float("inf"),
                          "base_svd_cached": base.cached})
            del u, base, delta
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, amp[-1]["name"])
    finally:
        if bar is not None:
            bar.close()
    return BaseAnalyses(pd.DataFrame(amp, columns=AMPLIFICATION_COLUMNS),
                        pd.DataFrame(intr, columns=INTRUDER_COLUMNS),
                        pd.DataFrame(norms, columns=["name", "delta_fro", "w0_fro", "relative", "base_svd_cached"]))
