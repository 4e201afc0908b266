"""The webhook delivery worker (issue 16): drains ``webhook_outbox``, at least once.

Each service process runs one :class:`Deliverer`. A round:

1. claims up to ``batch`` due rows in one short transaction: ``pending`` rows
   whose ``next_attempt_at`` passed, and ``delivering`` rows whose lease
   expired (a worker that died or hung mid-send). PostgreSQL selects them
   ``FOR UPDATE OF o SKIP LOCKED`` (rows another worker is claiming are
   skipped, never waited for; PostgreSQL 15 manual, SELECT "The Locking
   Clause"); SQLite's ``BEGIN IMMEDIATE`` makes claims one at a time. A claim
   sets ``state = delivering``, counts the attempt and sets ``lease_until``
   (and ``next_attempt_at``, so an expired lease is found by the same
   ``(state, next_attempt_at)`` index);
2. sends each claimed row outside any transaction, concurrently, with a
   timeout and no redirects followed;
3. per row, in its own transaction, only while this claim still holds the
   lease: 2xx -> ``delivered``; anything else -> ``pending`` again after a
   capped exponential backoff with jitter, or ``dead`` once ``attempts``
   reached ``max_attempts``.

A worker killed between 1 and 3 leaves the row ``delivering``; its lease
expires and another round sends it again. So a receiver may see a delivery
twice (the same ``delivery_id``), never not at all.
"""

from __future__ import annotations

import logging
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from verifier.service._periodic import Periodic
from verifier.service.config import ServiceConfig
from verifier.service.db import Database
from verifier.service.webhooks import JwsSigner, delivery_body, hmac_signature

__all__ = [
    "Claim",
    "Deliverer",
    "DeliveryPolicy",
    "backoff_s",
    "claim",
    "deliver_round",
    "delivery_policy",
]

_LOG = logging.getLogger(__name__)
_ERROR_CHARS = 500

_DUE = (
    "SELECT o.id, o.state, o.attempts, o.payload, s.url, s.secret FROM webhook_outbox o"
    " JOIN webhook_subscriptions s ON s.id = o.subscription_id"
    " WHERE o.state IN ('pending', 'delivering') AND o.next_attempt_at <= :now"
    " AND s.enabled = :true ORDER BY o.next_attempt_at LIMIT :batch"
)
_TAKE = (
    "UPDATE webhook_outbox SET state = 'delivering', attempts = attempts + 1,"
    " lease_until = :lease, next_attempt_at = :lease WHERE id = :id"
)
_EXPIRED_DEAD = (
    "UPDATE webhook_outbox SET state = 'dead', lease_until = NULL, last_error = :err WHERE id = :id"
)
_DELIVERED = (
    "UPDATE webhook_outbox SET state = 'delivered', delivered_at = :now, lease_until = NULL,"
    " last_error = NULL WHERE id = :id AND state = 'delivering' AND lease_until = :lease"
)
_FAILED = (
    "UPDATE webhook_outbox SET state = CASE WHEN attempts >= :max THEN 'dead' ELSE 'pending' END,"
    " next_attempt_at = :next, lease_until = NULL, last_error = :err"
    " WHERE id = :id AND state = 'delivering' AND lease_until = :lease"
)


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard to try: ``max_attempts`` sends before ``dead``; ``timeout_s`` per send;
    ``lease_s`` a claim's life (more than a send's timeout); retry ``n`` waits
    ``min(cap, base * 2**(n-1))`` scaled by a random factor in [0.5, 1]."""

    max_attempts: int = 10
    timeout_s: float = 5.0
    lease_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    batch: int = 16

    def __post_init__(self) -> None:
        if self.lease_s <= self.timeout_s:
            raise ValueError("webhook lease must outlast the send timeout")


def delivery_policy(config: ServiceConfig) -> DeliveryPolicy:
    """The configuration's webhook settings (checked in config.py)."""
    return DeliveryPolicy(
        max_attempts=config.webhook_max_attempts,
        timeout_s=float(config.webhook_timeout_s),
        lease_s=float(config.webhook_lease_s),
        backoff_base_s=config.webhook_backoff_base_ms / 1000,
        backoff_cap_s=float(config.webhook_backoff_cap_s),
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimed delivery: what to send where, and the lease that lets us settle it."""

    id: int
    attempt: int
    payload: dict[str, Any]
    url: str
    secret: str
    lease_until: datetime


def backoff_s(attempt: int, policy: DeliveryPolicy, rand: Callable[[], float]) -> float:
    """The wait after failed attempt ``attempt`` (1-based): capped exponential, equal jitter."""
    base = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0 ** min(attempt - 1, 30))
    return base * (0.5 + 0.5 * rand())


def claim(db: Database, now: datetime, policy: DeliveryPolicy) -> list[Claim]:
    """Step 1: lease up to ``policy.batch`` due deliveries (module docstring)."""
    lease = now + timedelta(seconds=policy.lease_s)
    claims: list[Claim] = []
    with db.raw() as conn, conn.write():
        lock = "" if conn.sqlite else " FOR UPDATE OF o SKIP LOCKED"
        rows = conn.all(_DUE + lock, {"now": conn.ts(now), "true": True, "batch": policy.batch})
        for rid, state, attempts, payload, url, secret in rows:
            if state == "delivering" and attempts >= policy.max_attempts:
                # the last attempt's worker died mid-send: no more tries
                err = "lease expired during the last attempt"
                conn.run(_EXPIRED_DEAD, {"id": rid, "err": err})
                continue
            conn.run(_TAKE, {"id": rid, "lease": conn.ts(lease)})
            claims.append(
                Claim(int(rid), int(attempts) + 1, conn.json_out(payload), url, secret, lease)
            )
    return claims


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is the receiver's answer, not a place to send the secret-signed body


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def send(c: Claim, sent_at: datetime, timeout_s: float, jws: JwsSigner | None) -> str | None:
    """Step 2: POST one delivery; None when the receiver answered 2xx, else the error."""
    body = delivery_body(c.id, c.payload, c.attempt, sent_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "vtpm-verifier-webhooks",
        "X-Vtpm-Delivery": str(c.id),
        "X-Vtpm-Signature": hmac_signature(c.secret, body),
    }
    if jws is not None:
        headers["X-Vtpm-Jws"] = jws.sign(body)
    # the URL's scheme is http or https (WebhookRequest.parse)
    req = urllib.request.Request(c.url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, DNS, TLS, bad URL
        return f"{exc.__class__.__name__}: {exc}"[:_ERROR_CHARS]
    return None if 200 <= status < 300 else f"HTTP {status}"


def settle(
    db: Database,
    c: Claim,
    error: str | None,
    now: datetime,
    policy: DeliveryPolicy,
    rand: Callable[[], float],
) -> None:
    """Step 3: record the outcome, only if this claim still holds the lease."""
    with db.raw() as conn, conn.write():
        lease = conn.ts(c.lease_until)
        if error is None:
            conn.run(_DELIVERED, {"id": c.id, "now": conn.ts(now), "lease": lease})
            return
        wait = timedelta(seconds=backoff_s(c.attempt, policy, rand))
        conn.run(
            _FAILED,
            {
                "id": c.id,
                "max": policy.max_attempts,
                "next": conn.ts(now + wait),
                "err": error,
                "lease": lease,
            },
        )


def deliver_round(
    db: Database,
    policy: DeliveryPolicy,
    now: Callable[[], datetime],
    jws: JwsSigner | None = None,
    rand: Callable[[], float] = random.random,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[int, int]:
    """Claim, send and settle until nothing is due; (delivered, failed) sends."""
    delivered = failed = 0
    while True:
        claims = claim(db, now(), policy)
        if not claims:
            return delivered, failed

        def one(c: Claim) -> str | None:
            return send(c, now(), policy.timeout_s, jws)

        errors = list(pool.map(one, claims)) if pool is not None else [one(c) for c in claims]
        for c, err in zip(claims, errors, strict=True):
            settle(db, c, err, now(), policy, rand)
            if err is None:
                delivered += 1
            else:
                failed += 1
                _LOG.info("webhook delivery %d attempt %d failed: %s", c.id, c.attempt, err)
        if len(claims) < policy.batch:
            return delivered, failed


class Deliverer(Periodic):
    """A daemon thread running :func:`deliver_round` every ``interval_s`` seconds, or at
    once when :meth:`wake` is called (a transition was just committed here)."""

    def __init__(
        self,
        db: Database,
        policy: DeliveryPolicy,
        interval_s: float,
        jws: JwsSigner | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__("webhooks", interval_s)
        self._db = db
        self._policy = policy
        self._jws = jws
        self._now = now
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(policy.batch, thread_name_prefix="vtpm-webhook-send")
        self.delivered = 0
        self.failed = 0

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._wake.set()
        super().stop(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _wait(self) -> bool:
        self._wake.wait(self._interval_s)
        self._wake.clear()
        return self._stop.is_set()

    def _round(self) -> None:
        d, f = deliver_round(self._db, self._policy, self._now, self._jws, pool=self._pool)
        self.delivered += d
        self.failed += f
