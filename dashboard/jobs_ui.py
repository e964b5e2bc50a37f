"""Background jobs on the pages: a live panel for one job (progress bar: runs done of the total, the step
and loss of each run in progress, cancel), and a live list of every job still running, found again from
the store, so a reload, a new tab or another page shows them too (the list sits in the sidebar of every
page that does not show it itself). The same for a sweep in one process and a sweep on Ray.

While jobs run, the panels poll the job files inside an ``st.fragment(run_every=...)`` (only the panel
re-runs); when a job ends they re-run the page once, so the charts pick up the new runs.
"""

from __future__ import annotations

import streamlit as st
from dashboard.plain_text import plain

from lora_analysis import jobs, runstore

POLL_S = 1.0            # the panel of a job the user is watching
LIST_POLL_S = 2.0       # the list of running jobs, on every page
SHOWN = "_jobs_shown_here"      # job ids a page shows in its own panel in this run (the list leaves them out)
LISTED = "_jobs_listed_here"    # True when the page shows the running-jobs list itself


def _runs(ids: list[str]) -> list[runstore.Run]:
    runs = []
    for run_id in ids:
        try:
            runs.append(runstore.load_run(run_id))
        except ValueError:      # deleted since: nothing to report
            continue
    return runs


def active_jobs() -> list[jobs.Job]:
    """The jobs still running, newest first, with their latest progress (re-read on every call)."""
    found = getattr(jobs, "active_jobs", None)
    if found is not None:
        return found()
    return [j for j in jobs.list_jobs() if not j.done]


def _progress(job: jobs.Job) -> None:
    p = job.progress
    total = max(float(p.get("total", 0) or 0), 1.0)
    done = min(max(float(p.get("done", 0) or 0), 0.0), total)
    # one bar per sweep, whatever runs it (this machine or Ray): runs done of the total, a run in progress
    # counting by its share of steps; the message names the runs in progress and their losses
    st.progress(done / total, text=plain(p.get("message") or "starting…"))


def _show(job: jobs.Job) -> None:
    p = job.progress
    if job.status == "running" or not job.done:
        _progress(job)
        running = p.get("running") or []
        if len(running) > 3:        # the message names three: the rest in a small table
            st.dataframe(running, hide_index=True, width="stretch")
        return
    runs = _runs(job.run_ids)
    failed = [r for r in runs if r.status == "failed"]
    completed = getattr(job, "runs_completed", None)
    completed = sum(r.status == "completed" for r in runs) if completed is None else completed
    if job.status == "completed" and completed > 0:
        st.success(f"Done: {completed} runs written to the run store. Spectra, Rank & alpha effects, Subspaces "
                   "and Merge equivalence now show them.", icon=":material/check_circle:")
    elif job.status in ("completed", "empty"):
        # finished, but nothing to show: never a green "Done"
        why = getattr(job, "summary", "") or f"{len(job.run_ids)} runs written, none completed"
        st.warning(f"The job ended without a completed run ({plain(why)}).", icon=":material/warning:")
    elif job.status == "failed":
        st.error(f"The job failed: {plain(job.error)}", icon=":material/error:")
    else:
        st.warning(f"The job was {plain(job.status)}; the runs it finished are kept in the run store.")
    for run in failed:
        st.error(f"Run '{plain(run.name)}' failed: {plain(run.error)}", icon=":material/error:")
    for failure in p.get("failures") or []:      # failed before writing a run folder
        st.error(f"Run '{plain(failure['run'])}' failed: {plain(failure['error'])}", icon=":material/error:")


def job_panel(job_id: str) -> None:
    """The live panel of one job (the one this page started)."""
    st.session_state.setdefault(SHOWN, set()).add(job_id)
    try:
        job = jobs.read_job(jobs.jobs_dir() / job_id)
    except ValueError as exc:
        st.error(plain(exc))
        return
    if job.done:
        _show(job)
        return

    @st.fragment(run_every=POLL_S)
    def live() -> None:
        current = jobs.read_job(jobs.jobs_dir() / job_id)
        if current.done:
            st.rerun()          # the whole page, once: new runs appear everywhere, polling stops
        _show(current)
        if st.button("Cancel", key=f"cancel_{job_id}", icon=":material/stop:"):
            jobs.cancel_job(current)

    live()


def _describe(job: jobs.Job) -> str:
    model = job.spec.get("model") if isinstance(job.spec, dict) else None
    return f"{job.kind} of {model}" if model else job.kind


@st.fragment(run_every=LIST_POLL_S)
def _running_list(where: str, skip: frozenset) -> None:
    current = [j for j in active_jobs() if j.id not in skip]
    ids = sorted(j.id for j in current)
    seen_key = f"_jobs_running:{where}"
    before = st.session_state.get(seen_key)
    st.session_state[seen_key] = ids
    if before is not None and set(before) - set(ids):
        st.rerun()          # a job ended: the whole page once, so its runs show (and stale choices go)
    if not current:
        return
    st.markdown(f"**Jobs running** ({len(current)})")
    for job in current:
        st.caption(f"{plain(_describe(job))} · {plain(job.id)}")
        _progress(job)
        if st.button("Cancel", key=f"cancel_{where}_{job.id}", icon=":material/stop:"):
            jobs.cancel_job(job)
            st.rerun()


def jobs_list(where: str = "main") -> None:
    """Every job still running, live (polled every ``LIST_POLL_S`` s), each with its progress and a cancel
    button; jobs this page shows in its own panel are left out."""
    if where == "main":
        st.session_state[LISTED] = True
    _running_list(where, frozenset(st.session_state.get(SHOWN, ())))


def start_page_run() -> None:
    """Called by the router before a page runs: nothing is shown by the page yet."""
    st.session_state[SHOWN] = set()
    st.session_state[LISTED] = False


def sidebar_jobs() -> None:
    """Called by the router after a page ran: the running jobs in the sidebar, unless the page listed them."""
    if st.session_state.get(LISTED):
        return
    with st.sidebar:
        jobs_list("sidebar")
