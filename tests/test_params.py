"""Parameter accounting against the reference numbers (PEFT, the LoRA paper, the seeds)."""

import json

import pytest
import torch
from torch import nn

from lora_analysis import apply_lora, count_parameters, save_adapter
from lora_analysis.cli import main
from lora_analysis.params import (adapter_file_size, build_from_config, build_preset, estimate_training_memory,
                                  lora_parameter_count, matrix_savings, parse_shape)


@pytest.mark.parametrize("preset,targets,rank,trainable,total", [
    ("llama-2-7b", ["q_proj", "v_proj"], 8, 4_194_304, 6_742_609_920),        # PEFT's printed reference
    ("gpt3-175b", ["q_proj", "v_proj"], 1, 4_718_592, None),                  # the paper's "4.7M"
    ("gpt3-175b", ["q_proj", "v_proj"], 8, 37_748_736, None),                 # the paper's "37.7M"
    ("gpt2", ["c_attn"], 8, 294_912, 124_734_720),                            # PEFT's GPT-2 example
    ("bert-base", ["query", "value"], 8, 294_912, 109_482_240 + 294_912),
    ("roberta-base", ["query", "value"], 8, 294_912, 124_645_632 + 294_912),
])
def test_reference_counts(preset, targets, rank, trainable, total):
    count = lora_parameter_count(build_preset(preset), targets, rank)
    assert count.trainable == trainable
    if total is not None:
        assert count.total == total
    assert count.trainable_percent == pytest.approx(100 * trainable / count.total)


def test_presets_allocate_nothing():
    model = build_preset("llama-3-8b")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_gpt3_is_175b():
    total = sum(p.numel() for p in build_preset("gpt3-175b").parameters())
    assert 174e9 < total < 176e9


@pytest.mark.parametrize("shape,rank,lora,ratio", [
    ((5, 5), 1, 10, 2.5), ((10, 10), 1, 20, 5.0), ((1000, 1000), 2, 4000, 250.0), ((512, 64), 8, 4608, 32768 / 4608),
])
def test_seed_matrix_examples(shape, rank, lora, ratio):
    result = matrix_savings(*shape, rank)
    assert result["lora_params"] == lora and result["ratio"] == pytest.approx(ratio)


def test_seed_512x64_is_86_percent_fewer():
    assert round(matrix_savings(512, 64, 8)["percent_fewer"]) == 86


def test_matrix_errors():
    with pytest.raises(ValueError, match=r"rank=6 is not allowed for module '5x5' \(5x5\): .* min\(in, out\) = 5"):
        matrix_savings(5, 5, 6)
    with pytest.raises(ValueError, match="shape '5by5'"):
        parse_shape("5by5")


def test_count_parameters_table_on_real_model():
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), targets=["0", "2"], rank=4)
    count = count_parameters(model)
    assert list(count.modules["lora_params"]) == [4 * (64 + 128), 4 * (128 + 10)]
    assert list(count.modules["full_params"]) == [64 * 128, 128 * 10]
    assert count.trainable == 4 * (64 + 128) + 4 * (128 + 10)
    assert count.total == 64 * 128 + 128 + 128 * 10 + 10 + count.trainable


def test_adapter_file_size_is_exact(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), targets=["0", "2"],
                       rank=4, rank_pattern={"2": 3})
    save_adapter(model, tmp_path)
    assert adapter_file_size(count_parameters(model).modules) == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_memory_estimate_parts():
    est = estimate_training_memory(total_params=1000, lora_params=10, dtype="bfloat16")
    # full: weights 2B + grads 2B + Adam 8B + fp32 master 4B per parameter
    assert est.full_total == 1000 * 16
    # LoRA: frozen base 2B/param; adapter fp32 4B + grads 4B + Adam 8B
    assert est.lora_total == 1000 * 2 + 10 * 16
    assert est.ratio == pytest.approx(16000 / 2160)
    assert estimate_training_memory(1000, 10, "float32").full_total == 1000 * 16
    with pytest.raises(ValueError, match="dtype='float8'"):
        estimate_training_memory(1000, 10, "float8")


def test_any_hf_config(tmp_path):
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    count = lora_parameter_count(build_from_config(tmp_path), ["q_proj", "v_proj"], 4)
    assert count.trainable == 2 * 2 * 4 * (64 + 64)


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_from_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_from_config(tmp_path / "bad.json")
    (tmp_path / "nomodel.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'model_type'"):
        build_from_config(tmp_path / "nomodel.json")
    (tmp_path / "unknown.json").write_text('{"model_type": "not-a-model"}')
    with pytest.raises(ValueError, match="model_type='not-a-model'"):
        build_from_config(tmp_path / "unknown.json")


# ---- CLI --------------------------------------------------------------------------------------------

def test_cli_llama_reference_json(capsys):
    assert main(["params", "--preset", "llama-2-7b", "--rank", "8", "--targets", "q_proj,v_proj", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == 4_194_304 and out["total_params"] == 6_742_609_920
    assert out["trainable_percent"] == pytest.approx(0.0622, abs=1e-4)
    assert len(out["modules"]) == 64
    assert out["modules"][0] == {"name": "model.layers.0.self_attn.q_proj", "shape": [4096, 4096], "rank": 8,
                                 "full_params": 16_777_216, "lora_params": 65_536, "ratio": 256.0}


def test_cli_table_output(capsys):
    assert main(["params", "--preset", "gpt3-175b", "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 4,718,592" in out and "GiB" in out


def test_cli_shape_mode(capsys):
    assert main(["params", "--shape", "1000x1000", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "4,000" in out and "250x fewer" in out


def test_cli_bad_input_is_one_line_error(capsys):
    assert main(["params", "--preset", "gpt2", "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rank=0") and "Traceback" not in err
    assert main(["params", "--preset", "gpt2", "--targets", "nonexistent"]) == 2
    assert "matched no Linear/Conv1D module" in capsys.readouterr().err


def test_rank_table_caps_rank_at_small_modules():
    from lora_analysis.params import rank_table

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    table = rank_table(model, "all-linear", [4, 32]).set_index("rank")
    assert table.loc[4, "trainable_params"] == 4 * (64 + 128) + 4 * (128 + 10)
    assert table.loc[32, "trainable_params"] == 32 * (64 + 128) + 10 * (128 + 10)   # head capped at 10
    with pytest.raises(ValueError, match="rank=0"):
        rank_table(model, "all-linear", [0])


def test_lora_parameter_count_caps_small_modules_like_the_trainer():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    count = lora_parameter_count(model, "all-linear", 32)
    assert list(count.modules["rank"]) == [32, 10]


def _params_json(capsys, *args):
    assert main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_has_one_schema_in_every_mode(capsys, tmp_path):
    config = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    preset = _params_json(capsys, "--preset", "gpt2", "--rank", "4")
    from_config = _params_json(capsys, "--config", str(tmp_path), "--rank", "4")
    shape = _params_json(capsys, "--shape", "1000x1000", "--rank", "2")
    assert preset.keys() == from_config.keys() == shape.keys()
    assert shape["trainable_params"] == 4000 and shape["total_params"] == 1_000_000 + 4000
    assert shape["lora_params"] == 4000 and shape["source"] == "1000x1000"
    assert shape["modules"] == [{"name": "1000x1000", "shape": [1000, 1000], "rank": 2, "full_params": 1_000_000,
                                 "lora_params": 4000, "ratio": 250.0}]
    assert preset["modules"][0].keys() == shape["modules"][0].keys()
    assert shape["memory_bytes"].keys() == preset["memory_bytes"].keys()


def test_cli_targets_regex_and_suffixes_mean_the_same_as_the_library(capsys):
    regex = _params_json(capsys, "--preset", "gpt2", "--rank", "2", "--targets", r"re:.*\.h\.0\.attn\.c_attn")
    suffix = _params_json(capsys, "--preset", "gpt2", "--rank", "2", "--targets", "c_attn")
    assert [m["name"] for m in regex["modules"]] == ["transformer.h.0.attn.c_attn"]
    assert len(suffix["modules"]) == 12
    assert main(["params", "--preset", "gpt2", "--targets", "re:c_attn["]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err


def test_counts_use_the_trainers_rank_rule_per_module():
    from lora_analysis.lora.config import LoRAConfig, effective_rank_alpha
    from lora_analysis.params import rank_table

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    count = lora_parameter_count(model, "all-linear", 32)
    rule = LoRAConfig(rank=32, alpha=32.0, cap_rank=True)
    assert list(count.modules["rank"]) == [effective_rank_alpha(rule, "0", 128, 64)[0],
                                           effective_rank_alpha(rule, "2", 10, 128)[0]]
    table = rank_table(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "all-linear", [32])
    assert int(table.loc[0, "trainable_params"]) == count.lora_params
