"""lora-analysis dashboard: a router only. Run with ``lora-analysis dashboard`` or, from the repository
folder, ``streamlit run dashboard/app.py`` (its ``.streamlit/config.toml`` keeps the server on 127.0.0.1).

A server listening beyond this machine (Streamlit's default, when started elsewhere without that config)
is refused a page unless exposing was asked for (``--expose`` / ``LORA_ANALYSIS_EXPOSE=1``)."""

import os
import sys
from pathlib import Path

# `streamlit run` puts only this folder on sys.path; the library lives one level up.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from streamlit import runtime  # noqa: E402

from dashboard.jobs_ui import sidebar_jobs, start_page_run  # noqa: E402
from lora_analysis.cli.dashboard import exposure_refusal, warn_exposed_once  # noqa: E402

PAGES = Path(__file__).parent / "views"  # not "pages/": that name switches Streamlit to legacy multipage mode

st.set_page_config(page_title="lora-analysis", page_icon=":material/blur_linear:", layout="wide")

if type(runtime.get_instance()) is runtime.Runtime:     # a real server (AppTest runs the app without one)
    address = st.get_option("server.address")
    refusal = exposure_refusal(address, os.environ)
    if refusal:
        st.error(refusal, icon=":material/lock:")
        st.stop()
    warn_exposed_once(address, st.get_option("server.port"))

navigation = st.navigation([
    st.Page(PAGES / "home.py", title="Home", icon=":material/home:", default=True),
    st.Page(PAGES / "params.py", title="Parameter savings", icon=":material/calculate:"),
    st.Page(PAGES / "finetune.py", title="Fine-tune", icon=":material/model_training:"),
    st.Page(PAGES / "spectra.py", title="Spectra", icon=":material/equalizer:"),
    st.Page(PAGES / "rank_alpha.py", title="Rank & alpha effects", icon=":material/tune:"),
    st.Page(PAGES / "subspaces.py", title="Subspaces", icon=":material/hub:"),
    st.Page(PAGES / "findings.py", title="Findings", icon=":material/fact_check:"),
    st.Page(PAGES / "merge.py", title="Merge equivalence", icon=":material/merge:"),
    st.Page(PAGES / "reports.py", title="Reports", icon=":material/description:"),
])
start_page_run()
navigation.run()
sidebar_jobs()          # jobs still running, found again from the store, live on every page
