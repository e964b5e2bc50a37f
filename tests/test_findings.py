"""Findings: each verdict rule on constructed inputs whose answer is known (planted shared directions for φ,
planted intruders, planted spectra, planted learning and forgetting), the whole check on constructed runs,
the research preset's sweeps, the intruder intervention on a tiny constructed case, and the CLI on a small
sweep of mlp-digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_analysis import runstore
from lora_analysis.analysis import findings as F
from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intervention import intervention, intruder_directions, plot_intervention
from lora_analysis.weights import ModuleUpdate

OUT, IN = 80, 96


@pytest.fixture(autouse=True)
def _one_thread():
    """The project's thread rule for the toy built-ins, which every model and matrix here is."""
    from lora_analysis.training.runtime import threads_scope

    with threads_scope("mlp-digits"):
        yield


# ---- the rules on plain numbers ---------------------------------------------------------------------------

def test_phi_rule():
    assert F.phi_verdict([0.9, 0.8, 0.7], [0.1, 0.12, 0.3], [0.07] * 3) == "reproduced"        # 2 of 3 both
    assert F.phi_verdict([0.9, 0.1, 0.1], [0.6, 0.6, 0.6], [0.07] * 3) == "partly"             # top on one
    assert F.phi_verdict([0.1, 0.1], [0.1, 0.2], [0.07, 0.07]) == "partly"                     # rest only
    assert F.phi_verdict([0.1, 0.2], [0.6, 0.5], [0.07, 0.07]) == "not reproduced"
    assert F.phi_verdict([0.51], [0.27], [0.07]) == "reproduced" and F.phi_verdict([0.5], [0.1], [0.07]) == "partly"
    assert F.phi_verdict([], [], []) == "not measurable"


def test_amplification_rule():
    assert F.amplification_verdict([4, 64, 16], [21.5, 2.0, 6.0]) == "reproduced"    # order of ranks is not trusted
    assert F.amplification_verdict([1, 8, 64], [10, 10.4, 4]) == "reproduced"       # a rise within 5% is flat
    assert F.amplification_verdict([1, 8, 64], [10, 12, 6]) == "partly"             # falls, not steadily
    assert F.amplification_verdict([1, 8, 64], [10, 9, 8]) == "partly"              # steady, not by 2×
    assert F.amplification_verdict([1, 8, 64], [2, 3, 5]) == "not reproduced"
    assert F.amplification_verdict([8], [3.0]) == "not measurable"
    assert F.amplification_verdict([4, 8], [math.inf, 2.0]) == "not measurable"     # an infinite factor is dropped


def test_intruders_rule():
    assert F.intruders_verdict(2.0, 0.0) == "reproduced"
    assert F.intruders_verdict(2.0, 0.5) == "reproduced"          # exactly a quarter: almost none
    assert F.intruders_verdict(2.0, 0.9) == "partly"
    assert F.intruders_verdict(0.4, 0.0) == "partly"              # below 0.5 per module: not "has them"
    assert F.intruders_verdict(0.5, 0.5) == "not reproduced"
    assert F.intruders_verdict(math.nan, 0.0) == "not measurable"


def test_energy_rank_rule():
    assert F.energy_rank_target(4096) == 160 and F.energy_rank_target(128) == 64
    assert F.energy_rank_verdict([200, 170, 2000], [4096] * 3) == "reproduced"
    assert F.energy_rank_verdict([64, 70, 10], [128] * 3) == "reproduced"       # median 64 = half of 128
    assert F.energy_rank_verdict([40, 30, 20], [128] * 3) == "partly"
    assert F.energy_rank_verdict([16, 10, 60], [128] * 3) == "not reproduced"   # median 16: a typical LoRA holds it
    assert F.energy_rank_verdict([], []) == "not measurable"


def test_forgetting_rule():
    assert F.forgetting_verdict([0.7, 0.8, 0.85], [0.05, 0.1, 0.2], 0.9, 0.4) == "reproduced"
    assert F.forgetting_verdict([0.95, 0.95], [0.05, 0.1], 0.9, 0.4) == "partly"      # forgets less, learns more
    assert F.forgetting_verdict([0.7, 0.8], [0.5, 0.6], 0.9, 0.4) == "partly"         # learns less, forgets more
    assert F.forgetting_verdict([0.95, 0.99], [0.5, 0.6], 0.9, 0.4) == "not reproduced"
    assert F.forgetting_verdict([], [], 0.9, 0.4) == "not measurable"
    assert F.gain("val_accuracy", 0.1, 0.9) == pytest.approx(0.8) and F.gain("source_loss", 0.1, 0.9) == pytest.approx(-0.8)


def test_every_rule_is_shown_as_text_and_code():
    for claim in F.CLAIMS:
        assert F.rule_text(claim.rule).startswith(("One", "Per", "Intruders")) and "\n" not in F.rule_text(claim.rule)
        assert F.rule_code(claim.rule).startswith(f"def {claim.rule.__name__}(")


# ---- planted structure ----------------------------------------------------------------------------------

def _frame(first: torch.Tensor, n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """(dim, n) orthonormal columns, the first being ``first``, the others random."""
    m = torch.randn(dim, n, generator=g, dtype=torch.float64)
    m[:, 0] = first
    return torch.linalg.qr(m)[0]          # the first column is ±first: φ does not see the sign


def _lora(name: str, right: torch.Tensor, sv: torch.Tensor, left: torch.Tensor, w0: torch.Tensor | None,
          scaling: float = 1.0) -> ModuleUpdate:
    """A LoRA update with A's right-singular vectors ``right`` (in, r) and values ``sv``; B = ``left`` (out, r)."""
    return ModuleUpdate(name, w0=w0, lora_A=(sv[:, None] * right.T).float(), lora_B=left.float(), scaling=scaling)


def _w0(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u0 = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))[0]
    v0 = torch.linalg.qr(torch.randn(IN, OUT, generator=g, dtype=torch.float64))[0]
    return (u0 * torch.linspace(10, 1, OUT, dtype=torch.float64)) @ v0.T, u0


def test_planted_shared_top_direction_is_reproduced_and_a_planted_miss_is_not():
    g = torch.Generator().manual_seed(0)
    top = torch.zeros(IN, dtype=torch.float64)
    top[5] = 1.0
    left8, left64 = torch.randn(OUT, 8, generator=g), torch.randn(OUT, 64, generator=g)
    small = _lora("q", _frame(top, 8, IN, g), torch.linspace(10, 1, 8, dtype=torch.float64), left8, None)
    large = _lora("q", _frame(top, 64, IN, g), torch.linspace(10, 1, 64, dtype=torch.float64), left64, None)
    frame = F.phi_modules({"q": small}, {"q": large})
    row = frame.iloc[0]
    assert row["phi_top1"] == pytest.approx(1.0, abs=1e-9) and row["k"] == 8 and row["d"] == IN
    assert row["phi_rest"] < row["baseline_rest"] + F.PHI_REST_MARGIN and row["baseline_rest"] == pytest.approx(7 / IN)
    assert F.phi_verdict(frame["phi_top1"], frame["phi_rest"], frame["baseline_rest"]) == "reproduced"

    # the large rank learned the small one's directions 2..8 on top, but not its top direction
    eye = torch.eye(IN, dtype=torch.float64)
    small = _lora("q", eye[:, :8], torch.tensor([10.0, 5, 4.9, 4.8, 4.7, 4.6, 4.5, 4.4], dtype=torch.float64), left8,
                  None)
    large = _lora("q", eye[:, 1:65], torch.cat([torch.linspace(20, 14, 7), torch.linspace(1, 0.5, 57)]).double(),
                  left64, None)
    frame = F.phi_modules({"q": small}, {"q": large})
    assert frame.iloc[0]["phi_top1"] == pytest.approx(0.0, abs=1e-9)
    assert frame.iloc[0]["phi_rest"] == pytest.approx(6 / 7, abs=1e-9)     # e2..e7 shared, e1 vs e8 not
    assert F.phi_verdict(frame["phi_top1"], frame["phi_rest"], frame["baseline_rest"]) == "not reproduced"


def fake_run(run_id: str, method: str, rank: int | None = None, created: float = 0.0, metrics: dict | None = None,
             model: str = "toy", steps: int = 10, seed: int = 0) -> runstore.Run:
    return runstore.Run(id=run_id, dir=Path("/nonexistent") / run_id, status="completed",
                        config={"model": model, "method": method, "rank": rank or 8, "seed": seed, "steps": steps,
                                "alpha": 16.0, "targets": ["q"]},
                        metrics=metrics or {}, created=created, finished=None, error=None, name=run_id, sweep_id=None,
                        environment={}, task={})


@pytest.fixture(scope="module")
def planted():
    """Runs of a toy model with planted structure: LoRA r=8 and r=64 share their top input direction, each
    writes a big update along an output direction unlike any of W0's (an intruder); full fine-tuning adds a
    small full-rank perturbation (high rank, no intruder). Metrics: LoRA learns less and forgets less."""
    g = torch.Generator().manual_seed(1)
    w0, u0 = _w0(g)
    top = torch.zeros(IN, dtype=torch.float64)
    top[3] = 1.0
    intruder = u0.sum(1) / math.sqrt(OUT)             # |cos| = 1/√80 with every left singular vector of W0
    updates = {}
    for rank in (8, 64):
        left = torch.randn(OUT, rank, generator=g, dtype=torch.float64) * 0.01
        left[:, 0] = intruder * 3.0
        updates[f"r{rank}"] = {"q": _lora("q", _frame(top, rank, IN, g), torch.linspace(10, 1, rank).double(), left,
                                          w0.float())}
    noise = torch.randn(OUT, IN, generator=g, dtype=torch.float64) * 0.02
    updates["full"] = {"q": ModuleUpdate("q", w0=w0.float(), w_ft=(w0 + noise).float())}
    metrics = {"r8": (0.7, 0.93), "r64": (0.8, 0.9), "full": (0.9, 0.5)}       # (val_accuracy, source_accuracy)
    runs = [fake_run(key, "full" if key == "full" else "lora", None if key == "full" else int(key[1:]),
                     created=float(i), metrics={"base_val_accuracy": 0.1, "val_accuracy": metrics[key][0],
                                                "base_source_accuracy": 0.95, "source_accuracy": metrics[key][1]})
            for i, key in enumerate(["r8", "r64", "full"])]
    return runs, updates


@pytest.fixture(scope="module")
def planted_result(planted):
    runs, updates = planted
    other = fake_run("other", "lora", 4, created=-1.0, model="toy", steps=99)    # another setting: left out
    return F.findings(runs + [other], load=lambda run: updates[run.id])


def test_findings_on_planted_runs(planted, planted_result):
    runs, updates = planted
    result = planted_result
    assert result.model == "toy" and {r.id for r in result.runs} == {"r8", "r64", "full"}
    by_key = {f.key: f for f in result.findings}
    assert [f.key for f in result.findings] == [c.key for c in F.CLAIMS]
    assert all(f.verdict in F.VERDICTS and f.rule and f.paper and f.measured for f in result.findings)

    assert by_key["phi"].verdict == "reproduced" and by_key["phi"].numbers["ranks"] == [8, 64]
    assert by_key["phi"].numbers["phi_top1"][0] == pytest.approx(1.0, abs=1e-6)
    assert by_key["intruders"].verdict == "reproduced"
    assert by_key["intruders"].numbers == {"lora_rate": 1.0, "full_rate": 0.0}   # only r ≤ 8 counts as low rank
    assert by_key["energy_rank"].verdict == "reproduced"          # a full-rank perturbation: rank_90 near 80
    assert min(by_key["energy_rank"].numbers["rank_90"]) > 40
    assert by_key["forgetting"].verdict == "reproduced"
    assert sorted(by_key["forgetting"].numbers["lora_forgot"]) == pytest.approx([0.02, 0.05])
    # amplification: the rule's input is the median over modules of the library's own amplification
    expected = [float(amplification_frame(updates[k])["amplification"].median()) for k in ("r8", "r64")]
    assert by_key["amplification"].numbers["amplification"] == pytest.approx(expected)
    assert by_key["amplification"].verdict == F.amplification_verdict([8, 64], expected)
    assert all(f.figures for f in result.findings)
    norms = result.norms.set_index("run")["relative_norm"]
    assert norms["full"] == pytest.approx(float(torch.linalg.norm(updates["full"]["q"].dense_delta())
                                                / torch.linalg.norm(updates["full"]["q"].w0)), rel=1e-5)
    assert "far above" in result.note                     # the planted LoRA updates are as large as W0
    json.dumps(result.to_dict())                          # plain JSON, no NaN
    assert list(result.table().columns) == ["claim", "paper", "measured", "verdict"]


def test_claims_without_the_runs_they_need_say_what_would_measure_them(planted):
    runs, updates = planted
    result = F.findings([runs[0]], load=lambda run: updates[run.id])          # one LoRA run only
    verdicts = {f.key: f for f in result.findings}
    assert all(f.verdict == "not measurable" for f in result.findings)
    assert "r=8 and r=64" in verdicts["phi"].needs and "full fine-tuning" in verdicts["intruders"].needs
    assert "source task" in verdicts["forgetting"].needs


def test_choose_runs_refuses_a_model_without_runs(planted):
    runs, _ = planted
    with pytest.raises(ValueError, match="model='gpt-9' has no completed run here: runs exist for toy"):
        F.choose_runs(runs, "gpt-9")
    with pytest.raises(ValueError, match="there is no completed run"):
        F.choose_runs([])


def test_report_section_holds_every_claim(planted, planted_result):
    from lora_analysis.report import render_report

    sections = F.findings_report_section(planted[0], result=planted_result, intervention=False)
    assert len(sections) == 1 + len(F.CLAIMS) and sections[0].tables[0][1]["verdict"].tolist()[0] == "reproduced"
    assert "Verdict: reproduced" in sections[1].text and sections[1].figures
    assert "Finding: Learns less, forgets less" in render_report("t", sections)
    assert "Not shown: there is no completed run" in F.findings_report_section([])[0].text


def test_research_presets_are_valid_sweeps():
    from lora_analysis.training import sweep_settings

    for model in F.RESEARCH_PRESETS:
        specs = F.preset_specs(model)
        assert [s["seed"] for s in specs] == [0, 0, 1, 1]
        runs = [cfg for spec in specs for _, cfg in sweep_settings(**spec)]
        assert sorted({c.rank for c in runs if c.method == "lora"}) == F.PRESET_RANKS
        assert sum(c.method == "full" for c in runs) == 2 and len({c.steps for c in runs}) == 1
        assert model in F.preset_text(model)
    with pytest.raises(ValueError, match="model='gpt2' has no research preset"):
        F.preset_specs("gpt2")


# ---- the intruder intervention on a tiny constructed case -----------------------------------------------------

def test_intervention_scales_a_planted_intruder_away():
    n = 8
    w0 = torch.diag(torch.arange(n, 0, -1).double())                        # singular vectors: the unit vectors
    u = torch.ones(n, dtype=torch.float64) / math.sqrt(n)                   # |cos| 0.35 with each: an intruder
    v = torch.zeros(n, dtype=torch.float64)
    v[-1] = 1.0                                                             # written on W0's weakest input
    w_ft = w0 + 20.0 * torch.outer(u, v)
    update = ModuleUpdate("0", w0=w0.float(), w_ft=w_ft.float())
    directions = intruder_directions(update, k=3)
    assert directions.intruders == [0]
    model = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w_ft)
    frame = intervention(model, {"0": update},
                         lambda m: {"val_top": float(torch.linalg.matrix_norm(m[0].weight.detach().double(), 2))},
                         factors=(1.0, 0.5, 0.0), k=3)
    assert frame["factor"].tolist() == [1.0, 0.5, 0.0] and frame["intruders"].tolist() == [1, 1, 1]
    s = torch.linalg.svdvals(w_ft)
    assert frame["val_top"].iloc[0] == pytest.approx(float(s[0]), rel=1e-6)
    assert frame["val_top"].iloc[2] == pytest.approx(float(s[1]), rel=1e-5)      # the intruder's σ removed
    torch.testing.assert_close(model[0].weight, w_ft.float())                      # the model itself is untouched
    assert len(plot_intervention(frame.assign(val_accuracy=[0.9, 0.8, 0.7])).data) == 1
    with pytest.raises(ValueError, match="factor=2 is not allowed"):
        intervention(model, {"0": update}, lambda m: {}, factors=(2,))


def test_intervention_merges_a_lora_model_and_scales_its_intruder():
    from lora_analysis.lora import apply_lora
    from lora_analysis.lora.model import lora_layers

    n = 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.arange(n, 0, -1).float()))
    apply_lora(model, rank=1, alpha=1.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.full((n, 1), 20.0 / math.sqrt(n)))
        layer.lora_A.weight.copy_(torch.eye(n)[-1:])
    update = ModuleUpdate("0", w0=torch.diag(torch.arange(n, 0, -1).float()),
                          lora_A=layer.lora_A.weight.detach().clone(), lora_B=layer.lora_B.weight.detach().clone(),
                          scaling=layer.scaling)
    x = torch.eye(n)
    with torch.no_grad():
        frame = intervention(model, {"0": update}, lambda m: {"out": float(m(x).abs().sum())}, factors=(1.0, 0.0))
        assert frame["out"].iloc[0] == pytest.approx(float(model(x).abs().sum()), rel=1e-5)
    assert frame["intruders"].tolist() == [1, 1] and len(lora_layers(model)) == 1      # the LoRA model is kept
    assert frame["out"].iloc[1] < frame["out"].iloc[0]


# ---- the CLI on a small sweep -----------------------------------------------------------------------------

@pytest.fixture
def small_sweep(small_sweep_home):
    return small_sweep_home


def test_findings_cli_on_a_small_sweep(small_sweep, capsys, monkeypatch):
    from lora_analysis.cli import main

    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(small_sweep))
    assert main(["findings", "--model", "mlp-digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "mlp-digits" and len(out["runs"]) == 3
    verdicts = {f["key"]: f for f in out["findings"]}
    assert verdicts["phi"]["verdict"] == "not measurable"               # ranks 1 and 8: no smaller rank ≥ 2
    assert verdicts["phi"]["needs"].startswith("LoRA runs at two ranks")
    for key in ("amplification", "intruders", "energy_rank", "forgetting"):   # measurable on these runs
        assert verdicts[key]["verdict"] in F.VERDICTS[:3], (key, verdicts[key]["measured"])
    assert verdicts["forgetting"]["numbers"]["source"] == "source_accuracy"
    assert out["relative_norms"][0]["relative_norm"] > 0

    assert main(["findings", "--runs-dir", str(small_sweep / "runs")]) == 0
    text = capsys.readouterr().out
    assert "Findings on mlp-digits (3 runs)" in text and "(5) Learns less, forgets less" in text
    assert "NOT MEASURABLE" in text and "‖ΔW‖_F/‖W0‖_F of these runs" in text

    assert main(["findings", "--model", "tiny-gpt"]) == 2
    assert "model='tiny-gpt' has no completed run here" in capsys.readouterr().err


def test_the_report_section_of_a_small_sweep_shows_the_intervention(small_sweep, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(small_sweep))
    sections = F.findings_report_section(runstore.list_runs())
    titles = [s.title for s in sections]
    assert titles[0] == "Findings: published claims about LoRA, on mlp-digits"
    assert titles[4:6] == ["Intruder intervention: r=1 (seed 0)", "Intruder intervention: full FT (seed 0)"]
    frame = sections[4].tables[0][1]
    assert frame["factor"].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and sections[4].figures
    assert {"val_accuracy", "source_accuracy", "intruders"} <= set(frame.columns)


def test_findings_cli_refuses_a_preset_without_a_model(capsys):
    from lora_analysis.cli import main

    assert main(["findings", "--run-preset"]) == 2
    assert "--run-preset needs --model with a research preset: one of mlp-digits, tiny-gpt, minilm (got None)" \
        in capsys.readouterr().err


def test_the_evidence_charts_fit_their_data_and_escape_names(small_sweep, monkeypatch):
    from lora_analysis.plots.checks import axis_problems, log_tick_problems, raw_markup

    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(small_sweep))
    result = F.findings(runstore.list_runs(), "mlp-digits")
    figures = [fig for f in result.findings for fig in f.figures]
    assert len(figures) >= 4
    for fig in figures:
        assert axis_problems(fig) == [] and log_tick_problems(fig) == [], fig.layout.title.text
        assert raw_markup(fig) == []
    for f in result.findings:
        assert len(f.readings) == len(f.figures) and all(f.readings)       # each chart says how to read it


def test_an_intruder_chart_without_any_intruder_still_has_a_scale():
    # seen on MiniLM: every count 0, and plotly invented a -1…1 axis around it
    import pandas as pd

    from lora_analysis.plots.checks import axis_problems

    counts = pd.DataFrame({"label": ["LoRA r=4", "full FT"], "method": ["lora", "full"], "rank": [4, 0],
                           "module": ["q", "q"], "intruders": [0, 0]})
    assert axis_problems(F.plot_intruders(counts, "none")) == []
