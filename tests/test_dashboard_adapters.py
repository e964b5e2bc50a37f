"""An uploaded adapter on the Spectra page, with its base weights and beside runs of the store (AppTest).

Everything is constructed and tiny: a 2-module PEFT adapter with known factors, a .safetensors of W0 for
those modules, and a LoRA and a full fine-tuning run written into a private store by hand (no training), so
each test takes a few seconds. The numbers on the page are checked against the library's own functions on
the same inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file
from streamlit.testing.v1 import AppTest

from dashboard.common import fmt_bytes
from lora_analysis import runstore
from lora_analysis.analysis import amplification, intruders, similarity
from lora_analysis.analysis.sources import load_updates

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
JSON, BIN = "application/json", "application/octet-stream"
SHAPES = {"layers.0.q_proj": (16, 12), "layers.0.v_proj": (8, 12)}     # (out, in)
RANK, ALPHA = 2, 4


def factors(seed: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in SHAPES.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    return state


def write_adapter(folder: Path, seed: int, rank: int = RANK) -> Path:
    folder.mkdir(parents=True)
    save_file(factors(seed, rank), str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"],
              "fan_in_fan_out": False, "base_model_name_or_path": None, "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def base_weights(seed: int = 7, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": torch.randn(*shape, generator=g) for name, shape in shapes.items()}


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_adapter(tmp_path / "adapter", seed=1)


@pytest.fixture
def base_file(tmp_path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file(base_weights(), str(path))
    return path


def upload_files(folder: Path) -> list:
    return [("adapter_config.json", (folder / "adapter_config.json").read_bytes(), JSON),
            ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes(), BIN)]


def open_spectra_upload(folder: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/spectra.py").run()
    at.radio(key="spectra_src").set_value("Upload a PEFT adapter").run()
    at.file_uploader(key="spectra_upload").set_value(upload_files(folder)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def with_base(at: AppTest, data: bytes) -> AppTest:
    at.radio(key="spectra_base_src_upload").set_value("Upload W0 (.safetensors)").run()
    at.file_uploader(key="spectra_base_upload_upload").set_value(("base.safetensors", data, BIN)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def shown_text(markdown: str) -> str:
    """What a reader sees: text from the data is escaped for Streamlit's markdown."""
    return re.sub(r"\\(.)", r"\1", markdown)


def frame_with(at: AppTest, *columns: str):
    found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
    assert found, (columns, [list(d.value.columns) for d in at.dataframe])
    return found[0]


def chart_titles(at: AppTest) -> list[str]:
    out = []
    for c in at.get("plotly_chart"):
        t = json.loads(c.proto.spec)["layout"].get("title", {})
        out.append(t.get("text", "") if isinstance(t, dict) else str(t))
    return out


def write_run(home: Path, name: str, seed: int, method: str = "lora") -> runstore.Run:
    """A completed run of the toy model written by hand: its adapter (or W_ft) and its W0."""
    writer = runstore.create_run({"model": "toy", "method": method, "rank": RANK if method == "lora" else None,
                                  "alpha": ALPHA, "seed": seed}, home / "runs", name=name)
    w0 = {name_: w for name_, w in ((k.removesuffix(".weight"), v) for k, v in base_weights().items())}
    writer.save_tensors("base_weights.safetensors", w0)
    if method == "lora":
        write_adapter(writer.dir / "adapter", seed)
    else:
        g = torch.Generator().manual_seed(seed)
        writer.save_tensors("full_weights.safetensors",
                            {n: w + 0.1 * torch.randn(*w.shape, generator=g) for n, w in w0.items()})
    writer.finish("completed", metrics={"val_accuracy": 0.5})
    return runstore.read_run(writer.dir)


# ---- an adapter with its base -----------------------------------------------------------------------------

def test_an_uploaded_adapter_with_its_base_gets_amplification_and_intruders(lora_home, adapter, base_file):
    at = open_spectra_upload(adapter)
    assert not at.error
    assert [s.value for s in at.success] == ["2 adapted modules, ranks [2]."]
    assert not [d for d in at.dataframe if "amplification" in d.value.columns]     # no W0 yet: not shown
    with_base(at, base_file.read_bytes())
    assert not at.error, [e.value for e in at.error]
    _, updates = load_updates(adapter, base_file)
    # amplification: the library's own frame, same inputs, same seed
    shown = frame_with(at, "amplification").set_index("name")
    expected = amplification.amplification_frame(updates, seed=0).set_index("name")
    assert sorted(shown.index) == sorted(SHAPES)
    assert shown["amplification"].to_dict() == pytest.approx(expected["amplification"].to_dict(), rel=1e-5)
    assert shown["delta_fro"].to_dict() == pytest.approx(expected["delta_fro"].to_dict(), rel=1e-5)
    # intruders per module at the defaults k=10, ε=0.5
    table = frame_with(at, "intruders", "min_max_cos").set_index("name")
    for name, u in updates.items():
        res = intruders.intruder_dimensions(u, intruders.DEFAULT_K, intruders.DEFAULT_EPSILON)
        assert int(table.loc[name, "intruders"]) == res.count
        assert float(table.loc[name, "min_max_cos"]) == pytest.approx(float(res.max_cos.min()), rel=1e-5)
    # ‖ΔW‖/‖W0‖ in the per-module table, ΔW versus W0 drawn
    spectra = frame_with(at, "effective_rank", "relative_norm").set_index("name")
    for name, u in updates.items():
        dw = u.scaling * (u.lora_B @ u.lora_A)
        assert spectra.loc[name, "relative_norm"] == pytest.approx(float(dw.norm() / u.w0.norm()), rel=1e-4)
    assert any("lie in W0" in t for t in chart_titles(at))
    assert any("‖ΔW‖_F / ‖W0‖_F over the 2 adapted modules" in shown_text(m.value) for m in at.markdown)
    # back to no base: what needs W0 goes, the adapter's own analyses stay
    at.radio(key="spectra_base_src_upload").set_value("No base").run()
    assert not at.exception and not at.error
    assert not [d for d in at.dataframe if "amplification" in d.value.columns]
    assert "relative_norm" not in frame_with(at, "effective_rank").columns


@pytest.mark.parametrize("case, expected", [
    ("wrong shape", "has shape (5, 5), which fits neither"),
    ("missing module", "layers.0.v_proj"),
    ("not safetensors", "not a readable safetensors file"),
])
def test_a_base_that_does_not_fit_is_one_line_and_the_adapter_stays(lora_home, adapter, case, expected):
    if case == "wrong shape":
        data = save(base_weights(shapes={**SHAPES, "layers.0.q_proj": (5, 5)}))
    elif case == "missing module":
        data = save({k: v for k, v in base_weights().items() if "q_proj" in k})
    else:
        data = b"\x00junk" * 10
    at = with_base(open_spectra_upload(adapter), data)
    errs = [shown_text(e.value) for e in at.error]
    assert len(errs) == 1 and errs[0].startswith("Could not do reading the base weights") and expected in errs[0], errs
    assert "\n" not in errs[0] and str(lora_home) not in errs[0]
    assert not at.exception
    assert len(frame_with(at, "effective_rank")) == 2       # the adapter's own analyses are still there
    assert not [d for d in at.dataframe if "amplification" in d.value.columns]


def test_a_typed_base_path_is_checked_and_read(lora_home, adapter, base_file, tmp_path):
    at = open_spectra_upload(adapter)
    at.radio(key="spectra_base_src_upload").set_value("A base on this machine (folder or .safetensors)").run()
    at.text_input(key="spectra_base_path_upload").set_value(str(base_file)).run()     # outside the allowed roots
    errs = [shown_text(e.value) for e in at.error]
    assert len(errs) == 1 and "was refused: it is outside the folders" in errs[0], errs
    assert f"the user data folder {lora_home}" in errs[0], errs           # the folders allowed, named
    inside = lora_home / "base.safetensors"
    inside.write_bytes(base_file.read_bytes())
    at.text_input(key="spectra_base_path_upload").set_value(str(inside)).run()
    assert not at.error and not at.exception, [e.value for e in at.error]
    assert len(frame_with(at, "amplification")) == 2
    # W0 streamed module by module under a progress bar, and what was read said
    (bar,) = at.get("progress")
    assert bar.proto.value == 100 and shown_text(bar.proto.text).startswith("W0 streamed: 2 of 2 modules")
    nbytes = sum(w.numel() * w.element_size() for w in base_weights().values())
    assert (f"Read W0 of 2 modules ({fmt_bytes(nbytes)}) from file {inside}: 2 tensors in 1 safetensors file(s)."
            in [shown_text(c.value) for c in at.caption])


# ---- the adapter beside runs ------------------------------------------------------------------------------

def test_the_adapter_is_compared_with_runs_and_kept_across_pages(lora_home, adapter, base_file):
    lora_run = write_run(lora_home, "toy LoRA r=2", seed=3)
    write_run(lora_home, "toy full FT", seed=4, method="full")
    at = with_base(open_spectra_upload(adapter), base_file.read_bytes())
    assert not at.error, [e.value for e in at.error]
    runs = at.multiselect(key="adapter_cmp_runs")
    assert len(runs.options) == 2 and len(runs.value) == 1
    lora_label = next(o for o in runs.options if "toy LoRA" in o)
    at.multiselect(key="adapter_cmp_runs").set_value(runs.options).run()
    at.selectbox(key="adapter_sub_b").set_value(lora_label).run()
    assert not at.error and not at.exception, [e.value for e in at.error]
    # φ between the adapter and the run: the library's frame on the same updates
    _, mine = load_updates(adapter, base_file)
    side = at.selectbox(key="adapter_sub_side").value
    expected = similarity.similarity_summary_frame(
        similarity.adapter_similarity(mine, runstore.load_updates(lora_run), side)).set_index("name")
    shown = frame_with(at, "phi_mean", "shared_directions").set_index("name")
    assert sorted(shown.index) == sorted(SHAPES)
    assert shown["phi_mean"].to_dict() == pytest.approx(expected["phi_mean"].to_dict(), rel=1e-5)
    assert shown["phi_top1"].to_dict() == pytest.approx(expected["phi_top1"].to_dict(), rel=1e-5)
    # the spectra across ranks and full fine-tuning have the adapter as one of their lines
    sweep = [json.loads(c.proto.spec) for c in at.get("plotly_chart")
             if "across ranks" in str(json.loads(c.proto.spec)["layout"].get("title"))]
    assert len(sweep) == 1 and any("adapter: upload" in (d.get("name") or "") for d in sweep[0]["data"])
    # intruders: the adapter beside both runs, each with its own W0
    per_run = frame_with(at, "modules compared")
    assert len(per_run) == 3 and any(str(v).startswith("adapter: upload") for v in per_run["label"])
    # another page and back: the adapter (and its base) are still there, though the upload widget is empty
    at.switch_page("views/home.py").run()
    at.switch_page("views/spectra.py").run()
    assert at.radio(key="spectra_src").value == "Upload a PEFT adapter"        # the source last shown
    assert not at.exception and not at.error
    assert any("uploaded earlier" in shown_text(c.value) for c in at.caption)
    assert len(frame_with(at, "amplification")) == 2
    # on Subspaces the adapter is one more subject beside the runs: φ with a run, amplification with its base
    at.switch_page("views/subspaces.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (label,) = at.multiselect(key="sub_adapters").value
    assert label.startswith("adapter: upload")
    at.selectbox(key="sub_a").set_value(label).run()
    at.selectbox(key="sub_b").set_value(lora_label).run()
    at.selectbox(key="sub_side").set_value(side).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = frame_with(at, "phi_mean", "shared_directions").set_index("name")
    assert shown["phi_mean"].to_dict() == pytest.approx(expected["phi_mean"].to_dict(), rel=1e-5)
    at.selectbox(key="base_run").set_value(label).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert label in set(frame_with(at, "modules compared")["label"])      # intruders: the adapter beside the runs


def test_the_adapter_alone_says_there_is_no_run_to_compare_with(lora_home, adapter):
    at = open_spectra_upload(adapter)
    assert not at.error
    assert any("nothing to compare it with" in shown_text(c.value) for c in at.caption)
    assert np.isfinite(frame_with(at, "effective_rank")["fro_norm"]).all()


def test_an_adapter_folder_with_a_base_folder_gets_the_same_numbers(lora_home, tmp_path):
    folder = write_adapter(lora_home / "my-adapter", seed=1)            # inside the user data folder
    (lora_home / "base").mkdir()
    save_file(base_weights(), str(lora_home / "base" / "model.safetensors"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/spectra.py").run()
    at.radio(key="spectra_src").set_value("An adapter folder on this machine").run()
    at.text_input(key="spectra_folder").set_value(str(folder)).run()
    at.radio(key="spectra_base_src_folder").set_value("A base on this machine (folder or .safetensors)").run()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert (f"Read adapter_config.json and adapter_model.safetensors ({fmt_bytes(size)}) from {folder}: 2 adapted "
            "modules, rank 2; base model not recorded." in [shown_text(c.value) for c in at.caption])
    at.text_input(key="spectra_base_path_folder").set_value(str(lora_home / "base")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    _, updates = load_updates(folder, lora_home / "base" / "model.safetensors")
    shown = frame_with(at, "amplification").set_index("name")
    expected = amplification.amplification_frame(updates, seed=0).set_index("name")
    assert shown["amplification"].to_dict() == pytest.approx(expected["amplification"].to_dict(), rel=1e-5)


def test_an_adapter_file_typed_on_the_spectra_page_is_read(lora_home):
    """One .safetensors adapter file (kohya format) typed as a path: read, what was read said, spectra shown."""
    g = torch.Generator().manual_seed(5)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = lora_home / "style.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 12, generator=g),
               f"{name}.lora_up.weight": torch.randn(16, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)},
              str(path))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/spectra.py").run()
    at.radio(key="spectra_src").set_value("An adapter folder on this machine").run()
    at.text_input(key="spectra_folder").set_value(str(path)).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(shown_text(c.value).startswith(f"Read style.safetensors ({fmt_bytes(path.stat().st_size)}) from "
                                              f"{lora_home} (kohya format): 1 adapted module, rank 4")
               for c in at.caption), [c.value for c in at.caption]
    assert list(frame_with(at, "effective_rank")["name"]) == [name]
