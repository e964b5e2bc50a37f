"""``python -m lora_analysis spectra`` / ``similarity`` through ``lora_analysis.cli.main``: values checked against
a directly computed SVD."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_analysis import apply_lora, save_adapter
from lora_analysis.cli import main


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(16, 16), "up": nn.Linear(16, 24)})
                                    for _ in range(2))

    def forward(self, x):
        return x


def _make(tmp_path, name, rank=4, alpha=8.0, seed=0):
    torch.manual_seed(0)
    base = Net()
    model = apply_lora(Net().requires_grad_(False), ["q_proj", "up"], rank=rank, alpha=alpha)
    model.load_state_dict(base.state_dict(), strict=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.weight.normal_()
    save_adapter(model, tmp_path / name)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    return model, tmp_path / name


def test_spectra_json_matches_direct_svd(tmp_path, capsys):
    model, path = _make(tmp_path, "ad")
    assert main(["spectra", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "skipped" in captured.err and "--base" in captured.err
    assert out["amplification"] is None and set(out["skipped"]) == {"amplification", "intruders"}
    modules = {m["name"]: m for m in out["modules"]}
    assert set(modules) == {"blocks.0.q_proj", "blocks.0.up", "blocks.1.q_proj", "blocks.1.up"}
    layer = model.blocks[1]["up"]
    delta = layer.delta_weight().detach().double()
    s = torch.linalg.svdvals(delta)
    m = modules["blocks.1.up"]
    assert m["shape"] == [24, 16] and m["rank"] == 4 and m["scaling"] == pytest.approx(2.0)
    np.testing.assert_allclose(m["singular_values"], s[:4].numpy(), rtol=1e-5)
    assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
    assert m["fro_norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-6)
    assert m["spectral_norm"] == pytest.approx(float(s[0]), rel=1e-6)
    assert m["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
    p = s[:4] / s[:4].sum()
    assert m["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    cum = (s[:4] ** 2).cumsum(0) / (s[:4] ** 2).sum()
    assert m["rank_90"] == int((cum < 0.9).sum()) + 1 and m["rank_99"] == int((cum < 0.99).sum()) + 1


def test_spectra_with_base_includes_amplification_and_intruders(tmp_path, capsys):
    model, path = _make(tmp_path, "ad")
    assert main(["spectra", str(path), "--base", str(tmp_path / "base.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == {} and len(out["amplification"]) == 4
    intr = out["intruders"]
    assert intr["k"] == 10 and intr["epsilon"] == 0.5
    base = load_file(str(tmp_path / "base.safetensors"))
    for name in ("blocks.0.q_proj", "blocks.1.up"):
        layer = model.get_submodule(name)
        w0 = base[f"{name}.weight"].double()
        delta = layer.delta_weight().detach().double()
        # amplification: ‖ΔW‖_F / ‖Uᵀ W0 V‖_F with U, V ΔW's top-r (r=4) singular vectors
        u, s, vh = torch.linalg.svd(delta)
        amp = next(m for m in out["amplification"] if m["name"] == name)
        want = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(u[:, :4].T @ w0 @ vh[:4].T))
        assert amp["r"] == 4 and amp["amplification"] == pytest.approx(want, rel=1e-6)
        # intruders: top-10 left singular vectors of W0 + ΔW with max |cos| < 0.5 against all of W0's
        u_ft = torch.linalg.svd(w0 + delta, full_matrices=False).U[:, :10]
        cos = (u_ft.T @ torch.linalg.svd(w0, full_matrices=False).U).abs().max(dim=1).values
        mod = next(m for m in intr["modules"] if m["name"] == name)
        assert mod["intruder_indices"] == [i for i in range(len(cos)) if cos[i] < 0.5]
        assert mod["min_max_cos"] == pytest.approx(float(cos.min()), rel=1e-6)
    assert intr["total"] == sum(len(m["intruder_indices"]) for m in intr["modules"])
    assert main(["spectra", str(path), "--base", str(tmp_path / "base.safetensors"), "--json", "--k", "3",
                 "--epsilon", "0.9"]) == 0
    out = json.loads(capsys.readouterr().out)["intruders"]
    assert out["k"] == 3 and out["epsilon"] == 0.9 and {m["k"] for m in out["modules"]} == {3}


def test_spectra_table_and_html(tmp_path, capsys):
    _, path = _make(tmp_path, "ad")
    report = tmp_path / "report.html"
    assert main(["spectra", str(path), "--base", str(tmp_path / "base.safetensors"), "--html", str(report)]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.q_proj" in text and "effective_rank" in text and "Amplification" in text
    html = report.read_text()
    assert html.count("<script type='text/javascript'>") == 1      # plotly.js inlined once
    assert "<script src=" not in html      # nothing fetched
    # the registry's spectra (3 figures), amplification (2) and intruders (1) entries, at their defaults
    assert html.count("Plotly.newPlot") == 6 and "Parameters: k=10, epsilon=0.5." in html
    assert not list(tmp_path.glob(".report.html.*"))
    assert main(["spectra", str(path)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_spectra_bad_inputs_are_one_line_errors(tmp_path, capsys):
    _, path = _make(tmp_path, "ad")
    # every module's W0 present, one of them of the wrong shape: the error names that module
    bad = {f"blocks.{i}.{m}.weight": torch.zeros(*s) for i in (0, 1) for m, s in (("q_proj", (16, 16)), ("up", (24, 16)))}
    save_file({**bad, "blocks.0.q_proj.weight": torch.zeros(16, 15)}, str(tmp_path / "bad.safetensors"))
    assert main(["spectra", str(path), "--base", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'blocks.0.q_proj' has shape (16, 15)" in err and err.count("\n") == 1
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    assert main(["spectra", str(path)]) == 2
    assert "adapter_model.bin" in capsys.readouterr().err
    (path / "adapter_model.bin").unlink()
    assert main(["spectra", str(path), "--json"]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


def test_similarity_json(tmp_path, capsys):
    _make(tmp_path, "one", rank=4, seed=1)
    _make(tmp_path, "same", rank=4, seed=2)            # same A (seed 0 init), different B
    assert main(["similarity", str(tmp_path / "one"), str(tmp_path / "same"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["side"] == "A" and out["summary"]["modules"] == 4
    mod = out["modules"]["blocks.0.q_proj"]
    assert np.array(mod["phi"]).shape == (4, 4) and mod["d"] == 16
    assert mod["phi_full"] == pytest.approx(1.0)      # identical A matrices span the same row space
    assert main(["similarity", str(tmp_path / "one"), str(tmp_path / "same"), "--side", "output"]) == 0
    assert "phi_top1" in capsys.readouterr().out


def test_gpt2_conv1d_adapter_with_model_dir_and_flat_safetensors_base(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from lora_analysis.analysis.amplification import projection_norm
    from lora_analysis.analysis.spectra import factored_svd

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model = apply_lora(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), ["c_attn", "c_proj"], rank=2)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.weight.normal_()
    save_adapter(model, tmp_path / "ad")
    results = []
    for base in (tmp_path / "gpt2", tmp_path / "gpt2" / "model.safetensors"):
        assert main(["spectra", str(tmp_path / "ad"), "--base", str(base), "--json"]) == 0
        results.append({m["name"]: m for m in json.loads(capsys.readouterr().out)["amplification"]})
    name = "transformer.h.0.attn.c_proj"                     # square Conv1D: only fan_in_fan_out tells
    layer = model.get_submodule(name)
    spec = factored_svd(layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling)
    want = projection_norm(layer.base_layer.weight.detach().T, spec.U, spec.V)   # W0 as (out, in)
    for res in results:
        assert res[name]["proj_delta"] == pytest.approx(want, rel=1e-6)


def test_a_runs_adapter_with_the_runs_base_weights(lora_home, capsys):
    """A run keeps W0 keyed by module name (not <module>.weight): --base takes that file too."""
    from lora_analysis.training import TrainConfig, train

    result = train(TrainConfig(model="mlp-digits", rank=2, alpha=4, steps=10, pretrain_steps=30))
    adapter, base = result.run_dir / "adapter", result.run_dir / "base_weights.safetensors"
    assert main(["spectra", str(adapter), "--base", str(base), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in out["amplification"]} == {"fc1", "fc2", "fc3"}
    from lora_analysis import runstore
    from lora_analysis.analysis.amplification import amplification_frame

    stored = amplification_frame(runstore.load_updates(runstore.load_run(result.run_id))).set_index("name")
    for m in out["amplification"]:    # the run's own W0, read through the adapter folder and --base
        assert m["amplification"] == pytest.approx(float(stored.loc[m["name"], "amplification"]), rel=1e-6)


def test_runs_by_name_id_prefix_or_folder_wherever_an_adapter_is_accepted(lora_home, tmp_path, capsys):
    """spectra / similarity / runs show take a run's name, id, unique id prefix or folder as well as an adapter
    folder; a run brings its own W0; errors say what was tried."""
    from lora_analysis.training import TrainConfig, train

    small = dict(model="mlp-digits", alpha=16, steps=10, pretrain_steps=30)
    r2 = train(TrainConfig(rank=2, **small), name="r2")
    r4 = train(TrainConfig(rank=4, **small), name="r4")
    full = train(TrainConfig(method="full", **small), name="ft")
    outs = []
    for word in ("r2", r2.run_id, r2.run_id[:-3], str(r2.run_dir), str(r2.run_dir / "adapter")):
        assert main(["spectra", word, "--json"]) == 0, word
        outs.append(json.loads(capsys.readouterr().out))
    assert all(o["modules"] == outs[0]["modules"] for o in outs)
    assert outs[0]["run"] == r2.run_id and [m["rank"] for m in outs[0]["modules"]] == [2, 2, 2]
    assert outs[0]["base_read"].endswith("base_weights.safetensors")       # the run's own W0: no --base needed
    assert {m["name"] for m in outs[0]["amplification"]} == {"fc1", "fc2", "fc3"}
    assert main(["spectra", "ft"]) == 0                                      # full FT: ΔW = W_ft − W0
    out = capsys.readouterr().out
    assert f"run {full.run_id} (ft, full)" in out and "full_weights.safetensors" in out and "W_ft − W0" in out
    assert main(["similarity", "r2", "r4", "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["modules"]["fc1"]["d"] == 64 and np.array(sim["modules"]["fc1"]["phi"]).shape == (2, 4)
    assert main(["similarity", "ft", "r4"]) == 2
    assert "full fine-tuning run" in capsys.readouterr().err
    assert main(["runs", "show", "r4"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert Path(files["adapter"]) == (r4.run_dir / "adapter").resolve() and Path(files["base_weights"]).is_file()
    assert main(["spectra", "r9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'r9' is neither an adapter folder" in err and str(lora_home / "runs") in err
    assert "3 runs there" in err
    (tmp_path / "empty").mkdir()
    assert main(["spectra", str(tmp_path / "empty")]) == 2
    assert "without adapter_config.json" in capsys.readouterr().err


def test_spectra_help_says_where_runs_keep_their_adapter_and_base_weights(lora_home, capsys):
    with pytest.raises(SystemExit):
        main(["spectra", "--help"])
    out = capsys.readouterr().out
    assert f"{lora_home / 'runs'}/RUN_ID/adapter " in out and f"{lora_home / 'runs'}/RUN_ID/base_weights.safetensors" in out
    assert "RUN_OR_ADAPTER" in out and "--runs-dir DIR, --out DIR" in out
