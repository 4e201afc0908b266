"""The deadline sweeper (issue 16): trusted attesters past their deadline become stale, each
with exactly one recorded transition, however many sweepers run at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from verifier.service.db import Database, upgrade
from verifier.service.models import Attester, AttesterTransition
from verifier.service.sweeper import LOCK_KEY, Sweeper, cause_time, sweep

NOW = datetime(2026, 12, 6, 5, 0, 0, 500000, tzinfo=UTC)


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


def _seed(db: Database, rows: list[tuple[str, str, datetime | None]]) -> None:
    """Attesters ``(id, state, deadline)``, last evidence 180 s before the deadline."""
    with db.transaction() as s:
        for i, (aid, state, deadline) in enumerate(rows):
            last = None if deadline is None else deadline - timedelta(seconds=180)
            s.add(
                Attester(
                    id=aid,
                    ek_fingerprint=f"{i:064x}",
                    ek_public=b"ek",
                    identity={},
                    ak_public=b"ak",
                    ak_name="00",
                    status="active",
                    flags=[],
                    created_at=NOW - timedelta(days=1),
                    state=state,
                    state_since=last,
                    deadline=deadline,
                    last_evidence_at=last,
                    cadence_s=60,
                )
            )


def _history(db: Database) -> list[AttesterTransition]:
    with db.read() as s:
        return list(s.scalars(select(AttesterTransition).order_by(AttesterTransition.id)))


def test_only_trusted_attesters_past_their_deadline_go_stale(db: Database) -> None:
    due = NOW - timedelta(seconds=1)
    _seed(
        db,
        [
            ("due", "trusted", due),
            ("due-now", "trusted", NOW),  # deadline == now: not yet missed
            ("later", "trusted", NOW + timedelta(seconds=30)),
            ("failed", "failed", None),
            ("unknown", "unknown", None),
        ],
    )
    counts = sweep(db, NOW)
    assert (counts.marked, counts.batches) == (1, 1)
    with db.read() as s:
        states = {a.id: (a.state, a.deadline) for a in s.scalars(select(Attester))}
        stale = s.get_one(Attester, "due")
        assert stale.state_since == NOW
    assert states == {
        "due": ("stale", None),
        "due-now": ("trusted", NOW),
        "later": ("trusted", NOW + timedelta(seconds=30)),
        "failed": ("failed", None),
        "unknown": ("unknown", None),
    }
    [tr] = _history(db)
    assert (tr.attester_id, tr.from_state, tr.to_state, tr.at, tr.result_id) == (
        "due",
        "trusted",
        "stale",
        NOW,
        None,
    )
    assert tr.cause == {
        "missed_deadline": cause_time(due),
        "last_evidence_at": cause_time(due - timedelta(seconds=180)),
        "cadence_s": 60,
    }
    assert tr.cause["missed_deadline"] == "2026-12-06T04:59:59.500000Z"
    # nothing is due any more: a stale attester has no deadline
    assert sweep(db, NOW + timedelta(hours=1)).marked == 2  # due-now and later
    assert sweep(db, NOW + timedelta(hours=2)).marked == 0
    assert len(_history(db)) == 3


def test_sweep_works_in_batches(db: Database) -> None:
    _seed(db, [(f"a{i:03d}", "trusted", NOW - timedelta(seconds=i + 1)) for i in range(23)])
    counts = sweep(db, NOW, batch=5)
    assert (counts.marked, counts.batches) == (23, 5)
    assert len(_history(db)) == 23
    with pytest.raises(ValueError, match="batch"):
        sweep(db, NOW, batch=0)


def test_concurrent_sweepers_record_each_transition_once(db: Database, url: str) -> None:
    """Four sweepers, each with its own engine (as four verifier processes), sweep 300 due
    attesters at once in small batches: 300 transitions, one per attester."""
    n = 300
    _seed(db, [(f"c{i:03d}", "trusted", NOW - timedelta(seconds=i % 50 + 1)) for i in range(n)])
    dbs = [Database(url) for _ in range(4)]
    marked: list[int] = []
    start = threading.Barrier(len(dbs))

    def run(d: Database) -> None:
        start.wait()
        total = 0
        for _ in range(20):  # a lock-holder's peers skip a round: sweep again
            total += sweep(d, NOW, batch=7).marked
        marked.append(total)

    threads = [threading.Thread(target=run, args=(d,)) for d in dbs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for d in dbs:
            d.dispose()
    assert sum(marked) == n, marked
    history = _history(db)
    assert len(history) == n
    assert len({t.attester_id for t in history}) == n
    with db.read() as s:
        left = s.scalar(select(func.count()).where(Attester.state != "stale"))
        assert left == 0


@pytest.mark.postgres
def test_a_second_process_skips_while_one_holds_the_lock(pg_database: Callable[[], str]) -> None:
    db = Database(pg_database())
    try:
        upgrade(db.engine)
        _seed(db, [("x", "trusted", NOW - timedelta(seconds=1))])
        with db.engine.connect() as other, other.begin():
            assert other.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
            skipped = sweep(db, NOW)
        assert (skipped.marked, skipped.batches) == (0, 0)
        assert sweep(db, NOW).marked == 1
    finally:
        db.dispose()


@pytest.mark.postgres
def test_an_attester_locked_by_evidence_is_skipped_not_waited_for(
    pg_database: Callable[[], str],
) -> None:
    """An attester row another transaction holds (evidence moving its deadline) is skipped;
    once that transaction commits a fresh deadline, the attester is not due any more."""
    db = Database(pg_database())
    try:
        upgrade(db.engine)
        _seed(db, [("busy", "trusted", NOW - timedelta(seconds=2)),
                   ("idle", "trusted", NOW - timedelta(seconds=1))])  # fmt: skip
        with db.engine.connect() as other:
            with other.begin():
                other.execute(text("SELECT 1 FROM attesters WHERE id = 'busy' FOR UPDATE"))
                assert sweep(db, NOW).marked == 1  # idle only, without waiting
                other.execute(
                    text("UPDATE attesters SET deadline = :d WHERE id = 'busy'"),
                    {"d": NOW + timedelta(seconds=180)},
                )
            assert sweep(db, NOW).marked == 0
        assert [t.attester_id for t in _history(db)] == ["idle"]
    finally:
        db.dispose()


def test_sweeper_thread_marks_in_the_background(db: Database) -> None:
    _seed(db, [("bg", "trusted", NOW - timedelta(seconds=1))])
    sweeper = Sweeper(db, interval_s=0.05, batch=10, now=lambda: NOW).start()
    try:
        deadline = time.monotonic() + 20
        while sweeper.marked < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert not sweeper.is_alive()
    assert (sweeper.marked, sweeper.failures) == (1, 0)
    assert [t.to_state for t in _history(db)] == ["stale"]
