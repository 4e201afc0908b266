"""Webhooks end to end (issue 16): `vtpm verifier serve` (gunicorn, 2 workers), a real
swtpm attester and a real receiver process; SQLite and PostgreSQL.

1. a subscription made over the admin API; real evidence moves the attester
   unknown -> trusted -> failed: each transition arrives once, its HMAC and its JWS
   (checked with the served JWKS) verify;
2. the receiver is down and the verifier is killed (SIGKILL) after a transition
   was recorded; both come back: the delivery arrives, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests._server import free_port
from tests.verifier.service.conftest import EkCa, Server, make_home, provision_tpm
from tests.verifier.service.test_webhooks_outbox import Receiver
from verifier.attester import AttesterState, TpmAttester, attest_once, enroll
from verifier.service.webhooks import verify_hmac, verify_jws
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]

NEVER = {"version": 1, "name": "never", "pcrs": {"sha256": {"7": "11" * 32}}}


@dataclass
class Setup:
    server: Server
    admin: str

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(
            method,
            f"{self.server.url}{path}",
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
            **kw,
        )


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa
) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp(f"webhooks-{request.param}")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, _reader = make_home(
        home,
        ek_ca,
        webhook_poll_ms=100,
        webhook_backoff_base_ms=200,
        webhook_backoff_cap_s=1,
        webhook_max_attempts=50,
    )
    db_url = request.getfixturevalue("pg_database")() if request.param == "postgres" else None
    server = Server(home, db_url).start()
    try:
        yield Setup(server, admin)
    finally:
        server.stop()


def _wait(what: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _attest(s: Setup, tpm: SwtpmProcess, state: AttesterState) -> dict[str, Any]:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return attest_once(http, state, att, None)


def _assign(s: Setup, attester_id: str, policy: str | None) -> None:
    r = s.call("PUT", f"/v1/attesters/{attester_id}/policy", json={"policy": policy})
    assert r.status_code == 200, r.text


def test_real_transitions_arrive_signed_once_through_outage_and_restart(
    setup: Setup, tpm_factory: Callable[[], SwtpmProcess], tmp_path: Path
) -> None:
    s = setup
    receiver = Receiver(free_port(), tmp_path / "got.jsonl", tmp_path / "status").start()
    try:
        r = s.call("POST", "/v1/webhooks", json={"url": receiver.url})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        jwks = requests.get(f"{s.server.url}/.well-known/jwks.json", timeout=10).json()
        r = s.call("PUT", "/v1/policies/never", json={"policy": NEVER})
        assert r.status_code in (200, 201), r.text

        tpm = tpm_factory()
        with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
            state = enroll(http, s.server.url, att, vm_id=f"vm-hook-{receiver.port}")
        good = _attest(s, tpm, state)
        assert good["state"] == "trusted"
        _attest(s, tpm, state)  # trusted again: no transition, no delivery
        _assign(s, state.attester_id, "never")
        bad = _attest(s, tpm, state)
        assert bad["state"] == "failed"
        _wait(lambda: len(receiver.requests()) >= 2)
        time.sleep(0.5)  # nothing more is coming
        got = receiver.requests()
        bodies = [json.loads(g["body"]) for g in got]
        assert [(b["from_state"], b["to_state"], b["result_id"]) for b in bodies] == [
            ("unknown", "trusted", good["id"]),
            ("trusted", "failed", bad["id"]),
        ]
        for g in got:
            raw = g["body"].encode()
            assert verify_hmac(secret, raw, g["headers"]["x-vtpm-signature"])
            assert verify_jws(g["headers"]["x-vtpm-jws"], raw, jwks)["attester_id"] == (
                state.attester_id
            )
        assert bodies[1]["cause"]["verdict"] == "contraindicated"
        assert bodies[1]["cause"]["failures"]

        # 2. receiver down, transition recorded, verifier SIGKILLed, both back
        receiver.stop()
        _assign(s, state.attester_id, None)
        back = _attest(s, tpm, state)
        assert back["state"] == "trusted"
        _wait(lambda: _pending_attempts(s) >= 1)
        _kill_verifier(s.server)
        receiver.start()
        s.server.start(s.server.port)
        _wait(lambda: len(receiver.requests()) >= 3)
        time.sleep(0.5)
        last = [json.loads(g["body"]) for g in receiver.requests()][2:]
        assert [(b["from_state"], b["to_state"], b["result_id"]) for b in last] == [
            ("failed", "trusted", back["id"])
        ]
        deliveries = s.call("GET", "/v1/webhook-deliveries").json()["deliveries"]
        assert [d["state"] for d in deliveries] == ["delivered"] * 3
        assert deliveries[0]["attempts"] >= 2
    finally:
        receiver.stop()


def _pending_attempts(s: Setup) -> int:
    rows = s.call("GET", "/v1/webhook-deliveries?state=pending").json()["deliveries"]
    return max((d["attempts"] for d in rows), default=0)


def _kill_verifier(server: Server) -> None:
    """SIGKILL the gunicorn master and its workers (by PID): the verifier host dies."""
    proc, server.proc = server.proc, None
    assert proc is not None
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in [proc.pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)
    for pid in map(int, children):  # reparented: gone once /proc forgets them
        _wait(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True
