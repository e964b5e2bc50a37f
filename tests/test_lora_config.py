"""The LoRA settings: the one rank rule (effective_rank_alpha), the one targets parser, help on every field."""

import math
from dataclasses import fields

import pytest

from lora_analysis.lora.config import (ALL_LINEAR, LoRAConfig, effective_rank_alpha, exact_pattern_key,
                                       format_targets, parse_targets, pattern_key)
from lora_analysis.lora.layer import compute_scaling


@pytest.mark.parametrize("value,parsed", [
    (None, None), ("", None), ("  ", None),
    ("all-linear", ALL_LINEAR), ("ALL-LINEAR", ALL_LINEAR),
    ("re:fc[12]", "fc[12]"), (r"re:blocks\.1\..*_proj", r"blocks\.1\..*_proj"),
    ("fc1,fc2", ["fc1", "fc2"]), (" q_proj , v_proj ,", ["q_proj", "v_proj"]), ("fc[12]", ["fc[12]"]),
    (["fc1", " fc2 "], ["fc1", "fc2"]), (("q", "v"), ["q", "v"]),
])
def test_parse_targets(value, parsed):
    assert parse_targets(value) == parsed
    assert type(parse_targets(value)) is type(parsed)        # a str is a regex, a list is suffixes


@pytest.mark.parametrize("value,match", [
    ("re:fc[12", r"targets='re:fc\[12' is not a valid regular expression"),
    ("re:", "empty"),
    ([], "no module names"),
    (["fc1", 3], "3"),
    (["re:fc"], "re:fc"),
    (3, "targets=3"),
])
def test_parse_targets_bad_input_raises_value_error(value, match):
    with pytest.raises(ValueError, match=match):
        parse_targets(value)


@pytest.mark.parametrize("text", ["all-linear", "re:fc[12]", "fc1,fc2", "q_proj"])
def test_format_targets_round_trips(text):
    assert parse_targets(format_targets(parse_targets(text))) == parse_targets(text)


def test_effective_rank_alpha_patterns_then_cap():
    config = LoRAConfig(rank=8, alpha=16.0, rank_pattern={"^big": 4}, alpha_pattern={"^big": 2.0})
    assert effective_rank_alpha(config, "big", 64, 64) == (4, 2.0)
    assert effective_rank_alpha(config, "mid", 64, 32) == (8, 16.0)
    with pytest.raises(ValueError, match=r"rank=8 is not allowed for module 'head' \(3x64\).*cap_rank"):
        effective_rank_alpha(config, "head", 3, 64)
    capped = LoRAConfig(rank=8, alpha=16.0, cap_rank=True)
    rank, alpha = effective_rank_alpha(capped, "head", 3, 64)
    assert rank == 3 and compute_scaling(rank, alpha) == pytest.approx(compute_scaling(8, 16.0))   # α/r kept
    rs = LoRAConfig(rank=16, alpha=8.0, rslora=True, cap_rank=True)
    rank, alpha = effective_rank_alpha(rs, "head", 4, 64)
    assert rank == 4 and alpha / math.sqrt(4) == pytest.approx(8.0 / math.sqrt(16))              # α/√r kept


def test_exact_pattern_key_matches_only_its_module_under_peft_rule():
    key = exact_pattern_key("fc")
    assert pattern_key({key: 1}, "fc") == key
    assert pattern_key({key: 1}, "sub.fc") is None
    dotted = exact_pattern_key("h.0.fc")
    assert pattern_key({dotted: 1}, "h.0.fc") == dotted
    assert pattern_key({dotted: 1}, "hx0yfc") is None and pattern_key({dotted: 1}, "a.h.0.fc") is None
    assert pattern_key({"fc": 1}, "sub.fc") == "fc"           # a plain key keeps PEFT's suffix meaning


def test_every_field_has_help():
    for f in fields(LoRAConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("patterns", [{"rank_pattern": {"fc[": 2}}, {"alpha_pattern": {"(fc": 2.0}}])
def test_bad_pattern_key_is_a_value_error_naming_it(patterns):
    with pytest.raises(ValueError, match=r"key '\(?fc\[?' is not a valid regular expression"):
        effective_rank_alpha(LoRAConfig(**patterns), "fc", 8, 8)
