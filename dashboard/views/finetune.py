"""Fine-tune: choose model, task, methods, ranks and alphas; launch a background job; watch; compare runs."""

import hashlib

import streamlit as st

from dashboard.analyses import widget
from dashboard.common import MAX_UPLOAD_BYTES, chart, guarded
from dashboard.jobs_ui import job_panel
from dashboard.runs import all_runs, clear_caches, run_label
from lora_analysis import jobs, runstore
from lora_analysis.analysis import registry
from lora_analysis.analysis.registry import Inputs
from lora_analysis.paths import home_dir
from lora_analysis.store.files import atomic_write_bytes
from lora_analysis.training.config import SweepSpec, field_help
from lora_analysis.training.models import BUILTIN_MODELS

HF_CHOICE = "Hugging Face model (folder or hub id)"
RANK_CHOICES = [1, 2, 4, 8, 16, 32, 64, 128]
LOSS = registry.get("loss_curves")      # the loss curves the report shows too


def save_upload(upload) -> str:
    """Keep an uploaded data file in the home folder under its content hash; returns its path."""
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{upload.name} is {len(data) / 2**20:.0f} MiB: data files must be under "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    suffix = upload.name.rsplit(".", 1)[-1].lower()
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


def launch_form() -> None:
    with st.form("finetune_form"):
        c = st.columns([2, 2, 2])
        model_choice = c[0].selectbox("Model", [*BUILTIN_MODELS, HF_CHOICE], key="ft_model", help=helps("model"))
        hf_model = c[0].text_input("Hugging Face folder or hub id", key="ft_hf_model",
                                   help="e.g. ./my-gpt2 (saved with save_pretrained) or gpt2 (needs the Hub)")
        methods = c[1].multiselect("Methods", ["LoRA", "full fine-tuning"], default=["LoRA", "full fine-tuning"],
                                   key="ft_methods", help=helps("full_ft", "; LoRA adds one run per rank, alpha "
                                                                           "and scaling"))
        ranks = c[1].multiselect("LoRA ranks", RANK_CHOICES, default=[1, 4, 16], key="ft_ranks", help=helps("ranks"))
        alphas = c[2].text_input("LoRA alphas", "16", key="ft_alphas", help=helps("alphas"))
        scaling = c[2].radio("Scaling", ["α/r", "α/√r (rsLoRA)", "both"], horizontal=True, key="ft_scaling",
                             help=helps("rslora", "; both: each setting with α/r and with α/√r"))
        c = st.columns([2, 1, 1, 1, 1, 1])
        targets = c[0].text_input("Target modules", "", key="ft_targets", help=helps("targets"))
        dropout = c[1].number_input("Dropout", 0.0, 0.95, 0.0, 0.05, key="ft_dropout", help=helps("dropout"))
        steps = c[2].number_input("Steps", 0, 100_000, 0, key="ft_steps", help=helps("steps", "; 0: the default"))
        lr = c[3].number_input("Learning rate", 0.0, 1.0, 0.0, format="%.5f", key="ft_lr",
                               help=helps("lr", "; 0: the default"))
        device = c[4].selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="ft_device", help=helps("device"))
        seed = c[5].number_input("Seed", 0, 2**31 - 1, 0, key="ft_seed", help=helps("seed"))
        data = st.file_uploader("Your own data (optional): CSV table with a label column for mlp-digits; "
                                ".txt/.jsonl/.csv text for language models", type=["csv", "txt", "jsonl"],
                                key="ft_data", help=helps("data"))
        submitted = st.form_submit_button("Launch", type="primary", icon=":material/rocket_launch:")
    if not submitted:
        return
    with guarded("launching the fine-tune") as g:
        model = hf_model.strip() if model_choice == HF_CHOICE else model_choice
        if not model:
            raise ValueError("give a Hugging Face model folder or hub id, or choose a built-in model")
        if not methods:
            raise ValueError("choose at least one method (LoRA, full fine-tuning)")
        lora = "LoRA" in methods
        if lora and not ranks:
            raise ValueError("choose at least one LoRA rank")
        spec = {"model": model, "ranks": sorted(ranks) if lora else [], "alphas": parse_alphas(alphas) if lora else [16],
                "rslora": {"α/r": [False], "α/√r (rsLoRA)": [True], "both": [False, True]}[scaling],
                "targets": [targets.strip()] if targets.strip() else [None],
                "full_ft": "full fine-tuning" in methods, "dropout": float(dropout), "seed": int(seed),
                "device": device, "steps": int(steps) or None, "lr": float(lr) or None,
                "data": save_upload(data) if data is not None else None}
        job = jobs.start_job("sweep", spec)
        st.session_state["ft_job"] = job.id
    if not g.failed:
        st.toast("Fine-tune started in the background")


def page() -> None:
    st.title("Fine-tune")
    st.caption("Runs train in a background process and land in the run store, so closing the tab loses "
               "nothing. LoRA and full fine-tuning share the pretrained base, data split, seed and steps.")
    launch_form()
    if st.session_state.get("ft_job"):
        job_panel(st.session_state["ft_job"])

    running = [j for j in jobs.list_jobs() if not j.done]
    if running:
        st.subheader("Jobs running")
        for job in running:
            c = st.columns([4, 1])
            c[0].write(f"`{job.id}` · {job.kind} · {job.spec.get('model')} · "
                       f"{job.progress.get('message', 'starting…')}")
            if c[1].button("Cancel", key=f"cancel_list_{job.id}"):
                jobs.cancel_job(job)
                st.rerun()

    st.subheader("Runs")
    runs = all_runs()
    if not runs:
        st.info("No runs yet: launch one above, or run the quick demo on Home.")
        return
    frame = runstore.runs_frame(runs=runs)
    shown = [c for c in ["name", "status", "model", "method", "rank", "alpha", "rslora", "targets", "steps",
                         "val_accuracy", "val_perplexity", "val_loss", "trainable_params", "train_seconds",
                         "created", "error", "id"] if c in frame.columns]
    st.dataframe(frame[shown], hide_index=True, width="stretch")
    labels = {run_label(r): r for r in runs}
    latest = runs[0].sweep_id
    default = [k for k, r in labels.items() if latest and r.sweep_id == latest] or list(labels)[:4]
    chosen = st.multiselect("Compare runs", list(labels), default=default, key="ft_compare")
    if chosen:
        selected = [labels[k] for k in chosen]
        with guarded("drawing the loss curves") as g:
            inputs = Inputs.from_runs(selected)
            params = {}
            widget(LOSS, "smooth", inputs, params, "ft_smooth", kind="number", max_value=1000)
            # the registered analysis, uncached: a running run's curves grow between reruns
            curves = LOSS.run(inputs, **params)
        if not g.failed:
            if len(curves.value.metrics):
                for i, (column, fig) in enumerate(zip(st.columns(2), curves.figures)):
                    with column:
                        chart(fig, key=f"ft_curve{i}")
            finals = curves.value.runs
            cols = [c for c in ["name", "status", "val_accuracy", "val_perplexity", "val_loss", "base_val_accuracy",
                                "base_val_perplexity", "trainable_params", "training_state_bytes", "samples_per_s",
                                "train_seconds", "device"] if c in finals.columns]
            st.dataframe(finals[cols], hide_index=True, width="stretch")
        with st.expander("Delete runs"):
            st.warning("Deleting removes the chosen runs' folders from the run store.")
            if st.button(f"Delete the {len(selected)} chosen runs", key="ft_delete"):
                with guarded("deleting runs"):
                    for run in selected:
                        runstore.delete_run(run)
                    clear_caches()
                    st.rerun()


page()
