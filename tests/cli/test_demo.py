"""`vtpm demo --once` end to end, as the installed console script runs it (issue 7)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vtpm_cli.demo import KERNEL, tamper_pe
from vtpm_core._process import pid_running
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import VerificationError

VTPM = Path(sys.executable).parent / "vtpm"

pytestmark = pytest.mark.swtpm


def _run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VTPM), "demo", "--once", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _pids(home: Path) -> dict[str, int]:
    lines = (home / "demo.pids").read_text().split("\n")
    return {k: int(v) for k, v, _start in (line.split() for line in lines if line)}


def _assert_demo_output(proc: subprocess.CompletedProcess[str], home: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    affirming = out.index("verdict: affirming")
    contra = out.index("verdict: contraindicated")
    assert affirming < contra
    # the failing rule names the kernel's boot-application event, expected vs actual
    tail = out[contra:]
    assert "FAIL boot_applications:" in tail
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in tail
    assert "vmlinuz.efi" in tail
    assert "expected one of 2 allowed digests" in tail
    assert "actual   sha256:" in tail
    pids = _pids(home)
    assert set(pids) == {"ca", "verifier", "vtpm"}
    for name, pid in pids.items():
        assert f"{name}={pid}" in out
        deadline = time.monotonic() + 5
        while pid_running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_running(pid), f"{name} (pid {pid}) still running"
    assert (home / "ca-passphrase").stat().st_mode & 0o777 == 0o600


def test_demo_once(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    _assert_demo_output(_run_demo(home), home)


def test_demo_refuses_foreign_home(tmp_path: Path) -> None:
    home = tmp_path / "mine"
    home.mkdir()
    (home / "precious.txt").write_text("keep me\n")
    proc = _run_demo(home)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {home} exists and is not a demo home (no .vtpm-demo); pick --home"
    ]
    assert (home / "precious.txt").read_text() == "keep me\n"


def test_tamper_pe_changes_authenticode_digest() -> None:
    pe = KERNEL.read_bytes()
    bad = tamper_pe(pe)
    assert len(bad) == len(pe)
    assert sum(a != b for a, b in zip(pe, bad, strict=True)) == 4
    assert authenticode_digest(bad) != authenticode_digest(pe)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"XX" + b"\0" * 100, "no MZ header", id="fail/pe/no-mz"),
        pytest.param(
            b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40) + b"NE\0\0" + b"\0" * 64,
            "no PE signature at 0x40",
            id="fail/pe/no-pe-signature",
        ),
        pytest.param(
            b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40) + b"PE\0\0" + b"\0" * 64,
            "no section with raw data",
            id="fail/pe/no-sections",
        ),
    ],
)
def test_tamper_pe_refuses_non_pe(data: bytes, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        tamper_pe(data)


def _start_until_running(home: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(VTPM), "demo", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("services running"):
            return proc, "".join(seen)
    _, err = proc.communicate(timeout=30)
    raise AssertionError("demo ended early:\n" + "".join(seen) + err)


def test_demo_sigterm_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    proc, out = _start_until_running(home)
    try:
        assert "verdict: contraindicated" in out
        pids = _pids(home)
        assert pid_running(pids["ca"]) and pid_running(pids["verifier"])
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "interrupted; services stopped" in err
    for name, pid in pids.items():
        assert not pid_running(pid), f"{name} (pid {pid}) still running"


def test_demo_stops_leftovers_of_a_killed_run(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    proc, _ = _start_until_running(home)
    left = _pids(home)
    proc.kill()  # no clean-up: the servers are left running
    proc.communicate(timeout=30)
    try:
        assert pid_running(left["ca"]) and pid_running(left["verifier"])
        again = _run_demo(home)
        assert f"stopping leftover ca (pid {left['ca']}) of a previous run" in again.stdout
        assert f"stopping leftover verifier (pid {left['verifier']})" in again.stdout
        _assert_demo_output(again, home)  # the same home works again (recreated)
        assert _pids(home)["ca"] != left["ca"]
        for name in ("ca", "verifier"):
            assert not pid_running(left[name])
    finally:
        for name in ("ca", "verifier"):
            if pid_running(left[name]):
                os.kill(left[name], 9)
