"""`vtpm check --wait-trusted ATTESTER --timeout S` (issue 16) against a real gunicorn
verifier (SQLite and PostgreSQL) and real swtpm attesters: exit 0 once trusted, 1 on
fresh failing evidence (with the failing rule) or on timeout, 2 for a bad command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest
import requests

from tests.verifier.service.conftest import REPO, Service
from verifier.attester import AttesterState, TpmAttester, attest_once, enroll
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]


def enrol(service: Service, tpm: SwtpmProcess) -> AttesterState:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return enroll(http, service.url, att, vm_id=f"vm-{uuid.uuid4()}")


def attest(tpm: SwtpmProcess, state: AttesterState) -> dict[str, object]:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return attest_once(http, state, att, None)


def wait(service: Service, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "vtpm_cli.main", "check", "--verifier", service.url, *args]
    env = {**os.environ, "VTPM_VERIFIER_TOKEN": service.reader}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_wait_trusted_exits_0_once_trusted_and_1_on_failure_or_timeout(
    service: Service, tpm_factory: Callable[[], SwtpmProcess]
) -> None:
    good_tpm, bad_tpm = tpm_factory(), tpm_factory()
    good = enrol(service, good_tpm)

    # 1. unknown, then real evidence (no policy: warning, trusted) while the CLI waits
    proc = wait(service, "--wait-trusted", good.attester_id, "--timeout", "60")
    time.sleep(1.5)
    assert proc.poll() is None, "returned before any evidence"
    attest(good_tpm, good)
    code, out = finish(proc)
    assert code == 0, out
    assert out.startswith(f"PASS attester {good.attester_id}: trusted"), out

    # 2. a policy its PCRs do not meet: fresh failing evidence ends the wait with exit 1
    policy = {"version": 1, "name": "wait-never", "pcrs": {"sha256": {"7": "11" * 32}}}
    r = service.call("PUT", "/v1/policies/wait-never", service.admin, json={"policy": policy})
    assert r.status_code == 200, r.text
    bad = enrol(service, bad_tpm)
    r = service.call(
        "PUT",
        f"/v1/attesters/{bad.attester_id}/policy",
        service.admin,
        json={"policy": "wait-never"},
    )
    assert r.status_code == 200, r.text
    proc = wait(service, "--wait-trusted", bad.attester_id, "--timeout", "60s")
    time.sleep(1.5)
    assert attest(bad_tpm, bad)["state"] == "failed"
    code, out = finish(proc)
    assert code == 1, out
    assert "FAIL" in out and "failed: verdict contraindicated" in out, out
    assert "pcrs.sha256.7" in out, out

    # 3. a failure from before the wait is waited out (the VM may be booting its fix):
    # no new evidence, so the timeout ends it, naming the state and since when
    t0 = time.monotonic()
    code, out = finish(wait(service, "--wait-trusted", bad.attester_id, "--timeout", "2"))
    assert code == 1 and 2 <= time.monotonic() - t0 < 15, out
    assert "timed out after 2 s; attester is failed since 20" in out, out


def test_wait_trusted_refusals(service: Service) -> None:
    t0 = time.monotonic()
    code, _ = finish(wait(service, "--wait-trusted", str(uuid.uuid4()), "--timeout", "20"))
    # a 404 is not retriable: at once, not after the timeout
    assert code == 1 and time.monotonic() - t0 < 15
    proc = wait(service, "--wait-trusted", "x", "--attester", "y")
    code, _ = finish(proc)
    assert code == 2
    proc = wait(service, "--wait-trusted", "x", "--timeout", "soon")
    code, _ = finish(proc)
    assert code == 2
