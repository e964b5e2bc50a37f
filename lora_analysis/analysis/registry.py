"""Every analysis, registered once: its question, its computation, its figures and its defaults.

    entry = registry.get("intruders")
    inputs = Inputs.from_runs(runs)                 # or Inputs.from_updates({"my adapter": updates})
    result = entry.run(inputs, k=5)                 # the other parameters at their registered defaults
    result.figures, result.tables, result.text      # plotly figures, (caption, DataFrame) pairs, prose
    result.answer, result.rule, result.readings     # the answer computed from the data, how, how to read each figure
    result.section()                                # the same, as a block of the HTML report

Three readers use an entry, and nothing else decides what an analysis shows:

* the dashboard page ``dashboard/views/<entry.page>.py`` builds its widgets from ``entry.params`` (their
  defaults, choices and help) and draws ``result.figures``;
* the HTML report (:mod:`lora_analysis.run_report`) renders, in registry order, every entry that applies
  to the chosen runs, at the same defaults (an entry with ``each`` set is shown once per choice of that
  parameter, e.g. once per run);
* the CLI: ``report --parts`` names entries or their groups, ``spectra`` uses the spectra, amplification
  and intruders entries on an adapter folder.

Adding an analysis: a module of pure functions in ``analysis/``, a plot function in ``plots/``, one
``register(Analysis(...))`` below and a page that shows it; the report and the CLI pick it up unchanged.

An analysis reads :class:`Inputs`: labelled subjects (runs of the run store, or adapters read from
folders) whose updates are loaded once, on first use. A compute function is ``(inputs, params) -> value``
(a DataFrame or a dataclass); figure, table and text functions are ``(value, params) -> ...``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import runstore
from ..plots import analysis as plots
from ..plots import training as training_plots
from ..report import Section
from ..weights import ModuleUpdate
from . import amplification, answers, intruders, rank_advice, similarity
from .answers import Answer
from .spectra import spectra_frame

# The three questions users come with; each analysis that answers one names it (``Analysis.answers``).
QUESTIONS = {"rank": "Which rank should I use?",
             "learned": "What did LoRA learn compared with full fine-tuning?",
             "merge": "Is my merged model the same model?"}
# The question each dashboard page answers first.
PAGE_QUESTIONS = {"rank_alpha": QUESTIONS["rank"], "spectra": QUESTIONS["learned"],
                  "subspaces": QUESTIONS["learned"], "merge": QUESTIONS["merge"]}

NEEDS_W0 = ("{what} compares ΔW with the base weights W0, which {subject} does not hold (an adapter alone has "
            "no W0). Name the base model to include it: --base MODEL_DIR_OR_WEIGHTS.safetensors on the CLI, "
            "runstore.load_updates(run, base=...) in Python")


def run_label(run: runstore.Run) -> str:
    """How a run is named on every page and in every report: its name and the end of its id."""
    return f"{run.name} · {run.id[-6:]}"


def _origin(run) -> str:
    """What identifies a run across exports and imports: its origin (its first id), else its id."""
    return (getattr(run, "origin", None) or getattr(run, "imported_as_new_id_of", None) or run.id)


def unique_runs(runs: Sequence[runstore.Run]) -> list[runstore.Run]:
    """One run per origin, order kept (a run imported again is the same run: stacking both would count it
    twice). Uses :func:`lora_analysis.runstore.unique_runs` when the store provides it."""
    store_rule = getattr(runstore, "unique_runs", None)
    if store_rule is not None:
        return list(store_rule(list(runs)))
    seen, out = set(), []
    for run in runs:
        key = _origin(run)
        if key in seen or run.id in seen:
            continue
        seen.update({key, run.id})
        out.append(run)
    return out


# ---- inputs ----------------------------------------------------------------------------------------

class Inputs:
    """What analyses read: subjects by label, each a run of the run store or a ready set of updates.

    ``load`` reads a run's updates (default :func:`lora_analysis.runstore.load_updates`), ``spectra`` a
    run's spectra frame, ``restore`` a run's model (default :func:`lora_analysis.training.restore.restore_run`);
    the dashboard passes its cached versions. Each subject is loaded at most once per ``Inputs``.
    """

    def __init__(self, subjects: Mapping[str, runstore.Run | Mapping[str, ModuleUpdate]], *,
                 load: Callable[[runstore.Run], Mapping[str, ModuleUpdate]] | None = None,
                 spectra: Callable[[runstore.Run], pd.DataFrame] | None = None,
                 restore: Callable[[runstore.Run], Any] | None = None) -> None:
        self._subjects = dict(subjects)
        self._load = load or runstore.load_updates
        self._spectra_of = spectra
        self._restore = restore
        self._updates: dict[str, Mapping[str, ModuleUpdate]] = {}
        self._spectra: dict[str, pd.DataFrame] = {}
        self.duplicates: list[str] = []     # runs left out as copies of a chosen run (see from_runs)

    @classmethod
    def from_runs(cls, runs: Sequence[runstore.Run], **loaders) -> "Inputs":
        """The runs by label, each run once: a run imported again (same origin) is not counted twice; the
        copies left out are listed in ``inputs.duplicates``."""
        kept = unique_runs(runs)
        inputs = cls({run_label(r): r for r in kept}, **loaders)
        kept_ids = {r.id for r in kept}
        inputs.duplicates = [run_label(r) for r in runs if r.id not in kept_ids]
        return inputs

    @classmethod
    def from_updates(cls, updates: Mapping[str, Mapping[str, ModuleUpdate]]) -> "Inputs":
        """Subjects that are not runs: ``{label: {module: ModuleUpdate}}`` (e.g. adapters read from folders)."""
        return cls(updates)

    @property
    def labels(self) -> list[str]:
        return list(self._subjects)

    @property
    def runs(self) -> list[runstore.Run]:
        return [s for s in self._subjects.values() if isinstance(s, runstore.Run)]

    def run(self, label: str) -> runstore.Run | None:
        subject = self._subject(label)
        return subject if isinstance(subject, runstore.Run) else None

    def _subject(self, label: str):
        if label not in self._subjects:
            raise ValueError(f"'{label}' is not one of the chosen runs: {', '.join(self._subjects) or 'none'}")
        return self._subjects[label]

    def updates(self, label: str) -> Mapping[str, ModuleUpdate]:
        """{module: ModuleUpdate} of one subject (W0 may be None for adapters without base weights). A
        :class:`~lora_analysis.analysis.sources.StreamedUpdates` subject reads each W0 when its update is
        asked for: the analyses against W0 loop over ``values()`` holding one update at a time."""
        if label not in self._updates:
            subject = self._subject(label)
            self._updates[label] = self._load(subject) if isinstance(subject, runstore.Run) else subject
        return self._updates[label]

    def factors(self, label: str) -> Mapping[str, ModuleUpdate]:
        """The updates as far as the analyses of ΔW alone need them: a streamed subject's without W0 (nothing
        read), any other's as :meth:`updates` gives them (a full fine-tuning run needs W0 to form ΔW)."""
        updates = self.updates(label)
        return updates.factors() if callable(getattr(updates, "factors", None)) else updates

    def spectra(self, label: str) -> pd.DataFrame:
        """:func:`lora_analysis.analysis.spectra_frame` of one subject (its rows one update at a time)."""
        if label not in self._spectra:
            run = self.run(label)
            self._spectra[label] = (self._spectra_of(run) if run is not None and self._spectra_of is not None
                                    else spectra_frame(self.updates(label)))
        return self._spectra[label]

    def restored(self, label: str):
        """The run's model rebuilt (LoRA unmerged), for analyses that run it."""
        run = self.run(label)
        if run is None:
            raise ValueError(f"'{label}' is not a run of the run store: only a run's model can be rebuilt")
        if self._restore is None:
            from ..training.restore import restore_run   # rebuilding a model is asked for by name, here only
            self._restore = restore_run
        return self._restore(run)

    def kind(self, label: str) -> str:
        """"lora" or "full"."""
        run = self.run(label)
        if run is not None:
            return run.method
        return "full" if any(u.kind == "full" for u in self.factors(label).values()) else "lora"

    def rank(self, label: str) -> int | None:
        """The run's configured rank (largest module rank for an adapter); None for full fine-tuning."""
        if self.kind(label) != "lora":
            return None
        run = self.run(label)
        if run is not None and run.config.get("rank") is not None:
            return int(run.config["rank"])
        return max((u.rank or 0 for u in self.factors(label).values()), default=0)

    def model(self, label: str) -> str | None:
        run = self.run(label)
        return run.model if run is not None else None

    def has_w0(self, label: str) -> bool:
        updates = self.updates(label)
        if isinstance(getattr(updates, "has_w0", None), bool):      # streamed: known without reading W0
            return bool(updates) and updates.has_w0
        return bool(updates) and all(u.w0 is not None for u in updates.values())


# ---- what an entry is --------------------------------------------------------------------------------

Options = Sequence | Callable[[Inputs, dict], Sequence]


@dataclass(frozen=True)
class Param:
    """One parameter of an analysis, with the default the page, the report and the CLI all use.

    ``default`` is a value, or ``fn(inputs, chosen)`` for a choice that depends on the data (which run,
    which module); ``chosen`` holds the parameters resolved before this one. ``options`` lists the allowed
    values (or is ``fn(inputs, chosen)``); numbers may have bounds ``low``/``high`` (inclusive).
    """

    name: str
    default: Any
    help: str
    label: str = ""
    options: Options = ()
    low: float | None = None
    high: float | None = None
    names: Mapping[Any, str] = field(default_factory=dict)   # display names of options

    def choices(self, inputs: Inputs, chosen: dict) -> list:
        return list(self.options(inputs, chosen) if callable(self.options) else self.options)

    def default_for(self, inputs: Inputs, chosen: dict) -> Any:
        if callable(self.default):
            return self.default(inputs, chosen)
        return self.default

    def check(self, value: Any, choices: list, analysis: str) -> Any:
        """``value`` if allowed (ints given for a float parameter become floats), else ``ValueError``."""
        what = f"{analysis}: {self.name}={value!r} is not allowed"
        if choices:
            if value not in choices:
                shown = ", ".join(map(repr, choices[:12])) + (" …" if len(choices) > 12 else "")
                raise ValueError(f"{what}: choose one of {shown}")
            return value
        kind = type(self.default)
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{what}: give true or false")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{what}: give an integer")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{what}: give a number")
            value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            bounds = f"from {self.low:g}" if self.low is not None else ""
            bounds += f" to {self.high:g}" if self.high is not None else " up"
            raise ValueError(f"{what}: it must be {bounds}")
        return value


def _no_tables(value, p) -> list:
    return []


def _no_text(value, p) -> str:
    return ""


def _always(inputs: Inputs) -> str | None:
    return None


def _no_answer(value, p) -> Answer:
    return Answer()


def _no_readings(value, p) -> list[str]:
    return []


@dataclass(frozen=True)
class Analysis:
    """One registered analysis.

    Attributes:
        name: short id (CLI ``--parts``, report anchors).
        title: heading on the page and in the report.
        question: what it answers, in one sentence (shown under the heading).
        group: the report part it belongs to ("training", "spectra", "subspaces", "merge", ...).
        page: the dashboard page that shows it (``dashboard/views/<page>.py``).
        compute: ``(inputs, params) -> value`` (DataFrame or dataclass).
        figures / tables / text / code: ``(value, params) ->`` plotly figures / (caption, DataFrame) pairs /
            prose / a code listing.
        params: the parameters, in the order they are resolved (later defaults may depend on earlier ones).
        applies: ``inputs -> None`` when the analysis applies, else the reason it does not.
        each: a parameter the report repeats the analysis over (every choice of it), e.g. "run".
        answers: which of :data:`QUESTIONS` it answers ("rank", "learned", "merge"), or None.
        answer: ``(value, params) ->`` :class:`~lora_analysis.analysis.answers.Answer`, computed from the data.
        readings: ``(value, params) ->`` one "how to read this chart" line per figure ("" for none).
    """

    name: str
    title: str
    question: str
    group: str
    page: str
    compute: Callable[[Inputs, dict], Any]
    figures: Callable[[Any, dict], list[go.Figure]]
    tables: Callable[[Any, dict], list[tuple[str, pd.DataFrame]]] = _no_tables
    text: Callable[[Any, dict], str] = _no_text
    code: Callable[[Any, dict], str] = _no_text
    params: tuple[Param, ...] = ()
    applies: Callable[[Inputs], str | None] = _always
    each: str | None = None
    answers: str | None = None
    answer: Callable[[Any, dict], Answer] = _no_answer
    readings: Callable[[Any, dict], list[str]] = _no_readings

    @property
    def user_question(self) -> str:
        """The user question it answers ("" for none): one of :data:`QUESTIONS`."""
        return QUESTIONS.get(self.answers or "", "")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"analysis '{self.name}' has no parameter '{name}': it has "
                         f"{', '.join(p.name for p in self.params) or 'none'}")

    def options(self, name: str, inputs: Inputs, chosen: Mapping | None = None) -> list:
        """The allowed values of parameter ``name`` given the ones ``chosen`` before it ([] = any value in
        its bounds)."""
        return self.param(name).choices(inputs, dict(chosen or {}))

    def default(self, name: str, inputs: Inputs, chosen: Mapping | None = None) -> Any:
        return self.param(name).default_for(inputs, dict(chosen or {}))

    def resolve(self, inputs: Inputs, **given) -> dict:
        """Every parameter: ``given`` ones checked, the others at their defaults. ``ValueError`` names an
        unknown or bad one."""
        unknown = sorted(set(given) - {p.name for p in self.params})
        if unknown:
            raise ValueError(f"analysis '{self.name}' has no parameter(s) {', '.join(unknown)}: it has "
                             f"{', '.join(p.name for p in self.params) or 'none'}")
        chosen: dict = {}
        for p in self.params:
            choices = p.choices(inputs, chosen)
            value = given[p.name] if p.name in given else p.default_for(inputs, chosen)
            chosen[p.name] = p.check(value, choices, self.name)
        return chosen

    def skip_reason(self, inputs: Inputs) -> str | None:
        """None when the analysis applies to ``inputs``, else why it does not."""
        return self.applies(inputs)

    def run(self, inputs: Inputs, **given) -> "Result":
        """Resolve the parameters, compute, and draw: what a page shows and a report section holds."""
        reason = self.skip_reason(inputs)
        if reason:
            raise ValueError(f"{self.title}: {reason}")
        params = self.resolve(inputs, **given)
        value = self.compute(inputs, params)
        figures = list(self.figures(value, params))
        found = self.answer(value, params)
        readings = [str(r or "") for r in list(self.readings(value, params))[:len(figures)]]
        readings += [""] * (len(figures) - len(readings))
        return Result(self.name, self.title, params, value, figures, list(self.tables(value, params)),
                      self.text(value, params), self.code(value, params), answer=found.answer, rule=found.rule,
                      readings=readings, question=self.user_question)

    def runs_over(self, inputs: Inputs, **given) -> list["Result"]:
        """What the report shows: one result, or one per choice of ``each`` (e.g. per run)."""
        if self.each is None or self.each in given:
            return [self.run(inputs, **given)]
        reason = self.skip_reason(inputs)
        if reason:
            raise ValueError(f"{self.title}: {reason}")
        return [self.run(inputs, **given, **{self.each: v}) for v in self.options(self.each, inputs, given)]


@dataclass
class Result:
    """One analysis computed and drawn, with the parameters it used (plain values: it pickles)."""

    name: str
    title: str
    params: dict
    value: Any
    figures: list[go.Figure]
    tables: list[tuple[str, pd.DataFrame]]
    text: str = ""
    code: str = ""
    answer: str = ""       # one or two plain sentences answering the question, computed from the data
    rule: str = ""         # how ``answer`` was computed
    readings: list[str] = field(default_factory=list)   # "how to read this chart", one per figure ("" = none)
    question: str = ""     # the user question it answers (one of QUESTIONS), "" for none

    def params_text(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.params.items())

    def section(self, each: str | None = None) -> Section:
        title = self.title if each is None else f"{self.title}: {self.params[each]}"
        text = " ".join(t for t in (self.text, f"Parameters: {self.params_text()}.") if t)
        readings = list(getattr(self, "readings", []) or [])
        return Section(title, text, list(self.figures), list(self.tables), code=self.code,
                       answer=getattr(self, "answer", ""), rule=getattr(self, "rule", ""),
                       readings=readings + [""] * (len(self.figures) - len(readings)),
                       question=getattr(self, "question", ""), analysis=self.name)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


class Registry:
    """The analyses in the order the report shows them, by name."""

    def __init__(self, analyses: Sequence[Analysis] = ()) -> None:
        self._by_name: dict[str, Analysis] = {}
        for a in analyses:
            self.register(a)

    def register(self, analysis: Analysis) -> Analysis:
        if analysis.name in self._by_name:
            raise ValueError(f"an analysis named '{analysis.name}' is already registered")
        names = {p.name for p in analysis.params}
        if analysis.each is not None and analysis.each not in names:
            raise ValueError(f"analysis '{analysis.name}': each={analysis.each!r} is not one of its parameters")
        self._by_name[analysis.name] = analysis
        return analysis

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._by_name[name]

    def get(self, name: str) -> Analysis:
        if name not in self._by_name:
            raise ValueError(f"no analysis is named '{name}': choose from {', '.join(self._by_name)}")
        return self._by_name[name]

    def __iter__(self) -> Iterator[Analysis]:
        return iter(list(self._by_name.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(a.group for a in self))

    def select(self, parts: Sequence[str] | None = None) -> list[Analysis]:
        """The analyses named by ``parts`` (analysis names or group names), in registry order; all for None."""
        if parts is None:
            return list(self)
        known = set(self.names()) | set(self.groups())
        unknown = [p for p in parts if p not in known]
        if unknown:
            raise ValueError(f"report part(s) {unknown} are not known: choose analyses "
                             f"({', '.join(self.names())}) or groups ({', '.join(self.groups())})")
        return [a for a in self if a.name in parts or a.group in parts]


# ---- shared choices ------------------------------------------------------------------------------------

def _labels(inputs: Inputs, chosen: dict) -> list[str]:
    return inputs.labels


def _first(options: Callable[[Inputs, dict], Sequence]):
    """Default: the first allowed value."""
    def default(inputs: Inputs, chosen: dict):
        values = list(options(inputs, chosen))
        if not values:
            raise ValueError("there is nothing to choose from")
        return values[0]
    return default


def _with_w0(inputs: Inputs, chosen: dict) -> list[str]:
    return [label for label in inputs.labels if inputs.has_w0(label)]


def _needs_w0(what: str) -> Callable[[Inputs], str | None]:
    def applies(inputs: Inputs) -> str | None:
        if not inputs.labels:
            return "no run is chosen"
        if any(inputs.has_w0(label) for label in inputs.labels):
            return None
        subject = f"'{inputs.labels[0]}'" if len(inputs.labels) == 1 else "none of the chosen runs"
        return NEEDS_W0.format(what=what, subject=subject)
    return applies


def _needs_runs(inputs: Inputs) -> str | None:
    return None if inputs.runs else "it reads training records, so it needs runs of the run store"


def _needs_subjects(inputs: Inputs) -> str | None:
    return None if inputs.labels else "no run is chosen"




# ---- training: curves and the runs table ------------------------------------------------------------------

METRICS = ("val_accuracy", "val_perplexity", "val_loss")
SUMMARY_COLUMNS = ["name", "model", "method", "rank", "alpha", "rslora", "targets", "steps", "val_accuracy",
                   "val_perplexity", "val_loss", "trainable_params", "train_seconds"]


def _metric_options(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in frame.columns and frame[m].notna().any()] or ["val_loss"]


@dataclass
class Training:
    runs: pd.DataFrame       # runstore.runs_frame: one row per run
    metrics: pd.DataFrame    # runstore.load_metrics: one row per logged step and run


def _training(inputs: Inputs, p: dict) -> Training:
    return Training(runstore.runs_frame(runs=inputs.runs), runstore.load_metrics(inputs.runs))


def _training_figures(t: Training, p: dict) -> list[go.Figure]:
    figures = [training_plots.plot_loss_curves(t.metrics, "train_loss", smooth=p["smooth"], log_y=True, runs=t.runs)]
    if "val_loss" in t.metrics.columns and t.metrics["val_loss"].notna().any():
        figures.append(training_plots.plot_loss_curves(t.metrics, "val_loss", title="Validation loss", log_y=True,
                                                       runs=t.runs))
    return figures


def _training_tables(t: Training, p: dict) -> list:
    return [("Runs", t.runs[[c for c in SUMMARY_COLUMNS if c in t.runs.columns]])]


TRAINING = Analysis(
    name="loss_curves", title="Training runs", group="training", page="finetune",
    question="How did each run train: its loss per step and its final metrics?",
    compute=_training, figures=_training_figures, tables=_training_tables,
    text=lambda t, p: f"{len(t.runs)} runs.",
    readings=lambda t, p: ["Training loss per step (centred rolling mean), on a log scale when the loss spans 4× or "
                           "more, linear otherwise: lines that keep falling have not converged.",
                           "Validation loss at each evaluation (log scale when it spans 4× or more); step 0 is "
                           "the model before training."],
    params=(Param("smooth", 5, "steps in the centred rolling mean of the training loss", "Smoothing", low=1),),
    applies=_needs_runs)


# ---- rank & alpha ---------------------------------------------------------------------------------------------

def _has_metric(run: runstore.Run) -> bool:
    """Whether the run ended with a validation metric to compare (a run recorded from a user's own training
    loop may have logged training loss only)."""
    values = [(run.metrics or {}).get(m) for m in METRICS]
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _models(inputs: Inputs, chosen: dict) -> list[str]:
    return list(dict.fromkeys(r.model for r in inputs.runs if _has_metric(r)))


def _rank_alpha_applies(inputs: Inputs) -> str | None:
    return _needs_runs(inputs) or (None if _models(inputs, {}) else
                                   "no run has a validation metric (val_accuracy, val_perplexity or val_loss)")


def _setting(run: runstore.Run) -> str:
    c = run.config
    return f"data={c.get('data') or 'default'}, steps={c.get('steps')}, seed={c.get('seed')}"


def _settings(inputs: Inputs, chosen: dict) -> list[str]:
    # runs of different data, steps or seed do not belong on one line: one setting at a time
    return list(dict.fromkeys(_setting(r) for r in inputs.runs if r.model == chosen["model"]))


def _setting_runs(inputs: Inputs, p: dict) -> list[runstore.Run]:
    return [r for r in inputs.runs if r.model == p["model"] and _setting(r) == p["setting"]]


def _ra_metrics(inputs: Inputs, chosen: dict) -> list[str]:
    return _metric_options(runstore.runs_frame(runs=_setting_runs(inputs, chosen)))


def delta_norms(inputs: Inputs, runs: Sequence[runstore.Run]) -> pd.DataFrame:
    """‖ΔW‖_F over the modules LoRA adapted, one row per run (full fine-tuning's over the same modules, so
    the two compare like with like)."""
    spectra = {r.id: inputs.spectra(run_label(r)) for r in runs}
    lora_modules = set().union(*(set(spectra[r.id]["name"]) for r in runs if r.method == "lora"))
    rows = []
    for run in runs:
        s = spectra[run.id]
        if run.method == "full" and lora_modules:
            s = s[s["name"].isin(lora_modules)]
        rows.append({"id": run.id, "name": run.name, "method": run.method, "status": run.status,
                     "rank": run.config.get("rank") if run.method == "lora" else None,
                     "alpha": run.config.get("alpha") if run.method == "lora" else None,
                     "rslora": run.config.get("rslora"),
                     "delta_norm": float(np.sqrt(np.sum(np.square(s["fro_norm"]))))})
    return pd.DataFrame(rows)


@dataclass
class RankAlpha:
    runs: pd.DataFrame     # runs_frame of the runs of one model and setting
    norms: pd.DataFrame    # delta_norms of the same runs
    sweeps: int = 1        # how many sweeps the runs come from
    duplicates: list = field(default_factory=list)   # labels left out as copies of a chosen run


def _rank_alpha(inputs: Inputs, p: dict) -> RankAlpha:
    runs = _setting_runs(inputs, p)
    sweeps = len({r.sweep_id for r in runs if r.sweep_id}) or 1
    return RankAlpha(runstore.runs_frame(runs=runs), delta_norms(inputs, runs), sweeps, list(inputs.duplicates))


def _rank_alpha_figures(v: RankAlpha, p: dict) -> list[go.Figure]:
    m = p["metric"]
    return [training_plots.plot_metric_vs_rank(v.runs, m), training_plots.plot_metric_vs_alpha(v.runs, m),
            training_plots.plot_update_norm(v.norms, "alpha"),
            training_plots.plot_update_norm(v.norms, "rank", title="Size of the learned update versus rank"),
            training_plots.plot_efficiency_frontier(v.runs, m), training_plots.plot_cost_comparison(v.runs)]


def _rank_alpha_text(v: RankAlpha, p: dict) -> str:
    text = ""
    if v.runs["rslora"].nunique() < 2:
        text = ("α/r versus α/√r: the rank chart draws one line per scaling once the runs include both "
                "(run the rsLoRA study on the Rank & alpha page).")
    if v.sweeps > 1:
        text += f" The runs come from {v.sweeps} sweeps of this model and setting."
    if v.duplicates:
        text += f" Left out as copies of a run shown (imported again): {', '.join(v.duplicates)}."
    return text.strip()


RANK_ALPHA_READINGS = (
    "Final metric per LoRA rank (full fine-tuning as a line): where the curve flattens, more rank buys nothing.",
    "Final metric per α: α scales the update like a learning-rate multiplier.",
    "‖ΔW‖_F of each run (over the modules LoRA adapted) per α.",
    "‖ΔW‖_F of each run per rank: how large an update each rank learned.",
    "Metric against trainable parameters: the runs up and to the left give the most for the least.",
    "Training cost per run (state memory, wall-clock time): single readings, which vary with machine load.")


RANK_ALPHA = Analysis(
    name="rank_alpha", title="Rank and alpha effects", group="training", page="rank_alpha",
    question="How do rank, alpha and the scaling rule (α/r or α/√r) change the final metric, the size of ΔW "
             "and the cost?",
    compute=_rank_alpha, figures=_rank_alpha_figures, text=_rank_alpha_text,
    answers="rank", answer=lambda v, p: answers.rank_answer(v.runs, p["metric"]),
    readings=lambda v, p: list(RANK_ALPHA_READINGS),
    params=(Param("model", _first(_models), "the runs' model", "Model", options=_models),
            Param("setting", _first(_settings), "runs with the same data and optimisation settings",
                  "Runs with the same data and optimisation settings", options=_settings),
            Param("metric", _first(_ra_metrics), "final metric to compare", "Metric", options=_ra_metrics)),
    applies=_rank_alpha_applies, each="model")


# ---- spectra across runs ----------------------------------------------------------------------------------

def _module_holders(inputs: Inputs) -> dict[str, list[str]]:
    """{module: the labels whose updates hold it}, modules in first-seen order."""
    holders: dict[str, list[str]] = {}
    for label in inputs.labels:
        for name in inputs.spectra(label)["name"]:
            holders.setdefault(name, []).append(label)
    return holders


def _common_modules(inputs: Inputs, chosen: dict) -> list[str]:
    """The modules every chosen run holds; when they share none but are runs of one model (a sweep over
    target sets), the modules at least two of them hold, most-shared first: compared where they overlap."""
    holders = _module_holders(inputs)
    every = sorted(n for n, lbs in holders.items() if len(lbs) == len(inputs.labels))
    if every or len({inputs.model(lb) for lb in inputs.labels}) > 1:
        return every
    shared = [n for n, lbs in holders.items() if len(lbs) >= 2]
    return sorted(shared, key=lambda n: (-len(holders[n]), n))


def _largest_module(inputs: Inputs, chosen: dict) -> str:
    """Among the modules held by the most runs, the one whose ΔW is largest in any run: where the runs
    learned most."""
    modules = _common_modules(inputs, chosen)
    if not modules:
        raise ValueError("the chosen runs share no module (different models)")
    holders = _module_holders(inputs)
    most = max(len(holders[n]) for n in modules)
    norms = pd.concat([inputs.spectra(label).set_index("name")["fro_norm"] for label in inputs.labels], axis=1)
    return max((n for n in modules if len(holders[n]) == most), key=lambda n: float(norms.loc[n].max()))


def _spectra_sweep(inputs: Inputs, p: dict) -> pd.DataFrame:
    rows = []
    for label in inputs.labels:
        frame = inputs.spectra(label).set_index("name")
        if p["module"] not in frame.index:
            continue           # this run does not adapt the module (another target set): said in the text
        row = frame.loc[p["module"]]
        rows.append({"label": label, "kind": row["kind"], "rank": row["rank"] if row["kind"] == "lora" else None,
                     "singular_values": row["singular_values"], "rank_90": row["rank_90"],
                     "available": int(min(row["out_features"], row["in_features"]))})
    frame = pd.DataFrame(rows, columns=["label", "kind", "rank", "singular_values", "rank_90", "available"])
    # LoRA by rank, then full fine-tuning
    order = sorted(range(len(frame)), key=lambda i: (frame["kind"][i] == "full", frame["rank"][i] or 0))
    frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs["left_out"] = [lb for lb in inputs.labels if lb not in set(frame["label"])]
    return frame


def _spectra_sweep_text(sweep: pd.DataFrame, p: dict) -> str:
    left_out = sweep.attrs.get("left_out") or []
    return (f"Not in this chart (they do not adapt {p['module']}): {', '.join(left_out)}." if left_out else "")


def _spectra_sweep_answer(sweep: pd.DataFrame, p: dict) -> Answer:
    available = int(sweep["available"].iloc[0]) if len(sweep) else None
    return answers.sweep_answer(sweep, p["module"], available)


def _sweep_applies(inputs: Inputs) -> str | None:
    if not inputs.labels:
        return "no run is chosen"
    if _common_modules(inputs, {}):
        return None
    if len({inputs.model(lb) for lb in inputs.labels}) > 1:
        return "the chosen runs share no module (different models)"
    return "no module is adapted by two of the chosen runs (they adapt different modules): nothing to set side by side"


SPECTRA_SWEEP = Analysis(
    name="spectra_sweep", title="LoRA ranks versus full fine-tuning", group="spectra", page="spectra",
    question="Does one module's ΔW need more directions under full fine-tuning than the LoRA ranks allow?",
    compute=_spectra_sweep, text=_spectra_sweep_text, answers="learned", answer=_spectra_sweep_answer,
    readings=lambda sweep, p: ["One line per run: σ_k (divided by σ₁ when normalised) against k, log scale. A "
                               "spectrum that falls fast needs few directions; full fine-tuning's tail shows how "
                               "many directions its update uses beyond the LoRA ranks."],
    figures=lambda sweep, p: [plots.plot_rank_sweep_spectra(
        sweep, normalized=p["normalized"], title=f"Spectra across ranks versus full fine-tuning: {p['module']}")],
    params=(Param("module", _largest_module, "the module compared (default: the largest ‖ΔW‖_F in any run)",
                  "Module", options=_common_modules),
            Param("normalized", True, "divide each spectrum by its σ₁", "Normalise by σ₁")),
    applies=_sweep_applies)


# ---- spectra of one run -------------------------------------------------------------------------------------

SPECTRA_TABLE_COLUMNS = ["name", "kind", "shape", "rank", "scaling", "fro_norm", "spectral_norm", "stable_rank",
                         "effective_rank", "rank_90", "rank_99", "numerical_rank", "w0_norm", "relative_norm"]


def _spectra_tables(s: pd.DataFrame, p: dict) -> list:
    table = s[[c for c in SPECTRA_TABLE_COLUMNS if c in s.columns]]
    if "relative_norm" in table.columns and table["relative_norm"].isna().all():
        table = table.drop(columns=["w0_norm", "relative_norm"], errors="ignore")    # no base weights: no column of n/a
    return [("Per-module metrics", table)]


def _spectra_text(s: pd.DataFrame, p: dict) -> str:
    text = (f"{len(s)} modules; ΔW = scaling·B·A for LoRA (spectra computed factored), W_ft − W0 for full "
            "fine-tuning; rank_90/rank_99: directions holding 90%/99% of Σσ²")
    if "relative_norm" in s.columns and s["relative_norm"].notna().any():
        text += "; relative_norm: ‖ΔW‖_F / ‖W0‖_F"
    return text + "."


SPECTRA_READINGS = (
    "σ_k of ΔW per module against k (log scale): a steep fall means a few directions carry the update.",
    "Share of ΔW's energy Σσ² held by the top k directions: where a line crosses 0.9 is the module's rank_90.",
    "The chosen metric per layer and module: which parts of the model the update reshaped most.")
HEATMAP_METRICS = ("effective_rank", "stable_rank", "rank_90", "fro_norm")

SPECTRA = Analysis(
    name="spectra", title="Singular spectra of ΔW", group="spectra", page="spectra",
    question="What did each module learn: the singular values of ΔW, how fast their energy accumulates, and "
             "its stable and effective rank by layer?",
    compute=lambda inputs, p: inputs.spectra(p["run"]),
    figures=lambda s, p: [plots.plot_singular_values(s, normalized=p["normalized"]), plots.plot_cumulative_energy(s),
                          plots.plot_rank_heatmap(s, p["heatmap"])],
    tables=_spectra_tables, text=_spectra_text,
    answers="learned", answer=lambda s, p: answers.spectra_answer(s, p["run"]),
    readings=lambda s, p: list(SPECTRA_READINGS),
    params=(Param("run", _first(_labels), "the run (or adapter) shown", "Run", options=_labels),
            Param("normalized", False, "divide each spectrum by its σ₁", "Normalise each spectrum by σ₁"),
            Param("heatmap", "effective_rank", "per-module metric of the heatmap", "Heatmap metric",
                  options=HEATMAP_METRICS)),
    applies=_needs_subjects, each="run")


# ---- rank advice --------------------------------------------------------------------------------------------

ADVICE_ALPHA_MODES = {"trained": "keep the trained scaling", "ratio": "α = ratio·r", "fixed": "one α for all"}


@dataclass
class RankAdvice:
    advice: pd.DataFrame    # rank_advice: one row per module
    config: dict            # PEFT LoraConfig keyword arguments
    scaling: pd.DataFrame = field(default_factory=pd.DataFrame)   # rank_advice.scaling_change: advised vs trained
    note: str = ""          # what the config changes against the trained run, and why
    trained_rank: int | None = None


def _rslora_of(inputs: Inputs, label: str) -> bool:
    run = inputs.run(label)
    return bool(run.config.get("rslora")) if run is not None else False


def _rank_advice(inputs: Inputs, p: dict) -> RankAdvice:
    updates = inputs.factors(p["run"])
    advice = rank_advice.rank_advice(updates, energy=p["energy"], max_rank=p["max_rank"])
    scalings = rank_advice.trained_scalings(updates)
    rslora = _rslora_of(inputs, p["run"])
    mode, note = p["alpha_mode"], ""
    if mode == "trained" and set(scalings) != set(advice["name"]):
        mode = "ratio"
        note = (f"Full fine-tuning has no α to keep: α = {p['ratio']:g}·r (alpha mode 'ratio'), a scaling of "
                f"{p['ratio']:g}.")
    config = rank_advice.peft_config_from_advice(advice, alpha_mode=mode, ratio=p["ratio"], use_rslora=rslora,
                                                 scalings=scalings if mode == "trained" else None)
    change = rank_advice.scaling_change(config, scalings)
    if scalings and not note:
        off = change[(change["factor"] - 1).abs() > 1e-9]
        rule = "α/√r (rsLoRA)" if rslora else "α/r"
        if off.empty:
            note = f"The config keeps every module's trained scaling ({rule}): the advised ranks scale the update as the run did."
        else:
            low, high = float(off["factor"].min()), float(off["factor"].max())
            factor = _show(low) if math.isclose(low, high) else f"{_show(low)}–{_show(high)}"
            note = (f"This config changes the scaling ({rule}) of {len(off)} of {len(change)} modules: "
                    f"{factor}× the trained one, "
                    f"because alpha mode '{mode}' sets α from the rank, not from the run; choose 'keep the trained "
                    "scaling' to reproduce the trained update's scale.")
    return RankAdvice(advice, config, change, note, inputs.rank(p["run"]))


def _advice_code(v: RankAdvice, p: dict) -> str:
    head = "".join(f"# {line}\n" for line in _wrap(v.note)) if v.note else ""
    return head + rank_advice.peft_config_snippet(v.config)


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


RANK_ADVICE = Analysis(
    name="rank_advice", title="Rank advice", group="spectra", page="spectra",
    question="Which rank does each module need to keep a chosen share of ΔW's energy, as a PEFT LoraConfig?",
    compute=_rank_advice, figures=lambda v, p: [],
    tables=lambda v, p: [("Advised rank per module", v.advice)],     # one table: the Spectra page unpacks it
    code=_advice_code, text=lambda v, p: v.note, answers="rank",
    answer=lambda v, p: answers.advice_answer(v.advice, p["energy"], v.trained_rank),
    params=(Param("run", _first(_labels), "the run (or adapter) advised", "Run", options=_labels),
            Param("energy", 0.9, "share of ΔW's energy Σσ² the advised rank keeps",
                  "Keep this share of ΔW's energy (Σσ²)", low=0.5, high=0.999),
            Param("max_rank", 64, "largest rank advised", "Largest rank", low=1, high=4096),
            Param("alpha_mode", "trained", "trained: keep each module's trained scaling (α = s·r, or s·√r with "
                  "rsLoRA), so the config reproduces the trained update; ratio: α = ratio·r for every module; "
                  "fixed: one α for all", "Alpha", options=tuple(ADVICE_ALPHA_MODES), names=ADVICE_ALPHA_MODES),
            Param("ratio", 2.0, "α / r", "α / r", low=0.0)),
    applies=_needs_subjects, each="run")


# ---- subspace similarity --------------------------------------------------------------------------------------

SIDES = {"A": "A matrices (paper, §7.2)", "input": "ΔW input directions (V)", "output": "ΔW output directions (U)"}


def _by_rank(inputs: Inputs) -> list[str]:
    return sorted((lb for lb in inputs.labels if inputs.kind(lb) == "lora"), key=lambda lb: inputs.rank(lb) or 0)


def _shares(inputs: Inputs, a: str, b: str) -> bool:
    """Whether two subjects adapt at least one module in common."""
    if a == b:
        return False
    if inputs.model(a) != inputs.model(b) and inputs.model(a) is not None and inputs.model(b) is not None:
        return False           # runs of different models share no module
    return not set(inputs.updates(a)).isdisjoint(inputs.updates(b))


def _with_partner(inputs: Inputs) -> list[str]:
    return [a for a in inputs.labels if any(_shares(inputs, a, b) for b in inputs.labels)]


def _default_first(inputs: Inputs, chosen: dict) -> str:
    # the paper compares r=8 with r=64: the highest rank first, among runs that share a module with another
    paired = _with_partner(inputs)
    ranked = [lb for lb in _by_rank(inputs) if lb in paired]
    return ranked[-1] if ranked else (paired or inputs.labels)[0]


def _default_second(inputs: Inputs, chosen: dict) -> str:
    # the next highest rank that shares modules with the first: runs of different models, or of disjoint
    # target sets, have nothing to compare
    first = chosen["first"]
    sharing = [lb for lb in inputs.labels if _shares(inputs, first, lb)]
    ranked = [lb for lb in reversed(_by_rank(inputs)) if lb in sharing]
    same = [lb for lb in inputs.labels if lb != first and inputs.model(lb) == inputs.model(first)]
    return (ranked or sharing or same or [lb for lb in inputs.labels if lb != first] or [first])[0]


def _similarity_applies(inputs: Inputs) -> str | None:
    if len(inputs.labels) < 2:
        return "it compares two runs: choose at least two"
    if not _with_partner(inputs):
        return ("no two of the chosen runs adapt a module in common (different models or target sets), so no "
                "direction can be compared")
    return None


def _sides(inputs: Inputs, chosen: dict) -> list[str]:
    both_lora = inputs.kind(chosen["first"]) == "lora" and inputs.kind(chosen["second"]) == "lora"
    return list(SIDES) if both_lora else ["input", "output"]


def _shared_modules(inputs: Inputs, chosen: dict) -> list[str]:
    second = inputs.updates(chosen["second"])
    common = [n for n in inputs.updates(chosen["first"]) if n in second]
    if not common:
        raise ValueError("the two adapters share no adapted module: nothing to compare")
    return common


@dataclass
class Similarity:
    results: dict                 # {module: SimilarityResult}
    summary: pd.DataFrame         # similarity_summary_frame


def _similarity(inputs: Inputs, p: dict) -> Similarity:
    results = similarity.adapter_similarity(inputs.factors(p["first"]), inputs.factors(p["second"]), p["side"])
    return Similarity(results, similarity.similarity_summary_frame(results))


SIMILARITY_READING = ("φ(i, j) for the top-i directions of the first run (rows) against the top-j of the second "
                      "(columns): 1 (bright) when one lies inside the other, about max(i, j)/d for random directions.")


def _similarity_figures(v: Similarity, p: dict) -> list[go.Figure]:
    r = v.results[p["module"]]
    return [plots.plot_similarity_heatmap(r.phi, r.d, title=f"Subspace similarity φ(i, j): {p['module']}, "
                                          f"{SIDES[p['side']]}", x_label=f"j ({p['second']})",
                                          y_label=f"i ({p['first']})")]


SIMILARITY = Analysis(
    name="similarity", title="Subspace similarity φ", group="subspaces", page="subspaces",
    question="Do two runs learn the same directions? φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j): 1 when the "
             "top-i directions of one lie in the top-j of the other, about max(i, j)/d for random subspaces "
             "(Hu et al. 2021, Eq. 4).",
    compute=_similarity, figures=_similarity_figures,
    tables=lambda v, p: [(f"φ summary, {p['first']} versus {p['second']}", v.summary)],
    answers="learned", answer=lambda v, p: answers.similarity_answer(v.summary, p["first"], p["second"], p["side"]),
    readings=lambda v, p: [SIMILARITY_READING],
    params=(Param("first", _default_first, "first run (default: the highest LoRA rank)", "First run",
                  options=_labels),
            Param("second", _default_second, "second run (default: the next highest rank of the same model)",
                  "Second run", options=_labels),
            Param("side", _first(_sides), "which directions are compared", "Directions", options=_sides,
                  names=SIDES),
            Param("module", _first(_shared_modules), "module of the heatmap", "Module", options=_shared_modules)),
    applies=_similarity_applies)


# ---- ΔW versus W0 ---------------------------------------------------------------------------------------------

def _run_modules(inputs: Inputs, chosen: dict) -> list[str]:
    return list(inputs.updates(chosen["run"]))


BASE_OVERLAP = Analysis(
    name="base_overlap", title="ΔW versus W0", group="subspaces", page="subspaces",
    question="How much of ΔW's top directions lie in W0's own top directions?",
    compute=lambda inputs, p: similarity.base_overlap(inputs.updates(p["run"])[p["module"]]),
    figures=lambda v, p: [plots.plot_base_overlap(v, title=f"How much ΔW's top directions lie in W0's: "
                                                            f"{p['module']}")],
    readings=lambda v, p: ["φ between ΔW's top-k directions and W0's top-k, per k, output and input side, with "
                           "the random baseline k/d: near the baseline, ΔW works in directions W0 does not emphasise."],
    params=(Param("run", _first(_with_w0), "run compared with its base weights", "Run", options=_with_w0),
            Param("module", _first(_run_modules), "module compared", "Module", options=_run_modules)),
    applies=_needs_w0("ΔW versus W0"), each="run")

AMPLIFICATION = Analysis(
    name="amplification", title="Amplification (LoRA paper, Table 7)", group="subspaces", page="subspaces",
    question="Does ΔW amplify directions W0 barely uses? ‖ΔW‖_F / ‖Uᵀ W0 V‖_F with U, V ΔW's top-r directions "
             "(Hu et al. 2021, §7.3: about 21.5 at r=4 for GPT-3's layer-48 Wq).",
    compute=lambda inputs, p: amplification.amplification_frame(inputs.updates(p["run"]), seed=p["seed"]),
    figures=lambda amp, p: [plots.plot_amplification(amp), plots.plot_amplification_table(amp)],
    answers="learned", answer=lambda amp, p: answers.amplification_answer(amp),
    readings=lambda amp, p: ["Amplification factor per module: above 1, ΔW is larger than what W0 holds along "
                             "ΔW's own directions.",
                             "The numbers behind it (Table 7's rows): ‖ΔW‖, ‖Uᵀ W0 V‖ and the same for random "
                             "directions."],
    params=(Param("run", _first(_with_w0), "run compared with its base weights", "Run", options=_with_w0),
            Param("seed", 0, "seed of the random directions (Table 7's random row)", "Seed", low=0)),
    applies=_needs_w0("amplification"), each="run")


# ---- intruder dimensions ----------------------------------------------------------------------------------------

EPSILONS = tuple(round(0.05 * i, 2) for i in range(1, 20))


@dataclass
class Intruders:
    sweep: pd.DataFrame      # label, name, kind, k, epsilon, intruders: one row per run, module and ε
    modules: pd.DataFrame    # label + intruders_frame columns, at the chosen ε
    skipped: list[str]       # labels without W0


def _intruders(inputs: Inputs, p: dict) -> Intruders:
    k, eps = p["k"], p["epsilon"]
    sweep, modules, skipped = [], [], []
    for label in inputs.labels:
        if not inputs.has_w0(label):
            skipped.append(label)
            continue
        for u in inputs.updates(label).values():
            res = intruders.intruder_dimensions(u, k, eps)    # one SVD per module serves every ε
            sweep += [{"label": label, "name": u.name, "kind": u.kind, "k": k, "epsilon": e,
                       "intruders": int(np.sum(res.max_cos < e))} for e in EPSILONS]
            modules.append({"label": label, "name": res.name, "kind": res.kind, "k": res.k, "epsilon": res.epsilon,
                            "intruders": res.count, "intruder_indices": res.intruders,
                            "min_max_cos": float(res.max_cos.min()) if res.k else float("nan")})
    return Intruders(pd.DataFrame(sweep, columns=["label", "name", "kind", "k", "epsilon", "intruders"]),
                     pd.DataFrame(modules, columns=["label", "name", "kind", "k", "epsilon", "intruders",
                                                    "intruder_indices", "min_max_cos"]), skipped)


def _intruders_tables(v: Intruders, p: dict) -> list:
    per_run, shared = answers.intruders_per_run(v.modules)
    where = (f"on the {len(shared)} modules all runs adapt" if shared and per_run["label"].nunique() > 1
             else "on each run's own modules")
    per_run = per_run.rename(columns={"modules": "modules adapted", "compared": "modules compared",
                                      "intruders": f"intruders at ε={p['epsilon']:g}, k={p['k']} ({where})",
                                      "per_module": "intruders per module compared",
                                      "all_modules_intruders": "intruders over all its modules"})
    return [("Intruders per run, like with like", per_run),
            ("Intruders per module", v.modules.drop(columns=["intruder_indices"]))]


def _intruders_figures(v: Intruders, p: dict) -> list[go.Figure]:
    shared = answers.shared_modules(v.modules)
    labels = v.modules["label"].nunique()
    if shared and labels > 1:
        sweep = v.sweep[v.sweep["name"].isin(shared)]
        where = f"the {len(shared)} module{'s' * (len(shared) != 1)} all runs adapt"
    else:
        sweep, where = v.sweep, ("all its modules" if labels <= 1 else "each run's own modules (they share none)")
    fig = plots.plot_intruders_vs_epsilon(sweep, p["k"], title=f"Intruder dimensions versus threshold ε, on {where}")
    fig.update_yaxes(title=f"intruders among top-{p['k']} singular vectors ({where})")
    return [fig]


INTRUDERS = Analysis(
    name="intruders", title="Intruder dimensions", group="subspaces", page="subspaces",
    question="Does fine-tuning create new top singular directions unlike any of W0's? Top-k singular vectors of "
             "W0 + ΔW whose largest |cosine| with every singular vector of W0 is below ε (Shuttleworth et al. "
             "2024, who report them for low-rank LoRA and rarely for full fine-tuning; the answer says what "
             "these runs show).",
    compute=_intruders, tables=_intruders_tables, figures=_intruders_figures,
    answers="learned", answer=lambda v, p: answers.intruders_answer(v.modules, p["k"], p["epsilon"]),
    readings=lambda v, p: ["Intruder count against the threshold ε, one line per run, on the modules named in the "
                           "title: a line that stays high at small ε has directions truly unlike W0's."],
    text=lambda v, p: (f"Skipped (no base weights W0): {', '.join(v.skipped)}." if v.skipped else ""),
    params=(Param("k", intruders.DEFAULT_K, "how many top singular vectors of W0 + ΔW are tested",
                  "k (top singular vectors checked)", low=1),
            Param("epsilon", intruders.DEFAULT_EPSILON, "cosine threshold of the tables (the chart sweeps ε)",
                  "ε (cosine threshold)", low=0.0, high=1.0)),
    applies=_needs_w0("intruder dimensions"))


# ---- merge equivalence ------------------------------------------------------------------------------------------

def _lora_runs(inputs: Inputs, chosen: dict) -> list[str]:
    # a run recorded from the user's own training loop (config "source") cannot be rebuilt: its data is unknown
    return [run_label(r) for r in inputs.runs if r.method == "lora" and not (r.config or {}).get("source")]


@dataclass
class Merge:
    check: Any                      # merge_check.MergeCheck
    latency: pd.DataFrame           # latency_check
    task: pd.DataFrame              # one row per variant: frozen base, LoRA (unmerged), LoRA (merged), full FT
    full: str | None                # label of the full fine-tuning run compared, if any


def full_run_for(run: runstore.Run, runs: Sequence[runstore.Run]) -> runstore.Run | None:
    """The full fine-tuning run to compare a LoRA run with: same model and data, same sweep if there is one."""
    fulls = [r for r in runs if r.method == "full" and r.model == run.model
             and r.config.get("data") == run.config.get("data")]
    return next((r for r in fulls if r.sweep_id == run.sweep_id), fulls[0] if fulls else None)


def _merge(inputs: Inputs, p: dict) -> Merge:
    import copy

    from ..lora import merge_and_unload
    from .merge_check import latency_check, merge_check

    restored = inputs.restored(p["run"])
    check = merge_check(restored.model, restored.held_out_inputs())
    latency = latency_check(restored.model, restored.held_out_inputs(), repeats=p["repeats"])
    rows = [{"variant": "frozen base", **restored.metric(restored.base_model())},
            {"variant": "LoRA (unmerged)", **restored.metric(restored.model)},
            {"variant": "LoRA (merged)", **restored.metric(merge_and_unload(copy.deepcopy(restored.model)))}]
    full = full_run_for(inputs.run(p["run"]), inputs.runs)
    if full is not None:
        other = inputs.restored(run_label(full))
        rows.append({"variant": "full fine-tuning", **other.metric(other.model)})
    return Merge(check, latency, pd.DataFrame(rows), run_label(full) if full is not None else None)


def _latency_figure(latency: pd.DataFrame) -> go.Figure:
    """plot_latency with each bar's interquartile range as its error bar, and a ratio to the base written on
    a bar only where it is beyond the measured spread ("≈ base" otherwise)."""
    from .merge_check import latency_verdicts

    fig = plots.plot_latency(latency)
    if not {"q1_ms", "q3_ms"} <= set(latency.columns):
        return fig
    verdicts = latency_verdicts(latency)
    for trace in fig.data:
        part = latency[latency["variant"] == trace.name]
        trace.error_y = {"type": "data", "symmetric": False, "array": list(part["q3_ms"] - part["median_ms"]),
                         "arrayminus": list(part["median_ms"] - part["q1_ms"])}
        if trace.name == "base":
            trace.text = ["" for _ in range(len(part))]
            continue
        texts = []
        for device, relative in zip(part["device"], part["relative"]):
            row = verdicts[(verdicts["device"] == device) & (verdicts["variant"] == trace.name)]
            texts.append(f"{relative:.2f}×" if len(row) and bool(row["measurable"].iloc[0]) else "≈ base")
        trace.text = texts
    return fig


def _merge_figures(v: Merge, p: dict) -> list[go.Figure]:
    metric = "val_accuracy" if "val_accuracy" in v.task.columns else "val_perplexity"
    return [plots.plot_merge_errors(v.check.errors, p["reference"]), _latency_figure(v.latency),
            training_plots.plot_task_metrics(v.task, metric)]


def _merge_text(v: Merge, p: dict) -> str:
    from .merge_check import merge_verdict

    verdict = merge_verdict(v.check.errors).text.replace("**", "")     # plain prose for page and report alike
    skipped = "".join(f" {d} was skipped on this machine: {why}." for d, why in v.check.skipped.items())
    full = "" if v.full else " No full fine-tuning run of this model is among the chosen runs."
    return f"{verdict}{skipped}{full}"


MERGE_READINGS = (
    "Largest output change per setup and merge variant (log scale), against the reference chosen; PEFT's merge "
    "tests accept about 1e-4 in float32.",
    "Median forward time per variant, the whiskers its interquartile range; a ratio to the base is written only "
    "where the ranges do not overlap (\"≈ base\" otherwise).",
    "The task metric of the frozen base, LoRA unmerged and merged, and full fine-tuning on held-out data.")


MERGE = Analysis(
    name="merge", title="Merge equivalence", group="merge", page="merge",
    question="Is the merged model the same model? Output drift of merging per dtype, the unmerge round trip, "
             "forward latency, and the task metric of base, LoRA and full fine-tuning.",
    compute=_merge, figures=_merge_figures, text=_merge_text, answers="merge",
    answer=lambda v, p: answers.merge_answer(v.check.errors, v.latency, v.check.skipped),
    readings=lambda v, p: list(MERGE_READINGS),
    tables=lambda v, p: [("Setups checked: base weights · LoRA factors, and who runs each", v.check.setups),
                         ("Merge errors", v.check.errors), ("Unmerge round trip", v.check.roundtrip),
                         ("Parameters before and after merge_and_unload", v.check.params), ("Task metric", v.task)],
    params=(Param("run", _first(_lora_runs), "LoRA run whose model is merged", "LoRA run", options=_lora_runs),
            Param("reference", "same dtype", "same dtype: what merging itself changes; fp32: total drift from the "
                  "exact model", "Compare with", options=("same dtype", "fp32")),
            Param("repeats", 30, "timed forward passes per variant", "Repeats", low=1, high=1000)),
    applies=lambda inputs: None if _lora_runs(inputs, {}) else "it rebuilds a LoRA run's model: choose a LoRA run "
                                                              "trained here (a run recorded from your own training "
                                                              "loop cannot be rebuilt: its data is not known here)")


# ---- the registry -------------------------------------------------------------------------------------------------

ANALYSES = Registry([TRAINING, RANK_ALPHA, SPECTRA_SWEEP, SPECTRA, RANK_ADVICE, SIMILARITY, BASE_OVERLAP,
                     AMPLIFICATION, INTRUDERS, MERGE])


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the default registry (the report and the CLI show it from then on)."""
    return ANALYSES.register(analysis)


def get(name: str) -> Analysis:
    return ANALYSES.get(name)

