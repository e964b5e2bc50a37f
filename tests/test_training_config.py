"""One config per concept: TrainConfig and SweepSpec carry each setting's help; the CLI options of
``train`` and ``sweep`` and the Fine-tune page's help texts are generated from those fields."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_analysis.cli import build_parser
from lora_analysis.training import SweepSpec, TrainConfig, sweep_settings
from lora_analysis.training.config import field_help

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _flat(text: str) -> str:
    """Text without whitespace: argparse wraps help lines (and may break them after a hyphen)."""
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("cls, command", [(TrainConfig, "train"), (SweepSpec, "sweep")])
def test_every_field_has_help_and_a_cli_option_with_that_help(cls, command):
    parser = _subparser(command)
    for f in fields(cls):
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and len(help_text) > 10, f.name
        options = [a for a in parser._actions if a.dest == f.name]
        assert options, f"{command} has no option for {f.name}"
        # the first option writing the field carries its help (--rslora; --compare-rslora adds its own)
        assert options[0].help.replace("%%", "%").startswith(help_text), (f.name, options[0].help)
        assert f"--{f.name.replace('_', '-')}" in options[0].option_strings
        assert _flat(help_text) in _flat(parser.format_help()), f.name


@pytest.mark.parametrize("argv, expected", [
    (["train"], TrainConfig()),
    (["train", "-r", "4", "--alpha", "16", "--targets", "re:fc[12]", "--rslora", "--init", "gaussian",
      "--dropout", "0.1", "--method", "lora", "--lr", "0.01", "--steps", "7", "--batch-size", "3",
      "--eval-every", "2", "--weight-decay", "0.1", "--seed", "3", "--device", "cpu", "--seq-len", "16",
      "--pretrain-steps", "5", "--label-column", "y", "--text-field", "body", "--data", "x.csv",
      "--grad-clip", "0", "--max-eval-tokens", "99"],
     TrainConfig(rank=4, alpha=16.0, targets="re:fc[12]", rslora=True, init="gaussian", dropout=0.1, lr=0.01,
                 steps=7, batch_size=3, eval_every=2, weight_decay=0.1, seed=3, device="cpu", seq_len=16,
                 pretrain_steps=5, label_column="y", text_field="body", data="x.csv", grad_clip=0.0,
                 max_eval_tokens=99)),
])
def test_cli_options_build_the_config(argv, expected):
    from lora_analysis.cli.train import config_from_args

    args = build_parser().parse_args(argv)
    assert config_from_args(TrainConfig, args) == expected


def test_sweep_cli_keeps_its_flags_and_defaults():
    from lora_analysis.cli.train import config_from_args

    spec = config_from_args(SweepSpec, build_parser().parse_args(["sweep"]))
    assert spec == SweepSpec(full_ft=False)
    assert [label for label, _ in spec.settings()] == [f"LoRA r={r} α=16" for r in (1, 2, 4, 8, 16, 32)]
    spec = config_from_args(SweepSpec, build_parser().parse_args(
        ["sweep", "--ranks", "1,4", "--alphas", "r,16", "--compare-rslora", "--targets", "fc1,fc2",
         "--targets", "re:fc[12]", "--full-ft", "--steps", "5", "--dropout", "0.1"]))
    assert spec.ranks == [1, 4] and spec.alphas == ["r", "16"] and spec.rslora == [False, True]
    assert spec.targets == ["fc1,fc2", "re:fc[12]"] and spec.full_ft and spec.steps == 5
    assert len(spec.settings()) == 2 * 2 * 2 * 2 + 1
    assert build_parser().parse_args(["sweep", "--rslora"]).rslora == [True]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--rslora", "--compare-rslora"])
    assert build_parser().parse_args(["sweep", "--workers", "2"]).workers == 2


def test_sweep_settings_is_the_sweep_spec():
    assert sweep_settings(ranks=[2], alphas=[4], full_ft=False, steps=3) == \
        SweepSpec(ranks=[2], alphas=[4], full_ft=False, steps=3).settings()
    with pytest.raises(ValueError, match="unknown sweep setting.*colour"):
        sweep_settings(ranks=[2], colour="red")


def test_validation_lives_in_the_fields():
    for cls in (TrainConfig, SweepSpec):
        for f in fields(cls):
            assert callable(f.metadata.get("check")), f"{cls.__name__}.{f.name} has no check"
    with pytest.raises(ValueError, match="grad_clip=-1 is not allowed"):
        TrainConfig(grad_clip=-1).validate()
    with pytest.raises(ValueError, match="ranks=\\[0\\] is not allowed"):
        SweepSpec(ranks=[0]).validate()


def test_finetune_page_help_comes_from_the_fields(lora_home):
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/finetune.py").run()
    assert not at.exception
    for key, name in (("ft_ranks", "ranks"), ("ft_alphas", "alphas"), ("ft_targets", "targets"),
                      ("ft_dropout", "dropout"), ("ft_seed", "seed"), ("ft_device", "device"),
                      ("ft_steps", "steps"), ("ft_lr", "lr"), ("ft_model", "model"), ("ft_scaling", "rslora"),
                      ("ft_methods", "full_ft")):
        widget = at.get("multiselect") + at.get("text_input") + at.get("number_input") + at.get("selectbox") \
            + at.get("radio")
        [w] = [w for w in widget if w.key == key]
        assert w.help.startswith(field_help(SweepSpec, name)), (key, w.help)
