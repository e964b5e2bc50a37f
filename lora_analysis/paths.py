"""Where lora-analysis keeps things: one home folder, overridable with LORA_ANALYSIS_HOME.

Default: the user's data folder (platformdirs), e.g. ~/.local/share/lora-analysis on Linux.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

ENV = "LORA_ANALYSIS_HOME"


def home_dir() -> Path:
    """The home folder (created on demand by whoever writes into it)."""
    value = os.environ.get(ENV)
    return Path(value).expanduser() if value else Path(user_data_dir("lora-analysis"))
