"""Recording attester state transitions, with their webhook deliveries (issue 16).

:func:`record` is the one place a transition row is written (evidence in
:mod:`verifier.service.services`, the deadline sweeper in
:mod:`verifier.service.sweeper`). In the caller's transaction it inserts the
transitions and, for each, one ``webhook_outbox`` row per enabled (and not
deleted) subscription whose ``events`` match (a transactional outbox): the state
change, its history row and its deliveries commit or roll back together, so
no transition is ever without its deliveries, and ``UNIQUE (subscription_id,
transition_id)`` (migration 0008) keeps any from being queued twice.

Cost is O(changes): rows are inserted ``_CHUNK`` per statement, and the
subscriptions are read once per call (a small table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from verifier.service.db import RawConnection
from verifier.service.webhooks import matches

__all__ = ["NewTransition", "record", "transition_record"]

# rows per INSERT: bounds the statement texts the driver caches (1.._CHUNK values lists)
_CHUNK = 100
# each INSERT is one of these followed by its placeholders' "(...), (...)" lists
_TRANSITION_INSERT = (
    "INSERT INTO attester_transitions (attester_id, from_state, to_state, at, cause, result_id)"
    " VALUES "
)
_OUTBOX_INSERT = (
    "INSERT INTO webhook_outbox (subscription_id, transition_id, payload, state, attempts,"
    " next_attempt_at, lease_until, last_error, delivered_at) VALUES "
)
_SUBSCRIPTIONS = (
    "SELECT id, events FROM webhook_subscriptions WHERE enabled = :true AND deleted_at IS NULL"
)


@dataclass(frozen=True, slots=True)
class NewTransition:
    """A state change about to be recorded; ``cause`` as in ``AttesterTransition``."""

    attester_id: str
    from_state: str
    to_state: str
    at: datetime
    cause: dict[str, Any]
    result_id: int | None = None


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def transition_record(transition_id: int, t: NewTransition) -> dict[str, Any]:
    """The transition as a webhook delivery carries it (the outbox row's ``payload``)."""
    return {
        "transition_id": transition_id,
        "attester_id": t.attester_id,
        "from_state": t.from_state,
        "to_state": t.to_state,
        "at": _iso(t.at),
        "cause": t.cause,
        "result_id": t.result_id,
    }


def record(conn: RawConnection, changes: Sequence[NewTransition]) -> list[int]:
    """Insert ``changes`` and their outbox rows; returns the transition ids in order.

    Must run inside the caller's ``conn.write()`` block, the one that changes
    the attesters' state: that is what makes the three writes one. Each
    attester appears at most once in ``changes`` (its row is locked by the
    caller), which is how the returned ids are matched to their transitions.
    """
    if not changes:
        return []
    ids: dict[str, int] = {}
    for start in range(0, len(changes), _CHUNK):
        chunk = changes[start : start + _CHUNK]
        values, params = [], {}
        for i, t in enumerate(chunk):
            values.append(f"(:a{i}, :f{i}, :t{i}, :at{i}, :c{i}, :r{i})")
            params.update(
                {
                    f"a{i}": t.attester_id,
                    f"f{i}": t.from_state,
                    f"t{i}": t.to_state,
                    f"at{i}": conn.ts(t.at),
                    f"c{i}": conn.json_in(t.cause),
                    f"r{i}": t.result_id,
                }
            )
        sql = _TRANSITION_INSERT + ", ".join(values) + " RETURNING id, attester_id"
        rows = conn.all(sql, params)
        ids.update({str(aid): int(tid) for tid, aid in rows})
    if len(ids) != len(changes):
        raise ValueError("record: an attester appears twice in one call")
    out = [ids[t.attester_id] for t in changes]
    subscriptions = [
        (str(sid), tuple(conn.json_out(events)))
        for sid, events in conn.all(_SUBSCRIPTIONS, {"true": True})
    ]
    deliveries = [
        (sid, tid, t)
        for tid, t in zip(out, changes, strict=True)
        for sid, events in subscriptions
        if matches(events, t.from_state, t.to_state)
    ]
    for start in range(0, len(deliveries), _CHUNK):
        values, params = [], {"pending": "pending", "zero": 0}
        for i, (sid, tid, t) in enumerate(deliveries[start : start + _CHUNK]):
            values.append(f"(:s{i}, :t{i}, :p{i}, :pending, :zero, :n{i}, NULL, NULL, NULL)")
            params.update(
                {
                    f"s{i}": sid,
                    f"t{i}": tid,
                    f"p{i}": conn.json_in(transition_record(tid, t)),
                    f"n{i}": conn.ts(t.at),
                }
            )
        conn.run(_OUTBOX_INSERT + ", ".join(values), params)
    return out
