"""Is the process that wrote a record still running? One answer for runs and jobs.

A pid alone does not name a process: once a process dies the kernel hands its pid to the next one, so a
record that trusts the pid reads "running" forever and a Cancel signals a stranger. A record therefore keeps
the pid with the process's start time (psutil), and a live process is the writer only when both match.

    identity = process_identity()          # {"pid": 4242, "pid_start_time": 1764490000.12, "host": "box"}
    record.update(identity)
    ...
    on_this_host(record) and is_alive(record)
"""

from __future__ import annotations

import socket
from typing import Mapping

import psutil

# psutil derives the start time from the boot time, which the system clock (NTP) may nudge; a pid reused
# within a second of the first process's start is not a case this has to tell apart
START_TIME_TOLERANCE_S = 1.0


def process_identity(pid: int | None = None) -> dict:
    """``{"pid", "pid_start_time", "host"}`` of process ``pid`` (default: this one); start time in seconds
    since the epoch. Raises ``psutil.NoSuchProcess`` when there is no such process."""
    proc = psutil.Process(pid)
    return {"pid": proc.pid, "pid_start_time": proc.create_time(), "host": socket.gethostname()}


def on_this_host(record: Mapping) -> bool:
    """Whether ``record``'s process ran on this machine (a record without a host is taken as local)."""
    host = record.get("host")
    return host is None or host == socket.gethostname()


def is_alive(record: Mapping) -> bool:
    """Whether the process named by ``record["pid"]`` and ``record["pid_start_time"]`` still runs here.

    A zombie has exited: not alive. A record written before start times were kept (no
    ``pid_start_time``) is judged by its pid alone. Only meaningful when :func:`on_this_host`.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = record.get("pid_start_time")
        return started is None or abs(proc.create_time() - float(started)) <= START_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:          # ZombieProcess is one too
        return False
    except psutil.AccessDenied:           # it exists, and belongs to someone we may not inspect
        return record.get("pid_start_time") is None
