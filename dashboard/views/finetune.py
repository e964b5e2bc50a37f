"""Fine-tune: choose model, task, methods, ranks and alphas; launch a background job; watch; compare runs."""

import hashlib
from dataclasses import MISSING, fields

import streamlit as st

from dashboard.analyses import widget
from dashboard.common import (MAX_UPLOAD_BYTES, answer, answers_box, chart, guarded, next_question, question,
                              reading, result_answer, table, uploader)
from dashboard.jobs_ui import job_panel, jobs_list
from dashboard.typed_paths import allowed_roots_text, model_source
from dashboard.runs import all_runs, clear_caches, follow_default, run_label
from lora_analysis import jobs, runstore
from lora_analysis.analysis import registry
from lora_analysis.analysis.registry import Inputs
from lora_analysis.paths import home_dir
from lora_analysis.store.files import atomic_write_bytes
from lora_analysis.training.config import SweepSpec, field_help
from lora_analysis.device import available_devices
from lora_analysis.training.models import BUILTIN_MODELS, DEFAULTS

HF_CHOICE = "Hugging Face model (folder or hub id)"
RANK_CHOICES = [1, 2, 4, 8, 16, 32, 64, 128]
DATA_TYPES = ("csv", "txt", "jsonl")
LOSS = registry.get("loss_curves")      # the loss curves the report shows too


def save_upload(upload) -> str:
    """Keep an uploaded data file in the home folder under its content hash; returns its path."""
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{upload.name} is {len(data) / 2**20:.0f} MiB: data files must be under "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    suffix = upload.name.rsplit(".", 1)[-1].lower()
    if suffix not in DATA_TYPES:        # the name comes from the browser: only its extension is used
        raise ValueError(f"{upload.name!r} is not a data file: give a {', '.join('.' + t for t in DATA_TYPES)} file")
    folder = home_dir() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.{suffix}"
    if not path.exists():
        atomic_write_bytes(path, data)
    return str(path)


def parse_alphas(text: str) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError("alphas is empty: give numbers or multiples of the rank, e.g. 16 or r,2r")
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            out.append(v)      # "r", "2r": the library validates them
    return out


def helps(name: str, more: str = "") -> str:
    """The help of a sweep setting, as the CLI shows it (one text, from the setting's field)."""
    return field_help(SweepSpec, name) + more


def field_default(name: str):
    """A sweep setting's own default (the value the form opens on: the same one the CLI uses)."""
    f = {f.name: f for f in fields(SweepSpec)}[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def model_defaults(model: str) -> dict:
    """What "default" means for ``model``: its steps, learning rates and targets (a Hugging Face model takes
    the shared HF defaults; its targets depend on its architecture)."""
    return DEFAULTS.get(model, DEFAULTS["hf"])


def targets_text(targets) -> str:
    if targets is None:
        return "the architecture's attention projections (e.g. q_proj, v_proj)"
    return targets if isinstance(targets, str) else ", ".join(targets)


def launch_form() -> None:
    c = st.columns([2, 4])
    # outside the form: the defaults shown below follow the model chosen
    model_choice = c[0].selectbox("Model", [*BUILTIN_MODELS, HF_CHOICE], key="ft_model", help=helps("model"))
    defaults = model_defaults(model_choice)
    with st.form("finetune_form"):
        hf_model = ""
        if model_choice == HF_CHOICE:
            hf_model = st.text_input(
                "Hugging Face model folder or hub id", key="ft_hf_model", placeholder="./my-gpt2 or gpt2",
                help="A folder saved with save_pretrained, inside " + allowed_roots_text() + "; or a hub id "
                     "such as gpt2 (needs the Hub)")
        c = st.columns([2, 2, 2])
        methods = c[0].multiselect("Methods", ["LoRA", "full fine-tuning"], default=["LoRA", "full fine-tuning"],
                                   key="ft_methods", help=helps("full_ft", "; LoRA adds one run per rank, alpha "
                                                                           "and scaling"))
        ranks = c[1].multiselect("LoRA ranks", RANK_CHOICES, default=[1, 4, 16], key="ft_ranks", help=helps("ranks"))
        alphas = c[2].text_input("LoRA alphas", ", ".join(f"{a:g}" if isinstance(a, (int, float)) else str(a)
                                                          for a in field_default("alphas")),
                                 key="ft_alphas", help=helps("alphas"))
        c = st.columns([2, 2, 2])
        scaling = c[0].radio("Scaling", ["α/r", "α/√r (rsLoRA)", "both"], horizontal=True, key="ft_scaling",
                             help=helps("rslora", "; both: each setting with α/r and with α/√r"))
        targets = c[1].text_input("Target modules", "", key="ft_targets", help=helps("targets"),
                                  placeholder=f"default: {targets_text(defaults['targets'])}")
        dropout = c[2].number_input("Dropout", 0.0, 0.95, float(field_default("dropout")), 0.05, key="ft_dropout",
                                    help=helps("dropout"))
        c = st.columns([1, 1.6, 1, 1])
        lr_default = defaults["lr"]
        steps = c[0].number_input("Steps", 1, 100_000, None, key="ft_steps",
                                  placeholder=f"default ({defaults['steps']})",
                                  help=helps("steps", f"; empty: the model's default, {defaults['steps']}"))
        lr = c[1].number_input("Learning rate", 1e-7, 1.0, None, 1e-4, format="%g", key="ft_lr",
                               placeholder=f"default (LoRA {lr_default['lora']:g}, full {lr_default['full']:g})",
                               help=helps("lr", f"; empty: the model's default, {lr_default['lora']:g} for LoRA "
                                                f"and {lr_default['full']:g} for full fine-tuning"))
        devices = ["auto", *available_devices()]      # only what this machine has
        device = c[2].selectbox("Device", devices, index=devices.index(field_default("device")), key="ft_device",
                                help=helps("device", f"; this machine has {', '.join(devices[1:])}"))
        seed = c[3].number_input("Seed", 0, 2**31 - 1, int(field_default("seed")), key="ft_seed", help=helps("seed"))
        data = uploader("Your own data (optional): CSV table with a label column for mlp-digits; .txt/.jsonl/.csv "
                        "text for language models", MAX_UPLOAD_BYTES, type=list(DATA_TYPES), key="ft_data",
                        more=helps("data"))
        submitted = st.form_submit_button("Launch", type="primary", icon=":material/rocket_launch:")
    if not submitted:
        return
    with guarded("launching the fine-tune") as g:
        model = model_source(hf_model) if model_choice == HF_CHOICE else model_choice
        if not methods:
            raise ValueError("choose at least one method (LoRA, full fine-tuning)")
        lora = "LoRA" in methods
        if lora and not ranks:
            raise ValueError("choose at least one LoRA rank")
        spec = {"model": model, "ranks": sorted(ranks) if lora else [], "alphas": parse_alphas(alphas) if lora else [16],
                "rslora": {"α/r": [False], "α/√r (rsLoRA)": [True], "both": [False, True]}[scaling],
                "targets": [targets.strip()] if targets.strip() else [None],
                "full_ft": "full fine-tuning" in methods, "dropout": float(dropout), "seed": int(seed),
                "device": device, "steps": int(steps) if steps is not None else None,
                "lr": float(lr) if lr is not None else None,
                "data": save_upload(data) if data is not None else None}
        job = jobs.start_job("sweep", spec)
        st.session_state["ft_job"] = job.id
    if not g.failed:
        st.toast("Fine-tune started in the background")


def store_answer(runs) -> str:
    """How the runs in the store ended, counted."""
    if not runs:
        return "The run store is empty: launch a fine-tune above, or run the quick demo on Home."
    counts = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    models = sorted({r.model for r in runs})
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"The run store holds {len(runs)} runs of {', '.join(models)}: {parts}. Compare them below; "
            "runs that completed show on every analysis page.")


def page() -> None:
    question("Fine-tune", "How do LoRA and full fine-tuning train on my model and data?")
    head = answers_box()
    st.caption("Runs train in a background process and land in the run store, so closing the tab loses "
               "nothing. LoRA and full fine-tuning share the pretrained base, data split, seed and steps.")
    launch_form()
    if st.session_state.get("ft_job"):
        job_panel(st.session_state["ft_job"])
    jobs_list()          # every job still running, found again from the store, live

    st.subheader("Runs")
    runs = all_runs()
    answer(store_answer(runs), "Counted from the run store: one entry per run folder, by its status.",
           container=head)
    if not runs:
        st.info("No runs yet: launch one above, or run the quick demo on Home.")
        return
    frame = runstore.runs_frame(runs=runs)
    shown = [c for c in ["name", "status", "model", "method", "rank", "alpha", "rslora", "targets", "steps",
                         "val_accuracy", "val_perplexity", "val_loss", "trainable_params", "train_seconds",
                         "created", "error", "id"] if c in frame.columns]
    table(frame[shown], "runs", key="ft_runs")
    labels = {run_label(r): r for r in runs}
    latest = runs[0].sweep_id
    default = [k for k, r in labels.items() if latest and r.sweep_id == latest] or list(labels)[:4]
    follow_default("ft_compare", list(labels), default)     # a new sweep replaces a stale selection
    chosen = st.multiselect("Compare runs", list(labels), key="ft_compare")
    if chosen:
        selected = [labels[k] for k in chosen]
        with guarded("drawing the loss curves") as g:
            inputs = Inputs.from_runs(selected)
            params = {}
            widget(LOSS, "smooth", inputs, params, "ft_smooth", kind="number", max_value=1000)
            # the registered analysis, uncached: a running run's curves grow between reruns
            curves = LOSS.run(inputs, **params)
        if not g.failed:
            result_answer(curves)
            if len(curves.value.metrics):
                for i, (column, fig) in enumerate(zip(st.columns(2), curves.figures)):
                    with column:
                        chart(fig, key=f"ft_curve{i}", how_to_read=reading(curves, i))
            finals = curves.value.runs
            cols = [c for c in ["name", "status", "val_accuracy", "val_perplexity", "val_loss", "base_val_accuracy",
                                "base_val_perplexity", "trainable_params", "training_state_bytes", "samples_per_s",
                                "train_seconds", "device"] if c in finals.columns]
            table(finals[cols], "compared-runs", key="ft_finals")
        with st.expander("Delete runs"):
            st.warning("Deleting removes the chosen runs' folders from the run store.")
            if st.button(f"Delete the {len(selected)} chosen runs", key="ft_delete"):
                with guarded("deleting runs"):
                    for run in selected:
                        runstore.delete_run(run)
                    clear_caches()
                    st.rerun()
    next_question("rank_alpha", "Next: which rank should I use? (Rank & alpha effects)")


page()
