"""Home: LoRA in three sentences and one picture, and a one-click quick demo that fills the other pages."""


import streamlit as st

from dashboard.common import answer, chart, guarded, next_question, page_question, question
from dashboard.jobs_ui import job_panel
from dashboard.plain_text import plain
from dashboard.runs import all_runs, completed
from lora_analysis import jobs
from lora_analysis.analysis.registry import ANALYSES
from lora_analysis.plots.params import plot_lora_diagram

QUICK_DEMO = {"model": "mlp-digits", "ranks": [1, 2, 4, 8, 16], "alphas": [16.0], "full_ft": True, "seed": 0}


# the questions users come with, and the page that answers each from their runs
QUESTIONS = [("rank_alpha", page_question("rank_alpha", "Which rank should I use?")),
             ("spectra", page_question("spectra", "What did LoRA learn compared with full fine-tuning?")),
             ("merge", page_question("merge", "Is my merged model the same model?")),
             ("params", "How many parameters and how much memory does LoRA save?")]


def store_answer() -> str:
    runs = completed(all_runs())
    if not runs:
        return ("The run store has no completed runs yet: run the quick demo below (about half a minute on a "
                "CPU) and each page answers its question from those runs.")
    models = sorted({r.model for r in runs})
    lora = sum(r.method == "lora" for r in runs)
    return (f"The run store holds {len(runs)} completed runs of {', '.join(models)} ({lora} LoRA, "
            f"{len(runs) - lora} full fine-tuning): each page below answers its question from them.")


def page() -> None:
    question("lora-analysis", "What does LoRA change in my model, and what does it cost?")
    answer(store_answer(), "Counted from the run store: completed runs, by model and method.")
    for name, text in QUESTIONS:
        next_question(name, text, icon=":material/help:")
    st.markdown(
        "**Low-Rank Adaptation keeps a pretrained weight W frozen and learns its update as the product of "
        "two thin matrices, ΔW = (α/r)·B·A, with B of shape d×r and A of shape r×k.** "
        "Only r·(d+k) values are trained instead of d·k, and after training B·A can be merged into W so "
        "the model runs exactly as fast as before. This dashboard measures what that low-rank update "
        "really learns: its singular spectrum, how rank and alpha change it, how it differs from full "
        "fine-tuning, and whether the merged model is the same model.")
    chart(plot_lora_diagram(4096, 4096, 8))
    st.caption("One attention projection of Llama-2-7B (4096×4096) at r=8. The exact counts are printed; the thickness of B and A is exaggerated so they stay visible.")

    st.subheader("Quick demo")
    st.markdown(
        "Fine-tunes a 3-layer MLP pretrained on scikit-learn's handwritten digits for a shifted task, with "
        f"LoRA at ranks {', '.join(map(str, QUICK_DEMO['ranks']))} (α={QUICK_DEMO['alphas'][0]:g}) and with full "
        "fine-tuning, on this machine's CPU in well under a minute. Its runs fill every other page.")
    if st.button("Run the quick demo", type="primary", icon=":material/play_arrow:", key="quick_demo"):
        with guarded("starting the quick demo"):
            st.session_state["home_job"] = jobs.start_job("sweep", QUICK_DEMO).id
    job_id = st.session_state.get("home_job")
    if job_id:
        job_panel(job_id)

    with st.expander("What each analysis answers (the pages and the HTML report show the same)"):
        st.markdown("\n".join(f"- **{plain(a.title)}**: {plain(a.question)}" for a in ANALYSES))


page()
