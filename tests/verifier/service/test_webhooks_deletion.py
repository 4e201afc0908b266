"""Deleting an attester or a webhook subscription while deliveries are queued (issue 16).

Nothing recorded is lost silently: a deleted attester's queued transitions are still
delivered (the outbox row carries the whole record); a deleted subscription matches
no new transition but what it was owed still goes out, or, when the deletion
discards it, is marked dead with the reason. Transition and delivery ids are never
reused (SQLite AUTOINCREMENT, migration 0010). SQLite and PostgreSQL, the in-process
app's routes, a real receiver process, the delivery rounds run in the test's thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update

from tests._server import free_port
from tests.verifier.service.test_webhooks_outbox import (
    FAST,
    Receiver,
    _attester,
    _drain,
    _outbox,
    _subscribe,
    _transition,
    url,
    utc,
)
from verifier.service import create_app, init_home, load_config
from verifier.service.db import Database
from verifier.service.delivery import deliver_round
from verifier.service.models import WebhookOutbox, WebhookSubscription
from verifier.service.retention import RetentionPolicy, prune

__all__ = ["url"]  # the fixture: SQLite and PostgreSQL


class Api:
    def __init__(self, client: FlaskClient, admin: str, db: Database) -> None:
        self.client, self.admin, self.db = client, admin, db

    def __call__(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return self.client.open(path, method=method, headers=headers, **kw)


@pytest.fixture
def api(url: str, tmp_path: Path) -> Iterator[Api]:
    home = tmp_path / "home"
    admin = init_home(home, verifier_id="t")
    cfg = home / "verifier.yaml"
    cfg.write_text(cfg.read_text() + "webhook_poll_ms: 600000\n")  # rounds run here
    app = create_app(load_config(home, database_url=url), migrate=True)
    ext = app.extensions["vtpm_verifier"]
    try:
        yield Api(app.test_client(), admin, ext["db"])
    finally:
        for worker in ("pruner", "sweeper", "deliverer"):
            if worker in ext:
                ext[worker].stop()
        ext["db"].dispose()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(free_port(), tmp_path / "received.jsonl", tmp_path / "status")
    try:
        yield r.start()
    finally:
        r.stop()


def _bodies(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(h["body"]) for h in receiver.requests() if h["status"] == 200]


def test_deleted_attesters_queued_transition_is_still_delivered(
    api: Api, receiver: Receiver
) -> None:
    db = api.db
    receiver.status(503)
    _attester(db, "a1")
    _subscribe(db, receiver.url)
    tid = _transition(db, "a1")
    deliver_round(db, FAST, utc)  # one failed attempt: queued, pending
    [row] = _outbox(db)
    assert (row.state, row.attempts) == ("pending", 1)

    assert api("DELETE", "/v1/attesters/a1").status_code == 204
    assert api("GET", "/v1/attesters/a1/history").status_code == 404  # the history went

    receiver.status(200)
    _drain(db, lambda: len(_bodies(receiver)) == 1)
    [body] = _bodies(receiver)
    assert (body["attester_id"], body["transition_id"], body["to_state"]) == ("a1", tid, "failed")
    assert body["cause"]["failures"] == ["pcr.7"]
    assert [r.state for r in _outbox(db)] == ["delivered"]

    # the deleted transition's id (the newest) is not handed out again: on SQLite it
    # was, and the new delivery collided with UNIQUE (subscription_id, transition_id)
    _attester(db, "a2")
    tid2 = _transition(db, "a2")
    assert tid2 > tid
    ids = [r.id for r in _outbox(db)]
    assert len(ids) == 2 and ids[1] > ids[0]


def test_deleted_subscription_still_delivers_what_it_was_owed(api: Api, receiver: Receiver) -> None:
    db = api.db
    receiver.status(503)
    _attester(db, "a1")
    sub = _subscribe(db, receiver.url)
    tid = _transition(db, "a1")
    deliver_round(db, FAST, utc)

    r = api("DELETE", f"/v1/webhooks/{sub}")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert (r.get_json()["queued"], r.get_json()["discarded"]) == (1, 0)
    assert api("GET", "/v1/webhooks").get_json()["webhooks"] == []
    assert api("DELETE", f"/v1/webhooks/{sub}").status_code == 404
    # a transition recorded after the deletion is queued for nobody
    _transition(db, "a1", to="trusted", frm="failed")
    assert len(_outbox(db)) == 1

    receiver.status(200)
    _drain(db, lambda: len(_bodies(receiver)) == 1)
    assert [b["transition_id"] for b in _bodies(receiver)] == [tid]
    [row] = api("GET", f"/v1/webhook-deliveries?webhook={sub}").get_json()["deliveries"]
    assert row["state"] == "delivered"
    r = api("POST", f"/v1/webhook-deliveries/{row['id']}/redeliver")
    assert r.status_code == 409 and "subscription was deleted" in r.get_json()["detail"]

    # retention drops the delivered row, then the tombstone with it
    later = utc() + timedelta(days=2)
    policy = RetentionPolicy(keep_results=None, keep_delivered=timedelta(days=1))
    counts = prune(db, policy, later)
    assert (counts.deliveries, counts.subscriptions) == (1, 1)
    with db.read() as s:
        assert s.get(WebhookSubscription, sub) is None
    assert _outbox(db) == []


def test_discarded_and_disabled_deliveries_are_marked_dead_not_sent(
    api: Api, receiver: Receiver
) -> None:
    db = api.db
    receiver.status(503)
    _attester(db, "a1")
    s1, s2 = _subscribe(db, receiver.url), _subscribe(db, receiver.url + "/2")
    _transition(db, "a1")
    deliver_round(db, FAST, utc)  # both attempted once, both failed
    sent = len(receiver.requests())

    assert api("DELETE", f"/v1/webhooks/{s1}?queued=later").status_code == 400
    r = api("DELETE", f"/v1/webhooks/{s1}?queued=discard")
    assert r.status_code == 200 and (r.get_json()["queued"], r.get_json()["discarded"]) == (0, 1)
    with db.transaction() as s:  # held: disabled after its delivery was queued
        s.execute(
            update(WebhookSubscription).where(WebhookSubscription.id == s2).values(enabled=False)
        )
    r = api("DELETE", f"/v1/webhooks/{s2}")
    assert r.status_code == 200 and r.get_json()["discarded"] == 1

    receiver.status(200)
    rows = {row.subscription_id: row for row in _outbox(db)}
    assert {r.state for r in rows.values()} == {"dead"}
    assert rows[s1].last_error == "discarded: subscription deleted"
    assert rows[s2].last_error == "discarded: subscription deleted while disabled"
    dead = api("GET", "/v1/webhook-deliveries?state=dead").get_json()["deliveries"]
    assert {d["subscription_id"] for d in dead} == {s1, s2}
    assert deliver_round(db, FAST, utc) == (0, 0)
    assert len(receiver.requests()) == sent  # nothing sent after the deletion

    # dead letters outlive the delivered window; the tombstones go with them
    policy = RetentionPolicy(
        keep_results=None, keep_delivered=timedelta(days=1), keep_dead=timedelta(days=30)
    )
    assert prune(db, policy, utc() + timedelta(days=2)).deliveries == 0
    counts = prune(db, policy, utc() + timedelta(days=31))
    assert (counts.deliveries, counts.subscriptions) == (2, 2)


def test_subscription_without_deliveries_is_deleted_at_once(api: Api) -> None:
    sub = _subscribe(api.db, "http://127.0.0.1:9/h")
    r = api("DELETE", f"/v1/webhooks/{sub}")
    assert r.status_code == 200 and r.get_json()["queued"] == 0
    with api.db.read() as s:
        assert s.get(WebhookSubscription, sub) is None
        assert s.query(WebhookOutbox).count() == 0
