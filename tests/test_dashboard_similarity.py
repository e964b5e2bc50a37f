"""Two adapters side by side on the Subspaces page, typed paths and a streamed base (AppTest).

Everything is constructed and tiny: 2-module PEFT adapters with known factors, written into a private user data
folder (an allowed root for typed paths), a run of the store written by hand, and a sharded base folder. φ on
the page is checked against ``python -m lora_analysis similarity ... --json`` (run in-process) on the same
files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from dashboard.common import fmt_bytes
from lora_analysis.cli import main
from tests.test_dashboard_adapters import APP, SHAPES, base_weights, upload_files, write_adapter, write_run

COLUMNS = ("k1", "k2", "d", "phi_top1", "phi_full", "phi_mean", "baseline_mean", "shared_directions")


def shown(text: str) -> str:
    """What a reader sees: text from the data is escaped for Streamlit's markdown."""
    return re.sub(r"\\(.)", r"\1", text)


def errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    return [shown(e.value) for e in at.error]


def phi_table(at: AppTest):
    found = [d.value for d in at.dataframe if {"phi_top1", "phi_full", "shared_directions"} <= set(d.value.columns)]
    assert len(found) == 1, [list(d.value.columns) for d in at.dataframe]
    return found[0].set_index("name")


def cli_similarity(capsys, first: str, second: str, side: str = "A") -> dict:
    capsys.readouterr()
    assert main(["similarity", first, second, "--side", side, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["modules"]


def assert_same_as_cli(at: AppTest, cli: dict) -> None:
    table = phi_table(at)
    assert sorted(table.index) == sorted(cli) == sorted(SHAPES)
    for name, row in cli.items():
        for column in COLUMNS:
            assert float(table.loc[name, column]) == pytest.approx(float(row[column]), rel=1e-6, abs=1e-9), \
                (name, column)


def custom_adapter(folder: Path, seed: int, shapes: dict, base: str | None = None, rank: int = 2) -> Path:
    """A PEFT adapter on modules ``shapes`` ({name: (out, in)}) recording ``base`` as its base model."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": sorted({n.rsplit(".", 1)[-1]
                                                                                   for n in shapes}),
         "base_model_name_or_path": base}))
    return folder


def open_subspaces() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/subspaces.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def type_paths(at: AppTest, first: Path | str, second: Path | str) -> AppTest:
    for slot, path in ((1, first), (2, second)):
        at.radio(key=f"pair_src_{slot}").set_value("A path on this machine").run()
        at.text_input(key=f"pair_path_{slot}").set_value(str(path)).run()
    return at


# ---- φ: the CLI's numbers -----------------------------------------------------------------------------------

def test_two_adapters_side_by_side_give_the_cli_numbers(lora_home, capsys):
    run = write_run(lora_home, "toy r2", seed=3)
    first = write_adapter(lora_home / "first", seed=1)
    second = write_adapter(lora_home / "second", seed=2, rank=3)
    at = open_subspaces()
    # adapter 1: the run of the store (offered first); adapter 2: a typed folder
    assert at.radio(key="pair_src_1").value == "A run in the store"
    assert at.selectbox(key="pair_run_1").value.startswith("toy r2")
    at.radio(key="pair_src_2").set_value("A path on this machine").run()
    at.text_input(key="pair_path_2").set_value(str(second)).run()
    assert errors(at) == []
    size = sum(f.stat().st_size for f in second.iterdir())
    assert (f"Read adapter_config.json and adapter_model.safetensors ({fmt_bytes(size)}) from {second}: 2 adapted "
            "modules, rank 3; base model not recorded.") in [shown(c.value) for c in at.caption]
    assert at.selectbox(key="pair_side").value == "A"
    assert_same_as_cli(at, cli_similarity(capsys, run.id, str(second)))
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("φ per module") for t in titles), titles
    # ΔW's output directions: the CLI's --side output
    at.selectbox(key="pair_side").set_value("output").run()
    assert errors(at) == []
    assert_same_as_cli(at, cli_similarity(capsys, run.id, str(second), "output"))
    # adapter 1 uploaded instead: the upload's numbers are the folder's
    at.radio(key="pair_src_1").set_value("An upload").run()
    at.file_uploader(key="pair_upload_1").set_value(upload_files(first)).run()
    at.selectbox(key="pair_side").set_value("A").run()
    assert errors(at) == []
    assert_same_as_cli(at, cli_similarity(capsys, str(first), str(second)))


def test_adapters_that_cannot_be_compared_say_why(lora_home):
    mine = custom_adapter(lora_home / "mine", 1, SHAPES, base="org/model-a")
    other_modules = custom_adapter(lora_home / "k", 2, {"layers.0.k_proj": (16, 12)})
    wider = custom_adapter(lora_home / "wide", 3, {name: (2 * o, 2 * i) for name, (o, i) in SHAPES.items()})
    other_base = custom_adapter(lora_home / "b", 4, SHAPES, base="org/model-b")
    at = type_paths(open_subspaces(), mine, other_modules)
    (err,) = errors(at)
    assert "share no adapted module" in err and "'layers.0.k_proj'" in err and "'layers.0.q_proj'" in err, err
    at.text_input(key="pair_path_2").set_value(str(wider)).run()
    (err,) = errors(at)
    assert "2 of the 2 modules both adapt differ in shape" in err and "(16, 12)" in err and "(32, 24)" in err, err
    assert "different base models" in err and not at.dataframe
    # different recorded bases, same shapes: a warning, and φ all the same
    at.text_input(key="pair_path_2").set_value(str(other_base)).run()
    assert errors(at) == []
    (warning,) = [shown(w.value) for w in at.warning]
    assert "org/model-a" in warning and "org/model-b" in warning, warning
    assert len(phi_table(at)) == 2


# ---- typed paths: refused outside the allowed folders --------------------------------------------------------

def test_paths_outside_the_allowed_folders_are_refused_naming_the_folders(lora_home, tmp_path):
    outside = write_adapter(tmp_path / "elsewhere" / "adapter", seed=1)
    (lora_home / "link").symlink_to(outside, target_is_directory=True)     # inside, pointing out
    inside = write_adapter(lora_home / "inside", seed=2)
    at = open_subspaces()
    for typed in (str(outside), str(lora_home / "link")):
        type_paths(at, typed, inside)
        (err,) = errors(at)
        assert err.startswith(f"Could not do reading adapter 1: the adapter path '{typed}' was refused: it is "
                              "outside the folders"), err
        assert f"the user data folder {lora_home}" in err and str(Path.cwd()) in err, err
        assert not at.dataframe
    type_paths(at, inside, inside)
    at.text_input(key="pair_base_path").set_value(str(tmp_path / "elsewhere")).run()
    (err,) = errors(at)
    assert f"the base weights path '{tmp_path / 'elsewhere'}' was refused: it is outside the folders" in err, err
    assert not at.get("progress") and len(phi_table(at)) == 2         # φ needs no base: still shown


# ---- a typed base: streamed module by module, what was read said ---------------------------------------------

def sharded_base(folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face model folder holding W0 in two shards with their index."""
    weights = base_weights()
    folder.mkdir()
    index = {}
    for i, (key, tensor) in enumerate(weights.items(), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({key: tensor}, str(folder / shard))
        index[key] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return weights


def test_a_typed_base_is_streamed_with_progress_and_says_what_was_read(lora_home):
    write_run(lora_home, "toy r2", seed=3)
    weights = sharded_base(lora_home / "base")
    first = write_adapter(lora_home / "first", seed=1)
    at = open_subspaces()
    at.radio(key="pair_src_2").set_value("A path on this machine").run()
    at.text_input(key="pair_path_2").set_value(str(first)).run()
    at.text_input(key="pair_base_path").set_value(str(lora_home / "base")).run()
    assert errors(at) == []
    (bar,) = at.get("progress")                                  # one adapter read here: one base streamed
    assert bar.proto.value == 100 and shown(bar.proto.text).startswith("W0 streamed: 2 of 2 modules"), bar.proto
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    label = next(c for c in (shown(c.value) for c in at.caption) if "Read W0" in c)
    assert label.endswith(f"Read W0 of 2 modules ({fmt_bytes(nbytes)}) from model folder {lora_home / 'base'}: 2 "
                          "tensors in 2 safetensors file(s)."), label
    assert any("kept beside it" in c.value for c in at.caption)           # the run uses its own W0
    # the adapter, now with W0, is offered in ΔW versus W0 beside the run
    adapter_label = label.split(": Read W0")[0]
    assert adapter_label in at.selectbox(key="base_run").options
    at.selectbox(key="base_run").set_value(adapter_label).run()
    assert errors(at) == []
    # a base that does not fit the adapter: one error, φ still shown, nothing streamed
    wrong = lora_home / "wrong.safetensors"
    save_file(base_weights(shapes={**SHAPES, "layers.0.q_proj": (5, 5)}), str(wrong))
    at.text_input(key="pair_base_path").set_value(str(wrong)).run()
    (err,) = errors(at)
    assert "has shape (5, 5), which fits neither" in err, err
    assert len(phi_table(at)) == 2 and adapter_label not in at.selectbox(key="base_run").options


def kohya_file(path: Path, seed: int, rank: int) -> Path:
    """A kohya-format adapter file (lora_down / lora_up / alpha per module), stored in bf16."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 12),
                                "lora_te_text_model_encoder_layers_0_mlp_fc1": (24, 12)}.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g).to(torch.bfloat16)
        state[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g).to(torch.bfloat16)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def test_two_kohya_files_typed_as_paths_give_the_cli_numbers(lora_home, capsys):
    first, second = kohya_file(lora_home / "one.safetensors", 1, 2), kohya_file(lora_home / "two.safetensors", 2, 4)
    at = type_paths(open_subspaces(), first, second)
    assert errors(at) == []
    read = [shown(c.value) for c in at.caption if "Read one.safetensors" in shown(c.value)]
    assert len(read) == 1 and f"from {lora_home} (kohya format, stored bfloat16): 2 adapted modules, rank 2" in read[0]
    cli = cli_similarity(capsys, str(first), str(second))
    table = phi_table(at)
    assert sorted(table.index) == sorted(cli) and len(cli) == 2
    for name, row in cli.items():
        assert [float(table.loc[name, c]) for c in COLUMNS] == pytest.approx([float(row[c]) for c in COLUMNS])
