"""Defect 11 on the dashboard: ``guarded`` shows a user error (ValueError) as one message and a bug
(KeyError, RuntimeError...) as a traceback, never as "Could not do ...: 'x'"."""

from streamlit.testing.v1 import AppTest

from dashboard.plain_text import plain


def _page():
    import streamlit as st

    from dashboard.common import guarded

    with guarded("a user error") as first:
        raise ValueError("rank=0 is not allowed: give an integer >= 1")
    with guarded("a lookup") as second:
        {}["x"]
    with guarded("a computation") as third:
        raise RuntimeError("internal state")
    st.write(f"failed: {first.failed} {second.failed} {third.failed}")


def test_user_errors_are_messages_and_bugs_are_tracebacks():
    at = AppTest.from_function(_page).run()
    # the message is escaped for Streamlit's markdown (user text is shown as text), so it renders as written
    assert [e.value for e in at.error] == [f"Could not do a user error: {plain('rank=0 is not allowed: give an integer >= 1')}"]
    assert len(at.exception) == 2
    assert [e.proto.type for e in at.exception] == ["KeyError", "RuntimeError"]
    assert "internal state" in at.exception[1].message
    assert all('raise RuntimeError("internal state")' in "".join(e.stack_trace) or '{}["x"]' in "".join(e.stack_trace)
               for e in at.exception)          # the traceback points at the faulty line
    assert [m.value for m in at.markdown] == ["failed: True True True"]
