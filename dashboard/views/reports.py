"""Reports: a self-contained HTML report of chosen runs and registered analyses; run bundles out and in."""

from pathlib import Path

import streamlit as st

from dashboard.common import MAX_UPLOAD_BYTES, answer, fmt_bytes, guarded, question, scratch_dir, uploader
from dashboard.plain_text import plain
from dashboard.runs import all_runs, clear_caches, completed, follow_default, latest_sweep, run_label, stamp
from dashboard.analyses import inputs_for, inputs_key
from lora_analysis import runstore
from lora_analysis.analysis.registry import ANALYSES
from lora_analysis.report import render_report
from lora_analysis.run_report import report_sections, run_configs


@st.cache_data(max_entries=8, show_spinner="Building the report…")
def build_report(_runs, key: tuple, parts: tuple[str, ...]) -> str:
    # the page caches' loaders: what the other pages already computed is reused
    return render_report("lora-analysis report", report_sections(inputs_for(_runs), parts),
                         configs=run_configs(_runs), subtitle=f"{len(_runs)} runs: " + ", ".join(r.name for r in _runs))


def report_section(runs) -> None:
    st.subheader("HTML report")
    st.caption("One file, plotly.js inlined once: it opens offline in any browser with every chart interactive, "
               "and carries the runs' configs and environment.")
    labels = {run_label(r): r for r in runs}
    follow_default("rep_runs", list(labels), [run_label(r) for r in latest_sweep(runs)])
    chosen = st.multiselect("Runs", list(labels), key="rep_runs", help="Opens on the newest sweep's runs")
    titles = {a.name: a.title for a in ANALYSES}
    parts = st.multiselect("Analyses (each as its page shows it, at the same defaults)", list(titles),
                           default=list(titles), format_func=titles.get, key="rep_parts")
    if not chosen or not parts:
        st.warning("Choose at least one run and one analysis.")
        return
    if st.button("Build the report", type="primary", key="rep_build", icon=":material/description:"):
        selected = [labels[k] for k in chosen]
        with guarded("building the report"):
            st.session_state["rep_html"] = build_report(selected, inputs_key(inputs_for(selected)), tuple(parts))
    html = st.session_state.get("rep_html")
    if html:
        st.success(f"Report ready: {len(html) / 2**20:.1f} MiB.")
        st.download_button("Download report.html", html, "lora-analysis-report.html", "text/html", key="rep_dl")


def bundle_section(runs) -> None:
    st.subheader("Share a run")
    labels = {run_label(r): r for r in runs}
    run = labels[st.selectbox("Run to export", list(labels), key="rep_export_run")]
    with guarded("exporting the run"):
        data = bundle_bytes(str(run.dir), stamp(run))
        st.download_button(f"Download {run.id}.zip ({len(data) / 2**10:.0f} KiB)", data, f"{run.id}.zip",
                           "application/zip", key="rep_export_dl")


@st.cache_data(max_entries=4, show_spinner="Packing the run…")
def bundle_bytes(run_dir: str, version: float) -> bytes:
    # zipped once per run version, not on every click elsewhere on the page
    with scratch_dir() as tmp:
        return runstore.export_run(runstore.read_run(run_dir), Path(tmp) / "bundle.zip").read_bytes()


def import_section() -> None:
    st.subheader("Import a run someone shared")
    limits = runstore.LIMITS
    upload = uploader("A run bundle (.zip of JSON, CSV and safetensors files; nothing else is accepted)",
                      MAX_UPLOAD_BYTES, type=["zip"], key="rep_import", what="packed",
                      more=f"Unpacked it may hold at most {limits.max_files} files and "
                           f"{fmt_bytes(limits.max_bytes, digits=0)}; larger bundles: python -m lora_analysis runs "
                           "import BUNDLE.zip.")
    if upload is None:
        return
    marker = f"{upload.name}:{upload.size}:{upload.file_id}"
    if st.session_state.get("rep_imported") == marker:
        st.success("Imported: the run now shows on every page.")
        return
    with guarded("importing the bundle"):
        if upload.size > MAX_UPLOAD_BYTES:
            raise ValueError(f"{upload.name} is {upload.size / 2**20:.0f} MiB: bundles over "
                             f"{MAX_UPLOAD_BYTES // 2**20} MiB go through the CLI (runs import)")
        with scratch_dir() as tmp:
            path = Path(tmp) / "bundle.zip"
            path.write_bytes(upload.getvalue())
            try:
                run = runstore.import_run(path)
            except ValueError as exc:   # name the uploaded file, not our private temp copy
                raise ValueError(str(exc).replace(str(path), upload.name)) from exc
        clear_caches()
        st.session_state["rep_imported"] = marker
        st.success(f"Imported run '{plain(run.name)}' ({plain(run.id)}): it now shows on every page.")


def page() -> None:
    question("Reports", "How do I keep and share what these pages found?")
    runs = completed(all_runs())
    answer(f"{len(runs)} completed runs can go into one offline HTML report, which opens with every page's "
           "answers and then shows the evidence; each run can also be shared as a bundle that another "
           "lora-analysis imports." if runs else "There is nothing to report yet: run the quick demo on Home, or "
           "import a run bundle below.",
           "The report shows each analysis as its page does, at the same defaults, for the runs chosen below.")
    if runs:
        report_section(runs)
        bundle_section(runs)
    else:
        st.info("No completed runs yet: run the quick demo on Home, or import a run bundle below.")
    import_section()


page()
