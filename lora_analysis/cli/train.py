"""``python -m lora_analysis train | sweep | runs``: fine-tune, sweep, and manage the run store.

    python -m lora_analysis train --model mlp-digits --rank 4 --alpha 16
    python -m lora_analysis sweep --model mlp-digits --ranks 1,2,4,8,16,32 --alphas 16 --full-ft --out runs/
    python -m lora_analysis sweep --model mlp-digits --ranks 1,4 --full-ft --executor ray [--ray-address auto]
    python -m lora_analysis runs list | show ID | delete ID | export ID [--to FILE] | import FILE
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import typing
from typing import Any, Sequence

import pandas as pd

from .. import runstore
from . import add_runs_dir, elsewhere_note, store_hint


# ---- options generated from the settings' fields ------------------------------------------------------

def _scalar_type(hint: Any) -> type:
    """int, float or str: the parser of a field annotated ``int | None``, ``float``, ``str | list[str]``..."""
    options = typing.get_args(hint) or (hint,)
    for t in (int, float):
        if t in options:
            return t
    return str


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_setting_options(parser: argparse.ArgumentParser, cls: type, order: Sequence[str]) -> None:
    """One option per field of the settings dataclass ``cls``: ``--batch-size`` for ``batch_size`` (plus
    the field's ``flags``), its help, default, type and choices, in argument groups named by the fields'
    ``group`` (in ``order``). A field with ``options`` gets several mutually exclusive flags."""
    hints = typing.get_type_hints(cls)
    groups = {name: parser.add_argument_group(name) for name in order}
    for f in dataclasses.fields(cls):
        meta, default = f.metadata, _field_default(f)
        group = groups[meta["group"]]
        help_text = meta["help"].replace("%", "%%")
        if meta.get("options"):
            exclusive = group.add_mutually_exclusive_group()
            for flag, kwargs in meta["options"]:
                exclusive.add_argument(flag, dest=f.name, default=default, **{"help": help_text, **kwargs})
            continue
        cli_default = meta.get("cli_default", default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": cli_default}
        if hints[f.name] is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("type") or _scalar_type(hints[f.name])
            kwargs.update({k: meta[k] for k in ("choices", "metavar", "action") if k in meta})
            if cli_default is not None:
                help_text += f" (default {_shown(cli_default)})"
        group.add_argument(f"--{f.name.replace('_', '-')}", *meta.get("flags", ()), help=help_text, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace):
    """The settings dataclass ``cls`` from parsed options (an option not given takes the field's default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{f.name: _field_default(f) if values[f.name] is None else values[f.name]
                  for f in dataclasses.fields(cls)})


def _add_output(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    add_runs_dir(o)
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    from ..training.config import SweepSpec, TrainConfig

    p = sub.add_parser("train", help="fine-tune one model with LoRA or fully, into the run store",
                       description="Fine-tune with LoRA (base frozen) or fully, and record the run.")
    add_setting_options(p, TrainConfig, ("method", "LoRA", "model and data", "optimisation"))
    _add_output(p)
    p.add_argument("--name", default=None, help="a name for the run")
    p.add_argument("--json", action="store_true", help="print the run's final metrics as JSON")
    p.set_defaults(func=run_train)

    s = sub.add_parser("sweep", help="many LoRA runs (ranks × alphas × scaling × targets) plus full FT",
                       description="Sweep LoRA settings on one pretrained base and data split, run by run in "
                                   "this process (the default) or as Ray tasks on this machine or a cluster.",
                       epilog=SWEEP_EXAMPLES)
    add_setting_options(s, SweepSpec, ("sweep", "LoRA", "model and data", "optimisation"))
    e = s.add_argument_group("executor")
    e.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: the runs one after another in this process (default); ray: each run a Ray task "
                        "(pip install -r requirements-ray.txt)")
    e.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster: auto (the one this machine belongs to) or ray://HOST:PORT "
                        "(default: start a local Ray on this machine)")
    e.add_argument("--workers", type=int, default=0, metavar="N",
                   help="with --executor ray: at most N runs in flight at once (default: as many as the cluster's "
                        "free CPUs/GPUs allow); the local executor runs one at a time")
    e.add_argument("--trial-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs each Ray trial asks for (default 1)")
    e.add_argument("--trial-gpus", type=float, default=None, metavar="G",
                   help="GPUs each Ray trial asks for (default: 1 when the cluster has GPUs and --device is auto or "
                        "cuda, else 0)")
    e.add_argument("--retries", type=int, default=0, metavar="N",
                   help="retry a Ray trial whose worker died up to N times (default 0: record it interrupted)")
    _add_output(s)
    s.add_argument("--json", action="store_true", help="print the sweep's table as JSON")
    s.set_defaults(func=run_sweep_cli)

    r = sub.add_parser("runs", help="list, show, delete, export or import runs of the run store",
                       description="Manage the run store.")
    add_runs_dir(r)
    rsub = r.add_subparsers(dest="action", metavar="ACTION")
    ls = rsub.add_parser("list", help="one line per run (the default)")
    ls.add_argument("--json", action="store_true")
    show = rsub.add_parser("show", help="a run's record, metrics and the paths of its files (adapter, base "
                                        "weights)")
    show.add_argument("run", help="run id, a unique id prefix, or the run's name (the newest of that name)")
    rm = rsub.add_parser("delete", help="delete a run")
    rm.add_argument("run", help="run id or a unique id prefix")
    ex = rsub.add_parser("export", help="write a run as one zip")
    ex.add_argument("run", help="run id, a unique id prefix, or the run's name")
    ex.add_argument("--to", default=None, help="zip file or folder (default ./<id>.zip)")
    im = rsub.add_parser("import", help="import a run zip")
    im.add_argument("bundle")
    for q in (ls, show, rm, ex, im):
        add_runs_dir(q, dest="sub_runs_dir", alias=q is not ex)     # export's output is --to
    r.set_defaults(func=run_runs, action="list", json=False)


# ---- train ------------------------------------------------------------------------------------------

class _Bar:
    """A tqdm bar fed by the trainer's progress hook (disabled with --quiet or when stderr is no terminal)."""

    def __init__(self, quiet: bool, total: int = 0, desc: str = "") -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, step, total, loss, **_) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _pretrain_bar(args, config):
    """A progress callback for pretraining the base (a bar on stderr, shown only if it takes a while)."""
    from tqdm import tqdm
    # delay: a cached base loads in well under a second and shows no bar at all
    bar = tqdm(desc=f"pretraining the {config.model} base (once; cached)", disable=args.quiet, file=sys.stderr,
               leave=False, delay=0.5)

    def pretrain_progress(step, total, loss, **_):
        bar.total = total
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        if step >= total:
            bar.close()                              # done: out of the way of the training bar
    try:
        yield pretrain_progress
    finally:
        bar.close()


def _prepare(args, config) -> object:
    from ..training.trainer import task_for
    with _pretrain_bar(args, config) as pretrain_progress:
        return task_for(config, progress=pretrain_progress)


def _main_metric(metrics: dict) -> str:
    return "val_accuracy" if "val_accuracy" in metrics or "base_val_accuracy" in metrics else "val_perplexity"


def run_train(args: argparse.Namespace) -> int:
    from ..training import trainer
    config = config_from_args(trainer.TrainConfig, args)
    config.validate()
    # train() claims the run folder before it loads (or pretrains) the base: a kill at any moment leaves an
    # "interrupted" run, never an empty folder
    bar = _Bar(args.quiet)
    try:
        with _pretrain_bar(args, config) as pretrain_progress:
            result = trainer.train(config, runs_dir=args.runs_dir, progress=bar, name=args.name,
                                   pretrain_progress=pretrain_progress)
    finally:
        bar.close()
    m = result.metrics
    if args.json:
        print(json.dumps({"run_id": result.run_id, "status": result.status, "error": result.error, **m},
                         indent=2, default=str))
    else:
        key = _main_metric(m)
        print(f"run {result.run_id}: {result.status}" + (f" ({result.error})" if result.error else ""))
        if key in m:
            print(f"  {key}: frozen base {m[f'base_{key}']:.4f} -> fine-tuned {m[key]:.4f}   "
                  f"(val_loss {m['base_val_loss']:.4f} -> {m['val_loss']:.4f})")
        print(f"  trainable params: {m['trainable_params']:,} of {m['total_params']:,} "
              f"({m['trainable_percent']:.3f}%)")
        if m.get("train_seconds"):
            print(f"  {m['steps_done']} steps in {m['train_seconds']:.2f} s ({m['samples_per_s']:.0f} samples/s); "
                  f"params+grads+optimizer {m.get('training_state_bytes', 0) / 2**20:.2f} MiB, "
                  f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB")
        print(f"  saved in {result.run_dir}")
    _tell_where(args.runs_dir, "the run", args.json)
    return 0 if result.status == "completed" else 1


def _tell_where(runs_dir, what: str, as_json: bool = False) -> None:
    """After writing into a run store other than the default: the command lines that read it (on stderr
    under --json, so stdout stays one JSON document)."""
    note = elsewhere_note(runs_dir, what)
    if note:
        print(note, file=sys.stderr if as_json else sys.stdout)


# ---- sweep --------------------------------------------------------------------------------------------

class _SweepBar:
    """One bar per sweep, under every executor: runs done out of the total (a run in progress counts by
    its share of steps), then the step and loss of each run in progress."""

    def __init__(self, quiet: bool, count: int, desc: str) -> None:
        from tqdm import tqdm

        from ..training.sweep import SweepProgress
        self.state = SweepProgress(count)
        self.bar = tqdm(total=count, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")

    def __call__(self, **event) -> None:
        self.state(**event)
        self.bar.update(self.state.fraction * self.state.count - self.bar.n)
        self.bar.set_postfix_str(self.state.summary(), refresh=False)

    def close(self) -> None:
        self.bar.close()


SWEEP_EXAMPLES = """\
examples:
  %(prog)s --model mlp-digits --ranks 1,2,4,8,16,32 --alphas 16 --full-ft
      six LoRA runs and one full fine-tune on one base and data split, one after another
  %(prog)s --model mlp-digits --ranks 1,4 --full-ft --executor ray --out runs/
      the same kind of sweep, each run a Ray task on a local Ray started for it
  %(prog)s --model meta-llama/Llama-2-7b-hf --ranks 4,8,16,32 --alphas r,2r --executor ray --ray-address auto
      on the Ray cluster this machine belongs to: one GPU per run, the runs land in --out
then: lora-analysis report --html sweep.html (a report of the newest sweep)"""


def run_sweep_cli(args: argparse.Namespace) -> int:
    from ..training.config import SweepSpec
    from ..training.sweep import make_executor, run_sweep
    settings = config_from_args(SweepSpec, args).settings()
    executor = make_executor(args.executor, address=args.ray_address, workers=args.workers or None,
                             trial_cpus=args.trial_cpus, trial_gpus=args.trial_gpus, retries=args.retries)
    # the base is prepared (pretrained and cached) once, here, when the runs go in this process or on a Ray
    # started on this machine (its workers then load it from the cache); a cluster's workers load their own
    task = _prepare(args, settings[0][1]) if executor.shares_memory or executor.on_this_machine else None
    where = "" if executor.shares_memory else " on Ray"
    bar = _SweepBar(args.quiet, len(settings), desc=f"sweep of {len(settings)} runs{where}")
    try:
        result = run_sweep(settings, runs_dir=args.runs_dir, executor=executor, task=task, progress=bar)
    finally:
        bar.close()
    frame = result.frame
    metric = _main_metric(frame.iloc[0].to_dict()) if len(frame) else "val_loss"
    cols = [c for c in ["name", "status", "trainable_params", f"base_{metric}", metric, "val_loss",
                        "train_seconds", "training_state_bytes", "run_id"] if c in frame.columns]
    if args.json:
        print(frame[cols + [c for c in ("error",) if c in frame.columns]].to_json(orient="records", indent=2))
    else:
        shown = frame[cols].copy()
        if "training_state_bytes" in shown:
            shown["training_state_bytes"] = (shown["training_state_bytes"] / 2**20).round(3)
            shown = shown.rename(columns={"training_state_bytes": "train_MiB"})
        print(f"sweep {result.sweep_id}: {len(frame)} runs in {runstore.runs_root(args.runs_dir)}")
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for _, row in frame[frame["status"] != "completed"].iterrows():
            print(f"  {row['name']}: {row['status']}: {row.get('error')}")
    _tell_where(args.runs_dir, "the runs", args.json)
    return 0 if (frame["status"] == "completed").all() else 1


# ---- runs ---------------------------------------------------------------------------------------------

def run_runs(args: argparse.Namespace) -> int:
    runs_dir = getattr(args, "sub_runs_dir", None) or args.runs_dir
    action = args.action or "list"
    if action == "list":
        frame = runstore.runs_frame(runs_dir)
        if args.json:
            print(frame.to_json(orient="records", indent=2, date_format="iso"))
            return 0
        if not len(frame):
            print(f"no runs in {runstore.runs_root(runs_dir)}{store_hint(runs_dir)}")
            return 0
        metric_cols = [c for c in ("val_accuracy", "val_perplexity", "val_loss") if c in frame.columns]
        cols = ["id", "status", "name", *metric_cols[:2], "trainable_params"]
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(frame[[c for c in cols if c in frame.columns]].to_string(index=False,
                                                                          float_format=lambda v: f"{v:.4g}"))
        return 0
    if action == "show":
        from .subjects import find_run, run_files
        run = find_run(args.run, runs_dir)
        print(json.dumps({**run.record, "status": run.status, "dir": str(run.dir), "files": run_files(run)},
                         indent=2, default=str))
        return 0
    if action == "delete":
        try:
            run_id = runstore.load_run(args.run, runs_dir).id
        except ValueError:          # a damaged run: its run.json cannot be read, it can still be deleted
            run_id = args.run
        runstore.delete_run(args.run, runs_dir)
        print(f"deleted run {run_id}")
        return 0
    if action == "export":
        from .subjects import find_run
        path = runstore.export_run(find_run(args.run, runs_dir), args.to, runs_dir)
        print(f"exported to {path}")
        return 0
    if action == "import":
        run = runstore.import_run(args.bundle, runs_dir)
        print(f"imported run {run.id} into {run.dir.parent}")
        _tell_where(runs_dir, "the run")
        return 0
    raise ValueError(f"unknown runs action {action!r}")  # pragma: no cover - argparse restricts it
