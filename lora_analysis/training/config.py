"""The settings of one fine-tuning run (:class:`TrainConfig`) and of a sweep (:class:`SweepSpec`).

Each setting is a dataclass field that carries its help text and its check, as PEFT's ``LoraConfig``
carries its help: the CLI options of ``train`` and ``sweep`` and the Fine-tune page's help texts are
generated from these fields (:func:`field_help`), and ``validate()`` runs every field's check, once.

    TrainConfig(model="mlp-digits", method="lora", rank=4, alpha=16, targets="re:fc[12]").validate()
    SweepSpec(ranks=[1, 4, 16], alphas=[16, "2r"], rslora=[False, True], full_ft=True).settings()

Targets have one text form everywhere (:func:`lora_analysis.lora.config.parse_targets`): None (the
model's default), ``"all-linear"``, ``"re:PATTERN"`` (a regex matched against the whole module name) or
``"q_proj,v_proj"`` / ``["q_proj", "v_proj"]`` (module-name suffixes).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Callable

from ..device import DEVICES
from ..lora.config import format_targets, parse_targets
from ..lora.layer import INIT_METHODS
from .hf import TASKS, check_task
from .models import check_model_name

METHODS = ("lora", "full")
Check = Callable[[str, Any], None]


def setting(default: Any = MISSING, help: str = "", check: Check | None = None, *, group: str = "",
            default_factory: Any = MISSING, **cli: Any) -> Field:
    """A dataclass field with its ``help``, its ``check(name, value)`` (raises ValueError) and the CLI
    ``group`` it is listed in. ``cli`` holds argparse overrides for :func:`~lora_analysis.cli.train`'s
    generator: ``flags`` (more option strings), ``type``, ``metavar``, ``cli_default``, ``options``
    (several options writing this one field, each ``(flag, argparse keywords)``)."""
    metadata = {"help": help, "check": check, "group": group, **cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_help(cls: type, name: str) -> str:
    """The help text of setting ``name`` of ``cls`` (for CLI options and dashboard widgets)."""
    return {f.name: f.metadata["help"] for f in fields(cls)}[name]


# ---- checks: each raises ValueError naming the value and what is allowed -------------------------------

def _refuse(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def integer(low: int, optional: bool = True) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _refuse(name, value, f"{name} must be an integer >= {low}")
    return check


def number(low: float, *, inclusive: bool = False, optional: bool = True) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (value < low if inclusive else value <= low):
            _refuse(name, value, f"{name} must be a finite number {'>=' if inclusive else '>'} {low}")
    return check


# AdamW's first step moves each weight by lr / (1 - β1) = 10·lr, computed in the weights' float32: above
# this the step itself overflows. Any smaller learning rate runs, and a run that diverges stops as "failed"
# (trainer.DIVERGED_FACTOR).
MAX_LR = 3.0e37


def learning_rate(name: str, value: Any) -> None:
    number(0.0)(name, value)
    if value is not None and value > MAX_LR:
        _refuse(name, value, f"{name} must be at most {MAX_LR:g}: AdamW's first step (10·lr) would overflow "
                             "float32; typical values are 1e-5 to 1e-2")


def probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        _refuse(name, value, f"{name} must be in [0, 1)")


def one_of(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            _refuse(name, value, f"choose one of {', '.join(choices)}")
    return check


def text(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        _refuse(name, value, f"{name} must be a string or None")


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _refuse(name, value, f"{name} must be True or False")


def model_name(name: str, value: Any) -> None:
    check_model_name(value)


def task_name(name: str, value: Any) -> None:
    check_task(value)


def targets_text(name: str, value: Any) -> None:
    parse_targets(value)       # raises ValueError naming a bad regex or entry


def device_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _refuse(name, value, f"choose one of {', '.join(DEVICES)} (or e.g. cuda:1)")
    from ..device import pick_device
    pick_device(value)          # names what this machine has


# ---- the settings every run of a sweep shares ----------------------------------------------------------

@dataclass
class RunSettings:
    """Settings shared by every run of a sweep. ``None`` means "the model's default" (``models.DEFAULTS``)."""

    model: str = setting("mlp-digits", "mlp-digits, tiny-gpt, minilm, a Hugging Face hub id or a local model folder",
                         model_name, group="model and data")
    data: str | None = setting(None, "CSV table (mlp-digits); for language models a corpus name (python-docs, "
                                     "python-source), for encoders (minilm, BERT...) a text task "
                                     "(bshift-python-docs), or for any of them a .txt/.jsonl/.json/.csv/.parquet "
                                     "file, a folder of them, or a Hugging Face dataset id (loaded with datasets); "
                                     "default: the model's own task", text, group="model and data")
    data_split: str | None = setting(None, "training split of a dataset (e.g. train, or train[:2000]); the held-out "
                                           "split is its validation or test split, else a seeded fraction "
                                           "(default: train)", text, group="model and data")
    data_config: str | None = setting(None, "config name of a Hugging Face dataset (e.g. wikitext-2-raw-v1)", text,
                                      group="model and data")
    label_column: str | None = setting(None, "label column of a CSV table or text-classification file (default: label, "
                                             "target or class)", text, group="model and data")
    text_field: str | None = setting(None, "text column of the data: the training text (language models, packed "
                                           "into windows) or the texts to classify (encoders) (default: text)", text,
                                     group="model and data", flags=("--text-column",))
    prompt_column: str | None = setting(None, "prompt column of instruction data (Hugging Face causal LMs; the loss "
                                              "is on the response only) (default: prompt, instruction or question "
                                              "when a response column is there too)", text, group="model and data")
    response_column: str | None = setting(None, "response column of instruction data (default: response, "
                                                "completion, output or answer)", text, group="model and data")
    messages_column: str | None = setting(None, "column of chat conversations, lists of {role, content} messages "
                                                "rendered with the tokenizer's chat template; the loss is on the "
                                                "assistant turns only (default: messages, when present)", text,
                                          group="model and data")
    task: str | None = setting(None, "classification (encoders: BERT, RoBERTa, DeBERTa, ModernBERT...) or causal-lm "
                                     "(default: what the model's config says)", task_name, group="model and data",
                               choices=TASKS)
    seq_len: int | None = setting(None, "tokens per training window (language models) or at most per text "
                                        "(encoders; default: the model's)",
                                  integer(2), group="model and data")
    pretrain_steps: int | None = setting(None, "pretraining steps of a built-in base (default: the model's; "
                                               "the cache keeps one base per value)", integer(1),
                                         group="model and data")
    dropout: float = setting(0.0, "dropout probability on the LoRA path's input, in [0, 1)", probability,
                             group="LoRA")
    init: str = setting("kaiming", "LoRA init: kaiming (A Kaiming-uniform, B zeros; PEFT's default), gaussian "
                                   "or pissa (A, B from the top-r SVD of W)", one_of(INIT_METHODS),
                        group="LoRA", choices=INIT_METHODS)
    lr: float | None = setting(None, "AdamW learning rate (default: per model and method; LoRA takes a larger one)",
                               learning_rate, group="optimisation")
    steps: int | None = setting(None, "training steps (default: per model)", integer(1), group="optimisation")
    batch_size: int | None = setting(None, "rows or token windows per step (default: per model)", integer(1),
                                     group="optimisation")
    eval_every: int | None = setting(None, "evaluate every N steps, and at the end (default: per model)", integer(1),
                                     group="optimisation")
    weight_decay: float = setting(0.0, "AdamW weight decay", number(0.0, inclusive=True, optional=False),
                                  group="optimisation")
    grad_clip: float | None = setting(1.0, "clip the gradient norm at this value (0: no clipping)",
                                      number(0.0, inclusive=True), group="optimisation")
    seed: int = setting(0, "seeds LoRA's init, dropout and the batch order: the same seed gives the same losses "
                           "on CPU", integer(0, optional=False), group="optimisation")
    device: str = setting("auto", "auto (cuda > mps > cpu), cuda, mps or cpu", device_name, group="optimisation")
    bf16: bool = setting(False, "bfloat16 autocast (CUDA only)", flag, group="optimisation")
    gradient_checkpointing: bool = setting(False, "trade compute for memory: recompute activations in the backward "
                                                  "pass (Hugging Face models that support it, and tiny-gpt)", flag, group="optimisation")
    compile: bool = setting(False, "compile the model with torch.compile (in place; first steps are slower)", flag,
                            group="optimisation")
    max_eval_tokens: int = setting(16384, "tokens per evaluation at most (language models)",
                                   integer(1, optional=False), group="optimisation")
    threads: int | None = setting(None, "CPU threads torch uses for the run (default 0: auto, one thread for the "
                                        "toy built-ins and any model under 5M parameters, torch's default "
                                        "otherwise; recorded in the run)", integer(0), group="optimisation")

    def check_fields(self) -> None:
        """Run every field's check (each raises ValueError naming the value and what is allowed)."""
        for f in fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what} setting(s) {', '.join(unknown)}: allowed are "
                             f"{', '.join(sorted(known))}")
        return cls(**d)

    _what = "run"


# ---- one run ------------------------------------------------------------------------------------------

@dataclass
class TrainConfig(RunSettings):
    """One fine-tuning run: the shared settings plus the method and its LoRA rank, alpha, scaling, targets.
    A rank above a module's min(out, in) is capped there, keeping the run's scaling α/r (α/√r)."""

    method: str = setting("lora", "lora (base frozen, only A and B train) or full (every parameter trains)",
                          one_of(METHODS), group="method", choices=METHODS)
    rank: int = setting(8, "LoRA rank r of B·A (a module smaller than r gets min(out, in), same scaling)",
                        integer(1, optional=False), group="LoRA", flags=("-r",))
    alpha: float | None = setting(None, "LoRA alpha, the numerator of the scaling α/r (default: equal to the rank, "
                                        "scaling 1)", number(0.0), group="LoRA")
    rslora: bool = setting(False, "scale by α/√r (rsLoRA) instead of α/r", flag, group="LoRA")
    targets: str | list[str] | None = setting(
        None, "modules to adapt: q_proj,v_proj (module-name suffixes), re:PATTERN (a regex matched against the "
              "whole module name) or all-linear (default: the model's own, e.g. q_proj,v_proj; all-linear for "
              "mlp-digits)", targets_text, group="LoRA")

    _what = "training"

    def __post_init__(self) -> None:
        self.targets = canonical_targets(self.targets)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting and what is allowed."""
        self.check_fields()


def canonical_targets(value: Any) -> Any:
    """The stored text form of targets: None, "all-linear", "re:PATTERN" or a list of suffixes ("a,b" is
    split). A value the parser refuses is left as is for ``validate()`` to name."""
    try:
        parsed = parse_targets(value)
    except ValueError:
        return value
    return parsed if parsed is None or isinstance(parsed, list) else format_targets(parsed)


# ---- a sweep ------------------------------------------------------------------------------------------

def as_choices(value: Any) -> list:
    """A grid axis as a list: a list/tuple as is, a comma-separated string split, a single value wrapped."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def parse_alpha(value: Any, rank: int) -> float:
    """Alpha as a number, or relative to the rank: "r", "2r", "0.5r"."""
    if isinstance(value, str):
        s = value.strip().lower()
        try:
            return float(s[:-1] or 1) * rank if s.endswith("r") else float(s)
        except ValueError:
            raise ValueError(f"alpha={value!r} is not allowed: give a number or a multiple of the rank like "
                             "'r' or '2r'") from None
    return value


def as_ranks(value: Any) -> list:
    """Ranks as a list, digit strings ("4") as integers; anything else is left for the check to name."""
    return [int(r) if isinstance(r, str) and r.strip().isdigit() else r for r in as_choices(value)]


def _ranks(name: str, value: Any) -> None:
    for r in as_ranks(value):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            _refuse(name, value, f"every rank must be an integer >= 1 (rank={r!r} is not)")


def _alphas(name: str, value: Any) -> None:
    for a in as_choices(value):
        number(0.0, optional=False)("alpha", parse_alpha(a, 1))


def _rslora_choices(name: str, value: Any) -> None:
    if any(not isinstance(v, bool) for v in as_choices(value)):
        _refuse(name, value, "give True (α/√r), False (α/r) or both")


def _target_choices(name: str, value: Any) -> None:
    for choice in _targets_axis(value):
        parse_targets(choice)


def _targets_axis(value: Any) -> list:
    """Target choices: a string is ONE choice (its commas separate suffixes), a list holds choices."""
    if value is None or isinstance(value, str):
        return [value]
    return list(value) or [None]


@dataclass
class SweepSpec(RunSettings):
    """A sweep: the grid ranks × alphas × scalings × target choices of LoRA runs, plus one full fine-tuning
    run when ``full_ft``; every other setting is shared by all runs.

    The classic studies: rank ``ranks=[1..32], alphas=[16]``; alpha at fixed rank ``ranks=[8],
    alphas=["r", "2r", 16]``; α/r vs rsLoRA ``rslora=[False, True]``; targets ``targets=["q_proj,v_proj",
    "all-linear"]``.
    """

    ranks: list[int] | str = setting(default_factory=lambda: [1, 2, 4, 8, 16, 32],
                                     help="LoRA ranks to sweep, one run each (as text: comma-separated)", check=_ranks, group="sweep",
                                     type=as_ranks, metavar="1,2,4,...")
    alphas: list[float | str] | str = setting(default_factory=lambda: [16],
                                              help="LoRA alphas to sweep: numbers or multiples of the rank such "
                                                   "as r, 2r (as text: comma-separated)", check=_alphas, group="sweep",
                                              type=as_choices, metavar="16,2r,...")
    rslora: list[bool] | bool = setting(
        default_factory=lambda: [False], help="scale by α/√r (rsLoRA) instead of α/r in every run",
        check=_rslora_choices, group="sweep",
        options=(("--rslora", {"action": "store_const", "const": [True]}),
                 ("--compare-rslora", {"action": "store_const", "const": [False, True],
                                       "help": "run each setting with α/r and with α/√r"})))
    targets: list[str | list[str] | None] | str | None = setting(
        default_factory=lambda: [None],
        help="a target choice: q_proj,v_proj (module-name suffixes), re:PATTERN (a regex matched against the "
             "whole module name) or all-linear (default: the model's own); repeat to compare",
        check=_target_choices, group="sweep", action="append", cli_default=None)
    full_ft: bool = setting(True, "add the full fine-tuning baseline run", flag, group="sweep", cli_default=False)

    _what = "sweep"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting; every run's config is checked too, so a bad
        sweep fails before any run starts."""
        self.settings()

    def settings(self) -> list[tuple[str, TrainConfig]]:
        """The (label, config) of every run, LoRA grid first (targets, then scaling, alpha, rank), full FT
        last."""
        self.check_fields()
        ranks = as_ranks(self.ranks)
        alphas, scalings, targets = as_choices(self.alphas), as_choices(self.rslora) or [False], \
            _targets_axis(self.targets)
        if not ranks and not self.full_ft:
            raise ValueError("the sweep is empty: give at least one rank or full_ft=True")
        if ranks and not alphas:
            raise ValueError("alphas is empty: give at least one alpha (a number, 'r' or '2r')")
        common = {f.name: getattr(self, f.name) for f in fields(RunSettings)}
        out: list[tuple[str, TrainConfig]] = []
        for target in targets:
            for rslora in scalings:
                for alpha in alphas:
                    for rank in ranks:
                        a = parse_alpha(alpha, rank)
                        cfg = TrainConfig(**common, method="lora", rank=rank, alpha=a, rslora=rslora,
                                          targets=target)
                        cfg.validate()
                        parts = [f"r={rank}", f"α={a:g}"]
                        if len(scalings) > 1 or rslora:
                            parts.append("α/√r" if rslora else "α/r")
                        if len(targets) > 1 or target is not None:
                            parts.append(format_targets(parse_targets(target)) or "default")
                        out.append(("LoRA " + " ".join(parts), cfg))
        if self.full_ft:
            cfg = TrainConfig(**common, method="full")
            cfg.validate()
            out.append(("full FT", cfg))
        return out
