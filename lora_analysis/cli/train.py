"""``python -m lora_analysis train | sweep | runs``: fine-tune, sweep, and manage the run store.

    python -m lora_analysis train --model mlp-digits --rank 4 --alpha 16
    python -m lora_analysis sweep --model mlp-digits --ranks 1,2,4,8,16,32 --alphas 16 --full-ft --out runs/
    python -m lora_analysis runs list | show ID | delete ID | export ID [--to FILE] | import FILE
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from .. import runstore


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mlp-digits",
                   help="mlp-digits, tiny-gpt, a Hugging Face hub id or a local model folder (default mlp-digits)")
    g.add_argument("--data", default=None, help="CSV table (mlp-digits) or corpus name / .txt .jsonl .csv text "
                                                "file (language models); default: the model's own task")
    g.add_argument("--label-column", default=None, help="label column of a CSV table (default label/target/class)")
    g.add_argument("--text-field", default=None, help="text field of a .jsonl/.csv text file (default text)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per training window (language models)")
    g.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps of a built-in base (default: the model's; cached per value)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per model and method)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: per model)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (and at the end)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    t.add_argument("--runs-dir", "--out", dest="runs_dir", default=None,
                   help="run store folder (default $LORA_ANALYSIS_HOME/runs or the user data folder)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _common_kwargs(args: argparse.Namespace) -> dict:
    return {"data": args.data, "label_column": args.label_column, "text_field": args.text_field,
            "seq_len": args.seq_len, "pretrain_steps": args.pretrain_steps, "lr": args.lr, "steps": args.steps,
            "batch_size": args.batch_size, "eval_every": args.eval_every, "weight_decay": args.weight_decay,
            "seed": args.seed, "device": args.device, "bf16": args.bf16}


def _targets(text: str | None):
    if text is None:
        return None
    return "all-linear" if text.strip() == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune one model with LoRA or fully, into the run store",
                       description="Fine-tune with LoRA (base frozen) or fully, and record the run.")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", "-r", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=None, help="default: equal to the rank (scaling 1)")
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument("--targets", default=None,
                      help="comma-separated module suffixes, or all-linear (default: per model)")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    lora.add_argument("--init", choices=["kaiming", "gaussian", "pissa"], default="kaiming")
    _add_common(p)
    p.add_argument("--name", default=None, help="a name for the run")
    p.add_argument("--json", action="store_true", help="print the run's final metrics as JSON")
    p.set_defaults(func=run_train)

    s = sub.add_parser("sweep", help="many LoRA runs (ranks × alphas × scaling × targets) plus full FT",
                       description="Sweep LoRA settings on one pretrained base and data split.")
    s.add_argument("--ranks", default="1,2,4,8,16,32", help="comma-separated ranks (default 1,2,4,8,16,32)")
    s.add_argument("--alphas", default="16", help="comma-separated alphas: numbers or multiples of r "
                                                  "such as r,2r (default 16)")
    scal = s.add_mutually_exclusive_group()
    scal.add_argument("--rslora", action="store_true", help="use alpha/sqrt(r) for every run")
    scal.add_argument("--compare-rslora", action="store_true", help="run each setting with alpha/r and alpha/sqrt(r)")
    s.add_argument("--targets", action="append", default=None,
                   help="a target choice (module suffixes comma-separated, or all-linear); repeat to compare")
    s.add_argument("--full-ft", action="store_true", help="add the full fine-tuning baseline")
    s.add_argument("--workers", type=int, default=0, help="run N runs at once in a process pool (default: in turn)")
    _add_common(s)
    s.add_argument("--json", action="store_true", help="print the sweep's table as JSON")
    s.set_defaults(func=run_sweep_cli)

    r = sub.add_parser("runs", help="list, show, delete, export or import runs of the run store",
                       description="Manage the run store.")
    r.add_argument("--runs-dir", dest="runs_dir", default=None, help="run store folder")
    rsub = r.add_subparsers(dest="action", metavar="ACTION")
    ls = rsub.add_parser("list", help="one line per run (the default)")
    ls.add_argument("--json", action="store_true")
    show = rsub.add_parser("show", help="a run's record and metrics")
    show.add_argument("run", help="run id (or a unique prefix)")
    rm = rsub.add_parser("delete", help="delete a run")
    rm.add_argument("run")
    ex = rsub.add_parser("export", help="write a run as one zip")
    ex.add_argument("run")
    ex.add_argument("--to", default=None, help="zip file or folder (default ./<id>.zip)")
    im = rsub.add_parser("import", help="import a run zip")
    im.add_argument("bundle")
    for q in (ls, show, rm, ex, im):
        q.add_argument("--runs-dir", dest="sub_runs_dir", default=None, help="run store folder")
    r.set_defaults(func=run_runs, action="list", json=False)


# ---- train ------------------------------------------------------------------------------------------

class _Bar:
    """A tqdm bar fed by the trainer's progress hook (disabled with --quiet or when stderr is no terminal)."""

    def __init__(self, quiet: bool, total: int = 0, desc: str = "") -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, step, total, loss, label=None, **_) -> None:
        if self.bar.total != total and label is None:
            self.bar.reset(total=total)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{label + ' · ' if label else ''}loss {loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _prepare(args) -> object:
    from ..training.models import prepare_task
    from tqdm import tqdm
    # delay: a cached base loads in well under a second and shows no bar at all
    bar = tqdm(desc=f"pretraining the {args.model} base (once; cached)", disable=args.quiet, file=sys.stderr,
               leave=False, delay=0.5)

    def pretrain_progress(step, total, loss, **_):
        bar.total = total
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
    try:
        return prepare_task(args.model, args.data, pretrain_steps=args.pretrain_steps, seq_len=args.seq_len,
                            label_column=args.label_column, text_field=args.text_field, progress=pretrain_progress)
    finally:
        bar.close()


def _main_metric(metrics: dict) -> str:
    return "val_accuracy" if "val_accuracy" in metrics or "base_val_accuracy" in metrics else "val_perplexity"


def run_train(args: argparse.Namespace) -> int:
    from ..training.trainer import TrainConfig, train
    config = TrainConfig(model=args.model, method=args.method, rank=args.rank, alpha=args.alpha,
                         dropout=args.dropout, targets=_targets(args.targets), rslora=args.rslora, init=args.init,
                         **_common_kwargs(args))
    config.validate()
    task = _prepare(args)
    bar = _Bar(args.quiet)
    try:
        result = train(config, task=task, runs_dir=args.runs_dir, progress=bar, name=args.name)
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
    return 0 if result.status == "completed" else 1


# ---- sweep --------------------------------------------------------------------------------------------

def run_sweep_cli(args: argparse.Namespace) -> int:
    from ..training.sweep import LocalExecutor, ProcessExecutor, resolve_steps, run_sweep, sweep_settings
    rslora = [False, True] if args.compare_rslora else [bool(args.rslora)]
    targets = [_targets(t) for t in args.targets] if args.targets else [None]
    settings = sweep_settings(model=args.model, ranks=[int(r) if r.strip().lstrip("-").isdigit() else r
                                                       for r in args.ranks.split(",") if r.strip()],
                              alphas=[a.strip() for a in args.alphas.split(",") if a.strip()], rslora=rslora,
                              targets=targets, full_ft=args.full_ft, **_common_kwargs(args))
    task = _prepare(args)
    total = sum(resolve_steps(c, task) for _, c in settings)
    bar = _Bar(args.quiet, total=total, desc=f"sweep of {len(settings)} runs")
    executor = ProcessExecutor(args.workers) if args.workers > 1 else LocalExecutor()
    try:
        result = run_sweep(settings, runs_dir=args.runs_dir, executor=executor,
                           task=task if isinstance(executor, LocalExecutor) else None,
                           progress=lambda **p: bar(**p) if isinstance(executor, LocalExecutor)
                           else bar.bar.update(p["total"]))
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
            print(f"no runs in {runstore.runs_root(runs_dir)}")
            return 0
        metric_cols = [c for c in ("val_accuracy", "val_perplexity", "val_loss") if c in frame.columns]
        cols = ["id", "status", "name", *metric_cols[:2], "trainable_params"]
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(frame[[c for c in cols if c in frame.columns]].to_string(index=False,
                                                                          float_format=lambda v: f"{v:.4g}"))
        return 0
    if action == "show":
        run = runstore.load_run(args.run, runs_dir)
        print(json.dumps({**run.record, "status": run.status, "dir": str(run.dir)}, indent=2, default=str))
        return 0
    if action == "delete":
        run = runstore.load_run(args.run, runs_dir)
        runstore.delete_run(run)
        print(f"deleted run {run.id}")
        return 0
    if action == "export":
        path = runstore.export_run(args.run, args.to, runs_dir)
        print(f"exported to {path}")
        return 0
    if action == "import":
        run = runstore.import_run(args.bundle, runs_dir)
        print(f"imported run {run.id} into {run.dir.parent}")
        return 0
    raise ValueError(f"unknown runs action {action!r}")  # pragma: no cover - argparse restricts it
