"""Test helpers for HTTP servers the tests start (`vtpm ca serve`, `vtpm verifier serve`).

Each server is a real gunicorn master on a free loopback port, polled until
its health URL answers 200 and stopped by PID (SIGTERM, SIGKILL after a grace).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests

from vtpm_core._process import stop_child

STOP_GRACE_S = 15.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> bool:
    """Poll ``url`` until it answers 200 (True), ``proc`` exits or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.05)
    return False


@contextmanager
def serving(
    cmd: list[str],
    log: Path,
    health_url: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log``) until it answers ``health_url``; stop it on exit.

    AssertionError with the log's tail if it exits or does not answer.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        if not answers(proc, health_url):
            raise AssertionError(f"{' '.join(cmd[:3])} did not answer: {log.read_text()[-3000:]}")
        yield proc
    finally:
        stop_child(proc, STOP_GRACE_S)
