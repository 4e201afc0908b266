"""Retention: old results, long-expired nonces, settled webhook deliveries (delivered, then
dead after longer) and emptied subscription tombstones are deleted in batches; nothing
else is."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select, text

from verifier.service.app import create_app
from verifier.service.config import init_home, load_config
from verifier.service.db import Database, upgrade
from verifier.service.models import (
    Attester,
    Nonce,
    Result,
    WebhookOutbox,
    WebhookSubscription,
)
from verifier.service.retention import _LOCK_KEY, Pruner, RetentionPolicy, prune
from verifier.service.transitions import NewTransition, record
from vtpm_core.errors import ConfigError

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgres":
        make: Callable[[], str] = request.getfixturevalue("pg_database")
        url = make()
    else:
        url = f"sqlite:///{tmp_path / 'verifier.db'}"
    database = Database(url)
    upgrade(database.engine)
    yield database
    database.dispose()


def _seed(db: Database, attesters: int, minutes: int) -> None:
    """``attesters`` with one result and one spent nonce a minute for ``minutes`` before NOW."""
    with db.transaction() as s:
        for a in range(attesters):
            s.add(
                Attester(
                    id=f"att-{a}",
                    ek_fingerprint=f"{a:064x}",
                    ek_public=b"ek",
                    identity={},
                    ak_public=b"ak",
                    ak_name="000b" + "00" * 32,
                    status="active",
                    flags=[],
                    created_at=NOW - timedelta(days=3),
                )
            )
        s.flush()
        for a in range(attesters):
            for m in range(minutes, 0, -1):
                at = NOW - timedelta(minutes=m)
                key = f"{a:04x}{m:08x}"
                s.add(
                    Nonce(
                        nonce=key,
                        attester_id=f"att-{a}",
                        pcr_selection={},
                        created_at=at,
                        expires_at=at + timedelta(minutes=2),
                        used=True,
                        used_at=at,
                    )
                )
                s.add(
                    Result(
                        attester_id=f"att-{a}",
                        created_at=at,
                        status="affirming",
                        nonce=key,
                        report={},
                        ear="x",
                    )
                )
        s.flush()
        for a in range(attesters):
            latest = s.execute(
                select(func.max(Result.id)).where(Result.attester_id == f"att-{a}")
            ).scalar_one()
            s.get_one(Attester, f"att-{a}").latest_result_id = latest


def test_prune_keeps_recent_rows_and_each_latest_result(db: Database) -> None:
    _seed(db, attesters=3, minutes=100)
    policy = RetentionPolicy(
        keep_results=timedelta(minutes=30), keep_nonces=timedelta(minutes=60), batch=7
    )
    counts = prune(db, policy, NOW)
    # results at minutes 100..31 before NOW go (70 per attester): 210 in batches of 7
    assert counts.results == 210
    # nonces expire 2 min after creation: those created 100..63 minutes ago (38 each)
    assert counts.nonces == 3 * 38
    assert counts.batches == 30 + 17  # ceil(210 / 7) and ceil(114 / 7)
    with db.read() as s:
        oldest = s.execute(select(func.min(Result.created_at))).scalar_one()
        assert oldest == NOW - timedelta(minutes=30)
        assert s.execute(select(func.count(Result.id))).scalar_one() == 3 * 30
        for a in s.execute(select(Attester)).scalars():
            assert a.latest_result_id is not None
            assert s.get(Result, a.latest_result_id) is not None
        assert s.execute(select(func.count()).select_from(Nonce)).scalar_one() == 3 * 62
    # a second run finds nothing left to delete
    again = prune(db, policy, NOW)
    assert (again.results, again.nonces, again.batches) == (0, 0, 0)


def test_prune_never_deletes_an_attesters_latest_result(db: Database) -> None:
    _seed(db, attesters=2, minutes=5)
    # everything is older than the window; only the two latest results stay
    counts = prune(db, RetentionPolicy(keep_results=timedelta(seconds=1), batch=3), NOW)
    assert counts.results == 2 * 4
    with db.read() as s:
        left = set(s.execute(select(Result.id)).scalars())
        assert left == {a.latest_result_id for a in s.execute(select(Attester)).scalars()}


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"keep_results": timedelta(0)}, "keep_results"),
        ({"keep_results": timedelta(days=1), "batch": 0}, "batch"),
        ({"keep_results": timedelta(days=1), "keep_nonces": timedelta(seconds=-1)}, "keep_nonces"),
        ({"keep_results": None, "keep_delivered": timedelta(0)}, "keep_delivered must be"),
        (
            {"keep_results": None, "keep_delivered": timedelta(days=7), "keep_dead": timedelta(1)},
            "keep_dead must be at least keep_delivered",
        ),
        ({"keep_results": None, "keep_dead": timedelta(days=7)}, "keep_dead must be at least"),
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, object], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_pruner_thread_prunes_in_the_background(db: Database) -> None:
    _seed(db, attesters=2, minutes=10)
    policy = RetentionPolicy(keep_results=timedelta(minutes=3), batch=4, interval_s=0.05)
    pruner = Pruner(db, policy, now=lambda: NOW).start()
    try:
        deadline = time.monotonic() + 20
        while pruner.rounds < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pruner.stop()
    assert pruner.rounds >= 1
    assert pruner.failures == 0
    with db.read() as s:
        assert s.execute(select(func.count(Result.id))).scalar_one() == 2 * 3


@pytest.mark.postgres
def test_second_pruner_skips_while_another_holds_the_lock(
    pg_database: Callable[[], str],
) -> None:
    url = pg_database()
    db = Database(url)
    try:
        upgrade(db.engine)
        _seed(db, attesters=1, minutes=5)
        policy = RetentionPolicy(keep_results=timedelta(seconds=1))
        with db.engine.connect() as other, other.begin():
            assert other.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            skipped = prune(db, policy, NOW)
        assert (skipped.results, skipped.nonces, skipped.batches) == (0, 0, 0)
        done = prune(db, policy, NOW)
        assert done.results == 4
    finally:
        db.dispose()


def test_service_config_reads_retention(tmp_path: Path) -> None:
    init_home(tmp_path / "home")
    cfg_file = tmp_path / "home" / "verifier.yaml"
    raw = yaml.safe_load(cfg_file.read_text())
    assert (cfg0 := load_config(tmp_path / "home")).webhook_keep_delivered_days == 7
    assert cfg0.webhook_keep_dead_days == 30  # the defaults: the outbox is bounded
    raw.update(retention_days=14, retention_interval_s=60, retention_batch=500)
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "home")
    assert (cfg.retention_days, cfg.retention_interval_s, cfg.retention_batch) == (14, 60, 500)
    # the app starts its pruner from that configuration, and none without it
    app = create_app(cfg, migrate=True)
    ext = app.extensions["vtpm_verifier"]
    pruner = ext["pruner"]
    assert isinstance(pruner, Pruner)
    assert pruner.is_alive()
    pruner.stop()
    assert not pruner.is_alive()
    ext["db"].dispose()
    raw.update(retention_days=0, webhook_keep_delivered_days=0, webhook_keep_dead_days=0)
    cfg_file.write_text(yaml.safe_dump(raw))
    plain = create_app(load_config(tmp_path / "home"), migrate=True)
    assert "pruner" not in plain.extensions["vtpm_verifier"]
    plain.extensions["vtpm_verifier"]["db"].dispose()
    for bad, message in [
        ({"webhook_keep_delivered_days": 7, "webhook_keep_dead_days": 3}, "at least"),
        ({"webhook_keep_delivered_days": 0, "webhook_keep_dead_days": 3}, "0 keeps for ever"),
        ({"webhook_keep_delivered_days": -1}, "webhook_keep_delivered_days must be an integer"),
    ]:
        cfg_file.write_text(yaml.safe_dump({**raw, **bad}))
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "home")
    raw["retention_days"] = -1
    cfg_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="retention_days"):
        load_config(tmp_path / "home")


def _seed_outbox(db: Database) -> dict[str, list[int]]:
    """One subscription's deliveries, ``{kind: [ids]}``, ages counted from NOW."""
    with db.transaction() as s:
        s.add(
            WebhookSubscription(
                id="sub", url="http://127.0.0.1:9/h", secret="x" * 16, events=["*"],
                enabled=True, created_at=NOW - timedelta(days=90),
            )
        )  # fmt: skip
    rows: dict[str, list[tuple[str, float]]] = {
        # state, age in days of next_attempt_at, kind
        "delivered-old": [("delivered", 3)] * 5,
        "delivered-new": [("delivered", 0.5)] * 2,
        "dead-old": [("dead", 40)] * 2,
        "dead-kept": [("dead", 3)] * 2,  # older than the delivered window: kept
        "undelivered-old": [("pending", 60), ("delivering", 60)],  # never pruned
    }
    ids: dict[str, list[int]] = {}
    tid = 0
    with db.transaction() as s:
        for kind, specs in rows.items():
            for state, age in specs:
                tid += 1
                row = WebhookOutbox(
                    subscription_id="sub", transition_id=tid, payload={"transition_id": tid},
                    state=state, attempts=1, next_attempt_at=NOW - timedelta(days=age),
                    delivered_at=NOW - timedelta(days=age) if state == "delivered" else None,
                )  # fmt: skip
                s.add(row)
                s.flush()
                ids.setdefault(kind, []).append(row.id)
    return ids


OUTBOX_POLICY = RetentionPolicy(
    keep_results=None, keep_delivered=timedelta(days=1), keep_dead=timedelta(days=30), batch=2
)


def test_prune_settled_deliveries_delivered_then_dead_after_longer(db: Database) -> None:
    ids = _seed_outbox(db)
    counts = prune(db, OUTBOX_POLICY, NOW)
    assert (counts.deliveries, counts.results, counts.subscriptions) == (5 + 2, 0, 0)
    assert counts.batches == 3 + 1  # 5 delivered in batches of 2, then 2 dead
    with db.read() as s:
        left = set(s.execute(select(WebhookOutbox.id)).scalars())
    kept = ids["delivered-new"] + ids["dead-kept"] + ids["undelivered-old"]
    assert left == set(kept)
    again = prune(db, OUTBOX_POLICY, NOW)
    assert (again.deliveries, again.batches) == (0, 0)
    # keeping everything (no windows) deletes nothing, whatever the age
    forever = RetentionPolicy(keep_results=None)
    assert prune(db, forever, NOW + timedelta(days=3650)).deliveries == 0


def test_pruned_newest_delivery_id_is_not_reused(db: Database) -> None:
    """A delivery id is a receiver's idempotency key: after the newest rows are pruned,
    the next delivery still gets a new id (SQLite AUTOINCREMENT, migration 0010)."""
    ids = _seed_outbox(db)
    newest = max(i for group in ids.values() for i in group)
    with db.transaction() as s:  # make the newest row an old delivered one
        row = s.get_one(WebhookOutbox, newest)
        row.state, row.next_attempt_at = "delivered", NOW - timedelta(days=5)
    prune(db, OUTBOX_POLICY, NOW)
    with db.read() as s:
        assert s.get(WebhookOutbox, newest) is None
    _seed(db, attesters=1, minutes=1)
    with db.raw() as conn, conn.write():
        [tid] = record(conn, [NewTransition("att-0", "unknown", "trusted", NOW, {}, None)])
    with db.read() as s:
        new = s.execute(
            select(WebhookOutbox.id).where(WebhookOutbox.transition_id == tid)
        ).scalar_one()
    assert new > newest


def test_prune_drops_a_deleted_subscription_with_its_last_delivery(db: Database) -> None:
    _seed_outbox(db)
    with db.transaction() as s:
        s.get_one(WebhookSubscription, "sub").deleted_at = NOW
        # its undelivered rows were discarded by the deletion (marked dead)
        for row in s.scalars(select(WebhookOutbox).where(WebhookOutbox.state != "delivered")).all():
            row.state = "dead"
    assert prune(db, OUTBOX_POLICY, NOW).subscriptions == 0  # dead letters still kept
    counts = prune(db, OUTBOX_POLICY, NOW + timedelta(days=61))
    assert counts.subscriptions == 1
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(WebhookOutbox)).scalar_one() == 0
        assert s.get(WebhookSubscription, "sub") is None
