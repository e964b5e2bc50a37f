"""``lora-analysis dashboard``: start the Streamlit dashboard, on this machine only unless exposed on purpose.

The dashboard can start training jobs, read, delete, export and import runs, and read model folders by
path; it has no login. So it listens on the loopback interface (127.0.0.1) unless the user asks for more
with ``--expose`` or ``LORA_ANALYSIS_EXPOSE=1``, and then a warning says what a visitor can do.

The Streamlit settings below are the ones the repository's ``.streamlit/config.toml`` holds for
``streamlit run dashboard/app.py`` (a test checks both agree); this command passes them on the command
line, so they hold from any folder and for an installed package, which has no such file.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from . import help_for

EXPOSE_ENV = "LORA_ANALYSIS_EXPOSE"
LOOPBACK, ALL_INTERFACES = "127.0.0.1", "0.0.0.0"
DEFAULT_PORT = 8501
LOCAL_HOSTS = ["localhost", LOOPBACK]
# What Streamlit is told (the server's settings and the look). Cross-origin access is off: enableCORS is
# Streamlit's CORS *protection* (True: a web page from another origin can neither read its routes nor open
# its WebSocket, the channel that drives every widget); XSRF protection guards the upload routes;
# allowedHosts refuses a WebSocket whose Host header names another host (DNS rebinding). maxUploadSize is in MiB: the largest file any page
# accepts (dashboard.common.MAX_UPLOAD_BYTES; a page accepting less sets its uploader's own limit).
STREAMLIT_OPTIONS: dict[str, object] = {
    "server.address": LOOPBACK,
    "server.headless": True,
    "server.enableXsrfProtection": True,
    "server.enableCORS": True,
    "server.allowedHosts": LOCAL_HOSTS,
    "server.maxUploadSize": 200,
    "client.toolbarMode": "minimal",
    "browser.gatherUsageStats": False,
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

EXAMPLES = """\
examples:
  %(prog)s
      the dashboard at http://127.0.0.1:8501, for this machine only
  %(prog)s --port 8600
      another port (when 8501 is taken)
  %(prog)s --expose
      every network interface: anyone who can reach this machine can use it (read the warning it prints)
  ssh -L 8501:127.0.0.1:8501 you@server   (on your laptop, while the dashboard runs on the server)
      the safe way to use a dashboard running on another machine: it stays on the server's loopback"""


def app_path() -> Path:
    """``dashboard/app.py``: beside the ``lora_analysis`` package, in a checkout and once installed."""
    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    if not app.is_file():
        raise ValueError(f"the dashboard's files are not installed: {app} is missing (reinstall lora-analysis, "
                         "or run `streamlit run dashboard/app.py` from a checkout)")
    return app


def expose_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``LORA_ANALYSIS_EXPOSE`` asks to listen on every interface (1/true/yes/on; 0/false/no/off
    or unset: no). Any other value is refused rather than guessed."""
    value = environ.get(EXPOSE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{EXPOSE_ENV}={environ[EXPOSE_ENV]!r}: use 1 to expose the dashboard on every network "
                     "interface, 0 or unset for this machine only")


def is_loopback(address: str | None) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost). Unset or empty
    means Streamlit's default, every interface: False."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False    # a host name or an interface address: reachable from elsewhere


def exposure_refusal(address: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the app must not serve a server listening on ``address`` (None when it may): a server started
    outside the repository folder misses ``.streamlit/config.toml`` and listens everywhere by default."""
    if is_loopback(address):
        return None
    try:
        if expose_requested(environ):
            return None
    except ValueError as exc:
        return str(exc)
    where = "every network interface" if not address or address in (ALL_INTERFACES, "::") else address
    return (f"This dashboard server listens on {where}, so other machines could use it, and that was not asked "
            f"for: it is refused. Start it with `lora-analysis dashboard` (this machine only), or with "
            f"`streamlit run dashboard/app.py` from the repository folder (its .streamlit/config.toml "
            f"keeps it on 127.0.0.1). To expose it deliberately: `lora-analysis dashboard --expose`, or "
            f"set {EXPOSE_ENV}=1.")


def exposure_warning(port: int, home: Path, address: str = ALL_INTERFACES) -> str:
    """What a visitor of an exposed dashboard can do."""
    where = "every network interface" if address in (ALL_INTERFACES, "::") else "a network interface"
    return (f"WARNING: the dashboard is exposed: it listens on {where} ({address}:{port}) "
            f"and has no login. Anyone who can reach this machine on port {port} can start training jobs "
            f"(using this machine's CPU and GPU), read, delete, export and import runs in the run store "
            f"({home / 'runs'}), upload files into {home}, and make it read model folders on this machine "
            f"by path. Expose it only on a network you trust, or keep it on 127.0.0.1 (the default, without "
            f"--expose and {EXPOSE_ENV}) and reach it through an SSH tunnel.")


_warned: set[tuple[str, int]] = set()


def warn_exposed_once(address: str | None, port: int) -> None:
    """Print :func:`exposure_warning` to the server's log once per process when ``address`` is not
    loopback (a server started with ``streamlit run`` and ``LORA_ANALYSIS_EXPOSE=1``)."""
    if is_loopback(address) or (str(address), port) in _warned:
        return
    from ..paths import home_dir

    _warned.add((str(address), port))
    print(exposure_warning(port, home_dir(), address or ALL_INTERFACES), file=sys.stderr, flush=True)


def _flags(key: str, value: object) -> list[str]:
    """``--key value`` (repeated for a list: Streamlit's way for options taking several values)."""
    values = value if isinstance(value, list) else [value]
    return [part for v in values for part in (f"--{key}", str(v).lower() if isinstance(v, bool) else str(v))]


def streamlit_command(port: int, expose: bool) -> list[str]:
    """The ``python -m streamlit run dashboard/app.py ...`` command line with every server setting.
    Exposed, it listens on every interface and accepts any Host name (visitors' names for this machine
    are not known here); cross-origin access stays off."""
    options = {**STREAMLIT_OPTIONS, "server.port": port, "server.fileWatcherType": "none",
               "server.address": ALL_INTERFACES if expose else LOOPBACK,
               "server.allowedHosts": ["*"] if expose else LOCAL_HOSTS}
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            *[part for key, value in options.items() for part in _flags(key, value)]]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help=help_for("dashboard"), epilog=EXAMPLES,
                       description="Start the dashboard (Streamlit) in the foreground: parameter savings, "
                                   "fine-tuning, spectra, rank and alpha, subspaces, merges and reports in the "
                                   "browser. It listens on 127.0.0.1 (this machine only); stop it with Ctrl+C. "
                                   "It keeps its runs in $LORA_ANALYSIS_HOME (default: the user data folder).")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--expose", action="store_true",
                   help=f"listen on every network interface, so other machines can use it (also: {EXPOSE_ENV}=1); "
                        "it has no login: read the warning it prints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..paths import home_dir

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a port is a number from 1 to 65535")
    expose = args.expose or expose_requested()
    command = streamlit_command(args.port, expose)
    env = dict(os.environ)
    if expose:
        env[EXPOSE_ENV] = "1"      # the app serves a non-loopback server only when this says so
        print(exposure_warning(args.port, home_dir()), file=sys.stderr)
    else:
        env.pop(EXPOSE_ENV, None)
        print(f"lora-analysis dashboard: http://{LOOPBACK}:{args.port} (this machine only; Ctrl+C stops it)",
              file=sys.stderr)
    return launch(command, env)


def launch(command: list[str], env: dict[str, str]) -> int:
    """Run the server in this process's place (POSIX: signals and Ctrl+C go straight to Streamlit), or as
    a child process where exec is not the norm (Windows)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(command[0], command, env)
    return subprocess.call(command, env=env)
