"""Attester state over time (issue 16): real swtpm evidence moves an attester between
unknown, trusted and failed; each change is recorded once with its cause. SQLite and
PostgreSQL; the app runs in-process on a loopback port with a pinned clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import select
from werkzeug.serving import BaseWSGIServer, make_server

from tests.verifier.service.conftest import EkCa, make_home, provision_tpm
from verifier.attester import AttesterState, TpmAttester, attest_once, enroll
from verifier.service.app import create_app
from verifier.service.config import load_config
from verifier.service.db import Database
from verifier.service.models import Attester, AttesterTransition
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]

TpmFactory = Callable[[], SwtpmProcess]


@dataclass
class Clock:
    """The verifier's clock, moved by the tests."""

    t: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


@dataclass
class Verifier:
    """One in-process verifier app behind a loopback WSGI server."""

    home: Path
    db_url: str | None
    clock: Clock
    admin: str
    reader: str
    app: Flask | None = None
    server: BaseWSGIServer | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    @property
    def db(self) -> Database:
        assert self.app is not None
        db: Database = self.app.extensions["vtpm_verifier"]["db"]
        return db

    def start(self) -> Verifier:
        cfg = load_config(self.home, database_url=self.db_url)
        self.app = create_app(cfg, migrate=True, clock=self.clock)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.app is not None:
            ext = self.app.extensions["vtpm_verifier"]
            for worker in ("pruner", "sweeper"):
                if worker in ext:
                    ext[worker].stop()
            ext["db"].dispose()
        self.app = self.server = self.thread = None

    def call(self, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
        return requests.request(
            method,
            f"{self.url}{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            **kwargs,
        )


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def verifier(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa
) -> Iterator[Verifier]:
    backend = request.param
    home = tmp_path_factory.mktemp(f"state-{backend}")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, attest_cadence_s=60, stale_grace=3, sweep_interval_s=1)
    db_url = request.getfixturevalue("pg_database")() if backend == "postgres" else None
    v = Verifier(home, db_url, Clock(), admin, reader).start()
    try:
        yield v
    finally:
        v.stop()


def enrol(v: Verifier, tpm: SwtpmProcess, vm_id: str) -> AttesterState:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return enroll(http, v.url, att, vm_id=vm_id)


def attest(v: Verifier, tpm: SwtpmProcess, state: AttesterState) -> dict[str, Any]:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return attest_once(http, state, att, None)


def assign(v: Verifier, attester_id: str, policy: str | None) -> None:
    r = v.call("PUT", f"/v1/attesters/{attester_id}/policy", v.admin, json={"policy": policy})
    assert r.status_code == 200, r.text


def transitions(v: Verifier, attester_id: str) -> list[AttesterTransition]:
    with v.db.read() as s:
        return list(
            s.scalars(
                select(AttesterTransition)
                .where(AttesterTransition.attester_id == attester_id)
                .order_by(AttesterTransition.id)
            )
        )


def row(v: Verifier, attester_id: str) -> Attester:
    with v.db.read() as s:
        a = s.get(Attester, attester_id)
        assert a is not None
        return a


def test_evidence_moves_state_and_records_each_change_once(
    verifier: Verifier, tpm_factory: TpmFactory
) -> None:
    v = verifier
    tpm = tpm_factory()
    state = enrol(v, tpm, "vm-state-1")
    view = v.call("GET", f"/v1/attesters/{state.attester_id}", v.reader).json()
    assert view["state"] == "unknown" and view["deadline"] is None
    assert transitions(v, state.attester_id) == []

    # 1. no policy: a verified quote is "warning", which is trusted
    t1 = v.clock.advance(1)
    first = attest(v, tpm, state)
    assert first["status"] == "warning", first["report"]
    assert first["state"] == "trusted" and first["next_attestation_s"] == 60
    a = row(v, state.attester_id)
    assert (a.state, a.state_since, a.last_evidence_at) == ("trusted", t1, t1)
    assert a.deadline == t1 + timedelta(seconds=180) and a.cadence_s == 60
    [tr] = transitions(v, state.attester_id)
    assert (tr.from_state, tr.to_state, tr.at, tr.result_id) == (
        "unknown",
        "trusted",
        t1,
        first["id"],
    )
    assert tr.cause == {"verdict": "warning", "failures": [], "flags": []}

    # 2. trusted again a minute later: the deadline moves, no transition, same "since"
    t2 = v.clock.advance(60)
    attest(v, tpm, state)
    a = row(v, state.attester_id)
    assert (a.state, a.state_since, a.last_evidence_at) == ("trusted", t1, t2)
    assert a.deadline == t2 + timedelta(seconds=180)
    assert len(transitions(v, state.attester_id)) == 1

    # 3. a policy the TPM's PCRs do not meet: failed, with the failing rules; no deadline
    policy = {"version": 1, "name": "never", "pcrs": {"sha256": {"7": "11" * 32}}}
    r = v.call("PUT", "/v1/policies/never", v.admin, json={"policy": policy})
    assert r.status_code == 200, r.text
    assign(v, state.attester_id, "never")
    t3 = v.clock.advance(30)
    bad = attest(v, tpm, state)
    assert bad["status"] == "contraindicated" and bad["state"] == "failed"
    a = row(v, state.attester_id)
    assert (a.state, a.state_since, a.deadline) == ("failed", t3, None)
    tr = transitions(v, state.attester_id)[-1]
    assert (tr.from_state, tr.to_state, tr.at, tr.result_id) == ("trusted", "failed", t3, bad["id"])
    assert tr.cause == {"verdict": "contraindicated", "failures": ["pcrs.sha256.7"], "flags": []}

    # 4. failing again records nothing new; passing again is one more transition
    v.clock.advance(30)
    attest(v, tpm, state)
    assert len(transitions(v, state.attester_id)) == 2
    assign(v, state.attester_id, None)
    t5 = v.clock.advance(30)
    good = attest(v, tpm, state)
    assert good["state"] == "trusted"
    history = [(t.from_state, t.to_state) for t in transitions(v, state.attester_id)]
    assert history == [("unknown", "trusted"), ("trusted", "failed"), ("failed", "trusted")]
    view = v.call("GET", f"/v1/attesters/{state.attester_id}", v.reader).json()
    assert view["state"] == "trusted"
    assert view["state_since"] == t5.isoformat().replace("+00:00", "Z")
    assert view["cadence_s"] == 60


def test_state_survives_a_verifier_restart(verifier: Verifier, tpm_factory: TpmFactory) -> None:
    """State lives in the database: a restarted verifier (a new app, new pools) sees it and
    carries on from it."""
    v = verifier
    tpm = tpm_factory()
    state = enrol(v, tpm, "vm-state-restart")
    t1 = v.clock.advance(1)
    attest(v, tpm, state)
    v.stop()
    v.start()
    state = AttesterState(v.url, state.attester_id, state.token)  # the new port
    a = row(v, state.attester_id)
    assert (a.state, a.state_since) == ("trusted", t1)
    v.clock.advance(10)
    attest(v, tpm, state)
    assert [(t.from_state, t.to_state) for t in transitions(v, state.attester_id)] == [
        ("unknown", "trusted")
    ]


def test_deleting_an_attester_deletes_its_history(
    verifier: Verifier, tpm_factory: TpmFactory
) -> None:
    v = verifier
    tpm = tpm_factory()
    state = enrol(v, tpm, "vm-state-delete")
    v.clock.advance(1)
    attest(v, tpm, state)
    assert len(transitions(v, state.attester_id)) == 1
    assert v.call("DELETE", f"/v1/attesters/{state.attester_id}", v.admin).status_code == 204
    assert transitions(v, state.attester_id) == []


def test_missed_deadline_goes_stale_and_evidence_brings_it_back(
    verifier: Verifier, tpm_factory: TpmFactory
) -> None:
    """The app's own background sweeper marks a trusted attester stale once its clock passes
    the deadline; the next evidence records stale -> trusted."""
    v = verifier
    tpm = tpm_factory()
    state = enrol(v, tpm, "vm-state-stale")
    t1 = v.clock.advance(1)
    attest(v, tpm, state)
    v.clock.advance(180)  # exactly at the deadline: not missed yet
    t2 = v.clock.advance(1)
    until = time.monotonic() + 30
    while row(v, state.attester_id).state != "stale" and time.monotonic() < until:
        time.sleep(0.1)
    a = row(v, state.attester_id)
    assert (a.state, a.state_since, a.deadline) == ("stale", t2, None)
    tr = transitions(v, state.attester_id)[-1]
    assert (tr.from_state, tr.to_state, tr.at, tr.result_id) == ("trusted", "stale", t2, None)
    deadline = t1 + timedelta(seconds=180)
    assert tr.cause == {
        "missed_deadline": deadline.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "last_evidence_at": t1.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "cadence_s": 60,
    }
    t3 = v.clock.advance(5)
    back = attest(v, tpm, state)
    assert back["state"] == "trusted"
    history = [(t.from_state, t.to_state) for t in transitions(v, state.attester_id)]
    assert history == [("unknown", "trusted"), ("trusted", "stale"), ("stale", "trusted")]
    assert row(v, state.attester_id).state_since == t3
