"""Answers computed from the data: constructed runs whose answer is known, the rank advice that keeps the
trained scaling, intruders compared like with like, timing verdicts only beyond the spread, target sets
that share no module, and copies of a run counted once."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lora_analysis.analysis import answers, registry
from lora_analysis.analysis.answers import (intruders_answer, intruders_per_run, merge_answer, rank_answer,
                                            relative_norm_note, similarity_answer, sweep_answer, timing_verdict)
from lora_analysis.analysis.merge_check import latency_verdicts
from lora_analysis.analysis.rank_advice import peft_config_from_advice, rank_advice, scaling_change
from lora_analysis.analysis.registry import Inputs
from lora_analysis.analysis.spectra import relative_norm_total, spectra_frame
from lora_analysis.lora.layer import compute_scaling
from lora_analysis.report import render_report
from lora_analysis.run_report import report_sections
from lora_analysis.weights import ModuleUpdate


def _runs(accuracies: dict, full: float | None = 0.99, metric: str = "val_accuracy") -> pd.DataFrame:
    rows = [{"method": "lora", "rank": r, "alpha": 16, "rslora": False, "status": "completed", metric: a,
             "trainable_params": 160 * r} for r, a in accuracies.items()]
    if full is not None:
        rows.append({"method": "full", "rank": None, "alpha": None, "rslora": None, "status": "completed",
                     metric: full, "trainable_params": 100_000})
    return pd.DataFrame(rows)


# ---- which rank ------------------------------------------------------------------------------------------

def test_rank_answer_finds_the_rank_after_which_gains_stop():
    runs = _runs({1: 0.80, 2: 0.90, 4: 0.95, 8: 0.975, 16: 0.978, 32: 0.979})
    found = rank_answer(runs, "val_accuracy")
    # rank 8 is the smallest that no larger rank beats by 0.5 points: 97.5% / 99% = 98%, 1280 / 100000 = 1.3%
    assert found.answer.startswith("Rank 8 reaches validation accuracy 97.5% (98% of full fine-tuning's accuracy "
                                   "(99.0%), with 1.3% of its trainable parameters)")
    assert "ranks above 8 (16, 32) add less than 0.5 points" in found.answer
    assert "0.5 points" in found.rule and "1, 2, 4, 8, 16, 32" in found.rule
    # a failed run does not count; a run still improving at the top rank is said so
    runs = pd.concat([_runs({1: 0.80, 2: 0.90, 4: 0.95}), pd.DataFrame([{"method": "lora", "rank": 64,
                      "alpha": 16, "rslora": False, "status": "failed", "val_accuracy": 1.0}])])
    top = rank_answer(runs, "val_accuracy")
    assert top.answer.startswith("Rank 4 reaches") and "largest rank trained and rank 2 is 5.0 points worse" in top.answer


def test_rank_answer_for_a_loss_lower_is_better_and_seeds_are_averaged():
    runs = _runs({2: 2.0, 4: 1.5, 8: 1.49, 16: 1.488}, full=1.4, metric="val_loss")
    runs = pd.concat([runs, _runs({4: 1.7}, full=None, metric="val_loss")])      # a second seed of rank 4
    found = rank_answer(runs, "val_loss")
    # rank 4 averages 1.6; rank 8 improves on it by 0.11 > 1% of 1.488: rank 8
    assert found.answer.startswith("Rank 8 reaches validation loss 1.49 (full fine-tuning: 1.4")
    assert "mean over seeds" in found.rule
    assert rank_answer(_runs({4: 0.9}, full=None), "val_accuracy").answer.endswith(
        "Only rank 4 was trained: train other ranks to see what rank changes.")
    with pytest.raises(ValueError, match="metric='f1' is not allowed"):
        rank_answer(runs, "f1")


def test_rank_answer_compares_ranks_at_one_alpha():
    runs = _runs({1: 0.8, 4: 0.9, 8: 0.95}, full=None)
    other = pd.DataFrame([{"method": "lora", "rank": 2, "alpha": 64, "rslora": False, "status": "completed",
                           "val_accuracy": 0.99, "trainable_params": 320}])
    found = rank_answer(pd.concat([runs, other]), "val_accuracy")
    assert "α=16 with α/r" in found.rule and found.answer.startswith("Rank 8")   # the α=64 run is not a rank point


def _lora(name: str, rank: int, alpha: float, seed: int, shape=(12, 8), w0: bool = True, rslora: bool = False):
    g = torch.Generator().manual_seed(seed)
    o, i = shape
    return ModuleUpdate(name, w0=torch.randn(o, i, generator=g) if w0 else None,
                        lora_A=torch.randn(rank, i, generator=g), lora_B=torch.randn(o, rank, generator=g),
                        scaling=compute_scaling(rank, alpha, rslora))


def test_rank_advice_keeps_the_trained_scaling():
    # an r=1, α=16 run (scaling 16) and an r=4, α=16 module (scaling 4): the advice's config must give every
    # module its trained scaling back, whatever rank it advises
    updates = {"l.0.q": _lora("l.0.q", 1, 16, 0), "l.0.v": _lora("l.0.v", 4, 16, 1)}
    res = registry.get("rank_advice").run(Inputs.from_updates({"run": updates}))
    assert res.params["alpha_mode"] == "trained"
    change = scaling_change(res.value.config, {n: u.scaling for n, u in updates.items()})
    assert np.allclose(change["factor"], 1.0) and set(change["name"]) == set(updates)
    assert "keeps every module's trained scaling" in res.text and res.code.startswith("# The config keeps")
    # rsLoRA: α' = s·√k reproduces s as well
    advice = rank_advice(updates)
    config = peft_config_from_advice(advice, alpha_mode="trained", use_rslora=True,
                                     scalings={n: u.scaling for n, u in updates.items()})
    assert np.allclose(scaling_change(config, {n: u.scaling for n, u in updates.items()})["factor"], 1.0)
    # the old rule (α = 2·r) changes the scaling: the advice says by how much and why
    ratio = registry.get("rank_advice").run(Inputs.from_updates({"run": updates}), alpha_mode="ratio")
    assert "changes the scaling" in ratio.text and "alpha mode 'ratio'" in ratio.text
    assert ratio.value.config["lora_alpha"] == 2.0 * ratio.value.config["r"]
    with pytest.raises(ValueError, match="needs the trained scaling of every module"):
        peft_config_from_advice(advice, alpha_mode="trained", scalings={})


# ---- what LoRA learned -------------------------------------------------------------------------------------

def test_relative_norm_per_module_and_in_total():
    w0 = torch.eye(8) * 2.0                                   # ‖W0‖_F = 2·√8
    lora = ModuleUpdate("m", w0=w0, lora_A=torch.ones(1, 8), lora_B=torch.ones(8, 1) * 0.1, scaling=1.0)
    frame = spectra_frame([lora, ModuleUpdate("n", w0=w0, w_ft=w0 * 1.05)])
    expected_m = float(torch.linalg.norm(0.1 * torch.ones(8, 8)) / torch.linalg.norm(w0))   # 0.8/5.66 = 0.141
    assert frame.loc[0, "relative_norm"] == pytest.approx(expected_m)
    assert frame.loc[1, "relative_norm"] == pytest.approx(0.05)
    total = np.sqrt(0.8 ** 2 + (0.05 * np.sqrt(32)) ** 2) / np.sqrt(2 * 32)
    assert relative_norm_total(frame) == pytest.approx(total)
    assert np.isnan(spectra_frame([_lora("x", 2, 2, 0, w0=False)]).loc[0, "relative_norm"])
    assert "far above" not in relative_norm_note(0.1) and "far above the ~0.1" in relative_norm_note(0.9)
    assert relative_norm_note(float("nan")) == ""


def test_sweep_answer_measures_instead_of_assuming():
    sweep = pd.DataFrame({"kind": ["lora"] * 3 + ["full"], "rank": [2, 8, 16, None], "rank_90": [2, 5, 7, 10]})
    low = sweep_answer(sweep, "fc1", 128)
    assert low.answer == ("Full fine-tuning needs 10 of 128 directions for 90% of its ΔW energy in fc1, which fits "
                          "within LoRA rank 16 (ranks compared: 2, 8, 16): here full fine-tuning's update is low rank.")
    high = sweep_answer(sweep.assign(rank_90=[2, 5, 7, 40]), "fc1", 128)
    assert ("more than the largest LoRA rank compared (16), so a LoRA of the ranks compared (2, 8, 16) cannot hold "
            "that update.") in high.answer
    assert sweep_answer(sweep[sweep["kind"] == "lora"], "fc1").answer == ""


def test_similarity_answer_counts_shared_top_directions():
    summary = pd.DataFrame({"phi_top1": [0.9, 0.2, 0.7], "phi_mean": [0.5, 0.3, 0.4],
                            "baseline_mean": [0.05, 0.05, 0.05]})
    found = similarity_answer(summary, "r=64", "r=8")
    assert found.answer.startswith("r=64 and r=8 share their top direction (φ(1,1) > 0.5) in 2 of 3 modules")
    assert found.answer.endswith("more than chance.")
    assert similarity_answer(summary.assign(phi_mean=0.06), "a", "b").answer.endswith("no more than chance.")


def test_intruders_are_compared_on_the_modules_both_runs_have():
    # LoRA adapts 6 modules (2 intruders each); full fine-tuning 18 (1 intruder in each of the 12 others)
    lora = [{"label": "lora", "name": f"m{i}", "kind": "lora", "intruders": 2} for i in range(6)]
    full = [{"label": "full", "name": f"m{i}", "kind": "full", "intruders": 0 if i < 6 else 1} for i in range(18)]
    modules = pd.DataFrame(lora + full)
    table, shared = intruders_per_run(modules)
    assert shared == [f"m{i}" for i in range(6)]
    assert table.set_index("label")[["compared", "intruders", "all_modules_intruders"]].to_dict("index") == {
        "lora": {"compared": 6, "intruders": 12, "all_modules_intruders": 12},
        "full": {"compared": 6, "intruders": 0, "all_modules_intruders": 12}}
    found = intruders_answer(modules, 10, 0.5)
    assert found.answer == ("On the 6 modules all runs adapt (1 run also adapt others, left out), intruders at "
                            "k=10, ε=0.5: lora: 12 (2 per module); full: 0 (0 per module).")


def test_the_registry_intruder_chart_and_table_compare_like_with_like():
    lora = {n: _lora(n, 2, 4, s) for s, n in enumerate(["a", "b"])}
    full = {n: ModuleUpdate(n, w0=u.w0, w_ft=u.w0 + 0.01) for n, u in lora.items()}
    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(12, 8, generator=g)
    full["c"] = ModuleUpdate("c", w0=w0, w_ft=w0 + 0.01)
    res = registry.get("intruders").run(Inputs.from_updates({"lora": lora, "full": full}))
    (caption, per_run), _ = res.tables
    assert list(per_run["modules compared"]) == [2, 2] and list(per_run["modules adapted"]) == [2, 3]
    assert "on the 2 modules all runs adapt" in res.figures[0].layout.title.text
    # the chart's totals are over the shared modules only
    shown = {tr.name: tr.y for tr in res.figures[0].data}
    at = res.value.sweep[res.value.sweep["name"].isin(["a", "b"])]
    for label, y in shown.items():
        assert list(y) == list(at[at["label"] == label].groupby("epsilon")["intruders"].sum())
    assert res.question == registry.QUESTIONS["learned"] and len(res.readings) == len(res.figures)


# ---- is the merged model the same -------------------------------------------------------------------------

def test_timing_verdict_only_beyond_the_spread():
    base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    same = [0.96, 1.01, 0.99, 1.04, 0.97, 1.00, 0.95]        # median 0.99: 0.99× but the spreads overlap
    measurable, text = timing_verdict(same, base, "merged", "base")
    assert not measurable and "no measurable difference" in text
    slow = [1.30, 1.32, 1.28, 1.31, 1.29]
    measurable, text = timing_verdict(slow, base, "unmerged", "base")
    assert measurable and text.startswith("unmerged is slower than base: 1.3× its time")
    measurable, text = timing_verdict(base, slow, "merged", "unmerged")
    assert measurable and "faster" in text
    with pytest.raises(ValueError, match="no timings"):
        timing_verdict([], base)


def _latency(base, merged):
    rows = []
    for variant, ts in (("base", base), ("merged", merged)):
        stats = answers.timing_stats(ts)
        rows.append({"device": "cpu", "variant": variant, **stats, "min_ms": min(ts), "repeats": len(ts),
                     "number": 1, "relative": stats["median_ms"] / float(np.median(base))})
    return pd.DataFrame(rows)


def _errors(bf16_merged: float, bf16_own: float, fp32_close: bool = True) -> pd.DataFrame:
    rows = []
    for variant in ("unmerged", "merged", "merge_and_unload"):
        rows.append({"dtype": "float32", "adapter_dtype": "float32", "setup": "float32 · float32 LoRA",
                     "variant": variant, "max_abs": 0.0 if variant == "unmerged" else 2e-7, "max_rel": 0.0,
                     "allclose": fp32_close, "tol_ratio": 0.002, "max_abs_vs_fp32": 0.0, "max_rel_vs_fp32": 0.0,
                     "allclose_vs_fp32": True})
        rows.append({"dtype": "bfloat16", "adapter_dtype": "float32", "setup": "bfloat16 · float32 LoRA",
                     "variant": variant, "max_abs": 0.0 if variant == "unmerged" else bf16_merged, "max_rel": 0.0,
                     "allclose": variant == "unmerged", "tol_ratio": 30.0,
                     "max_abs_vs_fp32": bf16_own if variant == "unmerged" else bf16_merged + bf16_own,
                     "max_rel_vs_fp32": 0.0, "allclose_vs_fp32": False})
    return pd.DataFrame(rows)


def test_merge_answer_from_constructed_errors_and_timings():
    found = merge_answer(_errors(0.004, 0.01), _latency([1.0, 1.02, 0.98, 1.01], [0.95, 1.0, 1.03, 0.97]))
    assert found.answer.startswith("Yes in float32: merged outputs match the unmerged ones within PEFT's tolerance")
    assert "In bfloat16 (float32 factors) merging moves outputs by 0.004, within the rounding bound 0.02 (twice " \
           "the 0.01 that bfloat16 itself causes)." in found.answer
    assert "the merged model and the base model: no measurable difference" in found.answer
    assert "0.95" not in found.answer                          # no ratio stated inside the noise
    worse = merge_answer(_errors(0.05, 0.01, fp32_close=False), _latency([1.0, 1.01, 0.99], [2.0, 2.1, 1.9]),
                         {"float16": "RuntimeError: not on this CPU"})
    assert worse.answer.startswith("No in float32")
    assert "by 0.05, 2.5× the rounding bound 0.02 (twice the 0.01 that bfloat16 itself causes): the merge adds " \
           "rounding of its own" in worse.answer
    assert "the merged model is slower than the base model: 2× its time" in worse.answer
    assert "float16 could not run here (RuntimeError: not on this CPU)." in worse.answer
    verdicts = latency_verdicts(_latency([1.0, 1.01, 0.99], [2.0, 2.1, 1.9]))
    assert verdicts[["variant", "measurable"]].to_dict("records") == [{"variant": "merged", "measurable": True}]


# ---- target sets, copies, and the report ------------------------------------------------------------------

def _adapter(names, rank, seed):
    return {n: _lora(n, rank, 2 * rank, seed + i) for i, n in enumerate(names)}


def test_runs_on_disjoint_target_sets_are_compared_where_they_can_be():
    inputs = Inputs.from_updates({"fc1 r4": _adapter(["l.0.fc1", "l.1.fc1"], 4, 0),
                                  "fc2 r8": _adapter(["l.0.fc2", "l.1.fc2"], 8, 10),
                                  "fc1 r2": _adapter(["l.0.fc1", "l.1.fc1"], 2, 20)})
    sim = registry.get("similarity")
    # the highest rank (fc2 r8) shares no module with anyone: the pair that shares modules is chosen
    assert sim.resolve(inputs)["first"] == "fc1 r4"
    assert sim.resolve(inputs)["second"] == "fc1 r2"
    sweep = registry.get("spectra_sweep").run(inputs)
    assert set(sweep.value["label"]) == {"fc1 r4", "fc1 r2"} and "fc2 r8" in sweep.text
    # no pair shares a module: the analysis is skipped with its reason, the report is still written
    disjoint = Inputs.from_updates({"fc1": _adapter(["l.0.fc1"], 2, 0), "fc2": _adapter(["l.0.fc2"], 2, 1)})
    assert "no two of the chosen runs adapt a module in common" in sim.skip_reason(disjoint)
    sections = report_sections(disjoint)
    by_title = {s.title: s for s in sections}
    assert by_title["Subspace similarity φ"].text.startswith("Not shown: no two of the chosen runs adapt")
    assert by_title["Intruder dimensions"].answer.startswith("The runs share no module; per module")
    page = render_report("target sets", sections)
    assert "Not shown, and why" in page and "no two of the chosen runs adapt a module in common" in page


def test_a_run_imported_again_is_counted_once(monkeypatch):
    from lora_analysis import runstore

    monkeypatch.delattr(runstore, "unique_runs", raising=False)      # the registry's own rule
    first = SimpleNamespace(id="20261130-aaaaaa", name="LoRA r=4", origin="20261130-aaaaaa")
    copy = SimpleNamespace(id="20261130-bbbbbb", name="LoRA r=4", origin="20261130-aaaaaa")
    other = SimpleNamespace(id="20261130-cccccc", name="LoRA r=8", origin=None)
    assert registry.unique_runs([first, copy, other]) == [first, other]
    inputs = Inputs.from_runs([first, copy, other])
    assert inputs.labels == ["LoRA r=4 · aaaaaa", "LoRA r=8 · cccccc"]
    assert inputs.duplicates == ["LoRA r=4 · bbbbbb"]


def test_every_answering_entry_names_its_question_and_report_opens_with_the_answers():
    named = {a.name: a.answers for a in registry.ANALYSES if a.answers}
    assert named == {"rank_alpha": "rank", "spectra_sweep": "learned", "spectra": "learned", "rank_advice": "rank",
                     "similarity": "learned", "amplification": "learned", "intruders": "learned", "merge": "merge"}
    inputs = Inputs.from_updates({"r4": _adapter(["a", "b"], 4, 0), "r2": _adapter(["a", "b"], 2, 5)})
    sections = report_sections(inputs)
    page = render_report("answers", sections)
    takeaways = page.index("id='takeaways'")
    first_section = page.index("id='sec-0'")
    assert takeaways < first_section
    assert page.index(registry.QUESTIONS["learned"]) < first_section
    answered = [s for s in sections if s.answer]
    assert len(answered) >= 5 and all(s.rule for s in answered)
    for s in answered:            # each answer is in the takeaways, escaped as the rest
        import html
        assert html.escape(s.answer) in page[takeaways:first_section]


def test_spectra_answer_counts_directions_and_calls_tiny_spreads_negligible():
    frame = pd.DataFrame({"name": ["a", "b", "c"], "kind": ["full"] * 3, "rank": [None] * 3,
                          "out_features": [128] * 3, "in_features": [128] * 3, "fro_norm": [1.0, 2.0, 0.0],
                          "rank_90": [10, 12, 0], "effective_rank": [7.90, 7.95, 0.0],
                          "w0_norm": [2.0, 2.0, 2.0], "relative_norm": [0.5, 1.0, 0.0]})
    found = answers.spectra_answer(frame, "full FT")
    assert found.answer.startswith("In full FT, 90% of full fine-tuning's ΔW energy lies in 11 directions per "
                                   "module (median over 2 modules; range 10–12) out of 128 available.")
    assert "‖ΔW‖/‖W0‖ = 0.65 over all modules" in found.answer and "far above the ~0.1" in found.answer
    assert "differ by less than 1% (7.9–7.95): differences between them are negligible" in found.answer
    assert found.answer.endswith("1 module did not change.")
    spread = answers.spectra_answer(frame.assign(effective_rank=[3.0, 7.0, 0.0]), "x").answer
    assert "negligible" not in spread


def test_scope_note_says_when_only_the_newest_sweep_is_shown():
    from lora_analysis.run_report import scope_note

    def run(i, sweep):
        return SimpleNamespace(id=f"r{i}", sweep_id=sweep, status="completed")

    newest = [run(1, "s2"), run(2, "s2")]
    older = [run(3, "s1"), SimpleNamespace(id="r4", sweep_id="s1", status="failed")]
    assert scope_note(newest, newest + older) == ("Only the newest sweep (2 runs, sweep s2) is shown; 1 other "
                                                  "completed run in the store is not.")
    assert scope_note(newest + older[:1], newest + older) == ""
