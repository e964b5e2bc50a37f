"""Answers to the three questions users come with, computed from the data: pure functions, frames in,
:class:`Answer` out. Nothing here states a finding that the numbers given did not produce.

* "Which rank should I use?"                              :func:`rank_answer`, :func:`advice_answer`
* "What did LoRA learn compared with full fine-tuning?"   :func:`spectra_answer`, :func:`sweep_answer`,
  :func:`similarity_answer`, :func:`amplification_answer`, :func:`intruders_answer`
* "Is my merged model the same model?"                    :func:`merge_answer` (with :func:`timing_verdict`)

Each answer is one or two plain sentences (no Markdown, no HTML); ``rule`` says how it was computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

# Accuracy differences below half a point are not called a gain; for losses and perplexities, 1 % of the best.
ACCURACY_TOLERANCE = 0.005
RELATIVE_TOLERANCE = 0.01
# ‖ΔW‖_F/‖W0‖_F in the papers' settings is about 0.1; far above it, their findings need not carry over.
PAPER_RELATIVE_NORM = 0.1
LARGE_RELATIVE_NORM = 0.5
# Per-module numbers whose spread is below this share of their largest value are called negligible.
NEGLIGIBLE_SPREAD = 0.01
# φ averaged over (i, j) counts as "more than chance" above this multiple of the random baseline.
CHANCE_MULTIPLE = 2.0

HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False, "val_perplexity": False}
METRIC_NAMES = {"val_accuracy": "validation accuracy", "val_loss": "validation loss",
                "val_perplexity": "validation perplexity"}


@dataclass(frozen=True)
class Answer:
    """``answer``: one or two plain sentences ("" when there is nothing to answer); ``rule``: how it was
    computed, in words."""

    answer: str = ""
    rule: str = ""


def _num(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.{digits}g}"


def _metric_value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric == "val_accuracy" else _num(value, 4)


def _share(part: float, whole: float) -> str:
    share = 100 * part / whole
    return f"{share:.2g}%" if share < 10 else f"{share:.0f}%"


def _s(count) -> str:
    """Plural "s" for a count (numpy integers and booleans alike)."""
    return "" if int(count) == 1 else "s"


def _rank_list(ranks: Sequence[int]) -> str:
    return ", ".join(str(int(r)) for r in ranks)


# ---- which rank -------------------------------------------------------------------------------------------

def _tolerance(metric: str, best: float) -> tuple[float, str]:
    if metric == "val_accuracy":
        return ACCURACY_TOLERANCE, f"{100 * ACCURACY_TOLERANCE:g} points"
    return RELATIVE_TOLERANCE * abs(best), f"{100 * RELATIVE_TOLERANCE:g}% ({_num(RELATIVE_TOLERANCE * abs(best), 2)})"


def _same_scaling_group(lora: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The LoRA runs at the (α, scaling rule) that covers the most ranks, so that rank is the only thing that
    changes; all runs when no setting covers two ranks."""
    keys = lora[["alpha", "rslora"]].astype(str).agg("|".join, axis=1)
    spread = {k: lora.loc[keys == k, "rank"].nunique() for k in dict.fromkeys(keys)}
    best = max(spread, key=lambda k: (spread[k], int((keys == k).sum())))
    if spread[best] >= 2 and len(spread) > 1:
        part = lora[keys == best]
        alpha, rslora = part["alpha"].iloc[0], bool(part["rslora"].fillna(False).iloc[0])
        return part, f"runs at α={_num(alpha)} with {'α/√r (rsLoRA)' if rslora else 'α/r'} (the setting shared by most ranks)"
    return lora, "all LoRA runs"


def rank_answer(runs: pd.DataFrame, metric: str) -> Answer:
    """Which rank, from final metrics: the smallest LoRA rank that no larger rank beats by more than a
    tolerance (0.5 accuracy points; 1 % of the best loss or perplexity), compared with full fine-tuning's
    metric and trainable parameters when a full fine-tuning run is there.

    ``runs``: :func:`lora_analysis.runstore.runs_frame` rows (method, rank, alpha, rslora, status, ``metric``,
    trainable_params). Several runs of one rank (seeds) are averaged.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric={metric!r} is not allowed: choose one of {', '.join(HIGHER_IS_BETTER)}")
    higher = HIGHER_IS_BETTER[metric]
    name = METRIC_NAMES[metric]
    frame = runs
    if "status" in frame.columns:
        frame = frame[frame["status"] == "completed"]
    if metric not in frame.columns:
        return Answer(f"No completed run has a final {name}: nothing to compare yet.",
                      "Compares the final metric of completed runs.")
    frame = frame[frame[metric].notna()]
    lora = frame[(frame["method"] == "lora") & frame["rank"].notna()]
    full = frame[frame["method"] == "full"]
    if lora.empty:
        return Answer(f"No completed LoRA run has a final {name}: train a few ranks to compare.",
                      "Compares the final metric of completed LoRA runs per rank.")
    for col in ("alpha", "rslora"):
        if col not in lora.columns:
            lora = lora.assign(**{col: None})
    lora, which = _same_scaling_group(lora.assign(rank=lora["rank"].astype(int)))
    has_params = "trainable_params" in frame.columns
    per_rank = lora.groupby("rank").agg(value=(metric, "mean"), runs=(metric, "size"),
                                        **({"params": ("trainable_params", "mean")} if has_params else {}))
    per_rank = per_rank.sort_index()
    best = per_rank["value"].max() if higher else per_rank["value"].min()
    tol, tol_text = _tolerance(metric, best)
    gain = (lambda a, b: a - b) if higher else (lambda a, b: b - a)      # how much a improves on b
    ranks = list(per_rank.index)
    chosen = next(r for r in ranks
                  if all(gain(per_rank.at[s, "value"], per_rank.at[r, "value"]) < tol for s in ranks if s > r))
    value = per_rank.at[chosen, "value"]
    seeds = " (mean over seeds)" if (per_rank["runs"] > 1).any() else ""
    rule = (f"From the final {name} of {which}{seeds}: the smallest rank that no larger rank beats by "
            f"{tol_text} or more. Ranks compared: {_rank_list(ranks)}.")
    if full.empty:
        versus = "no full fine-tuning run to compare with"
    else:
        full_value = float(full[metric].mean())
        if metric == "val_accuracy" and full_value > 0:
            versus = f"{_share(value, full_value)} of full fine-tuning's accuracy ({_metric_value(metric, full_value)})"
        else:
            versus = f"full fine-tuning: {_metric_value(metric, full_value)}"
        if has_params and full["trainable_params"].notna().any() and "params" in per_rank.columns:
            full_params = float(full["trainable_params"].mean())
            if full_params > 0 and math.isfinite(per_rank.at[chosen, "params"]):
                versus += f", with {_share(per_rank.at[chosen, 'params'], full_params)} of its trainable parameters"
        rule += " Full fine-tuning's metric and trainable parameters are the mean of its runs."
    head = f"Rank {chosen} reaches {name} {_metric_value(metric, value)} ({versus})"
    if len(ranks) == 1:
        return Answer(f"{head}. Only rank {chosen} was trained: train other ranks to see what rank changes.", rule)
    if chosen == ranks[-1]:
        lower = ranks[-2]
        loss = gain(value, per_rank.at[lower, "value"])
        worse = f"{100 * loss:.1f} points" if metric == "val_accuracy" else _num(loss)
        return Answer(f"{head}; it is the largest rank trained and rank {lower} is {worse} worse, so a larger "
                      "rank may still help.", rule)
    above = [s for s in ranks if s > chosen]
    return Answer(f"{head}; ranks above {chosen} ({_rank_list(above)}) add less than {tol_text}.", rule)


def advice_answer(advice: pd.DataFrame, energy: float, trained_rank: int | None = None) -> Answer:
    """Rank advice in a sentence: the advised ranks' spread over modules and the largest need, against the
    rank the run was trained at. ``advice``: :func:`lora_analysis.analysis.rank_advice.rank_advice` rows."""
    rule = (f"Per module, the smallest rank k whose top-k singular values hold {100 * energy:g}% of ΔW's energy "
            "Σσ². Energy kept is not task quality: check the metric of a run at the advised rank.")
    if advice.empty:
        return Answer("", rule)
    ranks = advice["advised_rank"].astype(int)
    worst = advice.loc[ranks.idxmax()]
    n = len(advice)
    median = int(np.median(ranks))
    text = (f"To keep {100 * energy:g}% of ΔW's energy, the {n} modules need rank {int(ranks.min())}–"
            f"{int(ranks.max())} (median {median}; largest: {worst['name']})" if ranks.nunique() > 1 else
            f"To keep {100 * energy:g}% of ΔW's energy, every one of the {n} modules needs rank {median}")
    if trained_rank:
        below = int((ranks < trained_rank).sum())
        text += (f"; the run was trained at rank {trained_rank}, and {below} of {n} modules need less." if below else
                 f"; the run was trained at rank {trained_rank}, and no module needs less.")
    else:
        text += ": this is the LoRA rank that would hold that share of full fine-tuning's update."
    return Answer(text, rule)


# ---- what LoRA learned ------------------------------------------------------------------------------------

def relative_norm_total(frame: pd.DataFrame) -> float:
    """‖ΔW‖_F / ‖W0‖_F over all modules together: √Σ‖ΔW‖² / √Σ‖W0‖² (nan without W0). ``frame`` has
    ``fro_norm`` (or ``delta_fro``) and ``w0_norm`` (or ``w0_fro``) columns."""
    delta = frame["fro_norm"] if "fro_norm" in frame.columns else frame.get("delta_fro")
    w0 = frame["w0_norm"] if "w0_norm" in frame.columns else frame.get("w0_fro")
    if delta is None or w0 is None or not len(frame) or w0.isna().any():
        return float("nan")
    base = float(np.sqrt(np.sum(np.square(w0.astype(float)))))
    return float(np.sqrt(np.sum(np.square(delta.astype(float))))) / base if base > 0 else float("inf")


def relative_norm_note(total: float, per_module: Sequence[float] = ()) -> str:
    """A sentence on ‖ΔW‖/‖W0‖, and a warning when it is far above the papers' ~0.1 ("" without W0)."""
    if total is None or not math.isfinite(total):
        return ""
    values = [v for v in per_module if v is not None and math.isfinite(v)]
    spread = f" (per module {_num(min(values), 2)}–{_num(max(values), 2)})" if len(values) > 1 else ""
    text = f"‖ΔW‖/‖W0‖ = {_num(total, 2)} over all modules{spread}"
    if total > LARGE_RELATIVE_NORM:
        text += (f", far above the ~{PAPER_RELATIVE_NORM:g} of the papers' settings (above {LARGE_RELATIVE_NORM:g}), "
                 "so their findings need not carry over to this run")
    return text + "."


def spectra_answer(frame: pd.DataFrame, label: str = "this run") -> Answer:
    """How low-rank ΔW is: the median over modules of the directions holding 90 % of Σσ², out of the
    directions available (LoRA: its rank; full fine-tuning: min(out, in)); ‖ΔW‖/‖W0‖ when W0 is known.
    ``frame``: :func:`lora_analysis.analysis.spectra.spectra_frame` rows."""
    rule = ("rank_90 = the fewest singular directions of ΔW holding 90% of Σσ², per module; the median over "
            "modules is given, against the directions available (the LoRA rank, or min(out, in) for full "
            "fine-tuning). ‖ΔW‖/‖W0‖ = √Σ‖ΔW‖²_F / √Σ‖W0‖²_F over all modules, when the base weights are known.")
    if frame.empty:
        return Answer("", rule)
    live = frame[frame["fro_norm"] > 0]
    if live.empty:
        return Answer(f"ΔW of {label} is zero in every module: nothing was learned.", rule)
    available = [int(r) if k == "lora" and r == r and r is not None else int(min(o, i))
                 for k, r, o, i in zip(live["kind"], live["rank"], live["out_features"], live["in_features"])]
    r90 = live["rank_90"].astype(int)
    kind = "full fine-tuning's" if (live["kind"] == "full").all() else "LoRA's" if (live["kind"] == "lora").all() \
        else "the"
    text = (f"In {label}, 90% of {kind} ΔW energy lies in {int(np.median(r90))} direction"
            f"{_s(int(np.median(r90)))} per module (median over {len(live)} modules; range "
            f"{int(r90.min())}–{int(r90.max())}) out of {int(np.median(available))} available.")
    if "relative_norm" in frame.columns:
        note = relative_norm_note(relative_norm_total(frame), list(frame["relative_norm"]))
        text += (" " + note) if note else ""
    eff = live["effective_rank"].astype(float) if "effective_rank" in live.columns else pd.Series([], dtype=float)
    if len(eff) > 1 and eff.max() > 1 + NEGLIGIBLE_SPREAD and (eff.max() - eff.min()) < NEGLIGIBLE_SPREAD * eff.max():
        text += (f" The modules' effective ranks differ by less than {100 * NEGLIGIBLE_SPREAD:g}% "
                 f"({_num(eff.min())}–{_num(eff.max())}): differences between them are negligible.")
    zero = len(frame) - len(live)
    if zero:
        text += f" {zero} module{_s(zero)} did not change."
    return Answer(text, rule)


def sweep_answer(sweep: pd.DataFrame, module: str, available: int | None = None) -> Answer:
    """Full fine-tuning's rank_90 in one module against the LoRA ranks compared: does full fine-tuning
    need more directions than LoRA allows? ``sweep``: rows kind, rank, rank_90 (one per run)."""
    rule = ("rank_90 of full fine-tuning's ΔW = W_ft − W0 (the fewest directions holding 90% of Σσ²) compared "
            "with the largest LoRA rank among the runs; Biderman et al. (2024) report full fine-tuning's ΔW "
            "to need far more directions than typical LoRA ranks: here it is measured, not assumed.")
    full = sweep[sweep["kind"] == "full"]
    ranks = sorted(int(r) for r in sweep.loc[sweep["kind"] == "lora", "rank"].dropna())
    if full.empty:
        return Answer("", rule)
    need = int(round(float(full["rank_90"].median())))
    of = f" of {available}" if available else ""
    text = f"Full fine-tuning needs {need}{of} directions for 90% of its ΔW energy in {module}"
    if not ranks:
        return Answer(text + "; no LoRA run is compared.", rule)
    top = ranks[-1]
    if need > top:
        text += (f", more than the largest LoRA rank compared ({top}), so a LoRA of the ranks compared "
                 f"({_rank_list(ranks)}) cannot hold that update.")
    else:
        fits = [r for r in ranks if r >= need]
        text += (f", which fits within LoRA rank {fits[0]} (ranks compared: {_rank_list(ranks)}): here full "
                 "fine-tuning's update is low rank.")
    return Answer(text, rule)


def similarity_answer(summary: pd.DataFrame, first: str, second: str, side: str = "A") -> Answer:
    """Shared directions between two runs, per module: how many modules share their top direction
    (φ(1,1) > 0.5), and mean φ against the random baseline. ``summary``: similarity_summary_frame rows."""
    rule = (f"φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) per module (Hu et al. 2021, Eq. 4). The top "
            f"direction counts as shared when φ(1,1) > 0.5; the directions overlap more than chance when the mean "
            f"φ over all (i, j) exceeds {CHANCE_MULTIPLE:g}× the mean for random subspaces (max(i, j)/d).")
    if summary.empty:
        return Answer("", rule)
    n = len(summary)
    shared = int((summary["phi_top1"] > 0.5).sum())
    phi, base = float(summary["phi_mean"].mean()), float(summary["baseline_mean"].mean())
    verdict = ("more than chance" if phi > CHANCE_MULTIPLE * base else "no more than chance")
    return Answer(f"{first} and {second} share their top direction (φ(1,1) > 0.5) in {shared} of {n} module"
                  f"{_s(n)}; on average φ is {_num(phi, 2)} against {_num(base, 2)} for random "
                  f"subspaces: {verdict}.", rule)


def amplification_answer(amp: pd.DataFrame) -> Answer:
    """The amplification factor's median and range over modules, with ‖ΔW‖/‖W0‖. ``amp``:
    amplification_frame rows (amplification, delta_fro, w0_fro)."""
    rule = ("Amplification factor = ‖ΔW‖_F / ‖Uᵀ W0 V‖_F with U, V ΔW's top-r singular directions (Hu et al. "
            "2021, §7.3; about 21.5 at r=4 and 2 at r=64 for GPT-3): above 1, ΔW is larger than what W0 already "
            "holds along ΔW's own directions. Median and range over modules.")
    values = amp["amplification"].replace([np.inf, -np.inf], np.nan).dropna() if len(amp) else pd.Series([], dtype=float)
    if values.empty:
        return Answer("", rule)
    med = float(values.median())
    text = (f"Along ΔW's own top directions, ΔW is {_num(med, 3)}× what W0 holds there (median over "
            f"{len(values)} modules, range {_num(values.min(), 3)}–{_num(values.max(), 3)}): "
            + ("ΔW amplifies directions W0 barely uses." if med > 1 else "ΔW does not amplify them."))
    note = relative_norm_note(relative_norm_total(amp), list(amp["delta_fro"] / amp["w0_fro"]))
    return Answer(text + (" " + note if note else ""), rule)


def shared_modules(modules: pd.DataFrame) -> list[str]:
    """Modules every label in ``modules`` (rows label, name) has, in first-seen order."""
    labels = list(dict.fromkeys(modules["label"]))
    if not labels:
        return []
    sets = [set(modules.loc[modules["label"] == lb, "name"]) for lb in labels]
    common = set.intersection(*sets)
    return [n for n in dict.fromkeys(modules["name"]) if n in common]


def intruders_per_run(modules: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Intruder counts compared like with like: per run, on the modules every run has (``shared``), and
    per module. Returns (frame, shared): rows label, kind, modules (its own), compared (shared modules),
    intruders (on the shared modules), per_module (intruders / compared), all_modules_intruders."""
    shared = shared_modules(modules)
    rows = []
    for label in dict.fromkeys(modules["label"]):
        own = modules[modules["label"] == label]
        on = own[own["name"].isin(shared)] if shared else own
        rows.append({"label": label, "kind": own["kind"].iloc[0], "modules": len(own), "compared": len(on),
                     "intruders": int(on["intruders"].sum()),
                     "per_module": float(on["intruders"].sum()) / len(on) if len(on) else float("nan"),
                     "all_modules_intruders": int(own["intruders"].sum())})
    return pd.DataFrame(rows, columns=["label", "kind", "modules", "compared", "intruders", "per_module",
                                       "all_modules_intruders"]), shared


def intruders_answer(modules: pd.DataFrame, k: int, epsilon: float) -> Answer:
    """Intruders per run on the modules all runs share (per module when they share none).
    ``modules``: rows label, name, kind, intruders (one per run and module)."""
    rule = (f"Intruders: top-{k} singular vectors of W0 + ΔW whose largest |cosine| with W0's singular vectors "
            f"is below ε={epsilon:g} (Shuttleworth et al. 2024). Runs are compared on the modules they all adapt "
            "(full fine-tuning's other modules are left out); when they share none, per module over each run's own.")
    if modules.empty:
        return Answer("", rule)
    table, shared = intruders_per_run(modules)
    parts = [f"{row.label}: {row.intruders} ({_num(row.per_module, 2)} per module)" for row in table.itertuples()]
    if len(table) == 1:
        row = table.iloc[0]
        return Answer(f"{row['label']} has {row['intruders']} intruder dimension{_s(row['intruders'])} "
                      f"in {row['compared']} modules ({_num(row['per_module'], 2)} per module) at k={k}, "
                      f"ε={epsilon:g}.", rule)
    left_out = int((table["modules"] > table["compared"]).sum())
    if shared:
        where = (f"On the {len(shared)} module{_s(len(shared))} all runs adapt"
                 + (f" ({left_out} run{_s(left_out)} also adapt others, left out)" if left_out else ""))
    else:
        where = "The runs share no module; per module over each run's own modules"
    return Answer(f"{where}, intruders at k={k}, ε={epsilon:g}: " + "; ".join(parts) + ".", rule)


# ---- is the merged model the same ------------------------------------------------------------------------

def timing_stats(times_ms: Sequence[float]) -> dict:
    """median, q1, q3, iqr (ms) of repeated timings."""
    t = np.asarray(list(times_ms), dtype=float)
    if not len(t):
        raise ValueError("no timings: time at least one repeat")
    q1, med, q3 = (float(v) for v in np.percentile(t, [25, 50, 75]))
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1}


def timing_verdict(a_ms: Sequence[float] | Mapping, b_ms: Sequence[float] | Mapping, a: str = "A",
                   b: str = "B") -> tuple[bool, str]:
    """Is ``a`` measurably faster or slower than ``b``? Only when their interquartile ranges do not
    overlap; else "no measurable difference". Each argument: repeated timings (ms), or a
    :func:`timing_stats` dict. Returns (measurable, sentence)."""
    sa = dict(a_ms) if isinstance(a_ms, Mapping) else timing_stats(a_ms)
    sb = dict(b_ms) if isinstance(b_ms, Mapping) else timing_stats(b_ms)
    ratio = sa["median_ms"] / sb["median_ms"] if sb["median_ms"] > 0 else float("nan")
    numbers = (f"median {_num(sa['median_ms'])} ms (IQR {_num(sa['iqr_ms'], 2)}) against {_num(sb['median_ms'])} ms "
               f"(IQR {_num(sb['iqr_ms'], 2)})")
    if sa["q1_ms"] > sb["q3_ms"]:
        return True, f"{a} is slower than {b}: {_num(ratio, 3)}× its time, {numbers}."
    if sa["q3_ms"] < sb["q1_ms"]:
        return True, f"{a} is faster than {b}: {_num(ratio, 3)}× its time, {numbers}."
    return False, f"{a} and {b}: no measurable difference ({numbers}; the spreads overlap)."


def merge_answer(errors: pd.DataFrame, latency: pd.DataFrame | None = None, skipped: Mapping[str, str] | None = None
                 ) -> Answer:
    """Is the merged model the same model: float32 by PEFT's element-wise tolerance, each lower-precision
    merge against the rounding that dtype already causes, and the merged model's speed against the base
    only when beyond the measured spread.

    ``errors``: MergeCheck.errors; ``latency``: latency_check rows with median_ms, q1_ms, q3_ms, iqr_ms.
    """
    from .merge_check import ATOL, RTOL

    rule = (f"float32: merged and merge_and_unload outputs against the unmerged ones, |Δ| ≤ {ATOL:g} + "
            f"{RTOL:g}·|y| for every output (PEFT's test). bfloat16/float16: the merge's drift max|merged − "
            "unmerged| against the rounding bound 2·e, with e = max|unmerged in that dtype − float32 unmerged| on "
            "the same inputs, the rounding the dtype itself causes: two results each within e of float32 can "
            "differ by up to 2·e, so a drift within it adds nothing beyond running in that dtype. Speed: "
            "repeated interleaved timings; a difference is stated only when the interquartile ranges do not "
            "overlap.")
    parts = []
    fp32 = errors[(errors["dtype"] == "float32") & (errors["adapter_dtype"] == "float32")
                  & errors["variant"].isin(["merged", "merge_and_unload"])]
    if len(fp32):
        same = bool(fp32["allclose"].all())
        parts.append(f"{'Yes' if same else 'No'} in float32: merged outputs "
                     f"{'match' if same else 'differ from'} the unmerged ones "
                     f"{'within' if same else 'beyond'} PEFT's tolerance (max |Δ| = {_num(fp32['max_abs'].max(), 2)}, "
                     f"worst element at {_num(fp32['tol_ratio'].max(), 2)}× its tolerance).")
    else:
        parts.append("float32 was not checked here: no verdict on merging.")
    for (dtype, adapter), part in errors[errors["dtype"] != "float32"].groupby(["dtype", "adapter_dtype"], sort=False):
        merged = part[part["variant"] == "merged"]
        own = part[part["variant"] == "unmerged"]
        if merged.empty or own.empty:
            continue
        drift, own_error = float(merged["max_abs"].iloc[0]), float(own["max_abs_vs_fp32"].iloc[0])
        bound = 2 * own_error
        factors = "float32" if adapter == "float32" else adapter
        if drift <= bound:
            parts.append(f"In {dtype} ({factors} factors) merging moves outputs by {_num(drift, 2)}, within the "
                         f"rounding bound {_num(bound, 2)} (twice the {_num(own_error, 2)} that {dtype} itself causes).")
        else:
            parts.append(f"In {dtype} ({factors} factors) merging moves outputs by {_num(drift, 2)}, "
                         f"{_num(drift / bound if bound > 0 else float('inf'), 2)}× the rounding bound {_num(bound, 2)} "
                         f"(twice the {_num(own_error, 2)} that {dtype} itself causes): the merge adds rounding of its "
                         "own.")
    for dtype, why in (skipped or {}).items():
        parts.append(f"{dtype} could not run here ({why}).")
    if latency is not None and len(latency) and {"q1_ms", "q3_ms"} <= set(latency.columns):
        for device, part in latency.groupby("device", sort=False):
            rows = part.set_index("variant")
            if {"merged", "base"} <= set(rows.index):
                _, sentence = timing_verdict(rows.loc["merged"].to_dict(), rows.loc["base"].to_dict(),
                                             f"On {device}, the merged model", "the base model")
                parts.append(sentence)
    return Answer(" ".join(parts), rule)
