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
  LOCKED``, updates them and inserts their transitions (PostgreSQL 15 manual,
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

from sqlalchemy import select, text

from verifier.service._periodic import Periodic
from verifier.service.db import Database
from verifier.service.models import Attester, AttesterTransition

__all__ = ["SweepCounts", "Sweeper", "cause_time", "sweep"]

_LOG = logging.getLogger(__name__)
# pg_try_advisory_xact_lock key: "vtpm" "swep" as two 32-bit halves
LOCK_KEY = 0x7674706D_73776570

# One round trip per batch: lock the due rows (skipping those another transaction
# holds), mark them stale, record a transition for each.
_SWEEP_PG = (
    "WITH c AS (SELECT id, state, deadline, last_evidence_at, cadence_s FROM attesters"
    " WHERE deadline < :now ORDER BY deadline LIMIT :batch FOR UPDATE SKIP LOCKED),"
    " u AS (UPDATE attesters a SET state = 'stale', state_since = :now, deadline = NULL"
    " FROM c WHERE a.id = c.id"
    " RETURNING a.id, c.state AS from_state, c.deadline, c.last_evidence_at, c.cadence_s)"
    " INSERT INTO attester_transitions (attester_id, from_state, to_state, at, cause, result_id)"
    " SELECT id, from_state, 'stale', :now, json_build_object("
    "'missed_deadline', to_char(deadline AT TIME ZONE 'UTC', :fmt),"
    " 'last_evidence_at', to_char(last_evidence_at AT TIME ZONE 'UTC', :fmt),"
    " 'cadence_s', cadence_s), NULL FROM u"
)
# the same text as cause_time(): PostgreSQL to_char of a UTC timestamp
_PG_TIME_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


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
    with db.transaction() as session:
        got = session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        if not got.scalar_one():
            return None
        done = session.execute(
            text(_SWEEP_PG), {"now": now, "batch": batch, "fmt": _PG_TIME_FORMAT}
        )
        return int(done.rowcount)  # type: ignore[attr-defined]


def _sweep_sqlite(db: Database, now: datetime, batch: int) -> int:
    """One batch under SQLite's write lock (BEGIN IMMEDIATE)."""
    with db.transaction() as session:
        due = session.scalars(
            select(Attester).where(Attester.deadline < now).order_by(Attester.deadline).limit(batch)
        ).all()
        for a in due:
            session.add(
                AttesterTransition(
                    attester_id=a.id,
                    from_state=a.state,
                    to_state="stale",
                    at=now,
                    cause={
                        "missed_deadline": cause_time(a.deadline),
                        "last_evidence_at": cause_time(a.last_evidence_at),
                        "cadence_s": a.cadence_s,
                    },
                )
            )
            a.state, a.state_since, a.deadline = "stale", now, None
        return len(due)


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
