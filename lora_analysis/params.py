"""Parameter accounting: how many values LoRA trains, how much memory training needs, how big the file is.

Counts are exact and come from real modules: presets are built from their architecture's shapes on
PyTorch's ``meta`` device (no weights are allocated or downloaded), then ``apply_lora`` is applied as
for a real model. Totals include the LoRA parameters, as PEFT's ``print_trainable_parameters`` does.
A Hugging Face config is checked before anything is built: layer and expert counts are bounded
(:data:`MAX_CONFIG_LAYERS`, :data:`MAX_CONFIG_EXPERTS`) and a config that builds no model is one ``ValueError``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .lora.config import ALL_LINEAR, LoRAConfig, Targets, effective_rank_alpha
from .lora.layer import linear_shape
from .lora.model import apply_lora, find_targets, lora_layers

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1}


@dataclass
class ParameterCount:
    """Totals and a per-module table (name, shape, full_params, lora_params, ratio)."""

    trainable: int
    total: int
    modules: pd.DataFrame

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def lora_params(self) -> int:
        return int(self.modules["lora_params"].sum()) if len(self.modules) else 0

    @property
    def full_params_of_targets(self) -> int:
        return int(self.modules["full_params"].sum()) if len(self.modules) else 0

    def to_dict(self) -> dict:
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": self.trainable_percent,
            "lora_params": self.lora_params,
            "modules": [{"name": r.name, "shape": [int(r.out_features), int(r.in_features)],
                         "rank": int(r.rank), "full_params": int(r.full_params), "lora_params": int(r.lora_params),
                         "ratio": float(r.ratio)} for r in self.modules.itertuples()],
        }


COLUMNS = ["name", "out_features", "in_features", "rank", "full_params", "lora_params", "ratio"]


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters of ``model`` and one row per LoRA layer.

    ``ratio`` is full_params / lora_params: how many times fewer values LoRA trains for that weight.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name, layer in lora_layers(model).items():
        full = layer.out_features * layer.in_features
        lora = layer.rank * (layer.in_features + layer.out_features)
        rows.append({"name": name, "out_features": layer.out_features, "in_features": layer.in_features,
                     "rank": layer.rank, "full_params": full, "lora_params": lora, "ratio": full / lora})
    return ParameterCount(trainable, total, pd.DataFrame(rows, columns=COLUMNS))


def matrix_savings(out_features: int, in_features: int, rank: int) -> dict:
    """The seeds' arithmetic for one d×k matrix: r·(d+k) LoRA values instead of d·k.

    >>> matrix_savings(1000, 1000, 2)["lora_params"]
    4000
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"shape {out_features}x{in_features} is not allowed: both sizes must be >= 1")
    name = f"{out_features}x{in_features}"
    rank, _ = effective_rank_alpha(LoRAConfig(rank=rank, alpha=1.0), name, out_features, in_features)
    full, lora = out_features * in_features, rank * (out_features + in_features)
    return {"shape": [out_features, in_features], "rank": rank, "full_params": full, "lora_params": lora,
            "ratio": full / lora, "percent_fewer": 100.0 * (1 - lora / full)}


def matrix_count(out_features: int, in_features: int, rank: int) -> ParameterCount:
    """:func:`matrix_savings` as a :class:`ParameterCount` of one bias-free matrix named ``"OUTxIN"`` (total
    includes the LoRA values, as for a model), so every mode of ``params`` reports the same fields."""
    m = matrix_savings(out_features, in_features, rank)
    row = {"name": f"{out_features}x{in_features}", "out_features": out_features, "in_features": in_features,
           "rank": m["rank"], "full_params": m["full_params"], "lora_params": m["lora_params"], "ratio": m["ratio"]}
    return ParameterCount(m["lora_params"], m["full_params"] + m["lora_params"], pd.DataFrame([row], columns=COLUMNS))


def parse_shape(text: str) -> tuple[int, int]:
    """"1000x1000" → (1000, 1000) as (out, in)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        out_f, in_f = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shape {text!r} is not allowed: write OUTxIN, e.g. 1000x1000") from None
    return out_f, in_f


# ---- architecture presets (shapes only) ----------------------------------------------------------

# Hugging Face configs of the public checkpoints, written out so nothing is downloaded.
HF_PRESETS: dict[str, dict] = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
             "n_head": 12},
    "bert-base": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                  "type_vocab_size": 2},
    "roberta-base": {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "pad_token_id": 1},
    "roberta-large": {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 1024,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                      "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1},
    "llama-2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False},
}

# Which modules the LoRA paper / PEFT adapt by default for each preset (attention query and value).
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "bert-base": ["query", "value"], "roberta-base": ["query", "value"],
                   "roberta-large": ["query", "value"], "llama-2-7b": ["q_proj", "v_proj"],
                   "llama-3-8b": ["q_proj", "v_proj"], "mistral-7b": ["q_proj", "v_proj"],
                   "gpt3-175b": ["q_proj", "v_proj"]}


class _GPT3Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT3Shapes(nn.Module):
    """GPT-3's shapes (Brown et al. 2020, Table 2.1): a GPT-2 style decoder with separate Wq, Wk, Wv, Wo.

    Only for counting: built on the meta device, it has no forward pass. GPT-3 175B: 96 layers,
    d_model 12288, context 2048, vocabulary 50257, tied input/output embedding.
    """

    def __init__(self, n_layer: int = 96, d_model: int = 12288, n_ctx: int = 2048, vocab: int = 50257) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(n_ctx, d_model)
        self.h = nn.ModuleList(_GPT3Block(d_model) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)


# A config is a few bytes that say how much to build: ``num_hidden_layers: 5000`` in a 142-byte file would
# build 5000 layers (minutes, even on the meta device: up to ~30 ms a layer for BERT). What is built is bounded
# first (check_config_size), above the largest public models (Llama 3.1 405B: 126 layers; DeepSeek-V3: 256
# routed experts a layer), so a config is built in a few seconds at most.
MAX_CONFIG_LAYERS = 160
MAX_CONFIG_EXPERTS = 512
MAX_CONFIG_EXPERT_MODULES = 32768        # layers × experts
_LAYER_KEYS = re.compile(r"layers$|^n_layer$|^(num|n)_blocks$")
_EXPERT_KEYS = re.compile(r"experts$")
# what transformers raises for a config whose values make no model (a wrong type, a negative size)
try:
    from huggingface_hub.errors import StrictDataclassError as _StrictError
except ImportError:  # pragma: no cover - older huggingface_hub
    _StrictError = ValueError
_BAD_CONFIG = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
               RuntimeError, AssertionError, _StrictError)


def check_config_size(config: dict, where: str = "") -> None:
    """Raise ``ValueError`` when a config asks for more layers or experts than any real model has, or gives
    a layer/expert count that is not a whole number (nested configs, e.g. ``text_config``, included)."""
    layers = experts = 1
    for key, value in config.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            check_config_size(value, f"{name}.")
            continue
        is_layers, is_experts = bool(_LAYER_KEYS.search(key)), bool(_EXPERT_KEYS.search(key))
        if not (is_layers or is_experts) or value is None or isinstance(value, (list, tuple)):
            continue            # a list names layers (e.g. mlp_only_layers), it does not count them
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the config's {name}={value!r} is not allowed: it must be a whole number >= 0")
        limit = MAX_CONFIG_LAYERS if is_layers else MAX_CONFIG_EXPERTS
        if value > limit:
            raise ValueError(f"the config's {name}={value} is not allowed: at most {limit} "
                             f"{'layers' if is_layers else 'experts'} are counted (the largest public models "
                             "have fewer)")
        if is_layers:
            layers = max(layers, value)
        else:
            experts = max(experts, value)
    if layers * experts > MAX_CONFIG_EXPERT_MODULES:
        raise ValueError(f"the config asks for {layers} layers of {experts} experts: at most "
                         f"{MAX_CONFIG_EXPERT_MODULES} experts in all are counted")


def _build_hf(config_dict: dict) -> nn.Module:
    check_config_size(config_dict)          # before anything is imported or built
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a runtime requirement
        raise ValueError("counting a Hugging Face config needs the 'transformers' package") from exc
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if not model_type or not isinstance(model_type, str):
        raise ValueError("the config has no 'model_type' key (text): is it a Hugging Face config.json?")
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model_type={model_type!r} is not a Hugging Face architecture this transformers "
                         f"version knows, or its config is not valid ({_one_line(exc)})") from None
    except _BAD_CONFIG as exc:
        raise ValueError(f"the {model_type} config is not valid: {_one_line(exc)}") from None
    import transformers

    # The class the config names (e.g. BertForSequenceClassification) when transformers has it; else a
    # causal LM for decoders and the bare model for encoders, which have no causal-LM head.
    architectures = getattr(config, "architectures", None)
    architectures = architectures if isinstance(architectures, (list, tuple)) else []
    arch = next((a for a in architectures if isinstance(a, str) and hasattr(transformers, a)), None)
    try:
        with torch.device("meta"):
            if arch is not None:
                return getattr(transformers, arch)(config)
            if model_type in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
                return AutoModel.from_config(config)
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:
                return AutoModel.from_config(config)
    except _BAD_CONFIG as exc:
        raise ValueError(f"the {model_type} config does not build a model: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "camembert", "mpnet"}


PRESETS: dict[str, Callable[[], nn.Module]] = {name: (lambda c=cfg: _build_hf(c)) for name, cfg in HF_PRESETS.items()}
PRESETS["gpt3-175b"] = lambda: _meta(GPT3Shapes)


def _meta(cls) -> nn.Module:
    with torch.device("meta"):
        return cls()


def build_preset(name: str) -> nn.Module:
    """A preset architecture on the meta device (shapes only, no memory)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not known: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def build_from_config_dict(config: dict) -> nn.Module:
    """Any Hugging Face config (the parsed ``config.json``) built on the meta device."""
    if not isinstance(config, dict):
        raise ValueError(f"a Hugging Face config must be a JSON object, got {type(config).__name__}")
    return _build_hf(config)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the Linear/Conv1D modules (what ``targets`` suffixes can name)."""
    from .lora.layer import is_adaptable

    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if n and is_adaptable(m)})


def build_from_config(path: str | Path) -> nn.Module:
    """Any Hugging Face ``config.json`` built on the meta device."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file '{path}' is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"config file '{path}' must hold a JSON object")
    return build_from_config_dict(config)


def lora_parameter_count(model: nn.Module, targets: Targets = ALL_LINEAR, rank: int = 8,
                         alpha: float | None = None, rslora: bool = False,
                         rank_pattern: dict | None = None) -> ParameterCount:
    """Count what LoRA with these settings would train on ``model`` (applied to the model in place;
    pass a meta-device model to count without allocating). Ranks follow the trainer's rule,
    :func:`~lora_analysis.lora.config.effective_rank_alpha` with ``cap_rank=True``: a module smaller than
    the rank gets rank min(out, in) (a 10-class head trains at most rank 10)."""
    apply_lora(model, targets=targets, rank=rank, alpha=alpha, rslora=rslora, rank_pattern=rank_pattern,
               cap_rank=True)
    return count_parameters(model)


# ---- memory -----------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Training memory in bytes, by part, for full fine-tuning and LoRA. Activations are excluded: they
    depend on batch size and sequence length and are the same order for both methods."""

    table: pd.DataFrame   # rows: weights, gradients, optimizer, master weights; columns: full, lora
    dtype: str

    @property
    def full_total(self) -> int:
        return int(self.table["full"].sum())

    @property
    def lora_total(self) -> int:
        return int(self.table["lora"].sum())

    @property
    def ratio(self) -> float:
        return self.full_total / self.lora_total


def estimate_training_memory(total_params: int, lora_params: int, dtype: str = "bfloat16",
                             optimizer: str = "adamw") -> MemoryEstimate:
    """Bytes held during training with AdamW (two fp32 moments per trainable parameter).

    Full FT: weights and gradients in ``dtype``, Adam moments in fp32, and an fp32 master copy when
    ``dtype`` is 16-bit (mixed precision). LoRA: frozen base in ``dtype``; LoRA factors, their gradients
    and moments in fp32 (PEFT keeps adapters in fp32). ``total_params`` excludes the LoRA parameters.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer={optimizer!r} is not allowed: choose adamw or sgd")
    b = DTYPE_BYTES[dtype]
    states = 8 if optimizer == "adamw" else 0
    master = 4 if b < 4 else 0
    table = pd.DataFrame({
        "full": [total_params * b, total_params * b, total_params * states, total_params * master],
        "lora": [total_params * b + lora_params * 4, lora_params * 4, lora_params * states, 0],
    }, index=["weights", "gradients", "optimizer states", "fp32 master weights"])
    return MemoryEstimate(table, dtype)


def adapter_file_size(modules: pd.DataFrame, dtype_bytes: int = 4) -> int:
    """Exact size in bytes of the ``adapter_model.safetensors`` our ``save_adapter`` writes for these
    modules (rows with name, rank, in_features, out_features): data plus safetensors' JSON header."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    dtype = {4: "F32", 2: "BF16"}[dtype_bytes]
    for r in modules.itertuples():
        for key, shape in ((f"base_model.model.{r.name}.lora_A.weight", [int(r.rank), int(r.in_features)]),
                           (f"base_model.model.{r.name}.lora_B.weight", [int(r.out_features), int(r.rank)])):
            size = math.prod(shape) * dtype_bytes
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def rank_table(model: nn.Module, targets: Targets, ranks: list[int], dtype: str = "bfloat16") -> pd.DataFrame:
    """One row per rank: trainable/total parameters, % of full, adapter file size and training memory.

    ``model`` is not modified (pass a meta-device preset: free to build); every rank's count follows from
    the targeted shapes, since LoRA trains r·(in + out) values per module, r from
    :func:`~lora_analysis.lora.config.effective_rank_alpha` (capped at min(out, in), as the trainer does).
    """
    base_total = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    shapes = {name: linear_shape(modules[name]) for name in find_targets(model, LoRAConfig(targets=targets))}
    rows = []
    for r in ranks:
        rule = LoRAConfig(targets=targets, rank=r, alpha=1.0, cap_rank=True)     # alpha does not change counts
        table = pd.DataFrame([{"name": name, "out_features": o, "in_features": i,
                               "rank": effective_rank_alpha(rule, name, o, i)[0], "full_params": o * i}
                              for name, (o, i) in shapes.items()])
        table["lora_params"] = table["rank"] * (table["in_features"] + table["out_features"])
        lora = int(table["lora_params"].sum())
        mem = estimate_training_memory(base_total, lora, dtype)
        rows.append({"rank": r, "trainable_params": lora, "total_params": base_total + lora,
                     "base_params": base_total, "trainable_percent": 100.0 * lora / (base_total + lora),
                     "adapter_bytes": adapter_file_size(table), "memory_full_bytes": mem.full_total,
                     "memory_lora_bytes": mem.lora_total, "target_full_params": int(table["full_params"].sum())})
    return pd.DataFrame(rows)
