"""Analyses of learned updates: pure functions, tensors or ``ModuleUpdate``s in, dataclasses or DataFrames out.

| module | question |
| --- | --- |
| ``spectra`` | the singular spectrum of ΔW per module (factored for LoRA), norms, stable/effective rank |
| ``similarity`` | φ subspace similarity between adapters, ranks, LoRA and full fine-tuning, ΔW and W0 |
| ``amplification`` | how much ΔW amplifies directions weak in W0 (LoRA paper, Table 7) |
| ``intruders`` | intruder dimensions of W0 + ΔW (Shuttleworth et al. 2024) |
| ``rank_advice`` | the rank each module needs, as a PEFT config; shrinking an adapter to it |
| ``merge_check`` | merged versus unmerged outputs per dtype, round-trip error, latency with its spread |
| ``answers`` | the three users' questions (which rank, what LoRA learned, is the merge the same) answered in words |
| ``sources`` | adapter directories and base weights → ``ModuleUpdate``s |
| ``registry`` | every analysis once: question, computation, figures, defaults; read by pages, report and CLI |

The registry is not imported here (it reads the run store and draws figures): ``from lora_analysis.analysis
import registry``.
"""

# Functions named like their module (amplification, merge_check, rank_advice) are not re-exported here:
# that would shadow the submodule itself. Import them from the module.
from .amplification import amplification_frame
from .intruders import IntruderResult, intruder_dimensions, intruder_sweep, intruders_frame
from .merge_check import MergeCheck, latency_check
from .rank_advice import ReducedAdapter, peft_config_from_advice, peft_config_snippet, reduce_rank, save_reduced_adapter
from .similarity import (SimilarityResult, a_similarity, adapter_similarity, base_overlap, random_baseline,
                         similarity_matrix, similarity_summary_frame, subspace_similarity, update_similarity)
from .sources import load_base_weights, load_updates, updates_from_adapter
from .spectra import (Spectrum, dense_svd, effective_rank, energy_rank, factored_svd, spectra_frame,
                      spectrum_metrics, stable_rank, update_spectrum)

__all__ = ["IntruderResult", "MergeCheck", "ReducedAdapter", "SimilarityResult", "Spectrum", "a_similarity",
           "adapter_similarity", "amplification_frame", "base_overlap", "dense_svd", "effective_rank",
           "energy_rank", "factored_svd", "intruder_dimensions", "intruder_sweep", "intruders_frame",
           "latency_check", "load_base_weights", "load_updates", "peft_config_from_advice", "peft_config_snippet",
           "random_baseline", "reduce_rank", "save_reduced_adapter", "similarity_matrix",
           "similarity_summary_frame", "spectra_frame", "spectrum_metrics", "stable_rank", "subspace_similarity",
           "update_similarity", "update_spectrum", "updates_from_adapter"]
