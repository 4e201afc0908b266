"""The webhook outbox and its delivery worker (issue 16), on SQLite and PostgreSQL, with a
real receiver process on a loopback port (started and stopped by PID).

- a transition and its deliveries commit or roll back together (transitions.record);
- the sweeper's stale transitions get their deliveries in its transaction;
- delivery: HMAC over the exact body, a detached JWS that verifies with the JWKS;
- a receiver down for a while, then up: delivered once, nothing lost;
- a receiver answering 500: retried with backoff, then dead; redeliver brings it back;
- a worker process killed while holding a claim: the lease expires and another
  worker delivers it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests._pgcluster import PgCluster
from tests._server import answers, free_port
from verifier.ear import EarSigner
from verifier.service.db import Database, upgrade
from verifier.service.delivery import (
    Deliverer,
    DeliveryPolicy,
    backoff_s,
    claim,
    deliver_round,
)
from verifier.service.models import Attester, AttesterTransition, WebhookOutbox
from verifier.service.sweeper import sweep
from verifier.service.transitions import NewTransition, record
from verifier.service.webhooks import (
    JwsSigner,
    WebhookRequest,
    WebhookService,
    matches,
    parse_events,
    verify_hmac,
    verify_jws,
)
from vtpm_core._process import stop_child
from vtpm_core.errors import ParseError, StateError, VerificationError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SECRET = "s3cret-s3cret-s3cret"
FAST = DeliveryPolicy(
    max_attempts=4, timeout_s=2.0, lease_s=3.0, backoff_base_s=0.2, backoff_cap_s=1.0, batch=8
)


def utc() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        make: Callable[[], str] = request.getfixturevalue("pg_database")
        return make()
    return f"sqlite:///{tmp_path / 'verifier.db'}"


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = Database(url)
    upgrade(database.engine)
    yield database
    database.dispose()


@dataclass
class Receiver:
    """``_webhook_receiver.py`` on a loopback port; ``status`` changes its answer."""

    port: int
    log: Path
    status_file: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_webhook_receiver.py"),
                str(self.port),
                str(self.log),
                str(self.status_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert answers(self.proc, f"http://127.0.0.1:{self.port}/health", timeout=20)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, 5.0)

    def status(self, code: int) -> None:
        self.status_file.write_text(str(code))

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(free_port(), tmp_path / "received.jsonl", tmp_path / "status")
    try:
        yield r
    finally:
        r.stop()


def _attester(
    db: Database, aid: str, state: str = "trusted", deadline: datetime | None = None
) -> None:
    with db.transaction() as s:
        s.add(
            Attester(
                id=aid,
                ek_fingerprint=aid.encode().hex().ljust(64, "0")[:64],
                ek_public=b"ek",
                identity={},
                ak_public=b"ak",
                ak_name="00",
                status="active",
                flags=[],
                created_at=utc() - timedelta(days=1),
                state=state,
                state_since=utc() - timedelta(hours=1),
                deadline=deadline,
                last_evidence_at=None if deadline is None else deadline - timedelta(seconds=180),
                cadence_s=60,
            )
        )


def _subscribe(db: Database, url: str, events: list[str] | None = None) -> str:
    body: dict[str, Any] = {"url": url, "secret": SECRET}
    if events is not None:
        body["events"] = events
    view = WebhookService(db, utc).add(WebhookRequest.parse(body))
    return str(view["id"])


def _transition(db: Database, aid: str, to: str = "failed", frm: str = "trusted") -> int:
    cause = {"verdict": "contraindicated", "failures": ["pcr.7"], "flags": []}
    with db.raw() as conn, conn.write():
        [tid] = record(conn, [NewTransition(aid, frm, to, utc(), cause, 7)])
    return tid


def _outbox(db: Database) -> list[WebhookOutbox]:
    with db.read() as s:
        return list(s.scalars(select(WebhookOutbox).order_by(WebhookOutbox.id)))


def _until(what: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _drain(db: Database, until: Callable[[], bool], jws: JwsSigner | None = None) -> None:
    """Run delivery rounds (the service's worker, in the test's thread) until ``until``."""

    def step() -> bool:
        deliver_round(db, FAST, utc, jws)
        return until()

    _until(step)


@pytest.mark.parametrize(
    ("events", "edge", "wanted"),
    [
        pytest.param(["*"], ("trusted", "failed"), True, id="pass/all"),
        pytest.param(["failed"], ("trusted", "failed"), True, id="pass/into-state"),
        pytest.param(["failed"], ("failed", "trusted"), False, id="fail/into-other-state"),
        pytest.param(["trusted->*"], ("trusted", "stale"), True, id="pass/from-any"),
        pytest.param(["*->trusted"], ("stale", "trusted"), True, id="pass/any-into"),
        pytest.param(["stale->trusted"], ("failed", "trusted"), False, id="fail/other-edge"),
    ],
)
def test_event_patterns(events: list[str], edge: tuple[str, str], wanted: bool) -> None:
    assert matches(parse_events(events), *edge) is wanted


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"url": "ftp://x/y"}, "expected an http", id="fail/scheme"),
        pytest.param({"url": "http://x", "events": []}, "1..32 patterns", id="fail/no-events"),
        pytest.param({"url": "http://x", "events": ["gone"]}, r"events\[0\]", id="fail/state"),
        pytest.param({"url": "http://x", "secret": "short"}, "16..128", id="fail/secret"),
        pytest.param({"url": "http://x", "extra": 1}, "unknown field", id="fail/unknown"),
    ],
)
def test_bad_subscriptions_are_refused_by_name(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ParseError, match=message):
        WebhookRequest.parse(body)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    waits = [backoff_s(n, FAST, lambda: 1.0) for n in range(1, 7)]
    assert waits == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backoff_s(2, FAST, lambda: 0.0) == pytest.approx(0.2)  # half, at the least


def test_a_transition_and_its_deliveries_commit_or_roll_back_together(db: Database) -> None:
    _attester(db, "a1")
    wants_failed = _subscribe(db, "http://127.0.0.1:9/a", ["failed"])
    wants_trusted = _subscribe(db, "http://127.0.0.1:9/b", ["trusted"])
    with pytest.raises(RuntimeError), db.raw() as conn, conn.write():
        record(conn, [NewTransition("a1", "trusted", "failed", utc(), {}, None)])
        raise RuntimeError("the state change failed after the transition was written")
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AttesterTransition)) == 0
    assert _outbox(db) == []

    tid = _transition(db, "a1")
    [row] = _outbox(db)
    assert (row.subscription_id, row.transition_id, row.state, row.attempts) == (
        wants_failed,
        tid,
        "pending",
        0,
    )
    assert row.payload["to_state"] == "failed" and row.payload["result_id"] == 7
    assert wants_trusted not in {r.subscription_id for r in _outbox(db)}


def test_the_sweepers_stale_transitions_come_with_their_deliveries(db: Database) -> None:
    now = utc()
    for i in range(5):
        _attester(db, f"s{i}", deadline=now - timedelta(seconds=1))
    sub = _subscribe(db, "http://127.0.0.1:9/h", ["trusted->stale"])
    assert sweep(db, now, batch=2).marked == 5
    rows = _outbox(db)
    assert sorted(r.payload["attester_id"] for r in rows) == [f"s{i}" for i in range(5)]
    assert {r.subscription_id for r in rows} == {sub}
    assert all(r.payload["cause"]["cadence_s"] == 60 for r in rows)


def test_delivery_is_signed_and_verifies(db: Database, receiver: Receiver, tmp_path: Path) -> None:
    signer = EarSigner.generate()
    jws = JwsSigner(signer.private_pem())
    receiver.start()
    _attester(db, "a1")
    _subscribe(db, receiver.url)
    tid = _transition(db, "a1")
    _drain(db, lambda: bool(receiver.requests()), jws)
    [got] = receiver.requests()
    body = got["body"].encode()
    assert verify_hmac(SECRET, body, got["headers"]["x-vtpm-signature"])
    assert not verify_hmac("another-secret-value", body, got["headers"]["x-vtpm-signature"])
    parsed = verify_jws(got["headers"]["x-vtpm-jws"], body, signer.jwks())
    assert parsed["transition_id"] == tid and parsed["attester_id"] == "a1"
    assert (parsed["from_state"], parsed["to_state"], parsed["result_id"]) == (
        "trusted",
        "failed",
        7,
    )
    assert parsed["delivery_id"] == got["headers"]["x-vtpm-delivery"]
    assert parsed["cause"]["failures"] == ["pcr.7"] and parsed["sent_at"].endswith("Z")
    with pytest.raises(VerificationError, match="does not verify"):
        verify_jws(got["headers"]["x-vtpm-jws"], body.replace(b"failed", b"trusty"), signer.jwks())
    [row] = _outbox(db)
    assert (row.state, row.attempts, row.lease_until) == ("delivered", 1, None)


def test_a_receiver_down_for_a_while_gets_each_delivery_once(
    db: Database, receiver: Receiver
) -> None:
    _attester(db, "a1")
    _attester(db, "a2")
    _subscribe(db, receiver.url)
    _transition(db, "a1")
    _transition(db, "a2", to="stale")
    # nobody listens: refused, retried with backoff
    _drain(db, lambda: all(r.attempts >= 2 for r in _outbox(db)))
    assert {r.state for r in _outbox(db)} == {"pending"}
    assert all("Connection refused" in (r.last_error or "") for r in _outbox(db))
    receiver.start()
    _drain(db, lambda: all(r.state == "delivered" for r in _outbox(db)))
    got = [json.loads(r["body"])["transition_id"] for r in receiver.requests()]
    assert sorted(got) == sorted(r.transition_id for r in _outbox(db))  # each once, none lost


def test_a_failing_receiver_is_retried_then_dead_then_redelivered(
    db: Database, receiver: Receiver
) -> None:
    receiver.status(500)
    receiver.start()
    _attester(db, "a1")
    _subscribe(db, receiver.url)
    _transition(db, "a1")
    _drain(db, lambda: _outbox(db)[0].state == "dead")
    [row] = _outbox(db)
    assert (row.attempts, row.last_error) == (FAST.max_attempts, "HTTP 500")
    sent = receiver.requests()
    assert [json.loads(r["body"])["attempt"] for r in sent] == [1, 2, 3, 4]
    assert len({r["headers"]["x-vtpm-delivery"] for r in sent}) == 1  # one delivery id
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(sent)]
    assert gaps[0] >= 0.1 and gaps[-1] >= 0.4  # backoff: 0.1-0.2 s, then up to 1 s

    service = WebhookService(db, utc)
    assert [d["id"] for d in service.deliveries("dead", 10)] == [row.id]
    receiver.status(200)
    view = service.redeliver(row.id)
    assert (view["state"], view["attempts"]) == ("pending", 0)
    _drain(db, lambda: _outbox(db)[0].state == "delivered")
    assert len(receiver.requests()) == 5


_CLAIM_AND_HANG = """
import sys, time
from datetime import UTC, datetime
from verifier.service.db import Database
from verifier.service.delivery import DeliveryPolicy, claim
policy = DeliveryPolicy(max_attempts=4, timeout_s=2.0, lease_s=3.0)
claims = claim(Database(sys.argv[1]), datetime.now(UTC), policy)
print(",".join(str(c.id) for c in claims), flush=True)
time.sleep(600)
"""


def test_a_killed_workers_claim_expires_and_is_delivered_by_another(
    db: Database, url: str, receiver: Receiver
) -> None:
    receiver.start()
    _attester(db, "a1")
    _subscribe(db, receiver.url)
    _transition(db, "a1")
    worker = subprocess.Popen(
        [sys.executable, "-c", _CLAIM_AND_HANG, url],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert worker.stdout is not None
        claimed = worker.stdout.readline().decode().strip()
        [row] = _outbox(db)
        assert claimed == str(row.id) and (row.state, row.attempts) == ("delivering", 1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        stop_child(worker, 1.0)
        if worker.stdout is not None:
            worker.stdout.close()
    # the lease still holds: nobody else may take it yet
    assert claim(db, utc(), FAST) == []
    assert receiver.requests() == []
    t0 = time.monotonic()
    _drain(db, lambda: _outbox(db)[0].state == "delivered")
    assert time.monotonic() - t0 < FAST.lease_s + 5
    [row] = _outbox(db)
    assert row.attempts == 2 and len(receiver.requests()) == 1


def test_concurrent_workers_send_each_delivery_once(
    db: Database, url: str, receiver: Receiver
) -> None:
    receiver.start()
    _subscribe(db, receiver.url)
    for i in range(30):
        _attester(db, f"c{i:02}")
        _transition(db, f"c{i:02}")
    small = DeliveryPolicy(max_attempts=4, timeout_s=2.0, lease_s=30.0, batch=4)
    engines = [Database(url) for _ in range(3)]  # as three processes: own connections

    def work(d: Database) -> None:
        while deliver_round(d, small, utc) != (0, 0):
            pass

    try:
        threads = [threading.Thread(target=work, args=(d,)) for d in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for d in engines:
            d.dispose()
    assert {r.state for r in _outbox(db)} == {"delivered"}
    sent = [json.loads(r["body"])["attester_id"] for r in receiver.requests()]
    assert sorted(sent) == [f"c{i:02}" for i in range(30)]  # each once


@pytest.mark.postgres
def test_the_service_worker_rides_out_a_postgresql_restart(receiver: Receiver) -> None:
    # a directory the postgres user can reach (pytest's tmp_path is 0700 for root)
    with (
        tempfile.TemporaryDirectory(prefix="webhooks-pg-") as base,
        PgCluster.create(Path(base)) as pg,
    ):
        database = Database(pg.url())
        upgrade(database.engine)
        receiver.start()
        worker = Deliverer(database, FAST, interval_s=0.05).start()
        try:
            _subscribe(database, receiver.url)
            _attester(database, "p1")
            _attester(database, "p2")
            _transition(database, "p1")
            pg.restart(down_s=1.0)  # the worker is polling (or mid-claim) meanwhile
            _until(lambda: _try(lambda: _transition(database, "p2")), timeout=30)
            _until(lambda: len(receiver.requests()) >= 2, timeout=30)
            time.sleep(0.3)
            sent = sorted(json.loads(r["body"])["attester_id"] for r in receiver.requests())
            assert sent == ["p1", "p2"]
            assert worker.is_alive() and worker.rounds > 0
        finally:
            worker.stop()
            database.dispose()


def _try(action: Callable[[], object]) -> bool:
    """True once ``action`` ran without the database being unavailable."""
    try:
        action()
    except StateError:
        return False
    return True
