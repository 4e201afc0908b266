"""`vtpm verifier serve` starts whatever the working directory holds.

Regression: a verifier home named ``verifier`` in the working directory used
to shadow the ``verifier`` package in the gunicorn workers ("Worker failed to
boot").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

from tests._server import free_port, serving

VTPM = str(Path(sys.executable).parent / "vtpm")


def test_home_named_like_the_package_serves(tmp_path: Path) -> None:
    subprocess.run(
        [VTPM, "verifier", "init", "--home", "verifier"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    cmd = [VTPM, "verifier", "serve", "--home", "verifier", "--bind", f"127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}/healthz"
    with serving(cmd, tmp_path / "serve.log", url, cwd=tmp_path):
        assert requests.get(url, timeout=5).json() == {"status": "ok"}
