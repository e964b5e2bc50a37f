"""Text users share (run names, module names, config values) shown in Streamlit's markdown as text.

Streamlit renders the strings given to ``st.success``, ``st.markdown``, ``st.caption``, ``st.info``… as
markdown: a run named ``![x](http://host/pixel)`` would make every visitor's browser fetch that URL, and
``:red[…]``, ``:material/…:`` or ``$…$`` would colour, draw icons or typeset LaTeX. :func:`plain` puts a
backslash before every markdown character, so the name shows as the characters it is made of.

    st.success(f"Imported run '{plain(run.name)}'")
"""

from __future__ import annotations

import re

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~$:])")     # what acts anywhere in a line
_LINE_START = re.compile(r"^(\s*(?:\d+)?)([-=.)])")         # what acts at a line's start (lists, rules)


def plain(text) -> str:
    """``text`` (any value, shown as ``str``) escaped for Streamlit markdown, on one line."""
    line = _MARKDOWN.sub(r"\\\1", " ".join(str(text).splitlines()))
    return _LINE_START.sub(r"\1\\\2", line)
