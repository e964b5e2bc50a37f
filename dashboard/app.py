"""lora-analysis dashboard: a router only. Run with ``streamlit run dashboard/app.py``."""

import sys
from pathlib import Path

# `streamlit run` puts only this folder on sys.path; the library lives one level up.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

PAGES = Path(__file__).parent / "views"  # not "pages/": that name switches Streamlit to legacy multipage mode

st.set_page_config(page_title="lora-analysis", page_icon=":material/blur_linear:", layout="wide")

navigation = st.navigation([
    st.Page(PAGES / "home.py", title="Home", icon=":material/home:", default=True),
    st.Page(PAGES / "params.py", title="Parameter savings", icon=":material/calculate:"),
    st.Page(PAGES / "finetune.py", title="Fine-tune", icon=":material/model_training:"),
    st.Page(PAGES / "spectra.py", title="Spectra", icon=":material/equalizer:"),
    st.Page(PAGES / "rank_alpha.py", title="Rank & alpha effects", icon=":material/tune:"),
    st.Page(PAGES / "subspaces.py", title="Subspaces", icon=":material/hub:"),
    st.Page(PAGES / "merge.py", title="Merge equivalence", icon=":material/merge:"),
    st.Page(PAGES / "reports.py", title="Reports", icon=":material/description:"),
])
navigation.run()
