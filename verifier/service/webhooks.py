"""Webhook subscriptions and what a delivery carries (issue 16, notifications).

A subscription names a receiver URL, a secret and the transitions it wants.
``events`` is a list of patterns, each one of:

- ``*``: every transition;
- ``STATE``: every transition into ``STATE`` (``failed``);
- ``FROM->TO``: one edge, either side ``*`` (``trusted->*``).

States are :data:`verifier.service.models.ATTESTER_STATES`.

A delivery is ``POST url`` with a JSON body (:func:`delivery_body`) and:

- ``X-Vtpm-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes
  under the subscription's secret (:func:`hmac_signature`; a receiver
  recomputes it over the bytes it received and compares in constant time);
- ``X-Vtpm-Delivery``: the delivery id, the same on every retry of one
  delivery (receivers dedupe on it: delivery is at-least-once);
- ``X-Vtpm-Jws`` (when the service signs): a JWS with detached payload
  (RFC 7515 Appendix F) over the body, ES256 with the EAR signing key; verify
  it offline with ``/.well-known/jwks.json`` (:func:`verify_jws`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select, update

from verifier.service.db import Database
from verifier.service.models import (
    ATTESTER_STATES,
    WEBHOOK_STATES,
    WebhookOutbox,
    WebhookSubscription,
)
from vtpm_core.errors import NotFoundError, ParseError, StateError, VerificationError

__all__ = [
    "JwsSigner",
    "WebhookRequest",
    "WebhookService",
    "delivery_body",
    "hmac_signature",
    "matches",
    "parse_events",
    "verify_hmac",
    "verify_jws",
]

_STRUCTURE = "WebhookRequest"
_MAX_URL = 2048
_MAX_EVENTS = 32
_SECRET_BYTES = 32
JWS_TYPE = "vtpm-webhook+jws"


def _pattern_ok(pattern: str) -> bool:
    if pattern == "*" or pattern in ATTESTER_STATES:
        return True
    src, sep, dst = pattern.partition("->")
    return bool(sep) and all(p == "*" or p in ATTESTER_STATES for p in (src, dst))


def parse_events(value: Any, structure: str = _STRUCTURE) -> tuple[str, ...]:
    """``events`` checked: a non-empty list of patterns (module docstring)."""
    if not isinstance(value, list) or not value or len(value) > _MAX_EVENTS:
        raise ParseError(structure, "events", 0, f"expected a list of 1..{_MAX_EVENTS} patterns")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not _pattern_ok(p):
            raise ParseError(
                structure,
                f"events[{i}]",
                0,
                f"{str(p)[:40]!r}: expected '*', a state or 'FROM->TO' "
                f"(states: {', '.join(ATTESTER_STATES)}, either side may be '*')",
            )
    return tuple(dict.fromkeys(value))


def matches(events: Sequence[str], from_state: str, to_state: str) -> bool:
    """Whether a transition ``from_state -> to_state`` is one ``events`` asks for."""
    for p in events:
        if p in ("*", to_state):
            return True
        src, sep, dst = p.partition("->")
        if sep and src in ("*", from_state) and dst in ("*", to_state):
            return True
    return False


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """``POST /v1/webhooks``: ``url`` (http or https), ``events`` (default ``["*"]``),
    ``secret`` (default: 32 random bytes, returned once), ``enabled`` (default true)."""

    url: str
    events: tuple[str, ...]
    secret: str | None
    enabled: bool

    @classmethod
    def parse(cls, body: dict[str, Any]) -> WebhookRequest:
        unknown = sorted(set(body) - {"url", "events", "secret", "enabled"})
        if unknown:
            raise ParseError(_STRUCTURE, unknown[0], 0, "unknown field")
        url = body.get("url")
        if not isinstance(url, str) or not 0 < len(url) <= _MAX_URL:
            raise ParseError(_STRUCTURE, "url", 0, f"expected a URL of 1..{_MAX_URL} characters")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ParseError(_STRUCTURE, "url", 0, f"{url[:64]!r}: expected an http(s) URL")
        secret = body.get("secret")
        if secret is not None and (not isinstance(secret, str) or not 16 <= len(secret) <= 128):
            raise ParseError(_STRUCTURE, "secret", 0, "expected a string of 16..128 characters")
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ParseError(_STRUCTURE, "enabled", 0, "expected true or false")
        return cls(url, parse_events(body.get("events", ["*"])), secret, enabled)


# -- what a delivery carries ---------------------------------------------------------------


def delivery_body(delivery_id: int, payload: dict[str, Any], attempt: int, sent_at: str) -> bytes:
    """The exact bytes POSTed: the transition record, the delivery id, attempt, sent_at."""
    body = {
        "type": "vtpm.attester.transition",
        "delivery_id": str(delivery_id),
        "attempt": attempt,
        **payload,
        "sent_at": sent_at,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")


def hmac_signature(secret: str, body: bytes) -> str:
    """``X-Vtpm-Signature``: ``sha256=`` and the hex HMAC-SHA256 of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_hmac(secret: str, body: bytes, header: str | None) -> bool:
    """A receiver's check of ``X-Vtpm-Signature`` (constant-time)."""
    return header is not None and hmac.compare_digest(hmac_signature(secret, body), header)


class JwsSigner:
    """Detached-payload ES256 JWS over a delivery body with the EAR signing key; the
    header's ``kid`` is the key's id in ``/.well-known/jwks.json``."""

    __slots__ = ("_key", "_kid")

    def __init__(self, pem: bytes) -> None:
        from verifier.ear import EarSigner

        signer = EarSigner.load(pem)
        self._kid = signer.kid
        from cryptography.hazmat.primitives import serialization

        self._key = serialization.load_pem_private_key(pem, None)

    def sign(self, body: bytes) -> str:
        import jwt

        token = jwt.api_jws.PyJWS().encode(
            body,
            self._key,  # type: ignore[arg-type]
            algorithm="ES256",
            headers={"kid": self._kid, "typ": JWS_TYPE},
            is_payload_detached=True,
        )
        return str(token)


def verify_jws(token: str, body: bytes, jwks: dict[str, Any]) -> dict[str, Any]:
    """A receiver's check of ``X-Vtpm-Jws``: ES256 by the JWKS key its ``kid`` names,
    over exactly ``body``. Returns the parsed body; raises VerificationError."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
        keys = {k.get("kid"): k for k in jwks.get("keys", [])}
        jwk = keys.get(header.get("kid"))
        if jwk is None or header.get("alg") != "ES256":
            raise VerificationError("webhook.jws", f"no ES256 key {header.get('kid')!r} in JWKS")
        key = jwt.PyJWK(jwk).key
        jwt.api_jws.PyJWS().decode(token, key, algorithms=["ES256"], detached_payload=body)
    except jwt.PyJWTError as exc:
        raise VerificationError("webhook.jws", f"signature does not verify: {exc}") from None
    parsed: dict[str, Any] = json.loads(body)
    return parsed


# -- the admin service -----------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t else None


def subscription_view(s: WebhookSubscription) -> dict[str, Any]:
    return {
        "id": s.id,
        "url": s.url,
        "events": list(s.events),
        "enabled": s.enabled,
        "created_at": _iso(s.created_at),
    }


def delivery_view(d: WebhookOutbox) -> dict[str, Any]:
    return {
        "id": d.id,
        "subscription_id": d.subscription_id,
        "transition_id": d.transition_id,
        "state": d.state,
        "attempts": d.attempts,
        "next_attempt_at": _iso(d.next_attempt_at) if d.state == "pending" else None,
        "lease_until": _iso(d.lease_until),
        "last_error": d.last_error,
        "delivered_at": _iso(d.delivered_at),
        "transition": d.payload,
    }


@dataclass
class WebhookService:
    """Subscriptions and deliveries for the admin API (``/v1/webhooks``)."""

    db: Database
    clock: Callable[[], datetime]

    def add(self, req: WebhookRequest) -> dict[str, Any]:
        """A new subscription; the view carries the secret (shown only here)."""
        secret = req.secret or secrets.token_urlsafe(_SECRET_BYTES)
        sub = WebhookSubscription(
            id=str(uuid.uuid4()),
            url=req.url,
            secret=secret,
            events=list(req.events),
            enabled=req.enabled,
            created_at=self.clock(),
        )
        with self.db.transaction() as session:
            session.add(sub)
        return {**subscription_view(sub), "secret": secret}

    def list_all(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            subs = session.scalars(
                select(WebhookSubscription)
                .where(WebhookSubscription.deleted_at.is_(None))
                .order_by(WebhookSubscription.created_at)
            ).all()
            counts = dict(
                session.execute(
                    select(WebhookOutbox.subscription_id, func.count())
                    .where(WebhookOutbox.state.in_(("pending", "delivering", "dead")))
                    .group_by(WebhookOutbox.subscription_id)
                ).all()
            )
            return [{**subscription_view(s), "undelivered": counts.get(s.id, 0)} for s in subs]

    def remove(self, subscription_id: str, *, discard: bool = False) -> dict[str, Any]:
        """Delete a subscription; what it was still owed is not lost silently.

        1. the subscription matches no transition recorded from now on (``deleted_at``:
           :func:`verifier.service.transitions.record` skips it);
        2. its queued deliveries (pending, or delivering under a lease) of transitions
           already recorded are still delivered, retried and dead-lettered as before
           (``queued``); with ``discard``, or when the subscription was disabled (its
           deliveries held), they are marked ``dead`` with the reason instead
           (``discarded``), visible in ``GET /v1/webhook-deliveries?state=dead``
           until retention prunes them. A send in flight when it is discarded may
           still arrive (its settle then finds the row dead and leaves it so);
        3. the row is kept as a tombstone while any delivery names it, so delivery
           ids and their history stay readable; the retention pruner drops it with
           its last delivery (:mod:`verifier.service.retention`). None left: dropped now.
        """
        now = self.clock()
        with self.db.transaction() as session:
            sub = session.get(WebhookSubscription, subscription_id, with_for_update=True)
            if sub is None or sub.deleted_at is not None:
                raise NotFoundError(f"webhook {subscription_id!r} does not exist")
            mine = WebhookOutbox.subscription_id == subscription_id
            undelivered = mine & WebhookOutbox.state.in_(("pending", "delivering"))
            owed = int(
                session.execute(
                    select(func.count()).select_from(WebhookOutbox).where(undelivered)
                ).scalar_one()
            )
            drop = discard or not sub.enabled
            if drop and owed:
                why = "subscription deleted" + ("" if sub.enabled else " while disabled")
                session.execute(
                    update(WebhookOutbox)
                    .where(undelivered)
                    .values(
                        state="dead",
                        lease_until=None,
                        next_attempt_at=now,  # retention counts its age from here
                        last_error=f"discarded: {why}",
                    )
                )
            left = session.execute(select(WebhookOutbox.id).where(mine).limit(1)).first()
            if left is None:
                session.delete(sub)
            else:
                sub.deleted_at = now
        return {
            "id": subscription_id,
            "deleted_at": _iso(now),
            "queued": 0 if drop else owed,
            "discarded": owed if drop else 0,
        }

    def deliveries(
        self, state: str | None, limit: int, subscription_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``state`` one of WEBHOOK_STATES (None: all)."""
        if state is not None and state not in WEBHOOK_STATES:
            raise ParseError("query", "state", 0, f"expected one of {', '.join(WEBHOOK_STATES)}")
        stmt = select(WebhookOutbox).order_by(WebhookOutbox.id.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(WebhookOutbox.state == state)
        if subscription_id is not None:
            stmt = stmt.where(WebhookOutbox.subscription_id == subscription_id)
        with self.db.read() as session:
            return [delivery_view(d) for d in session.scalars(stmt)]

    def redeliver(self, delivery_id: int) -> dict[str, Any]:
        """Queue a delivery again now, attempts reset (a dead one after the receiver was
        fixed, or a delivered one a receiver lost). Refused while a worker holds it."""
        now = self.clock()
        with self.db.transaction() as session:
            d = session.get(WebhookOutbox, delivery_id, with_for_update=True)
            if d is None:
                raise NotFoundError(f"webhook delivery {delivery_id} does not exist")
            if d.state == "delivering" and d.lease_until is not None and d.lease_until > now:
                raise StateError(f"webhook delivery {delivery_id} is being delivered right now")
            sub = session.get(WebhookSubscription, d.subscription_id)
            if sub is not None and sub.deleted_at is not None:
                raise StateError(
                    f"webhook delivery {delivery_id}: its subscription was deleted"
                    " (subscribe the receiver again to get new transitions)"
                )
            session.execute(
                update(WebhookOutbox)
                .where(WebhookOutbox.id == delivery_id)
                .values(
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    lease_until=None,
                    delivered_at=None,
                )
            )
            session.flush()
            session.refresh(d)
            return delivery_view(d)

    def depth(self) -> dict[str, int]:
        """Undelivered outbox rows per state (``delivered`` rows are history, not depth):
        each count a range of ``ix_webhook_outbox_state_next``."""
        states = [s for s in WEBHOOK_STATES if s != "delivered"]
        with self.db.read() as session:
            counts = dict(
                session.execute(
                    select(WebhookOutbox.state, func.count())
                    .where(WebhookOutbox.state.in_(states))
                    .group_by(WebhookOutbox.state)
                ).all()
            )
        return {s: int(counts.get(s, 0)) for s in states}

    def metrics_text(self) -> bytes:
        """``vtpm_verifier_webhook_outbox{state=...}``: undelivered rows per state, read from
        the database at scrape time (one truth for every worker and process)."""
        lines = [
            "# HELP vtpm_verifier_webhook_outbox Undelivered webhook deliveries by state",
            "# TYPE vtpm_verifier_webhook_outbox gauge",
            *(f'vtpm_verifier_webhook_outbox{{state="{s}"}} {n}' for s, n in self.depth().items()),
        ]
        return ("\n".join(lines) + "\n").encode("ascii")
