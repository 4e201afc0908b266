"""The deadline sweeper (issue 16): trusted attesters whose deadline passed become ``stale``.

Evidence keeps a trusted attester's ``deadline`` at ``last evidence + cadence x
grace`` (:meth:`verifier.service.services.EvidenceService.submit`); every other
state has no deadline. :func:`sweep` marks the attesters whose deadline is
before ``now`` as stale, ``batch`` at a time, and records one transition each
(cause: the missed deadline, the last evidence and the cadence), in the same
transaction as the state change.

Cost is O(changes), not O(fleet), per tick: the rows come from the
``ix_attesters_deadline`` index (migration 0005) and a stale attester leaves it
(deadline NULL), so a tick with nothing due reads one index entry.

Exactly once, with several gunicorn workers and several verifier processes
sharing one database:

- PostgreSQL: one statement per batch selects the due rows ``FOR UPDATE SKIP
  LOCKED`` and updates them; :func:`~verifier.service.transitions.record`
  then inserts their transitions and webhook deliveries in the same
  transaction (PostgreSQL 15 manual,
  SELECT "The Locking Clause": a row locked by another transaction is skipped,
  and in READ COMMITTED a row locked after a concurrent update is re-checked
  against ``deadline < now``, section 13.2.1). Evidence locks the attester row
  (``FOR UPDATE OF a``) while it moves the deadline, so the sweeper never
  marks an attester whose fresh evidence is being committed, and evidence
  arriving after the sweep sees ``stale`` and records ``stale -> trusted``.
  Each batch first takes a transaction-level advisory lock without waiting:
  one process sweeps per round, the others skip (the row locks alone would
  already keep transitions single; the lock saves the duplicate work).
- SQLite: each batch is one ``BEGIN IMMEDIATE`` transaction that re-reads the
  due rows under the write lock; processes sweep one after the other.

:class:`Sweeper` runs :func:`sweep` every ``sweep_interval_s`` seconds in a
background thread of each service process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from verifier.service._periodic import Periodic
from verifier.service.db import Database, RawConnection
from verifier.service.transitions import NewTransition, record

__all__ = ["SweepCounts", "Sweeper", "cause_time", "sweep"]

_LOG = logging.getLogger(__name__)
# pg_try_advisory_xact_lock key: "vtpm" "swep" as two 32-bit halves
LOCK_KEY = 0x7674706D_73776570

# Lock the due rows (skipping those another transaction holds) and mark them stale;
# their transitions (and webhook deliveries) are then written by transitions.record.
_SWEEP_PG = (
    "WITH c AS (SELECT id, state, deadline, last_evidence_at, cadence_s FROM attesters"
    " WHERE deadline < :now ORDER BY deadline LIMIT :batch FOR UPDATE SKIP LOCKED)"
    " UPDATE attesters a SET state = 'stale', state_since = :now, deadline = NULL"
    " FROM c WHERE a.id = c.id"
    " RETURNING a.id, c.state, c.deadline, c.last_evidence_at, c.cadence_s"
)
_DUE_SQLITE = (
    "SELECT id, state, deadline, last_evidence_at, cadence_s FROM attesters"
    " WHERE deadline < :now ORDER BY deadline LIMIT :batch"
)
_MARK_SQLITE = (
    "UPDATE attesters SET state = 'stale', state_since = :now, deadline = NULL WHERE id = :id"
)


@dataclass(frozen=True, slots=True)
class SweepCounts:
    """Attesters one :func:`sweep` marked stale, and the batches (transactions) it took."""

    marked: int
    batches: int


def cause_time(t: datetime | None) -> str | None:
    """A time in a transition's cause: UTC, microseconds always written."""
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sweep(db: Database, now: datetime, batch: int = 500) -> SweepCounts:
    """Mark every trusted attester whose deadline is before ``now`` stale, ``batch`` per
    transaction, with one transition each. Returns at once (nothing marked) on PostgreSQL
    while another process holds the sweeping lock."""
    if batch < 1:
        raise ValueError("sweep: batch must be at least 1")
    marked = batches = 0
    while True:
        n = _sweep_pg(db, now, batch) if not db.sqlite else _sweep_sqlite(db, now, batch)
        if n is None:
            break
        if n:
            batches += 1
            marked += n
        if n < batch:
            break
    return SweepCounts(marked=marked, batches=batches)


def _sweep_pg(db: Database, now: datetime, batch: int) -> int | None:
    """One batch; None when another transaction holds the sweeping lock."""
    with db.raw() as conn, conn.write():
        got = conn.one("SELECT pg_try_advisory_xact_lock(:k)", {"k": LOCK_KEY})
        if got is None or not got[0]:
            return None
        rows = conn.all(_SWEEP_PG, {"now": conn.ts(now), "batch": batch})
        record(conn, [_stale(now, conn, row) for row in rows])
        return len(rows)


def _sweep_sqlite(db: Database, now: datetime, batch: int) -> int:
    """One batch under SQLite's write lock (BEGIN IMMEDIATE)."""
    with db.raw() as conn, conn.write():
        rows = conn.all(_DUE_SQLITE, {"now": conn.ts(now), "batch": batch})
        for row in rows:
            conn.run(_MARK_SQLITE, {"now": conn.ts(now), "id": row[0]})
        record(conn, [_stale(now, conn, row) for row in rows])
        return len(rows)


def _stale(now: datetime, conn: RawConnection, row: tuple[Any, ...]) -> NewTransition:
    attester_id, from_state, deadline, last_evidence_at, cadence_s = row
    return NewTransition(
        attester_id=str(attester_id),
        from_state=str(from_state),
        to_state="stale",
        at=now,
        cause={
            "missed_deadline": cause_time(conn.from_ts(deadline)),
            "last_evidence_at": cause_time(conn.from_ts(last_evidence_at)),
            "cadence_s": cadence_s,
        },
    )


class Sweeper(Periodic):
    """A daemon thread that sweeps every ``interval_s`` seconds until :meth:`stop`."""

    def __init__(
        self,
        db: Database,
        interval_s: float,
        batch: int,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__("sweeper", interval_s)
        self._db = db
        self._batch = batch
        self._now = now
        self.marked = 0

    def _round(self) -> None:
        counts = sweep(self._db, self._now(), self._batch)
        self.marked += counts.marked
        if counts.marked:
            _LOG.info("sweeper: %d attesters went stale", counts.marked)
