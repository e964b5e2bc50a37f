"""The dashboard's server is safe to leave running: started as the README says it listens on 127.0.0.1
only, refuses WebSockets from other origins and other Host names, and exposing it is explicit and warned
about. (``lora-analysis dashboard`` from an installed package: tests/test_packaging.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from lora_analysis.cli import dashboard as cli_dashboard
from lora_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 120          # generous: the machine may be busy; the wait ends as soon as the server answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], cwd: Path, port: int, env: dict | None = None):
    """Start ``command`` (a Streamlit server on ``port``), wait for /_stcore/health, yield (process, log
    path); stop it afterwards."""
    log_path = Path(cwd) / f"server-{port}.log" if Path(cwd) != ROOT else None
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).read() == b"ok":
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the server did not answer its health check"
            time.sleep(0.2)
        yield proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening socket of process ``pid``."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def websocket_status(port: int, host: str, origin: str | None) -> int:
    """The HTTP status a WebSocket handshake to the app's stream gets (101: accepted)."""
    request = (f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               + (f"Origin: {origin}\r\n" if origin else "") + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request.encode())
        return int(s.recv(100).split(b" ")[1])


def check_local_only(pid: int, port: int) -> None:
    """Listens on 127.0.0.1:port only; its WebSocket answers this machine's pages, not another site's
    (cross-origin access off) nor another Host name (DNS rebinding)."""
    assert listening(pid) == {("127.0.0.1", port)}
    local = f"127.0.0.1:{port}"
    assert websocket_status(port, local, f"http://{local}") == 101
    assert websocket_status(port, f"localhost:{port}", f"http://localhost:{port}") == 101
    assert websocket_status(port, local, "http://evil.example") == 403
    assert websocket_status(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403


def test_dashboard_started_as_the_readme_says_listens_on_loopback_only(tmp_path):
    """``streamlit run dashboard/app.py`` from the repository folder (the README's command)."""
    port = free_port()
    with server([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port)],
                ROOT, port, env={"LORA_ANALYSIS_HOME": str(tmp_path)}) as (proc, _):
        check_local_only(proc.pid, port)


def test_the_project_config_and_the_cli_pass_the_same_streamlit_settings():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    assert flat == cli_dashboard.STREAMLIT_OPTIONS
    assert flat["server.address"] == "127.0.0.1" and flat["server.enableXsrfProtection"] is True
    assert flat["server.enableCORS"] is True       # Streamlit's CORS *protection*: cross-origin access off


def test_the_theme_follows_the_visitors_system():
    """No forced light (or dark) theme: Streamlit follows the browser's colour scheme."""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    # any theme option, even only primaryColor, makes a custom theme on the light base
    assert "theme" not in config
    assert not [k for k in cli_dashboard.STREAMLIT_OPTIONS if k.startswith("theme.")]


def test_upload_limit_is_the_largest_a_page_accepts():
    from dashboard.common import MAX_UPLOAD_BYTES

    assert cli_dashboard.STREAMLIT_OPTIONS["server.maxUploadSize"] * 2**20 == MAX_UPLOAD_BYTES


def _launched(monkeypatch, argv, environ=None) -> tuple[list[str], dict]:
    """Run ``dashboard`` with ``argv`` up to the launch, which is recorded instead of made."""
    seen = {}
    monkeypatch.setattr(cli_dashboard, "launch", lambda command, env: seen.update(command=command, env=env) or 0)
    for key, value in (environ or {}).items():
        monkeypatch.setenv(key, value)
    assert main(["dashboard", *argv]) == 0
    return seen["command"], seen["env"]


def _option(command: list[str], key: str) -> list[str]:
    return [command[i + 1] for i, part in enumerate(command) if part == f"--{key}"]


def test_default_launch_is_loopback_with_every_setting(monkeypatch, capsys):
    monkeypatch.delenv(cli_dashboard.EXPOSE_ENV, raising=False)
    command, env = _launched(monkeypatch, ["--port", "8610"])
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(command[4]) == ROOT / "dashboard" / "app.py"
    assert _option(command, "server.address") == ["127.0.0.1"]
    assert _option(command, "server.port") == ["8610"]
    assert _option(command, "server.allowedHosts") == ["localhost", "127.0.0.1"]
    assert _option(command, "server.enableCORS") == ["true"]
    assert _option(command, "server.enableXsrfProtection") == ["true"]
    assert cli_dashboard.EXPOSE_ENV not in env
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, environ", [(["--expose"], {}), ([], {"LORA_ANALYSIS_EXPOSE": "1"}),
                                           ([], {"LORA_ANALYSIS_EXPOSE": "yes"})])
def test_exposing_is_explicit_and_warns_what_a_visitor_can_do(monkeypatch, capsys, tmp_path, argv, environ):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(tmp_path))
    command, env = _launched(monkeypatch, argv, environ)
    assert _option(command, "server.address") == ["0.0.0.0"]
    assert _option(command, "server.enableCORS") == ["true"]        # still no cross-origin access
    assert env[cli_dashboard.EXPOSE_ENV] == "1"                     # so the app serves a non-loopback server
    err = capsys.readouterr().err
    assert err.startswith("WARNING: the dashboard is exposed")
    for what in ("start training jobs", "delete, export and import runs", str(tmp_path / "runs"),
                 "upload files", "model folders", "no login"):
        assert what in err, what


def test_a_bad_expose_value_or_port_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(cli_dashboard, "launch", lambda command, env: pytest.fail("launched"))
    monkeypatch.setenv("LORA_ANALYSIS_EXPOSE", "maybe")
    assert main(["dashboard"]) == 2
    assert "LORA_ANALYSIS_EXPOSE='maybe'" in capsys.readouterr().err
    monkeypatch.setenv("LORA_ANALYSIS_EXPOSE", "0")
    assert main(["dashboard", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


@pytest.mark.parametrize("address, environ, refused", [
    ("127.0.0.1", {}, False), ("localhost", {}, False), ("::1", {}, False), ("127.0.0.2", {}, False),
    (None, {}, True), ("", {}, True), ("0.0.0.0", {}, True), ("192.168.1.5", {}, True), ("myhost", {}, True),
    ("0.0.0.0", {"LORA_ANALYSIS_EXPOSE": "1"}, False), ("0.0.0.0", {"LORA_ANALYSIS_EXPOSE": "0"}, True),
])
def test_the_app_refuses_a_server_listening_beyond_this_machine_unless_asked(address, environ, refused):
    """``streamlit run`` from another folder misses the project's config and listens everywhere; the app
    then shows why it refuses, instead of the pages."""
    refusal = cli_dashboard.exposure_refusal(address, environ)
    assert (refusal is not None) == refused
    if refused:
        assert "lora-analysis dashboard" in refusal and "LORA_ANALYSIS_EXPOSE=1" in refusal
