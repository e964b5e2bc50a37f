"""The analysis registry: one entry per analysis, its defaults checked once, W0-less inputs skipped with a
reason, and report sections built from entries alone."""

import pandas as pd
import pytest
import torch

from lora_analysis.analysis import registry
from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruders_frame
from lora_analysis.analysis.registry import ANALYSES, Analysis, Inputs, Param, Registry
from lora_analysis.report import render_report
from lora_analysis.run_report import report_sections
from lora_analysis.weights import ModuleUpdate


def updates(seed: int, rank: int = 2, w0: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in {"blocks.0.q_proj": (12, 8), "blocks.0.v_proj": (12, 8), "blocks.1.q_proj": (12, 8)}.items():
        out[name] = ModuleUpdate(name, w0=torch.randn(o, i, generator=g) if w0 else None,
                                 lora_A=torch.randn(rank, i, generator=g), lora_B=torch.randn(o, rank, generator=g),
                                 scaling=2.0)
    return out


def test_every_entry_is_complete():
    assert len(ANALYSES.names()) == len(set(ANALYSES.names())) >= 10
    assert set(ANALYSES.groups()) == {"training", "spectra", "subspaces", "merge"}
    for a in ANALYSES:
        assert a.title and a.question.endswith((".", "?", ")")) and a.page, a.name
        for p in a.params:
            assert p.help and p.label, (a.name, p.name)


def test_defaults_and_checks():
    intr = registry.get("intruders")
    inputs = Inputs.from_updates({"a": updates(0)})
    assert intr.resolve(inputs) == {"k": 10, "epsilon": 0.5}            # the paper's defaults, for every reader
    assert intr.resolve(inputs, epsilon=1) == {"k": 10, "epsilon": 1.0}
    with pytest.raises(ValueError, match=r"intruders: k=0 is not allowed: it must be from 1 up"):
        intr.resolve(inputs, k=0)
    with pytest.raises(ValueError, match=r"intruders: k=2.5 is not allowed: give an integer"):
        intr.resolve(inputs, k=2.5)
    with pytest.raises(ValueError, match=r"no parameter\(s\) kk: it has k, epsilon"):
        intr.resolve(inputs, kk=3)
    spectra = registry.get("spectra")
    assert spectra.resolve(inputs) == {"run": "a", "normalized": False, "heatmap": "effective_rank"}
    with pytest.raises(ValueError, match=r"heatmap='nope' is not allowed: choose one of 'effective_rank'"):
        spectra.resolve(inputs, heatmap="nope")
    with pytest.raises(ValueError, match="no analysis is named 'nope': choose from loss_curves, "):
        registry.get("nope")


def test_similarity_defaults_follow_the_data():
    inputs = Inputs.from_updates({"r2": updates(0, 2), "r4": updates(1, 4), "r3": updates(2, 3)})
    sim = registry.get("similarity")
    # the highest rank first, the next highest second, A matrices, the first shared module
    assert sim.resolve(inputs) == {"first": "r4", "second": "r3", "side": "A", "module": "blocks.0.q_proj"}
    result = sim.run(inputs, second="r2", module="blocks.1.q_proj")
    assert result.value.results["blocks.1.q_proj"].phi.shape == (4, 2)
    assert result.figures[0].layout.yaxis.title.text == "i (r4)"
    other = Inputs.from_updates({"a": updates(0), "b": {"other": updates(1)["blocks.0.q_proj"]}})
    with pytest.raises(ValueError, match="share no adapted module"):
        sim.resolve(other)


def test_the_cli_and_the_registry_compute_the_same_numbers():
    inputs = Inputs.from_updates({"a": updates(3)})
    amp = registry.get("amplification").run(inputs).value
    pd.testing.assert_frame_equal(amp, amplification_frame(updates(3)))
    intr = registry.get("intruders").run(inputs, k=4, epsilon=0.6).value
    expected = intruders_frame(updates(3), 4, 0.6)
    pd.testing.assert_frame_equal(intr.modules.drop(columns=["label"]), expected)
    # the ε sweep counts the same intruders at the chosen ε
    at = intr.sweep[intr.sweep["epsilon"] == 0.6].groupby("name")["intruders"].sum()
    assert at.to_dict() == dict(zip(expected["name"], expected["intruders"]))


def test_updates_without_w0_skip_the_analyses_that_need_it():
    """An adapter (or a LoRA run stored without its base weights) has w0=None: spectra, rank advice and φ
    still run; amplification, ΔW versus W0 and intruders say why they are left out."""
    inputs = Inputs.from_updates({"lora": updates(0, w0=False), "other": updates(1, w0=False)})
    for name in ("amplification", "base_overlap", "intruders"):
        reason = registry.get(name).skip_reason(inputs)
        assert "base weights W0" in reason and "--base" in reason, name
        with pytest.raises(ValueError, match="base weights W0"):
            registry.get(name).run(inputs)
    for name in ("spectra", "rank_advice", "similarity", "spectra_sweep"):
        assert registry.get(name).skip_reason(inputs) is None
    sections = {s.title: s for s in report_sections(inputs, ("spectra", "subspaces"))}
    assert sections["Intruder dimensions"].text.startswith("Not shown: intruder dimensions compares ΔW with the "
                                                           "base weights W0, which none of the chosen runs")
    assert not sections["Intruder dimensions"].figures
    assert sections["Singular spectra of ΔW: lora"].figures               # one section per run
    # one subject with W0, one without: the W0 analyses run on the one that has it and name the other
    mixed = Inputs.from_updates({"with": updates(0), "without": updates(1, w0=False)})
    assert registry.get("amplification").options("run", mixed) == ["with"]
    assert registry.get("intruders").run(mixed).text == "Skipped (no base weights W0): without."


def test_report_sections_from_a_private_registry_and_their_html():
    def count(inputs, p):
        return pd.DataFrame({"label": inputs.labels, "modules": [len(inputs.updates(x)) for x in inputs.labels]})

    own = Registry([Analysis(name="count", title="Modules <per> run", question="How many?", group="g", page="x",
                             compute=count, figures=lambda v, p: [], tables=lambda v, p: [("counts", v)],
                             code=lambda v, p: "print('<hi>')", params=(Param("n", 1, "n", "n", low=1),))])
    (section,) = report_sections(Inputs.from_updates({"a": updates(0)}), registry=own)
    assert section.title == "Modules <per> run" and section.text == "Parameters: n=1."
    page = render_report("t", [section])
    assert "<pre>print(&#x27;&lt;hi&gt;&#x27;)</pre>" in page and "Modules &lt;per&gt; run" in page
    with pytest.raises(ValueError, match="parameters given for \\['nope'\\]"):
        report_sections(Inputs.from_updates({"a": updates(0)}), params={"nope": {}}, registry=own)
    with pytest.raises(ValueError, match="already registered"):
        own.register(own.get("count"))
    with pytest.raises(ValueError, match="report part\\(s\\) \\['x'\\] are not known"):
        own.select(["x"])
