"""User text in figures is text, never markup (issue 13, "escaping"): run names, module names and config
values enter plotly's titles, legends, hover templates, annotations, tick labels and table cells, all of
which render a subset of HTML (``<b>``, ``<a href>``, ``<br>``...). Every plot function, fed a run and a
module with hostile names, must leave no raw tag from them in the figure's JSON; and each run keeps one
colour on every chart (:func:`lora_analysis.plots.style.run_color`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from lora_analysis.plots import analysis as A
from lora_analysis.plots import params as P
from lora_analysis.plots import training as T
from lora_analysis.plots.checks import raw_markup, text_fields
from lora_analysis.plots.style import apply_style, reference_line, run_color, run_key, safe_label

RUN = '<img src=x onerror=alert(1)><a href="javascript:alert(1)">x</a>'
MODULE = "<script>alert(1)</script>"
RUN_ID = "20261130-120000-deadbeef"


def _spectra() -> pd.DataFrame:
    s = [4.0, 2.0, 1.0]
    return pd.DataFrame({"name": [f"blocks.0.{MODULE}", MODULE], "kind": "lora", "rank": 3.0, "out_features": 8,
                         "in_features": 8, "fro_norm": [5.0, 4.0], "effective_rank": [2.5, 2.4],
                         "stable_rank": [1.3, 1.2], "singular_values": [s, s],
                         "normalized_spectrum": [[1.0, 0.5, 0.25]] * 2})


def _runs() -> pd.DataFrame:
    rows = [{"id": f"{RUN_ID[:-1]}{i}", "name": RUN, "method": "lora", "status": "completed", "rank": r,
             "alpha": 16.0, "rslora": False, "targets": t, "val_accuracy": acc, "base_val_accuracy": 0.1,
             "trainable_params": 100 * r, "train_seconds": 0.2, "training_state_bytes": 2000 * r}
            for i, (r, acc, t) in enumerate(((1, 0.6, MODULE), (4, 0.9, "q_proj")))]
    rows.append({**rows[0], "id": RUN_ID, "method": "full", "rank": None, "alpha": None, "val_accuracy": 0.95,
                 "trainable_params": 5000})
    return pd.DataFrame(rows)


def _figures() -> dict[str, go.Figure]:
    spectra = _spectra()
    metrics = pd.DataFrame({"run_id": RUN_ID, "name": RUN, "method": "lora", "step": [0, 1, 2],
                            "train_loss": [None, 2.0, 1.0], "val_loss": [2.5, None, 1.5]})
    sweep = pd.DataFrame({"label": [RUN, f"{RUN} full"], "kind": ["lora", "full"],
                          "singular_values": [[1.0, 0.5], [1.0, 0.6, 0.3]], "rank_90": [2, 3]})
    amp = pd.DataFrame({"name": [MODULE], "r": [2], "proj_delta": [0.5], "proj_w0": [1.0], "proj_random": [0.1],
                        "w0_fro": [3.0], "delta_fro": [2.0], "amplification": [4.0]})
    intruders = pd.DataFrame({"label": RUN, "name": MODULE, "kind": "lora", "k": 4, "epsilon": [0.3, 0.6],
                              "intruders": [1, 2]})
    errors = pd.DataFrame({"setup": [MODULE] * 2, "variant": ["unmerged", "merged"], "max_abs": [0.0, 1e-3],
                           "max_abs_vs_fp32": [1e-4, 1e-3]})
    latency = pd.DataFrame({"device": [MODULE], "variant": ["base"], "median_ms": [1.0], "min_ms": [0.9],
                            "relative": [1.0]})
    overlap = pd.DataFrame({"k": [1, 2], "phi_output": [0.1, 0.2], "baseline_output": [0.01, 0.02],
                            "phi_input": [0.1, 0.3], "baseline_input": [0.01, 0.02]})
    norms = _runs().assign(delta_norm=[1.0, 2.0, 3.0])
    memory = pd.DataFrame({"full": [1e6, 1e6], "lora": [1e6, 1e3]}, index=[MODULE, "gradients"])
    table = pd.DataFrame({"rank": [1, 2], "trainable_params": [10, 20], "base_params": 100,
                          "trainable_percent": [9.0, 17.0]})
    return {
        "singular_values": A.plot_singular_values(spectra, title=f"spectra of {RUN}"),
        "cumulative_energy": A.plot_cumulative_energy(spectra),
        "rank_heatmap": A.plot_rank_heatmap(spectra),
        "rank_heatmap_bars": A.plot_rank_heatmap(spectra.assign(name=[MODULE, f"x.{MODULE}"])),
        "rank_sweep_spectra": A.plot_rank_sweep_spectra(sweep, title=f"Spectra: {MODULE}"),
        "similarity_heatmap": A.plot_similarity_heatmap(np.eye(2), d=8, title=f"φ: {MODULE}, {RUN}"),
        "amplification": A.plot_amplification(amp),
        "amplification_table": A.plot_amplification_table(amp),
        "intruders_vs_epsilon": A.plot_intruders_vs_epsilon(intruders, title=f"on {MODULE}"),
        "merge_errors": A.plot_merge_errors(errors),
        "latency": A.plot_latency(latency),
        "base_overlap": A.plot_base_overlap(overlap, title=f"ΔW vs W0: {MODULE}"),
        "loss_curves": T.plot_loss_curves(metrics, runs=_runs().assign(status="running", steps=10)),
        "loss_curves_val": T.plot_loss_curves(metrics, "val_loss"),
        "metric_vs_rank": T.plot_metric_vs_rank(_runs()),
        "metric_vs_alpha": T.plot_metric_vs_alpha(_runs()),
        "efficiency_frontier": T.plot_efficiency_frontier(_runs()),
        "cost_comparison": T.plot_cost_comparison(_runs()),
        "update_norm": T.plot_update_norm(norms, "rank"),
        "task_metrics": T.plot_task_metrics(pd.DataFrame({"variant": [RUN], "val_accuracy": [0.5]})),
        "spectra_history": T.plot_spectra_history(pd.DataFrame({"step": [0, 10, 0, 10], "module": [MODULE] * 2 + [
            f"x.{MODULE}"] * 2, "rank": 4, "effective_rank": [0.0, 2.5, 0.0, 1.5], "norm": [0.0, 1.0, 0.0, 2.0]})),
        "trainable_vs_rank": P.plot_trainable_vs_rank(table, title=RUN),
        "percent_vs_rank": P.plot_percent_vs_rank(table),
        "memory": P.plot_memory(memory),
        "lora_diagram": P.plot_lora_diagram(8, 8, 2),
    }


FIGURES = _figures()
NO_USER_TEXT = {"lora_diagram", "update_norm", "percent_vs_rank"}     # built from numbers only


def test_every_plot_function_is_fed_hostile_names():
    functions = sorted(n.removeprefix("plot_") for m in (A, T, P) for n in dir(m) if n.startswith("plot_"))
    assert [f for f in functions if not any(name.startswith(f) for name in FIGURES)] == []


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_no_raw_markup_from_user_text_survives(name):
    spec = json.loads(FIGURES[name].to_json())
    assert raw_markup(spec) == []
    # the hostile text is still there, as escaped text a reader sees literally
    texts = " ".join(text for _, text in text_fields(spec))
    assert ("&lt;" in texts) == (name not in NO_USER_TEXT), f"{name}: where is the run's or module's name?"


def test_the_check_finds_raw_markup():
    fig = go.Figure(go.Scatter(x=[1], y=[1], name=RUN))
    assert [p.split(":")[0] for p in raw_markup(fig)] == ["data[0].name"]
    fig = go.Figure(go.Scatter(x=[1], y=[1], hovertemplate=f"{MODULE}<br>%{{y}}"))
    assert len(raw_markup(fig)) == 1


def test_safe_label_escapes_markup_and_templates():
    assert safe_label(MODULE) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert safe_label("a & b") == "a &amp; b" and safe_label(3) == "3"
    assert safe_label("100%{y}") == "100%&#123;y}"       # a name cannot pull values into a hover template
    fig = apply_style(go.Figure(), f"title {MODULE}", subtitle=RUN)
    assert "<script" not in fig.layout.title.text and "<br><sup>" in fig.layout.title.text
    reference_line(fig, 2.0, f"full FT {MODULE}")
    assert fig.layout.annotations[0].text == "full FT &lt;script&gt;alert(1)&lt;/script&gt;"


def test_a_run_keeps_its_colour_on_every_chart():
    run_id = "20261130-122332-033063ac"
    label = "LoRA r=4 α=16 · 3063ac"                       # registry.run_label: name · last 6 of the id
    assert run_key(run_id) == run_key(label) == "3063ac" and run_key("full FT") == "full FT"
    color = run_color(run_id)
    assert color == run_color(label) and run_color(run_id, "full") == run_color(label, "full")
    assert run_color("20261130-122332-000000aa") != color or run_color("x") != color   # not one colour for all
    # the same run in the loss curves, the rank sweep spectra, the intruders chart and the cost bars
    metrics = pd.DataFrame({"run_id": run_id, "name": "LoRA r=4 α=16", "method": "lora", "step": [1, 2],
                            "train_loss": [2.0, 1.0]})
    other = metrics.assign(run_id="20261130-122332-999999ff", name="LoRA r=1 α=16")
    curves = T.plot_loss_curves(pd.concat([other, metrics]))
    sweep = A.plot_rank_sweep_spectra(pd.DataFrame({"label": [label], "kind": ["lora"],
                                                    "singular_values": [[1.0, 0.5]], "rank_90": [2]}))
    intr = A.plot_intruders_vs_epsilon(pd.DataFrame({"label": label, "name": "m", "kind": "lora", "k": 4,
                                                     "epsilon": [0.3, 0.6], "intruders": [1, 2]}))
    costs = T.plot_cost_comparison(pd.DataFrame({"id": [run_id], "name": ["LoRA r=4 α=16"], "method": ["lora"],
                                                 "train_seconds": [1.0]}))
    assert curves.data[1].line.color == sweep.data[0].line.color == intr.data[0].line.color == color
    assert list(costs.data[0].marker.color) == [color]
    assert curves.data[0].line.color != color or run_color(other["run_id"][0]) == color


# ---- within one figure, runs never share a colour (issue: Rank & alpha drew r=1 and r=16 in one colour) ---

def _clashing_ids(n: int = 2, kind: str | None = None) -> list[str]:
    """``n`` run ids whose preferred colours (:func:`run_color`, a hash) are the same (ids for full
    fine-tuning end differently, so they never are the LoRA ones)."""
    by_color: dict[str, list[str]] = {}
    for i in range(2000):
        run_id = f"20261130-122332-{i:06x}{'ef' if kind == 'full' else 'ab'}"
        by_color.setdefault(run_color(run_id, kind), []).append(run_id)
    return next(ids for ids in by_color.values() if len(ids) >= n)[:n]


def test_runs_in_one_figure_never_share_a_colour():
    from lora_analysis.plots.style import FULL_PALETTE, RUN_PALETTE, run_colors

    a, b = _clashing_ids()
    assert run_color(a) == run_color(b)                                   # their hashes clash
    colors = run_colors([b, a])
    assert colors[a] != colors[b]
    first = min((a, b), key=run_key)
    assert colors[first] == run_color(first)                              # the first (sorted) keeps its own
    assert run_colors([a, b]) == colors                                   # the drawing order does not matter
    # a run alone keeps its colour on every page; the same run by id and by label is one run
    label = f"LoRA r=1 α=16 · {a[-6:]}"
    assert run_colors([a, label]) == {a: run_color(a), label: run_color(a)}
    # a palette's worth of runs: every colour used once; full fine-tuning from the oranges only
    many = [f"20261130-122332-{i:06x}cd" for i in range(len(RUN_PALETTE))]
    assert sorted(run_colors(many).values()) == sorted(RUN_PALETTE)
    fulls = _clashing_ids(3, "full")
    got = run_colors(fulls + many[:2], ["full"] * 3 + [None] * 2)
    assert len({got[f] for f in fulls}) == 3 and {got[f] for f in fulls} <= set(FULL_PALETTE)
    assert not {got[m] for m in many[:2]} & set(FULL_PALETTE)
    # more runs than colours: no error, the palette is reused
    assert set(run_colors([f"run {i}" for i in range(30)]).values()) == set(RUN_PALETTE)
    with pytest.raises(ValueError, match="one kind per key"):
        run_colors([a, b], ["lora"])


def test_every_chart_gives_clashing_runs_distinct_colours():
    (r1, r16), (f1, f2) = _clashing_ids(), _clashing_ids(2, "full")
    runs = pd.DataFrame([{"id": i, "name": n, "method": m, "status": "completed", "rank": r, "alpha": a,
                          "rslora": False, "targets": "all-linear", "val_accuracy": acc, "trainable_params": 100,
                          "train_seconds": 1.0, "training_state_bytes": 2000, "delta_norm": 0.1 * acc}
                         for i, n, m, r, a, acc in ((r1, "LoRA r=1", "lora", 1, 16.0, 0.6),
                                                    (r16, "LoRA r=16", "lora", 16, 16.0, 0.8),
                                                    (f1, "full FT", "full", None, None, 0.9),
                                                    (f2, "full FT", "full", None, None, 0.91))])
    metrics = pd.concat([pd.DataFrame({"run_id": i, "name": n, "method": m, "step": [1, 2], "train_loss": [2.0, 1.0]})
                         for i, n, m in zip(runs["id"], runs["name"], runs["method"])])
    sweep = pd.DataFrame({"run_id": list(runs["id"]), "label": list(runs["name"]), "kind": list(runs["method"]),
                          "singular_values": [[1.0, 0.5]] * 4, "rank_90": [1, 2, 2, 2]})
    intr = pd.DataFrame([{"label": f"{n} · {i[-6:]}", "name": "m", "kind": m, "k": 4, "epsilon": e, "intruders": 1}
                         for i, n, m in zip(runs["id"], runs["name"], runs["method"]) for e in (0.3, 0.6)])
    lines = {"loss curves": T.plot_loss_curves(metrics), "rank sweep": A.plot_rank_sweep_spectra(sweep),
             "intruders": A.plot_intruders_vs_epsilon(intr)}
    for name, fig in lines.items():
        colors = [t.line.color for t in fig.data if t.mode != "lines" or "planned" not in str(t.name)]
        assert len(colors) == 4 and len(set(colors)) == 4, (name, colors)
    by_rank = T.plot_metric_vs_alpha(runs)                                # one line per rank: r=1, r=16
    norms = T.plot_update_norm(runs, "alpha")
    for fig in (by_rank, norms):
        colors = [t.line.color for t in fig.data]
        assert len(colors) == 2 and colors[0] != colors[1]
    costs = T.plot_cost_comparison(runs)
    assert len(set(costs.data[0].marker.color)) == 4
