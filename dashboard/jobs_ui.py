"""A live panel for one background job: progress bar (runs done of the total), the step and loss of each
run in progress, cancel button. The same for a sweep in one process and a sweep on Ray.

While the job runs, the panel polls the job's files once a second inside an ``st.fragment`` (only the
panel re-runs); when the job ends it re-runs the page once so the charts pick up the new runs, and stops
polling.
"""

from __future__ import annotations

import streamlit as st
from dashboard.plain_text import plain

from lora_analysis import jobs, runstore


def _runs(ids: list[str]) -> list[runstore.Run]:
    runs = []
    for run_id in ids:
        try:
            runs.append(runstore.load_run(run_id))
        except ValueError:      # deleted since: nothing to report
            continue
    return runs


def _show(job: jobs.Job) -> None:
    p = job.progress
    total = max(float(p.get("total", 0) or 0), 1.0)
    done = min(max(float(p.get("done", 0) or 0), 0.0), total)
    if job.status == "running":
        # one bar per sweep, whatever runs it (this machine or Ray): runs done of the total, a run in
        # progress counting by its share of steps; the message names the runs in progress and their losses
        st.progress(done / total, text=p.get("message") or "starting…")
        running = p.get("running") or []
        if len(running) > 3:        # the message names three: the rest in a small table
            st.dataframe(running, hide_index=True, width="stretch")
    elif job.status == "completed":
        failed = [r for r in _runs(job.run_ids) if r.status == "failed"]
        st.success(f"Done: {len(job.run_ids) - len(failed)} runs written to the run store. Spectra, Rank & alpha "
                   "effects, Subspaces and Merge equivalence now show them.", icon=":material/check_circle:")
        for run in failed:
            st.error(f"Run '{plain(run.name)}' failed: {plain(run.error)}", icon=":material/error:")
        for failure in p.get("failures") or []:      # failed before writing a run folder
            st.error(f"Run '{plain(failure['run'])}' failed: {plain(failure['error'])}", icon=":material/error:")
    elif job.status == "failed":
        st.error(f"The job failed: {plain(job.error)}")
    else:
        st.warning(f"The job was {job.status}; the runs it finished are kept in the run store.")


def job_panel(job_id: str) -> None:
    try:
        job = jobs.read_job(jobs.jobs_dir() / job_id)
    except ValueError as exc:
        st.error(str(exc))
        return
    if job.done:
        _show(job)
        return

    @st.fragment(run_every=1.0)
    def live() -> None:
        current = jobs.read_job(jobs.jobs_dir() / job_id)
        if current.done:
            st.rerun()          # the whole page, once: new runs appear everywhere, polling stops
        _show(current)
        if st.button("Cancel", key=f"cancel_{job_id}", icon=":material/stop:"):
            jobs.cancel_job(current)

    live()
