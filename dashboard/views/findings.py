"""Findings: the published claims about LoRA checked on the runs in the run store, each with the paper's
number, the measured one, a verdict by a rule written in code (shown in an expander), and the evidence.
A claim the runs cannot measure offers the research preset's sweep as a background job. The page only
wires widgets to :mod:`lora_analysis.analysis.findings`."""

import streamlit as st

from dashboard.common import answer, answers_box, chart, guarded, question, table
from dashboard.jobs_ui import job_panel
from dashboard.plain_text import plain
from dashboard.runs import all_runs, completed, stamp, updates_for
from lora_analysis import jobs
from lora_analysis.analysis import findings as F
from lora_analysis.analysis.intervention import plot_intervention, run_intervention

# a claim that does not hold on these runs is a finding, not an error of the page: no red box
BADGES = {"reproduced": (st.success, ":material/check_circle:"), "partly": (st.info, ":material/contrast:"),
          "not reproduced": (st.warning, ":material/cancel:"), "not measurable": (st.info, ":material/help:")}
QUESTION = "Do the published findings about LoRA hold on these runs?"


@st.cache_resource(max_entries=8, show_spinner="Checking the claims on the runs…")
def _findings(model: str, runs_key: tuple) -> F.Findings:
    # keyed by every run's folder and last change: a new or changed run is picked up at once
    runs = [r for r in completed(all_runs()) if r.model == model]
    return F.findings(runs, model, load=updates_for)


@st.cache_data(max_entries=16, show_spinner="Scaling the intruder dimensions down and evaluating…")
def _intervention(run_dir: str, stamp_: float):
    from lora_analysis import runstore
    return run_intervention(runstore.read_run(run_dir))


def intervention_panel(result: F.Findings) -> None:
    """Shuttleworth et al.'s intervention on one chosen run: its intruders scaled down step by step, the target
    and source metrics at each step."""
    runs = sorted(result.runs, key=lambda r: (r.method == "full", r.config.get("rank") or 0))
    labels = {f"{F.short_label(r)} · seed {r.config.get('seed')} · {r.id[-6:]}": r for r in runs}
    with st.expander("Intervention: scale the intruder dimensions down (Shuttleworth et al. 2024)"):
        st.caption("The run's model is rebuilt and its intruders (top-10 singular vectors of W0+ΔW unlike any of "
                   "W0's) are scaled by 1, 0.75, 0.5, 0.25 and 0; the target and source metrics are measured at each "
                   "step. The paper: shrinking LoRA's intruders gives back source behaviour at a small target cost.")
        choice = st.selectbox("Run", list(labels), key="findings_intervention_run")
        if st.button("Scale the intruders down", key="findings_intervention", icon=":material/tune:"):
            st.session_state["findings_intervened"] = choice
        if st.session_state.get("findings_intervened") == choice:
            with guarded("the intervention"):
                run = labels[choice]
                frame = _intervention(str(run.dir), stamp(run))
                chart(plot_intervention(frame, choice), key="findings_intervention_chart",
                      how_to_read="Each step scales the intruder directions further down (1 = as trained, 0 = "
                                  "removed); the lines are the target and source metrics measured at that step.")
                table(frame, "intervention", key="findings_intervention_table")


def preset_panel(model: str, key: str) -> None:
    """The research preset of ``model`` (or of a built-in model to choose) as background jobs."""
    choices = list(F.RESEARCH_PRESETS)
    chosen = model if model in choices else st.selectbox("Model", choices, key=f"{key}_model")
    st.caption(plain(F.preset_text(chosen)))
    if st.button(f"Run the research preset on {chosen}", key=f"{key}_run", icon=":material/play_arrow:"):
        with guarded("starting the research preset"):
            st.session_state["findings_jobs"] = [jobs.start_job("sweep", spec).id for spec in F.preset_specs(chosen)]


def job_panels(box) -> None:
    """The preset's jobs (one per sweep), drawn once, at the top of the page."""
    with box:
        for job_id in st.session_state.get("findings_jobs", []):
            job_panel(job_id)


def show(finding: F.Finding, index: int, model: str, result: F.Findings) -> None:
    st.subheader(f"({index}) {finding.title}")
    st.markdown(plain(finding.claim))
    badge, icon = BADGES[finding.verdict]
    badge(f"**{finding.verdict.capitalize()}**: {plain(finding.measured)}", icon=icon)
    st.markdown(f"**Paper:** {plain(finding.paper)}")
    with st.expander("The rule that gives the verdict"):
        st.markdown(plain(finding.rule))
        st.code(finding.rule_code, language="python")
    readings = getattr(finding, "readings", []) or []
    for j, fig in enumerate(finding.figures):
        chart(fig, key=f"finding_{finding.key}_{j}", how_to_read=readings[j] if j < len(readings) else "")
    for j, (caption, frame) in enumerate(finding.tables):
        with st.expander(caption):
            table(frame, f"{finding.key}-{caption}", key=f"finding_{finding.key}_table{j}")
    if finding.key == "intruders" and finding.verdict != "not measurable":
        intervention_panel(result)
    if finding.verdict == "not measurable":
        st.caption(plain(f"To measure it: {finding.needs}. The research preset has all of these."))
        if model in F.RESEARCH_PRESETS:
            preset_panel(model, f"preset_{finding.key}")


def page() -> None:
    question("Findings: published claims about LoRA", QUESTION)
    head = answers_box()        # the answer, once the claims are checked
    st.caption("What the literature says LoRA does, checked on the runs in front of you: the paper's number, the "
               "number measured here, and a verdict computed by a rule written in the code (open it under each "
               "claim). Runs of one model are checked together; LoRA ranks should span 1…64 with a full "
               "fine-tuning run beside them, as the research preset does.")
    box = st.container()
    try:
        body(head)
    finally:
        job_panels(box)


def body(head) -> None:
    runs = completed(all_runs())
    models = list(dict.fromkeys(r.model for r in runs))
    if not runs:
        st.info("The run store has no completed runs yet: run the research preset below (minutes on a CPU for "
                "the small built-in models).", icon=":material/info:")
        preset_panel("", "preset_empty")
        return
    model = st.selectbox("Model", models, key="findings_model",
                         help="the runs of this model that share the newest run's data and length are checked")
    key = tuple(sorted((r.id, stamp(r)) for r in runs if r.model == model))
    with guarded("checking the claims") as g:
        result = _findings(model, key)
    if g.failed:
        return
    text, rule = result.answer()
    answer(text, rule, container=head)
    table(result.table(), f"findings-{model}", key="findings_table")
    far = len(result.norms) and result.norms["relative_norm"].median() > F.FAR_ABOVE * F.PAPER_RELATIVE_NORM
    (st.warning if far else st.caption)(plain(result.note))
    with st.expander("‖ΔW‖/‖W0‖ per run"):
        table(result.norms, f"relative-norms-{model}", key="findings_norms")
    for i, finding in enumerate(result.findings, 1):
        with guarded(f"showing claim {i}"):
            show(finding, i, model, result)
    with st.expander("Run the research preset (ranks 1…64, full fine-tuning, two seeds)"):
        preset_panel(model if model in F.RESEARCH_PRESETS else "", "preset_bottom")


page()
