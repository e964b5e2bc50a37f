"""What a LoRA adapter is: the settings PEFT's ``LoraConfig`` holds, as a plain dataclass, plus the two rules
every part of the library shares: which rank and alpha a module gets (:func:`effective_rank_alpha`) and what a
``targets`` text means (:func:`parse_targets`).

Every field matches the key of the same meaning in PEFT's ``adapter_config.json`` so that adapters move
both ways (see :mod:`lora_analysis.lora.adapter_io`). Each field carries its help text in
``field(metadata={"help": ...})``, as PEFT's ``LoraConfig`` does, so a CLI or a page can show it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

from .layer import compute_scaling, validate_hyperparameters

Targets = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"


@dataclass
class LoRAConfig:
    """Settings of one LoRA adapter (see each field's ``metadata["help"]``)."""

    targets: Targets = field(default=ALL_LINEAR, metadata={"help": (
        "modules to adapt: a list of module-name suffixes (['q_proj', 'v_proj'] matches '...attn.q_proj'), a "
        "str regular expression matched against the whole module name, or 'all-linear' (every Linear/Conv1D "
        "except the output head, MultiheadAttention's out_proj and modules_to_save)")})
    rank: int = field(default=8, metadata={"help": "r, the inner dimension of B·A; the default for modules not "
                                                    "in rank_pattern"})
    alpha: float = field(default=8.0, metadata={"help": "the numerator of the scaling alpha/r (alpha/sqrt(r) "
                                                         "with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability on the LoRA path's input, in [0, 1)"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski "
                                                           "2023) instead of alpha/r"})
    init: str = field(default="kaiming", metadata={"help": (
        "'kaiming' (A Kaiming-uniform, B zeros; PEFT's default), 'gaussian' (A ~ N(0, 1/r), B zeros) or "
        "'pissa' (A, B from the top-r SVD of W; W keeps the residual)")})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": (
        "{pattern: rank} overrides; a pattern matches a module as PEFT matches it: the regex "
        "'(.*\\.)?PATTERN$' against the full name, so 'fc' also matches 'sub.fc' ('^' + re.escape(name) "
        "matches one module only)")})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "{pattern: alpha} overrides, matched as rank_pattern")})
    modules_to_save: list[str] = field(default_factory=list, metadata={"help": (
        "modules (name suffixes) kept fully trainable and saved with the adapter, e.g. a new classifier head")})
    bias: str = field(default="none", metadata={"help": "'none' only (LoRA bias training is not supported)"})
    cap_rank: bool = field(default=False, metadata={"help": (
        "cap a module's rank at min(out, in) and keep the scaling alpha/r (alpha/sqrt(r)) of the uncapped "
        "setting; a creation-time policy (a saved adapter records each module's actual rank)")})

    def rank_for(self, module_name: str) -> int:
        """The rank ``rank_pattern`` gives ``module_name`` (PEFT's rule), before any cap."""
        return self.rank_pattern[key] if (key := pattern_key(self.rank_pattern, module_name)) else self.rank

    def alpha_for(self, module_name: str) -> float:
        """The alpha ``alpha_pattern`` gives ``module_name`` (PEFT's rule), before any cap."""
        return self.alpha_pattern[key] if (key := pattern_key(self.alpha_pattern, module_name)) else self.alpha

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return d


def alpha_for_scaling(scaling: float, rank: int, rslora: bool = False) -> float:
    """The alpha that gives ``scaling`` at ``rank``: the inverse of :func:`~.layer.compute_scaling`."""
    return scaling * (math.sqrt(rank) if rslora else rank)


def effective_rank_alpha(config: LoRAConfig, name: str, out_features: int, in_features: int) -> tuple[int, float]:
    """THE rank and alpha module ``name`` (an (out, in) weight) gets when an adapter is created.

    First the patterns (PEFT's rule), then the cap: with ``config.cap_rank`` a rank above min(out, in) becomes
    min(out, in) and alpha is rescaled so the scaling stays the uncapped α/r (α/√r); without it, such a rank
    raises ``ValueError``, as does any bad setting (:func:`~.layer.validate_hyperparameters`). Loading a saved
    adapter does not call this: its tensors say each module's rank, and any rank >= 1 is legal there.
    """
    rank, alpha = config.rank_for(name), config.alpha_for(name)
    smallest = min(out_features, in_features)
    too_big = isinstance(rank, int) and not isinstance(rank, bool) and rank > smallest
    validate_hyperparameters(name, smallest if too_big else rank, alpha, config.dropout, out_features,
                             in_features, config.init)
    if not too_big:
        return rank, alpha
    if not config.cap_rank:
        raise ValueError(f"rank={rank!r} is not allowed for module '{name}' ({out_features}x{in_features}): "
                         f"rank must be an integer from 1 to min(in, out) = {smallest} (or set cap_rank=True "
                         "to cap it there)")
    return smallest, alpha_for_scaling(compute_scaling(rank, alpha, config.rslora), smallest, config.rslora)


# ---- pattern keys (PEFT's rank_pattern / alpha_pattern) ------------------------------------------------

# A key is a regular expression that a hostile adapter controls: ``(a+)+b`` against a long module name
# backtracks for minutes (Python's ``re`` has no time limit). Keys are therefore bounded before any match:
# at most MAX_PATTERN_CHARS characters, no repeat inside a repeat, no alternation inside a repeat, no
# back-references, and at most MAX_UNBOUNDED_REPEATS open-ended repeats (``*``, ``+``, ``{n,}``), so the
# matching time is polynomial of small degree in the module name's length, which is itself bounded
# (MAX_MODULE_NAME_CHARS). Every legitimate key (module names, ``^`` + escaped names, ``layers\.\d+\.fc``,
# ``(q|v)_proj``) passes; the common literal keys are matched without a regex at all.
MAX_PATTERN_CHARS = 256
MAX_UNBOUNDED_REPEATS = 2
MAX_MODULE_NAME_CHARS = 512
_REGEX_META = set("\\^$.|?*+()[]{}")


def _walk_regex(items, key: str, inside_repeat: bool, counts: dict) -> None:
    from re import _constants as c  # the parser's opcodes (Python >= 3.11)

    for op, arg in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            low, high, body = arg
            repeats = high is c.MAXREPEAT or high > 1
            if repeats and inside_repeat:
                raise ValueError(f"pattern key {key!r} is not allowed: a repeated group inside a repeat "
                                 "(e.g. '(a+)+') can take exponential time to match")
            if high is c.MAXREPEAT:
                counts["unbounded"] += 1
            _walk_regex(body, key, inside_repeat or repeats, counts)
        elif op is c.BRANCH:
            if inside_repeat:
                raise ValueError(f"pattern key {key!r} is not allowed: an alternation inside a repeat "
                                 "(e.g. '(a|aa)+') can take exponential time to match")
            for branch in arg[1]:
                _walk_regex(branch, key, inside_repeat, counts)
        elif op is c.SUBPATTERN:
            _walk_regex(arg[-1], key, inside_repeat, counts)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            raise ValueError(f"pattern key {key!r} is not allowed: back-references are not supported")
        elif op in (c.ASSERT, c.ASSERT_NOT):
            _walk_regex(arg[1], key, inside_repeat, counts)
        elif op is getattr(c, "ATOMIC_GROUP", None):
            _walk_regex(arg, key, inside_repeat, counts)


@functools.lru_cache(maxsize=4096)
def safe_regex(key: str, what: str = "rank_pattern/alpha_pattern key") -> re.Pattern:
    """``key`` compiled, after the checks above; ``ValueError`` naming the key and the rule it breaks."""
    if not isinstance(key, str):
        raise ValueError(f"{what} {key!r} is not allowed: it must be text")
    if len(key) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} {key[:40]!r}… is not allowed: it has {len(key)} characters, at most "
                         f"{MAX_PATTERN_CHARS} are allowed")
    try:
        from re import _parser
        parsed = _parser.parse(key)
        compiled = re.compile(key)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"{what} {key!r} is not a valid regular expression ({exc})") from None
    counts = {"unbounded": 0}
    try:
        _walk_regex(list(parsed), key, False, counts)
    except ValueError as exc:
        raise ValueError(str(exc).replace("pattern key", what, 1)) from None
    if counts["unbounded"] > MAX_UNBOUNDED_REPEATS:
        raise ValueError(f"{what} {key!r} is not allowed: it has {counts['unbounded']} open-ended repeats "
                         f"(*, +, {{n,}}), at most {MAX_UNBOUNDED_REPEATS} are allowed")
    return compiled


def check_module_name(name: str) -> None:
    """Module names are matched against user regexes: bound their length (real ones are < 200 chars)."""
    if len(name) > MAX_MODULE_NAME_CHARS:
        raise ValueError(f"module name {name[:40]!r}… is not allowed: it has {len(name)} characters, at most "
                         f"{MAX_MODULE_NAME_CHARS} are allowed")


@functools.lru_cache(maxsize=4096)
def _literal_key(key: str) -> tuple[bool, str] | None:
    """``(anchored, name)`` when ``key`` is a plain name (no regex syntax at all) or ``^`` + an escaped name,
    so that PEFT's regex rule reduces to string tests; None when it needs the regex engine."""
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    if not set(body) & _REGEX_META:
        return anchored, body
    name = re.sub(r"\\(.)", r"\1", body)      # undo re.escape
    return (anchored, name) if re.escape(name) == body else None


def _key_matches(key: str, module_name: str) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", module_name)``, without backtracking risks."""
    literal = _literal_key(key)
    if literal is not None:
        anchored, name = literal
        return module_name == name or (not anchored and module_name.endswith("." + name))
    safe_regex(key)
    check_module_name(module_name)
    return _peft_rule(key).match(module_name) is not None


@functools.lru_cache(maxsize=4096)
def _peft_rule(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


def check_pattern_keys(patterns: dict, what: str) -> None:
    """Raise ``ValueError`` for the first key of ``patterns`` that :func:`safe_regex` refuses."""
    for key in patterns:
        if not isinstance(key, str):
            raise ValueError(f"{what} key {key!r} is not allowed: keys must be text")
        if _literal_key(key) is None:
            safe_regex(key, f"{what} key")


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of ``patterns`` that matches ``module_name`` as PEFT's ``get_pattern_key`` matches it
    (``re.match(rf"(.*\\.)?({key})$", name)``), else None. Keys that could match for minutes are refused
    (:func:`safe_regex`)."""
    for key in patterns:
        if _key_matches(key, module_name):
            return key
    return None


def exact_pattern_key(module_name: str) -> str:
    """A pattern key that matches ``module_name`` and no other name under PEFT's rule: anchored (``^`` only
    matches at the start, so the optional ``(.*\\.)?`` prefix must be empty) and escaped (a dot is a dot)."""
    return "^" + re.escape(module_name)


def exact_patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """``{exact_pattern_key(name): value}`` for every module whose value differs from ``default``."""
    return {exact_pattern_key(name): value for name, value in values.items() if value != default}


# ---- targets -------------------------------------------------------------------------------------------

def parse_targets(value) -> str | list[str] | None:
    """The one parser of the text form of ``targets`` (training config, sweeps, CLI, dashboard).

    - ``None`` or ``""`` → ``None`` (the model's default targets);
    - ``"all-linear"`` (any case) → ``"all-linear"``;
    - ``"re:PATTERN"`` → ``"PATTERN"``, a regex matched against the whole module name (a ``str``, as in
      PEFT's ``target_modules``);
    - ``"a,b"`` → ``["a", "b"]``: module-name suffixes (``"fc[12]"`` is the suffix ``fc[12]``, not a regex);
    - a list or tuple of names → a list of suffixes.

    Parse text once: the regex comes back without its ``re:`` marker (:func:`format_targets` puts it back).
    Raises ``ValueError`` for an invalid regex or a non-text name.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if text.startswith(REGEX_PREFIX):
            pattern = text[len(REGEX_PREFIX):]
            if not pattern:
                raise ValueError(f"targets={value!r} is not allowed: the regular expression after 're:' is empty")
            try:
                safe_regex(pattern, "targets")
            except ValueError as exc:
                raise ValueError(str(exc).replace(f"targets {pattern!r}", f"targets={value!r}", 1)) from None
            return pattern
        value = text.split(",")
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(f"targets entry {bad[0]!r} is not allowed: module names must be text")
        if any(v.strip().startswith(REGEX_PREFIX) for v in value):
            raise ValueError(f"targets={list(value)!r} is not allowed: give a regex as one 're:PATTERN' string, "
                             "not inside a list of names")
        names = [v.strip() for v in value if v.strip()]
        if not names:
            raise ValueError(f"targets={value!r} is not allowed: it holds no module names")
        return names
    raise ValueError(f"targets={value!r} is not allowed: give 'all-linear', 're:PATTERN', or comma-separated "
                     "module-name suffixes")


def format_targets(targets: Targets | None) -> str:
    """The text form :func:`parse_targets` reads back: ``""``, ``"all-linear"``, ``"re:PATTERN"`` or ``"a,b"``."""
    if targets is None:
        return ""
    if isinstance(targets, str):
        return ALL_LINEAR if targets.lower() == ALL_LINEAR else REGEX_PREFIX + targets
    return ",".join(targets)


def matches_target(targets: Targets, module_name: str) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches names equal to an
    entry or ending with ``"." + entry``."""
    if isinstance(targets, str):
        check_module_name(module_name)
        return safe_regex(targets, "targets regular expression").fullmatch(module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def matches_module_to_save(modules_to_save: Sequence[str], module_name: str) -> bool:
    """True if ``module_name`` is, or is inside, a module listed in ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module_name) for m in modules_to_save)
