"""Retention: delete old results, spent nonces and settled webhook deliveries in small batches
so the database stays bounded.

A fleet at a 60 s cadence writes one result and one nonce per attester per
minute; without pruning the ``results`` and ``nonces`` tables grow without
limit. :func:`prune` removes, in batches of ``batch`` rows, each in its own
short transaction (so a hot-route writer waits for at most one batch):

- results created before ``now - keep_results``, except each attester's latest
  result (``attesters.latest_result_id``), which the status routes read;
- nonces that expired before ``now - keep_nonces``: an expired nonce can no
  longer be spent, and evidence naming a nonce the verifier does not hold is
  rejected like a replay, so dropping it loses no protection;
- webhook outbox rows (issue 16): ``delivered`` ones after ``keep_delivered``,
  ``dead`` ones after the longer ``keep_dead`` (dead letters stay visible in
  ``GET /v1/webhook-deliveries?state=dead`` for an operator to see and
  redeliver). A row's age is counted from its ``next_attempt_at``, which a
  worker sets to the end of its lease when it claims the row (at or after the
  delivery) and to the next retry's time when it fails (at or after its death,
  or the time it was discarded): never earlier than the settlement, so a row is
  kept at least that long. Pending and delivering rows are never touched: each
  DELETE repeats the state and age conditions, so a row redelivered between
  the batch's SELECT and its DELETE stays (PostgreSQL re-checks the WHERE on
  the updated row);
- deleted webhook subscriptions (tombstones, migration 0010) once no outbox
  row names them.

The deletes use the indexes of migration 0003 (``results.created_at``,
``nonces.expires_at``) and the outbox's ``(state, next_attempt_at)``. On
PostgreSQL each batch first takes a transaction-level advisory lock without
waiting (``pg_try_advisory_xact_lock``): when several workers or verifier
processes share one database, one prunes and the others skip that round
instead of deleting the same rows.

:class:`Pruner` runs :func:`prune` in a background thread of each service
process every ``interval_s`` seconds when ``retention_days`` or a webhook
retention (``webhook_keep_delivered_days``, default 7, and
``webhook_keep_dead_days``, default 30) is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, delete, exists, select, text
from sqlalchemy.orm import Session

from verifier.service._periodic import Periodic
from verifier.service.db import Database
from verifier.service.models import (
    Attester,
    Nonce,
    Result,
    WebhookOutbox,
    WebhookSubscription,
)

__all__ = ["PruneCounts", "Pruner", "RetentionPolicy", "prune"]

_LOG = logging.getLogger(__name__)
# pg_try_advisory_xact_lock key: "vtpm" "prun" as two 32-bit halves
_LOCK_KEY = 0x7674706D_7072756E


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long rows are kept (None: for ever), and how many one transaction deletes."""

    keep_results: timedelta | None
    keep_nonces: timedelta = timedelta(hours=1)
    keep_delivered: timedelta | None = None
    keep_dead: timedelta | None = None
    batch: int = 1000
    interval_s: float = 300.0

    def __post_init__(self) -> None:
        if self.keep_results is not None and self.keep_results <= timedelta(0):
            raise ValueError("retention: keep_results must be positive")
        if self.keep_nonces < timedelta(0):
            raise ValueError("retention: keep_nonces must not be negative")
        for name in ("keep_delivered", "keep_dead"):
            value = getattr(self, name)
            if value is not None and value <= timedelta(0):
                raise ValueError(f"retention: {name} must be positive")
        # dead letters are kept at least as long as delivered rows: they are the ones
        # an operator must still see (None is for ever)
        if self.keep_dead is not None and (
            self.keep_delivered is None or self.keep_dead < self.keep_delivered
        ):
            raise ValueError("retention: keep_dead must be at least keep_delivered")
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
    deliveries: int = 0
    subscriptions: int = 0


def prune(db: Database, policy: RetentionPolicy, now: datetime) -> PruneCounts:
    """Delete what ``policy`` no longer keeps, one batch per transaction (module docstring)."""
    results, batches = (0, 0) if policy.keep_results is None else _prune_results(db, policy, now)
    nonces, n = _prune_nonces(db, policy, now)
    batches += n
    deliveries = 0
    for state, keep in (("delivered", policy.keep_delivered), ("dead", policy.keep_dead)):
        if keep is not None:
            cut = now - keep
            rows, n = _prune_deliveries(
                db,
                policy.batch,
                (WebhookOutbox.state == state) & (WebhookOutbox.next_attempt_at < cut),
            )
            deliveries += rows
            batches += n
    subscriptions, n = _prune_tombstones(db, policy.batch)
    return PruneCounts(
        results=results,
        nonces=nonces,
        batches=batches + n,
        deliveries=deliveries,
        subscriptions=subscriptions,
    )


def _prune_results(db: Database, policy: RetentionPolicy, now: datetime) -> tuple[int, int]:
    assert policy.keep_results is not None
    result_cut = now - policy.keep_results
    latest = select(Attester.latest_result_id).where(Attester.latest_result_id.is_not(None))
    results = batches = 0
    while True:
        with db.transaction() as session:
            if not _locked(db, session):
                return results, batches
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
    return results, batches


def _prune_nonces(db: Database, policy: RetentionPolicy, now: datetime) -> tuple[int, int]:
    nonce_cut = now - policy.keep_nonces
    nonces = batches = 0
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
    return nonces, batches


def _prune_deliveries(db: Database, batch: int, which: ColumnElement[bool]) -> tuple[int, int]:
    """Settled outbox rows matching ``which`` (a state and an age), oldest first."""
    rows = batches = 0
    while True:
        with db.transaction() as session:
            if not _locked(db, session):
                break
            ids = (
                session.execute(
                    select(WebhookOutbox.id)
                    .where(which)
                    .order_by(WebhookOutbox.next_attempt_at)
                    .limit(batch)
                )
                .scalars()
                .all()
            )
            if ids:
                # ``which`` again: a row redelivered since the SELECT is pending now
                session.execute(delete(WebhookOutbox).where(WebhookOutbox.id.in_(ids), which))
        if not ids:
            break
        batches += 1
        rows += len(ids)
        if len(ids) < batch:
            break
    return rows, batches


def _prune_tombstones(db: Database, batch: int) -> tuple[int, int]:
    """Deleted subscriptions no outbox row names any more."""
    unused = WebhookSubscription.deleted_at.is_not(None) & ~exists().where(
        WebhookOutbox.subscription_id == WebhookSubscription.id
    )
    with db.transaction() as session:
        if not _locked(db, session):
            return 0, 0
        ids = list(
            session.execute(select(WebhookSubscription.id).where(unused).limit(batch)).scalars()
        )
        if ids:
            session.execute(
                delete(WebhookSubscription).where(WebhookSubscription.id.in_(ids), unused)
            )
    return len(ids), 1 if ids else 0


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
        if counts.results or counts.nonces or counts.deliveries or counts.subscriptions:
            _LOG.info(
                "retention: deleted %d results, %d nonces, %d webhook deliveries and %d"
                " deleted subscriptions in %d batches",
                counts.results,
                counts.nonces,
                counts.deliveries,
                counts.subscriptions,
                counts.batches,
            )
