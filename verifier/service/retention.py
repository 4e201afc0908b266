"""Retention: delete old results and spent nonces in small batches so the database stays bounded.

A fleet at a 60 s cadence writes one result and one nonce per attester per
minute; without pruning the ``results`` and ``nonces`` tables grow without
limit. :func:`prune` removes, in batches of ``batch`` rows, each in its own
short transaction (so a hot-route writer waits for at most one batch):

- results created before ``now - keep_results``, except each attester's latest
  result (``attesters.latest_result_id``), which the status routes read;
- nonces that expired before ``now - keep_nonces``: an expired nonce can no
  longer be spent, and evidence naming a nonce the verifier does not hold is
  rejected like a replay, so dropping it loses no protection.

The deletes use the indexes of migration 0003 (``results.created_at``,
``nonces.expires_at``). On PostgreSQL each batch first takes a transaction-level
advisory lock without waiting (``pg_try_advisory_xact_lock``): when several
workers or verifier processes share one database, one prunes and the others
skip that round instead of deleting the same rows.

:class:`Pruner` runs :func:`prune` in a background thread of each service
process every ``interval_s`` seconds when ``retention_days`` is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from verifier.service._periodic import Periodic
from verifier.service.db import Database
from verifier.service.models import Attester, Nonce, Result

__all__ = ["PruneCounts", "Pruner", "RetentionPolicy", "prune"]

_LOG = logging.getLogger(__name__)
# pg_try_advisory_xact_lock key: "vtpm" "prun" as two 32-bit halves
_LOCK_KEY = 0x7674706D_7072756E


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long rows are kept, and how many one transaction deletes."""

    keep_results: timedelta
    keep_nonces: timedelta = timedelta(hours=1)
    batch: int = 1000
    interval_s: float = 300.0

    def __post_init__(self) -> None:
        if self.keep_results <= timedelta(0) or self.keep_nonces < timedelta(0):
            raise ValueError("retention: keep_results must be positive, keep_nonces not negative")
        if self.batch < 1:
            raise ValueError("retention: batch must be at least 1")
        if self.interval_s <= 0:
            raise ValueError("retention: interval_s must be positive")


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """Rows one :func:`prune` call deleted, and the batches (transactions) it took."""

    results: int
    nonces: int
    batches: int


def prune(db: Database, policy: RetentionPolicy, now: datetime) -> PruneCounts:
    """Delete results and nonces older than ``policy`` allows, one batch per transaction."""
    result_cut = now - policy.keep_results
    nonce_cut = now - policy.keep_nonces
    latest = select(Attester.latest_result_id).where(Attester.latest_result_id.is_not(None))
    results = nonces = batches = 0
    while True:
        with db.transaction() as session:
            if not _locked(db, session):
                return PruneCounts(results=results, nonces=nonces, batches=batches)
            ids = (
                session.execute(
                    select(Result.id)
                    .where(Result.created_at < result_cut, Result.id.not_in(latest))
                    .order_by(Result.created_at)
                    .limit(policy.batch)
                )
                .scalars()
                .all()
            )
            if ids:
                session.execute(delete(Result).where(Result.id.in_(ids)))
        if not ids:
            break
        batches += 1
        results += len(ids)
        if len(ids) < policy.batch:
            break
    while True:
        with db.transaction() as session:
            if not _locked(db, session):
                break
            keys = (
                session.execute(
                    select(Nonce.nonce)
                    .where(Nonce.expires_at < nonce_cut)
                    .order_by(Nonce.expires_at)
                    .limit(policy.batch)
                )
                .scalars()
                .all()
            )
            if keys:
                session.execute(delete(Nonce).where(Nonce.nonce.in_(keys)))
        if not keys:
            break
        batches += 1
        nonces += len(keys)
        if len(keys) < policy.batch:
            break
    return PruneCounts(results=results, nonces=nonces, batches=batches)


def _locked(db: Database, session: Session) -> bool:
    """On PostgreSQL: whether this transaction holds the pruning lock (never waits)."""
    if db.sqlite:
        return True  # BEGIN IMMEDIATE already serialises writers
    got = session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    return bool(got.scalar_one())


class Pruner(Periodic):
    """A daemon thread that prunes every ``policy.interval_s`` seconds until :meth:`stop`
    (errors: see :class:`~verifier.service._periodic.Periodic`)."""

    def __init__(
        self,
        db: Database,
        policy: RetentionPolicy,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__("pruner", policy.interval_s)
        self._db = db
        self._policy = policy
        self._now = now

    def _round(self) -> None:
        counts = prune(self._db, self._policy, self._now())
        if counts.results or counts.nonces:
            _LOG.info(
                "retention: deleted %d results and %d nonces in %d batches",
                counts.results,
                counts.nonces,
                counts.batches,
            )
