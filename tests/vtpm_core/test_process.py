"""vtpm_core._process: SIGTERM, grace, SIGKILL on real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from vtpm_core._process import pid_exists, pid_running, stop_child, stop_pid

_IGNORE_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(30)"
)


def _stubborn() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _IGNORE_TERM], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
    return proc


def test_stop_child_terminates_then_kills() -> None:
    polite = subprocess.Popen(["sleep", "30"])
    assert stop_child(polite, 5.0) is True
    assert polite.returncode == -15
    assert stop_child(polite, 5.0) is False  # already reaped: nothing to do

    stubborn = _stubborn()
    t = time.monotonic()
    with stubborn, stubborn.stdout:  # type: ignore[union-attr]
        assert stop_child(stubborn, 0.3) is True
    assert stubborn.returncode == -9
    assert 0.3 <= time.monotonic() - t < 5


def test_stop_child_uses_the_given_kill() -> None:
    stubborn = _stubborn()
    called: list[int] = []

    def kill() -> None:
        called.append(stubborn.pid)
        stubborn.kill()

    with stubborn, stubborn.stdout:  # type: ignore[union-attr]
        assert stop_child(stubborn, 0.2, kill=kill) is True
    assert called == [stubborn.pid] and stubborn.returncode == -9


def test_stop_pid_of_a_process_that_is_not_ours(tmp_path: Path) -> None:
    # sh starts the stubborn process in the background and exits: init reaps it, not us
    ready = tmp_path / "ready"
    code = _IGNORE_TERM.replace("print('ready', flush=True)", f"open({str(ready)!r}, 'w').close()")
    out = subprocess.run(
        ["sh", "-c", 'python="$1"; shift; "$python" -c "$1" >/dev/null 2>&1 & echo $!',
         "sh", sys.executable, code],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pid = int(out)
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists() and pid_exists(pid) and pid_running(pid)
    t = time.monotonic()
    stop_pid(pid, 0.3)
    assert not pid_running(pid)
    assert time.monotonic() - t >= 0.3  # it ignored SIGTERM, so SIGKILL ended it
