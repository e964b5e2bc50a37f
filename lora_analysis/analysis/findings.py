"""Findings: the published claims about LoRA, checked on the runs in front of the user.

    result = findings(runstore.list_runs(), model="tiny-gpt")
    result.table()                     # claim, paper, measured, verdict: one row per claim
    result.findings[0].figures         # the evidence (plotly), the same on the page, in the report and the CLI

Five claims (:data:`CLAIMS`), each with the paper's number, the number measured on the chosen runs and a
verdict among :data:`VERDICTS`. A verdict is never judged by eye: each claim has a rule, a pure function of
plain numbers (``*_verdict`` below) whose docstring is the rule as the page shows it, and whose source is
shown beside it. The numbers come from the existing analyses (similarity, amplification, intruders,
spectra) on the runs' stored updates, and from the ``source_*`` metrics a run records on the task its
base was pretrained for (:attr:`lora_analysis.training.models.Task.source_metrics`).

Which runs: the completed runs of one model (default: the model of the newest run) that share the newest
run's data and training length; LoRA runs that share its scaling rule, targets and init. Several seeds
are averaged where a claim compares ranks (amplification), and the φ pair is taken within one seed.

Context for every verdict: ‖ΔW‖_F/‖W0‖_F over the adapted modules. The papers' fine-tunes move the weights
by about a tenth of their norm (:data:`PAPER_RELATIVE_NORM`); a run far above that is a different regime,
and the findings say so (:func:`norm_note`).

:data:`RESEARCH_PRESETS` holds, per built-in model, the sweep the claims need (ranks 1…64, full
fine-tuning, two seeds, α and learning rates lowered so that ‖ΔW‖/‖W0‖ moves towards the papers' range).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from .. import runstore
from ..plots.style import COLORS, SEQUENCE, apply_style, bounded_axis, finite, fit_range, reference_line, safe_label
from ..report import Section
from ..weights import ModuleUpdate
from . import amplification, intruders, similarity
from .spectra import spectra_frame, update_spectrum

VERDICTS = ("reproduced", "partly", "not reproduced", "not measurable")
MOST = 2 / 3                  # "most modules" / "most runs" in the rules below
PAPER_RELATIVE_NORM = 0.1     # ‖ΔW‖_F/‖W0‖_F of the papers' fine-tunes, about
FAR_ABOVE = 3.0               # a run above this multiple of it is in another regime (said with every verdict)

# (1) φ: Hu et al. 2021, §7.2, Figure 3
PHI_TOP = 0.5                 # the paper: φ(1,1) between r=8 and r=64 above 0.5
PHI_REST_MARGIN = 0.2         # "the others fall toward random": φ of directions 2..k at most this above random
PAPER_RANKS = (8, 64)
# (2) amplification: Hu et al. 2021, Table 7 (GPT-3, layer 48, W_q)
PAPER_AMPLIFICATION = {4: 21.5, 64: 2.0}
AMPLIFICATION_DROP = 2.0      # the factor at the lowest rank at least this multiple of the one at the highest
# (3) intruders: Shuttleworth et al. 2024 (k=10, ε=0.5)
LOW_RANK = 8                  # "low-rank LoRA": r ≤ 8
INTRUDERS_PRESENT = 0.5       # intruders per module (of its top k) for "LoRA has them"
FULL_ALMOST_NONE = 0.25       # full FT's rate at most this share of LoRA's for "almost none"
# (4) energy rank: Biderman et al. 2024
TYPICAL_LORA_RANK = 16        # the typical LoRA configuration the paper compares with
PAPER_RANK_MULTIPLE = 10      # "rank 10-100× higher than typical LoRA configurations"


# ---- the verdict rules: pure functions of plain numbers ------------------------------------------------

def _share(flags) -> float:
    flags = [bool(f) for f in flags]
    return sum(flags) / len(flags) if flags else 0.0


def phi_verdict(phi_top1: Sequence[float], phi_rest: Sequence[float], baseline_rest: Sequence[float]) -> str:
    """One value per module compared between the two ranks (A matrices' right-singular vectors, Eq. 4).
    A module shares its top direction when φ(1,1) > 0.5; its other directions fall toward random when φ of
    directions 2..k of each (k the smaller rank) is at most 0.2 above the random baseline (k−1)/d.
    Reproduced: both hold on at least 2/3 of the modules. Partly: either holds on at least one module.
    Not reproduced: neither holds anywhere."""
    top = [t > PHI_TOP for t in phi_top1]
    rest = [not math.isnan(r) and r <= b + PHI_REST_MARGIN for r, b in zip(phi_rest, baseline_rest)]
    if not top:
        return "not measurable"
    if _share(t and r for t, r in zip(top, rest)) >= MOST:
        return "reproduced"
    return "partly" if any(top) or any(rest) else "not reproduced"


def amplification_verdict(ranks: Sequence[int], factors: Sequence[float]) -> str:
    """One amplification factor per LoRA rank (the median over modules, averaged over seeds).
    Reproduced: the factor falls at every step up in rank (never rising by more than 5%) and the lowest
    rank's is at least 2× the highest rank's. Partly: it falls overall (lowest rank's above highest's, or a
    negative rank correlation) but not steadily or not by 2×. Not reproduced: it does not fall."""
    pairs = sorted((int(r), float(f)) for r, f in zip(ranks, factors) if math.isfinite(f))
    if len({r for r, _ in pairs}) < 2:
        return "not measurable"
    values = [f for _, f in pairs]
    steady = all(b <= a * 1.05 for a, b in zip(values, values[1:]))
    if steady and values[0] >= AMPLIFICATION_DROP * values[-1]:
        return "reproduced"
    rho = pd.Series([r for r, _ in pairs]).rank().corr(pd.Series(values).rank())     # Spearman, without scipy
    return "partly" if values[0] > values[-1] or (not math.isnan(rho) and rho < 0) else "not reproduced"


def intruders_verdict(lora_rate: float, full_rate: float) -> str:
    """Intruders per module (among the top k=10 singular vectors of W0+ΔW, ε=0.5): ``lora_rate`` averaged
    over the LoRA runs with r ≤ 8, ``full_rate`` over the full fine-tuning runs, on the same modules.
    Reproduced: LoRA has at least 0.5 per module and full fine-tuning at most a quarter of LoRA's rate
    ("almost none"). Partly: LoRA has more than full fine-tuning, but not both. Not reproduced: LoRA has
    no more than full fine-tuning."""
    if math.isnan(lora_rate) or math.isnan(full_rate):
        return "not measurable"
    if lora_rate >= INTRUDERS_PRESENT and full_rate <= FULL_ALMOST_NONE * lora_rate:
        return "reproduced"
    return "partly" if lora_rate > full_rate else "not reproduced"


def energy_rank_target(dimension: int) -> float:
    """The rank the claim asks of a module whose smaller side is ``dimension``: 10× the typical LoRA rank
    16, capped at half the dimension (a 128-wide matrix cannot need a rank of 160)."""
    return min(PAPER_RANK_MULTIPLE * TYPICAL_LORA_RANK, dimension / 2)


def energy_rank_verdict(rank_90: Sequence[int], dimensions: Sequence[int]) -> str:
    """Per module of a full fine-tuning run: rank_90, the directions holding 90% of ΔW's energy Σσ², and
    the module's smaller side min(out, in). Taken at the median module. Reproduced: rank_90 reaches 10× a
    typical LoRA rank (16), capped at half the module's dimension. Partly: it is above 16 (more than a
    typical LoRA holds) but below that. Not reproduced: at most 16."""
    if not len(rank_90):
        return "not measurable"
    r = float(np.median(rank_90))
    target = float(np.median([energy_rank_target(d) for d in dimensions]))
    if r >= target:
        return "reproduced"
    return "partly" if r > TYPICAL_LORA_RANK else "not reproduced"


def forgetting_verdict(lora_learned: Sequence[float], lora_forgot: Sequence[float], full_learned: float,
                       full_forgot: float) -> str:
    """Per LoRA run, how much it learned (target metric gained from the base, step 0, to the end) and forgot
    (source metric lost), against full fine-tuning's (averaged over its runs). Reproduced: at least 2/3 of
    the LoRA runs both learn less and forget less than full fine-tuning. Partly: most LoRA runs (over half)
    forget less, or most learn less, but not both. Not reproduced: otherwise."""
    if not len(lora_learned) or math.isnan(full_learned) or math.isnan(full_forgot):
        return "not measurable"
    less = [lr < full_learned for lr in lora_learned]
    kept = [f < full_forgot for f in lora_forgot]
    if _share(a and b for a, b in zip(less, kept)) >= MOST:
        return "reproduced"
    return "partly" if _share(kept) > 0.5 or _share(less) > 0.5 else "not reproduced"


def rule_text(rule: Callable) -> str:
    """The rule as the page shows it: the rule function's docstring, one paragraph."""
    return " ".join(inspect.getdoc(rule).split())


def rule_code(rule: Callable) -> str:
    return inspect.getsource(rule)


# ---- what a finding is ---------------------------------------------------------------------------------

@dataclass
class Claim:
    key: str
    title: str
    claim: str           # one sentence, with its citation
    paper: str           # the paper's number
    rule: Callable
    needs: str           # the runs that make it measurable


CLAIMS = (
    Claim("phi", "Subspace similarity between ranks",
          "The top singular direction learned at r=8 is shared with r=64 (φ > 0.5) while the other directions "
          "fall toward the random baseline (Hu et al. 2021, LoRA, §7.2, Fig. 3).",
          "φ(1,1) > 0.5 between A of r=8 and r=64; other directions low (random: max(i, j)/d)",
          phi_verdict, "LoRA runs at two ranks, ideally r=8 and r=64 (and at least r=2 for the smaller), same "
                       "model and seed"),
    Claim("amplification", "Amplification falls as the rank grows",
          "ΔW amplifies directions W0 barely uses, and the amplification factor ‖ΔW‖_F/‖UᵀW0V‖_F falls as r "
          "grows (Hu et al. 2021, LoRA, §7.3, Table 7).",
          "≈21.5 at r=4, ≈2 at r=64 (GPT-3, layer 48, W_q)",
          amplification_verdict, "LoRA runs at two or more ranks (e.g. r=4 and r=64) with their base weights"),
    Claim("intruders", "Intruder dimensions",
          "Low-rank LoRA creates intruder dimensions (top singular vectors of W0+ΔW unlike any of W0's), full "
          "fine-tuning almost none (Shuttleworth et al. 2024, LoRA vs Full Fine-tuning: An Illusion of "
          "Equivalence).",
          "LoRA (low rank): intruders in the top 10 (ε=0.5); full fine-tuning: almost none",
          intruders_verdict, "a LoRA run at r ≤ 8 and a full fine-tuning run of the same model"),
    Claim("energy_rank", "Full fine-tuning is high rank",
          "Full fine-tuning's ΔW needs a rank far above typical LoRA ranks to hold 90% of its energy "
          "(Biderman et al. 2024, LoRA Learns Less and Forgets Less, §6).",
          "rank 10–100× a typical LoRA configuration (r=16)",
          energy_rank_verdict, "a full fine-tuning run (with its base weights)"),
    Claim("forgetting", "Learns less, forgets less",
          "LoRA learns less of the target task than full fine-tuning and forgets less of the source task "
          "(Biderman et al. 2024, LoRA Learns Less and Forgets Less).",
          "LoRA below full fine-tuning on the target and on forgetting, at every rank studied",
          forgetting_verdict, "LoRA and full fine-tuning runs evaluated on their source task (runs of a built-in "
                              "model trained with this version record source_* metrics)"),
)


@dataclass
class Finding:
    """One claim checked on the chosen runs. ``verdict`` is one of :data:`VERDICTS`; ``needs`` says which
    runs would make a "not measurable" claim measurable; ``numbers`` holds what the rule was given."""

    key: str
    title: str
    claim: str
    paper: str
    measured: str
    verdict: str
    rule: str
    rule_code: str
    needs: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    readings: list[str] = field(default_factory=list)      # how to read figures[i] (plain text)

    def row(self) -> dict:
        return {"claim": self.title, "paper": self.paper, "measured": self.measured, "verdict": self.verdict}

    def to_dict(self) -> dict:
        """Plain JSON values (no figures)."""
        return {"key": self.key, "title": self.title, "claim": self.claim, "paper": self.paper,
                "measured": self.measured, "verdict": self.verdict, "rule": self.rule, "needs": self.needs,
                "numbers": _plain(self.numbers)}


def _plain(value):
    if value is pd.NA:
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class Findings:
    """Every claim on one model's runs, plus ‖ΔW‖/‖W0‖ per run (``norms``) and what it means (``note``)."""

    model: str | None
    runs: list[runstore.Run]
    findings: list[Finding]
    norms: pd.DataFrame
    note: str

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([f.row() for f in self.findings], columns=["claim", "paper", "measured", "verdict"])

    def answer(self) -> tuple[str, str]:
        """The page's answer in one or two sentences (which claims hold on these runs), and how it is made."""
        by = {v: [f.title.lower() for f in self.findings if f.verdict == v] for v in VERDICTS}
        parts = [f"{len(by[v])} {v} ({'; '.join(by[v])})" for v in VERDICTS if by[v]]
        text = (f"On {self.model} ({len(self.runs)} runs), of the {len(self.findings)} published claims: "
                + ", ".join(parts) + ".")
        rule = ("Each claim's verdict comes from its own rule, written in the code and shown under the claim; "
                "the answer counts the verdicts.")
        return text, rule

    def to_dict(self) -> dict:
        return {"model": self.model, "runs": [r.id for r in self.runs], "note": self.note,
                "relative_norms": _plain(self.norms.to_dict(orient="records")),
                "findings": [f.to_dict() for f in self.findings]}


# How to read each claim's evidence charts, in the order the finding draws them.
READINGS = {
    "phi": ["Per module: the dark bar is φ(1,1), how much the top direction of the two ranks overlap (above the "
            "dashed line at 0.5: shared); the light bar is the overlap of directions 2..k, which the paper expects "
            "near the random baseline (the tick).",
            "φ(i, j) for one module: the overlap of the lower rank's top-i directions with the higher rank's top-j "
            "(0 = orthogonal, 1 = the same subspace); the paper's picture is a bright first cell and a dim rest."],
    "amplification": ["The amplification factor ‖ΔW‖F / ‖UᵀW0V‖F against the LoRA rank, both axes log: thin lines "
                      "are modules, the thick line their median, stars the paper's values; the claim is a line "
                      "that falls as the rank grows."],
    "intruders": ["Per module, how many of the fine-tuned weight's top singular vectors match none of W0's "
                  "(intruder dimensions); the claim: LoRA's bars above zero, full fine-tuning's at or near zero."],
    "energy_rank": ["Per module, the rank full fine-tuning's ΔW needs for 90% of its energy (bar), the module's "
                    "min(out, in) and the rule's target (ticks); bars far above the typical LoRA rank (dashed) "
                    "support the claim."],
    "forgetting": ["One point per run: what it gained on the target task (up) against what it lost on its source "
                   "task (right); the claim is LoRA's points below and to the left of full fine-tuning's.",
                   "Each run's evaluations as a path from step 0: the source-task metric across, the target-task "
                   "metric up."],
}


def _finding(claim: Claim, verdict: str, measured: str, figures=(), tables=(), numbers=None) -> Finding:
    if verdict not in VERDICTS:
        raise ValueError(f"verdict={verdict!r} is not one of {', '.join(VERDICTS)}")
    figures = list(figures)
    readings = (READINGS.get(claim.key, []) + [""] * len(figures))[:len(figures)]
    return Finding(claim.key, claim.title, claim.claim, claim.paper, measured, verdict, rule_text(claim.rule),
                   rule_code(claim.rule), claim.needs if verdict == "not measurable" else "", figures,
                   list(tables), dict(numbers or {}), readings)


def not_measurable(claim: Claim, why: str) -> Finding:
    return _finding(claim, "not measurable", f"not measurable: {why}; needs {claim.needs}")


# ---- choosing the runs ----------------------------------------------------------------------------------

def _setting(run: runstore.Run) -> tuple:
    c = run.config
    return (c.get("model"), c.get("data"), c.get("steps"), c.get("pretrain_steps"), c.get("seq_len"))


def _lora_setting(run: runstore.Run) -> tuple:
    c = run.config
    targets = c.get("targets")
    return (bool(c.get("rslora")), tuple(targets) if isinstance(targets, list) else targets, c.get("init"))


def choose_runs(runs: Sequence[runstore.Run], model: str | None = None) -> list[runstore.Run]:
    """The completed runs of ``model`` (default: the newest completed run's) that share the newest one's data
    and training length; LoRA runs also share the newest LoRA run's scaling rule, targets and init. Newest
    first. ``ValueError`` when there is none."""
    done = sorted((r for r in runs if r.status == "completed"), key=lambda r: (r.created, r.id), reverse=True)
    if model is not None:
        models = sorted({r.model for r in done})
        done = [r for r in done if r.model == model]
        if not done:
            raise ValueError(f"model={model!r} has no completed run here: runs exist for "
                             f"{', '.join(models) or 'no model'}")
    if not done:
        raise ValueError("there is no completed run: run a sweep first (findings --run-preset)")
    setting = _setting(done[0])
    chosen = [r for r in done if _setting(r) == setting]
    loras = [r for r in chosen if r.method == "lora"]
    lora_setting = _lora_setting(loras[0]) if loras else None
    return [r for r in chosen if r.method != "lora" or _lora_setting(r) == lora_setting]


def _rank(run: runstore.Run) -> int:
    """A LoRA run's rank; 0 for full fine-tuning (its config keeps the unused default)."""
    return int(run.config.get("rank") or 0) if run.method == "lora" else 0


class Loaded:
    """The chosen runs' updates, each loaded once (``load`` defaults to :func:`runstore.load_updates`)."""

    def __init__(self, runs: Sequence[runstore.Run],
                 load: Callable[[runstore.Run], Mapping[str, ModuleUpdate]] | None = None) -> None:
        self.runs = list(runs)
        self._load = load or runstore.load_updates
        self._cache: dict[str, Mapping[str, ModuleUpdate]] = {}

    def updates(self, run: runstore.Run) -> Mapping[str, ModuleUpdate]:
        if run.id not in self._cache:
            self._cache[run.id] = self._load(run)
        return self._cache[run.id]

    def lora(self) -> list[runstore.Run]:
        return [r for r in self.runs if r.method == "lora"]

    def full(self) -> list[runstore.Run]:
        return [r for r in self.runs if r.method == "full"]

    def lora_modules(self) -> set[str]:
        return set().union(*(set(self.updates(r)) for r in self.lora())) if self.lora() else set()

    def has_w0(self, run: runstore.Run) -> bool:
        updates = self.updates(run)
        return bool(updates) and all(u.w0 is not None for u in updates.values())


def short_label(run: runstore.Run) -> str:
    """"full FT" or "r=8": how a run is named on the findings' charts."""
    return "full FT" if run.method == "full" else f"r={_rank(run)}"


# ---- ‖ΔW‖/‖W0‖: the regime the runs are in ---------------------------------------------------------------

def relative_norms(loaded: Loaded) -> pd.DataFrame:
    """One row per run: ‖ΔW‖_F/‖W0‖_F over the modules LoRA adapted (all recorded modules when there is no
    LoRA run), with the per-module median, for runs that hold W0."""
    modules = loaded.lora_modules()
    rows = []
    for run in loaded.runs:
        if not loaded.has_w0(run):
            continue
        updates = [u for n, u in loaded.updates(run).items() if not modules or n in modules]
        delta = [_delta_norm(u) for u in updates]
        base = [float(torch.linalg.vector_norm(u.w0.double())) for u in updates]
        per_module = [d / b for d, b in zip(delta, base) if b > 0]
        rows.append({"run": run.id, "name": run.name, "method": run.method, "rank": _rank(run) or pd.NA,
                     "seed": run.config.get("seed"),
                     "relative_norm": math.sqrt(sum(d * d for d in delta)) / math.sqrt(sum(b * b for b in base))
                     if sum(base) > 0 else math.nan,
                     "module_median": float(np.median(per_module)) if per_module else math.nan})
    frame = pd.DataFrame(rows, columns=["run", "name", "method", "rank", "seed", "relative_norm", "module_median"])
    return frame.astype({"rank": "Int64"})


def _delta_norm(update: ModuleUpdate) -> float:
    """‖ΔW‖_F: from the factored spectrum for LoRA (never the dense matrix), W_ft − W0 for full fine-tuning."""
    if update.kind == "lora":
        return float(torch.linalg.vector_norm(update_spectrum(update).S))
    return float(torch.linalg.vector_norm(update.w_ft.double() - update.w0.double()))


def norm_note(norms: pd.DataFrame) -> str:
    """What ‖ΔW‖/‖W0‖ says about the runs' regime, against the papers' ~0.1."""
    values = norms["relative_norm"].dropna() if len(norms) else pd.Series(dtype=float)
    if not len(values):
        return "‖ΔW‖/‖W0‖ is unknown: the runs hold no base weights W0."
    low, high = float(values.min()), float(values.max())
    text = f"‖ΔW‖_F/‖W0‖_F of these runs: {low:.2g}–{high:.2g} (the papers' fine-tunes: about {PAPER_RELATIVE_NORM:g})."
    if float(values.median()) > FAR_ABOVE * PAPER_RELATIVE_NORM:
        text += (" That is far above the papers' regime: the updates are a sizeable part of W0 itself, so claims "
                 "about small updates of a large model may not carry over. A smaller α or learning rate moves "
                 "runs toward it (the research preset does, as far as the task still learns).")
    return text


# ---- (1) φ between two ranks --------------------------------------------------------------------------

def _pick_pair(loras: list[runstore.Run]) -> tuple[runstore.Run, runstore.Run] | None:
    """(smaller, larger): r=8 and r=64 when present, else the largest rank and the rank ≥ 2 closest to 8
    (on a log scale) below it; both of the newest run's seed when that seed has two ranks."""
    seeds = [r.config.get("seed") for r in loras]
    for seed in list(dict.fromkeys(seeds)) + [None]:
        pool = [r for r in loras if seed is None or r.config.get("seed") == seed]
        by_rank = {}
        for r in pool:                           # newest first: keep the newest run of each rank
            by_rank.setdefault(_rank(r), r)
        ranks = sorted(by_rank)
        if len(ranks) < 2:
            continue
        hi = PAPER_RANKS[1] if PAPER_RANKS[1] in by_rank else ranks[-1]
        lower = [k for k in ranks if 2 <= k < hi]
        if not lower:
            continue
        lo = PAPER_RANKS[0] if PAPER_RANKS[0] in lower else min(lower, key=lambda k: abs(math.log(k / 8)))
        return by_rank[lo], by_rank[hi]
    return None


def phi_modules(small: Mapping[str, ModuleUpdate], large: Mapping[str, ModuleUpdate]) -> pd.DataFrame:
    """Per module shared by two LoRA updates: φ(1,1) between their A matrices' right-singular vectors, φ of
    directions 2..k of each (k the smaller rank) and its random baseline (k−1)/d."""
    rows = []
    for name in [n for n in small if n in large]:
        u1 = similarity.lora_a_subspace(small[name].lora_A)
        u2 = similarity.lora_a_subspace(large[name].lora_A)
        d, k = u1.shape[0], min(u1.shape[1], u2.shape[1])
        top = similarity.subspace_similarity(u1, u2, 1, 1)
        rest = similarity.subspace_similarity(u1[:, 1:k], u2[:, 1:k], k - 1, k - 1) if k >= 2 else math.nan
        rows.append({"module": name, "d": d, "k": k, "phi_top1": top, "phi_rest": rest,
                     "baseline_rest": (k - 1) / d if k >= 2 else math.nan, "baseline_top1": 1 / d})
    return pd.DataFrame(rows, columns=["module", "d", "k", "phi_top1", "phi_rest", "baseline_rest", "baseline_top1"])


def plot_phi_modules(frame: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    modules = [safe_label(m) for m in frame["module"]]
    fig.add_bar(x=modules, y=frame["phi_top1"], name="φ(1,1): top direction", marker_color=COLORS["lora"])
    fig.add_bar(x=modules, y=frame["phi_rest"], name="φ of directions 2..k", marker_color="#9ecae1")
    fig.add_scatter(x=modules, y=frame["baseline_rest"] + PHI_REST_MARGIN, mode="markers",
                    marker={"symbol": "line-ew-open", "size": 28, "color": COLORS["random"]},
                    name=f"random baseline + {PHI_REST_MARGIN:g} (the rule's ceiling for 2..k)")
    reference_line(fig, PHI_TOP, f"φ(1,1) > {PHI_TOP:g}: the paper's top-direction overlap",
                   line={"dash": "dash", "color": "#555"})
    fig.update_layout(barmode="group", yaxis={"title": "φ"}, xaxis={"title": "module"})
    bounded_axis(fig, "y", 0.0, 1.0)          # φ lives in [0, 1]: small values read as small
    return apply_style(fig, title)


def phi_finding(loaded: Loaded) -> Finding:
    claim = CLAIMS[0]
    pair = _pick_pair(loaded.lora())
    if pair is None:
        return not_measurable(claim, "fewer than two LoRA ranks (with the smaller ≥ 2) among the runs")
    lo, hi = pair
    frame = phi_modules(loaded.updates(lo), loaded.updates(hi))
    if not len(frame):
        return not_measurable(claim, f"runs r={_rank(lo)} and r={_rank(hi)} share no module")
    verdict = phi_verdict(frame["phi_top1"], frame["phi_rest"], frame["baseline_rest"])
    shared = int((frame["phi_top1"] > PHI_TOP).sum())
    measured = (f"r={_rank(lo)} vs r={_rank(hi)}: φ(1,1) {frame['phi_top1'].min():.2f}–{frame['phi_top1'].max():.2f} "
                f"(> {PHI_TOP:g} on {shared} of {len(frame)} modules); directions 2..k "
                f"{frame['phi_rest'].min():.2f}–{frame['phi_rest'].max():.2f} against random "
                f"≤ {frame['baseline_rest'].max():.2f}")
    from ..plots import analysis as plots
    first = frame.iloc[int(frame["phi_top1"].values.argmax())]["module"]
    heat = similarity.a_similarity(loaded.updates(lo)[first], loaded.updates(hi)[first])
    figures = [plot_phi_modules(frame, f"φ between A of r={_rank(lo)} and r={_rank(hi)}, per module"),
               plots.plot_similarity_heatmap(heat.phi, heat.d, title=f"φ(i, j): {first}",
                                             x_label=f"j (r={_rank(hi)})", y_label=f"i (r={_rank(lo)})")]
    return _finding(claim, verdict, measured, figures, [("φ per module", frame)],
                    {"ranks": [_rank(lo), _rank(hi)], "runs": [lo.id, hi.id], **frame.to_dict(orient="list")})


# ---- (2) amplification versus rank ----------------------------------------------------------------------

def amplification_by_rank(loaded: Loaded) -> pd.DataFrame:
    """One row per LoRA run (with W0) and module: rank, seed, module, amplification at the module's rank."""
    frames = []
    for run in loaded.lora():
        if not loaded.has_w0(run):
            continue
        amp = amplification.amplification_frame(loaded.updates(run))
        frames.append(amp.assign(rank=_rank(run), seed=run.config.get("seed"), run=run.id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["name", "amplification", "rank", "seed", "run"])


def plot_amplification_vs_rank(per_module: pd.DataFrame, summary: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    for i, (name, group) in enumerate(per_module.groupby("name", sort=False)):
        g = group.groupby("rank", as_index=False)["amplification"].mean()
        fig.add_scatter(x=g["rank"], y=g["amplification"], mode="lines", name=safe_label(name), opacity=0.45,
                        line={"color": SEQUENCE[i % len(SEQUENCE)], "width": 1})
    fig.add_scatter(x=summary["rank"], y=summary["amplification"], mode="lines+markers", name="median over modules",
                    line={"color": COLORS["lora"], "width": 3})
    fig.add_scatter(x=list(PAPER_AMPLIFICATION), y=list(PAPER_AMPLIFICATION.values()), mode="markers",
                    name="paper (GPT-3 W_q, Table 7)", marker={"symbol": "star", "size": 13, "color": COLORS["full"]})
    fig.update_layout(xaxis={"title": "LoRA rank r", "type": "log"},
                      yaxis={"title": "amplification ‖ΔW‖_F / ‖UᵀW0V‖_F", "type": "log"})
    return apply_style(fig, title)


def amplification_finding(loaded: Loaded) -> Finding:
    claim = CLAIMS[1]
    per_module = amplification_by_rank(loaded)
    per_module = per_module[np.isfinite(per_module["amplification"].astype(float))] if len(per_module) else per_module
    if not len(per_module) or per_module["rank"].nunique() < 2:
        return not_measurable(claim, "LoRA runs with base weights at fewer than two ranks")
    per_run = per_module.groupby(["rank", "seed", "run"], as_index=False)["amplification"].median()
    summary = per_run.groupby("rank", as_index=False)["amplification"].mean()
    verdict = amplification_verdict(summary["rank"], summary["amplification"])
    measured = "median over modules: " + " → ".join(f"{a:.3g} (r={int(r)})" for r, a in
                                                    zip(summary["rank"], summary["amplification"]))
    fig = plot_amplification_vs_rank(per_module, summary, "Amplification factor versus rank")
    return _finding(claim, verdict, measured, [fig], [("Amplification per rank (median over modules, mean "
                                                       "over seeds)", summary)],
                    {"ranks": summary["rank"].tolist(), "amplification": summary["amplification"].tolist()})


# ---- (3) intruder dimensions -------------------------------------------------------------------------------

def intruder_counts(loaded: Loaded, k: int = intruders.DEFAULT_K,
                    epsilon: float = intruders.DEFAULT_EPSILON) -> pd.DataFrame:
    """One row per run (low-rank LoRA, r ≤ 8, and full fine-tuning, with W0) and module LoRA adapted:
    label, method, rank, module, intruders among the top k."""
    modules = loaded.lora_modules()
    rows = []
    for run in [r for r in loaded.lora() if _rank(r) <= LOW_RANK] + loaded.full():
        if not loaded.has_w0(run):
            continue
        for name, u in loaded.updates(run).items():
            if modules and name not in modules:
                continue
            res = intruders.intruder_dimensions(u, min(k, *u.shape), epsilon)
            rows.append({"run": run.id, "label": short_label(run), "method": run.method, "rank": _rank(run) or None,
                         "module": name, "intruders": res.count})
    return pd.DataFrame(rows, columns=["run", "label", "method", "rank", "module", "intruders"])


def plot_intruders(counts: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    labels = list(dict.fromkeys(counts.sort_values(["method", "rank"], ascending=[False, True])["label"]))
    for i, label in enumerate(labels):
        g = counts[counts["label"] == label].groupby("module", as_index=False, sort=False)["intruders"].mean()
        full = label == "full FT"
        fig.add_bar(x=[safe_label(m) for m in g["module"]], y=g["intruders"], name=safe_label(label),
                    marker_color=COLORS["full"] if full else SEQUENCE[(i + 2) % len(SEQUENCE)])
    fig.update_layout(barmode="group", xaxis={"title": "module"},
                      yaxis={"title": f"intruders among the top {intruders.DEFAULT_K} (ε={intruders.DEFAULT_EPSILON:g})"})
    bounded_axis(fig, "y", 0, intruders.DEFAULT_K)     # a count of the top k: none at all still reads as 0 of k
    return apply_style(fig, title)


def intruders_finding(loaded: Loaded) -> Finding:
    claim = CLAIMS[2]
    counts = intruder_counts(loaded)
    lora, full = counts[counts["method"] == "lora"], counts[counts["method"] == "full"]
    if not len(lora) or not len(full):
        missing = "a LoRA run at r ≤ 8" if not len(lora) else "a full fine-tuning run"
        return not_measurable(claim, f"no {missing} with base weights")
    lora_rate, full_rate = float(lora["intruders"].mean()), float(full["intruders"].mean())
    verdict = intruders_verdict(lora_rate, full_rate)
    # per label (a rank, or full FT), summed over its runs (seeds): intruders of the top-k slots tested
    per_label = counts.sort_values(["method", "rank"], ascending=[False, True]).groupby("label", sort=False)
    parts = [f"{label} {int(g['intruders'].sum())} of {len(g) * intruders.DEFAULT_K}" for label, g in per_label]
    measured = f"per module: LoRA r≤{LOW_RANK} {lora_rate:.2f}, full FT {full_rate:.2f} (" + ", ".join(parts) + ")"
    return _finding(claim, verdict, measured, [plot_intruders(counts, "Intruder dimensions per module")],
                    [("Intruders per run and module", counts)],
                    {"lora_rate": lora_rate, "full_rate": full_rate})


# ---- (4) energy rank of full fine-tuning -----------------------------------------------------------------

def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return f"{low}" if low == high else f"{low}–{high}"


def plot_energy_ranks(frame: pd.DataFrame, lora_ranks: Sequence[int], title: str) -> go.Figure:
    """rank_90 per module (the mean over full fine-tuning runs), the module's min(out, in) and the rule's target."""
    frame = frame.groupby("name", as_index=False, sort=False).agg(
        rank_90=("rank_90", "mean"), dimension=("dimension", "first"), target=("target", "first"))
    fig = go.Figure()
    frame = frame.assign(name=[safe_label(n) for n in frame["name"]])
    fig.add_bar(x=frame["name"], y=frame["rank_90"], name="full FT: rank for 90% of Σσ²", marker_color=COLORS["full"])
    fig.add_scatter(x=frame["name"], y=frame["dimension"], mode="markers", name="min(out, in)",
                    marker={"symbol": "line-ew-open", "size": 28, "color": "#555"})
    fig.add_scatter(x=frame["name"], y=frame["target"], mode="markers", name="the rule's target",
                    marker={"symbol": "line-ew-open", "size": 28, "color": COLORS["random"]})
    reference_line(fig, TYPICAL_LORA_RANK, f"typical LoRA rank {TYPICAL_LORA_RANK}", line={"dash": "dash"})
    if lora_ranks:
        reference_line(fig, max(lora_ranks), f"largest LoRA rank here ({max(lora_ranks)})",
                       line={"dash": "dot", "color": COLORS["lora"]}, below=True)
    fig.update_layout(xaxis={"title": "module"}, yaxis={"title": "rank"})
    return apply_style(fig, title)


def energy_rank_finding(loaded: Loaded) -> Finding:
    claim = CLAIMS[3]
    fulls = [r for r in loaded.full() if loaded.has_w0(r)]
    if not fulls:
        return not_measurable(claim, "no full fine-tuning run with base weights")
    modules = loaded.lora_modules()
    frame = pd.concat([spectra_frame([u for n, u in loaded.updates(run).items() if not modules or n in modules])
                       .assign(run=run.id, seed=run.config.get("seed")) for run in fulls], ignore_index=True)
    frame = frame.assign(dimension=[min(o, i) for o, i in zip(frame["out_features"], frame["in_features"])])
    frame = frame.assign(target=[energy_rank_target(d) for d in frame["dimension"]])
    verdict = energy_rank_verdict(frame["rank_90"], frame["dimension"])
    measured = (f"rank_90 {_span(frame['rank_90'])} (median {float(frame['rank_90'].median()):g}) of min(out, in) "
                f"{_span(frame['dimension'])}; target {float(frame['target'].median()):g}")
    table = frame[["name", "seed", "out_features", "in_features", "rank_90", "rank_99", "effective_rank",
                   "dimension", "target"]]
    fig = plot_energy_ranks(frame, [_rank(r) for r in loaded.lora()],
                            "Rank holding 90% of full fine-tuning's ΔW energy")
    return _finding(claim, verdict, measured, [fig], [("Full fine-tuning ΔW: rank per module", table)],
                    {"rank_90": frame["rank_90"].tolist(), "dimension": frame["dimension"].tolist(),
                     "runs": [r.id for r in fulls]})


# ---- (5) learns less, forgets less --------------------------------------------------------------------------

HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False, "val_perplexity": False, "source_accuracy": True,
                    "source_embedding_cosine": True, "source_loss": False, "source_perplexity": False}
TARGET_METRICS = ("val_accuracy", "val_loss")
SOURCE_METRICS = ("source_accuracy", "source_embedding_cosine", "source_loss")


def _pick_metric(runs: Sequence[runstore.Run], choices: Sequence[str]) -> str | None:
    for m in choices:
        if runs and all(_finite(r.metrics.get(m)) and _finite(r.metrics.get(f"base_{m}")) for r in runs):
            return m
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gain(metric: str, before: float, after: float) -> float:
    """How much ``metric`` improved from ``before`` to ``after`` (positive: better), by its direction."""
    return (after - before) if HIGHER_IS_BETTER[metric] else (before - after)


def learning_forgetting(runs: Sequence[runstore.Run]) -> tuple[pd.DataFrame, str | None, str | None]:
    """(frame, target metric, source metric): one row per run with ``learned`` (target metric gained from step 0
    to the end) and ``forgot`` (source metric lost), both in the metric's own units."""
    target, source = _pick_metric(runs, TARGET_METRICS), _pick_metric(runs, SOURCE_METRICS)
    rows = []
    if target and source:
        for r in runs:
            m = r.metrics
            rows.append({"run": r.id, "label": short_label(r), "method": r.method, "rank": _rank(r) or None,
                         "seed": r.config.get("seed"), "learned": gain(target, m[f"base_{target}"], m[target]),
                         "forgot": -gain(source, m[f"base_{source}"], m[source]),
                         target: m[target], source: m[source]})
    return pd.DataFrame(rows), target, source


def plot_learning_forgetting(frame: pd.DataFrame, target: str, source: str, title: str) -> go.Figure:
    fig = go.Figure()
    for method, group in frame.groupby("method", sort=False):
        fig.add_scatter(x=group["forgot"], y=group["learned"], mode="markers+text",
                        text=[safe_label(lb) for lb in group["label"]],
                        textposition="top center", name="full fine-tuning" if method == "full" else "LoRA",
                        marker={"size": 11, "color": COLORS[method]})
    # runs that all gained (or lost) exactly the same get an explicit scale around that value, not plotly's ±1
    def flat_range(values):
        return fit_range(values, pad=0.25) if len(set(finite(values))) == 1 else None
    fig.update_layout(xaxis={"title": f"forgot: {source} lost on the source task (lower: forgets less)",
                             "range": flat_range(frame["forgot"])},
                      yaxis={"title": f"learned: {target} gained on the target task",
                             "range": flat_range(frame["learned"])})
    return apply_style(fig, title)


def plot_trajectories(runs: Sequence[runstore.Run], target: str, source: str, title: str) -> go.Figure:
    """Each run's evaluations as a path: source metric (x) against target metric (y), step 0 to the end."""
    fig = go.Figure()
    for i, run in enumerate(sorted(runs, key=lambda r: (r.method != "full", _rank(r)))):
        m = run.metrics_frame()
        if target not in m or source not in m:
            continue
        m = m.dropna(subset=[target, source])
        color = COLORS["full"] if run.method == "full" else SEQUENCE[i % len(SEQUENCE)]
        fig.add_scatter(x=m[source], y=m[target], mode="lines+markers", name=safe_label(f"{short_label(run)} · seed "
                                                                                    f"{run.config.get('seed')}"), line={"color": color}, text=m["step"],
                        hovertemplate="step %{text}<br>source %{x:.4g}<br>target %{y:.4g}")
    fig.update_layout(xaxis={"title": f"{source} (source task)"}, yaxis={"title": f"{target} (target task)"})
    return apply_style(fig, title)


def forgetting_finding(loaded: Loaded) -> Finding:
    claim = CLAIMS[4]
    frame, target, source = learning_forgetting(loaded.runs)
    if not loaded.lora() or not loaded.full():
        return not_measurable(claim, "LoRA and full fine-tuning runs are both needed")
    if source is None:
        return not_measurable(claim, "the runs were not evaluated on their source task (no source_* metrics)")
    lora, full = frame[frame["method"] == "lora"], frame[frame["method"] == "full"]
    full_learned, full_forgot = float(full["learned"].mean()), float(full["forgot"].mean())
    verdict = forgetting_verdict(lora["learned"], lora["forgot"], full_learned, full_forgot)
    measured = (f"{target} gained: LoRA {lora['learned'].min():.3g}–{lora['learned'].max():.3g}, full FT "
                f"{full_learned:.3g}; {source} lost: LoRA {lora['forgot'].min():.3g}–{lora['forgot'].max():.3g}, "
                f"full FT {full_forgot:.3g}")
    figures = [plot_learning_forgetting(frame, target, source, "Learns less, forgets less?"),
               plot_trajectories(loaded.runs, target, source, "Learning versus forgetting during training")]
    return _finding(claim, verdict, measured, figures, [("Learned and forgot per run", frame)],
                    {"target": target, "source": source, "full_learned": full_learned, "full_forgot": full_forgot,
                     "lora_learned": lora["learned"].tolist(), "lora_forgot": lora["forgot"].tolist()})


# ---- all of them ------------------------------------------------------------------------------------------------

FINDERS = (phi_finding, amplification_finding, intruders_finding, energy_rank_finding, forgetting_finding)


def findings(runs: Sequence[runstore.Run], model: str | None = None, *,
             load: Callable[[runstore.Run], Mapping[str, ModuleUpdate]] | None = None) -> Findings:
    """Every claim of :data:`CLAIMS` checked on the runs :func:`choose_runs` picks for ``model``. The SVDs run
    under the project's thread rule for that model (one thread for the small built-ins: their matrices are
    too small for a thread pool, and on a busy machine it costs seconds per SVD)."""
    from ..training.runtime import threads_scope

    chosen = choose_runs(runs, model)
    with threads_scope(chosen[0].model):
        loaded = Loaded(chosen, load)
        norms = relative_norms(loaded)
        return Findings(chosen[0].model, chosen, [find(loaded) for find in FINDERS], norms, norm_note(norms))


def intervention_runs(result: Findings) -> list[runstore.Run]:
    """The runs the report shows the intruder intervention of: the lowest-rank LoRA run and a full
    fine-tuning run."""
    loras = sorted((r for r in result.runs if r.method == "lora"), key=_rank)
    return loras[:1] + [r for r in result.runs if r.method == "full"][:1]


def findings_report_section(runs: Sequence[runstore.Run], model: str | None = None, *,
                            result: Findings | None = None, intervention: bool = True) -> list[Section]:
    """The findings as blocks of the HTML report: an overview table, then one section per claim (the claim,
    the verdict and its rule, the evidence charts and tables) and, with ``intervention``, the intruder
    intervention of the lowest-rank LoRA run and of full fine-tuning (this rebuilds their models). For a run
    set without a completed run, one section saying so. ``result``: findings already computed on these runs."""
    if result is None:
        try:
            result = findings(runs, model)
        except ValueError as exc:
            return [Section("Findings: published claims about LoRA", f"Not shown: {exc}")]
    overview = Section(f"Findings: published claims about LoRA, on {result.model}",
                       f"{len(result.runs)} runs. {result.note}",
                       tables=[("Claims", result.table()), ("‖ΔW‖/‖W0‖ per run", result.norms)])
    sections = [overview]
    for f in result.findings:
        text = f"{f.claim} Verdict: {f.verdict}. Measured: {f.measured}. Rule: {f.rule}"
        if f.needs:
            text += f" To measure it: {f.needs}."
        sections.append(Section(f"Finding: {f.title}", text, list(f.figures), list(f.tables)))
        if f.key == "intruders" and intervention and f.verdict != "not measurable":
            sections += [_intervention_section(run) for run in intervention_runs(result)]
    return sections


def _intervention_section(run: runstore.Run) -> Section:
    from .intervention import plot_intervention, run_intervention

    title = f"Intruder intervention: {short_label(run)} (seed {run.config.get('seed')})"
    try:
        frame = run_intervention(run)
    except ValueError as exc:
        return Section(title, f"Not shown: {exc}")
    return Section(title, "The run's intruders scaled by 1 … 0, the target and source metrics at each step "
                          "(Shuttleworth et al. 2024).", [plot_intervention(frame, short_label(run))],
                   [("Metrics per scaling factor", frame)])


# ---- the research preset: the sweep the claims need ------------------------------------------------------

PRESET_SEEDS = (0, 1)
PRESET_RANKS = [1, 2, 4, 8, 16, 32, 64]
# Per built-in model: the LoRA sweep and the full fine-tuning run share data and length; each has its own
# learning rate (a sweep shares one lr, so they are two sweeps per seed). α is fixed across ranks, as in Hu
# et al. (scaling α/r). The rates are the defaults' lowered until ‖ΔW‖/‖W0‖ came down from 1.7–3.3 (mlp-digits)
# and 0.7–1.1 (tiny-gpt) towards the papers' ~0.1 while the target task still learns; measured with the
# presets: mlp-digits 0.35–0.77 (the rotated digits are a large shift: lower, and LoRA at r=1 stops learning
# the task), tiny-gpt 0.09 (full fine-tuning) to 0.55 (LoRA r=1). "timing" is what the preset took here.
RESEARCH_PRESETS: dict[str, dict] = {
    "mlp-digits": {"common": {"steps": 600}, "lora": {"alphas": [16.0], "lr": 5e-4}, "full": {"lr": 2e-4},
                   "timing": "16 runs: 2.6 min on a shared 2-core CPU under heavy load (25 s of CPU time)"},
    "tiny-gpt": {"common": {"steps": 300}, "lora": {"alphas": [16.0], "lr": 5e-4}, "full": {"lr": 1e-4},
                 "timing": "16 runs: 39 min on a shared 2-core CPU (seed 0 under heavy load 26 min, seed 1 13 min; "
                           "1.2 to 7 min a run)"},
    "minilm": {"common": {"steps": 300}, "lora": {"alphas": [16.0], "lr": 1e-3}, "full": {"lr": 3e-5},
               "timing": "on a shared, heavily loaded 2-core CPU 8 s a step and 11 s an evaluation: about 40 min a "
                         "run, 11 h for the 16 runs (a GPU takes seconds a run; not timed here)"},
}


def preset_specs(model: str, seeds: Sequence[int] = PRESET_SEEDS, ranks: Sequence[int] | None = None) -> list[dict]:
    """The research preset of ``model`` as sweep specs (the fields of
    :class:`~lora_analysis.training.config.SweepSpec`), for :func:`lora_analysis.jobs.start_job` ("sweep")
    or :func:`lora_analysis.training.sweep_settings`: per seed, the LoRA sweep over ranks 1…64 and the full
    fine-tuning run."""
    if model not in RESEARCH_PRESETS:
        raise ValueError(f"model={model!r} has no research preset: choose one of {', '.join(RESEARCH_PRESETS)}")
    preset = RESEARCH_PRESETS[model]
    specs = []
    for seed in seeds:
        common = {"model": model, **preset["common"], "seed": int(seed)}
        specs.append({**common, "ranks": list(ranks or PRESET_RANKS), "full_ft": False, **preset["lora"]})
        specs.append({**common, "ranks": [], "full_ft": True, **preset["full"]})
    return specs


def preset_text(model: str) -> str:
    """The preset in one sentence, with how long it takes."""
    preset = RESEARCH_PRESETS[model]
    time_text = preset["timing"]
    return (f"{model}: LoRA at r={', '.join(map(str, PRESET_RANKS))} (α={preset['lora']['alphas'][0]:g}, "
            f"lr={preset['lora']['lr']:g}) and full fine-tuning (lr={preset['full']['lr']:g}), "
            f"{preset['common']['steps']} steps, seeds {', '.join(map(str, PRESET_SEEDS))}: {time_text}.")


def missing_runs(result: Findings | None, model: str) -> list[str]:
    """Keys of the claims not measurable on ``result`` (all of them when there are no runs): what the preset's
    sweep would make measurable."""
    if result is None:
        return [c.key for c in CLAIMS]
    return [f.key for f in result.findings if f.verdict == "not measurable"]
