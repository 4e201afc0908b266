"""Stopping processes by PID: SIGTERM, a grace period, then SIGKILL (POSIX signal(7)).

``stop_child`` is for a ``subprocess.Popen`` we started (it reaps the child);
``stop_pid`` for a process that is not our child (a detached swtpm, a server
left by an earlier run), watched through ``/proc`` (proc(5)). ``pid_exists``
is the signal-0 existence check; ``pid_running`` also counts a zombie as gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["pid_exists", "pid_running", "stop_child", "stop_pid"]


def stop_child(
    proc: subprocess.Popen[Any],
    grace: float,
    kill: Callable[[], None] | None = None,
) -> bool:
    """SIGTERM ``proc`` if it runs, wait ``grace`` s, then ``kill`` (default SIGKILL) and reap.

    Returns whether it was still running (had to be signalled).
    """
    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        if kill is None:
            proc.kill()
        else:
            kill()
        proc.wait()
    return True


def pid_exists(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0; someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_running(pid: int) -> bool:
    """Like ``pid_exists``, but a zombie (reaped later by its parent) counts as gone."""
    if not pid_exists(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pid(pid: int, grace: float, poll: float = 0.005) -> None:
    """SIGTERM a process that is not our child, SIGKILL after ``grace`` s; return once gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(poll)
    if pid_running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_running(pid):
            time.sleep(poll)
