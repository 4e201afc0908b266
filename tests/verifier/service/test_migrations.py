"""Migrations on SQLite and PostgreSQL: the models match the latest revision, 0005
gives existing attesters the state of their latest result, 0010 keeps outbox ids unique
for good (issue 16)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, delete, insert, select, table

from verifier.service.db import Database, _alembic_config, upgrade
from verifier.service.models import (
    Attester,
    AttesterTransition,
    Base,
    Result,
    WebhookOutbox,
    WebhookSubscription,
)

T0 = datetime(2026, 12, 5, 12, 0, 0, 250000, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgres":
        make: Callable[[], str] = request.getfixturevalue("pg_database")
        url = make()
    else:
        url = f"sqlite:///{tmp_path / 'verifier.db'}"
    database = Database(url)
    yield database
    database.dispose()


def _to(db: Database, revision: str, *, down: bool = False) -> None:
    cfg = _alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


# the expression index of 0002 (coalesce(vm_id, '')) cannot be reflected, so not compared
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
def test_models_match_the_latest_migration(db: Database) -> None:
    upgrade(db.engine)
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(ctx, Base.metadata)
    assert diffs == []


def _attester(aid: str) -> dict[str, object]:
    return {
        "id": aid,
        "vm_id": aid,
        "ek_fingerprint": f"{len(aid):064x}",
        "ek_public": b"ek",
        "identity": {},
        "ak_public": b"ak",
        "ak_name": "00",
        "status": "active",
        "flags": [],
        "created_at": T0 - timedelta(days=1),
    }


def test_0005_backfills_state_from_the_latest_result(db: Database) -> None:
    """An attester whose latest result affirmed is trusted since that result, with the
    default deadline after it; a contraindicated one is failed; one without results stays
    unknown. Each backfilled state is one recorded transition."""
    _to(db, "0004")
    with db.engine.begin() as conn:
        # the attesters table as 0004 left it: the columns _attester() names
        now = Attester.__table__.c
        old = table(
            "attesters", *(column(n, now[n].type) for n in [*_attester("x"), "latest_result_id"])
        )
        for aid in ("good", "bad", "new"):
            conn.execute(insert(old).values(_attester(aid)))
        ids = {}
        for aid, status, at in (
            ("good", "contraindicated", T0 - timedelta(minutes=5)),
            ("good", "warning", T0),
            ("bad", "contraindicated", T0 + timedelta(seconds=1)),
        ):
            ids[aid] = conn.execute(
                insert(Result)
                .values(
                    attester_id=aid,
                    created_at=at,
                    status=status,
                    policy_name=None,
                    nonce="00",
                    report={},
                    ear="x",
                )
                .returning(Result.id)
            ).scalar_one()
        for aid, rid in ids.items():
            conn.execute(old.update().where(old.c.id == aid).values(latest_result_id=rid))
    _to(db, "head")
    with db.read() as s:
        good, bad, new = (s.get_one(Attester, a) for a in ("good", "bad", "new"))
        assert (good.state, good.state_since, good.last_evidence_at) == ("trusted", T0, T0)
        assert good.deadline == T0 + timedelta(seconds=180)
        assert (bad.state, bad.state_since, bad.deadline) == (
            "failed",
            T0 + timedelta(seconds=1),
            None,
        )
        assert (new.state, new.state_since, new.deadline) == ("unknown", None, None)
        history = s.scalars(select(AttesterTransition).order_by(AttesterTransition.id)).all()
        assert [(t.attester_id, t.from_state, t.to_state, t.result_id) for t in history] == [
            ("good", "unknown", "trusted", ids["good"]),
            ("bad", "unknown", "failed", ids["bad"]),
        ]
        assert all(t.cause == {"backfill": "0005"} for t in history)
    # and back down: the columns and the history go, the attesters stay
    _to(db, "0004", down=True)
    with db.engine.connect() as conn:
        names = {r[0] for r in conn.execute(select(old.c.id))}
    assert names == {"good", "bad", "new"}
    _to(db, "head")
    # the round trip kept the expression index of 0002 (a rebuilt SQLite table would not)
    sql = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if db.sqlite
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'attesters'"
    )
    with db.engine.connect() as conn:
        indexes = {r[0] for r in conn.exec_driver_sql(sql)}
    assert {"uq_attesters_ek_vm", "ix_attesters_state_id", "ix_attesters_deadline"} <= indexes


def _result(aid: str, rid: int | None = None) -> dict[str, object]:
    values: dict[str, object] = {
        "attester_id": aid,
        "created_at": T0,
        "status": "affirming",
        "policy_name": None,
        "nonce": "00",
        "report": {},
        "ear": "x",
    }
    if rid is not None:
        values["id"] = rid
    return values


def test_0009_result_ids_pass_2_to_the_31(db: Database) -> None:
    """After 0009 result ids (the key, its sequence, every column naming one) hold values
    past 2^31 - 1 on both backends; 0008 -> 0009 keeps the rows (issue 18)."""
    _to(db, "0008")
    with db.engine.begin() as conn:
        conn.execute(insert(Attester.__table__).values(_attester("big")))
        kept = conn.execute(insert(Result).values(_result("big")).returning(Result.id))
        kept_id = kept.scalar_one()
    _to(db, "head")
    past = 2**31 + 7
    with db.engine.begin() as conn:
        if db.sqlite:
            conn.execute(insert(Result).values(_result("big", past)))
        else:  # the sequence itself must count past 2^31 (serial made it AS integer)
            conn.exec_driver_sql(f"SELECT setval('results_id_seq', {past - 1})")
        rid = conn.execute(insert(Result).values(_result("big")).returning(Result.id)).scalar_one()
        assert rid == past + (1 if db.sqlite else 0)
        conn.execute(
            Attester.__table__.update()
            .where(Attester.__table__.c.id == "big")
            .values(latest_result_id=rid)
        )
        conn.execute(
            insert(AttesterTransition).values(
                attester_id="big",
                at=T0,
                from_state="unknown",
                to_state="trusted",
                result_id=rid,
                cause={},
            )
        )
    with db.read() as s:
        assert s.get_one(Attester, "big").latest_result_id == rid
        ids = s.scalars(select(Result.id).order_by(Result.id)).all()
        assert ids[0] == kept_id and ids[-1] == rid


def test_0010_keeps_the_outbox_and_never_reuses_its_ids(db: Database) -> None:
    """0009 -> 0010 keeps transitions and deliveries with their ids; afterwards deleting
    the newest rows does not hand their ids out again (SQLite rebuilt with AUTOINCREMENT;
    PostgreSQL's sequences never did); subscriptions gain ``deleted_at``; and back down."""
    _to(db, "0009")
    subs = table(
        "webhook_subscriptions",
        *(
            column(n, WebhookSubscription.__table__.c[n].type)
            for n in ("id", "url", "secret", "events", "enabled", "created_at")
        ),
    )
    with db.engine.begin() as conn:
        conn.execute(insert(Attester.__table__).values(_attester("a")))
        tid = conn.execute(
            insert(AttesterTransition)
            .values(attester_id="a", at=T0, from_state="unknown", to_state="trusted", cause={})
            .returning(AttesterTransition.id)
        ).scalar_one()
        conn.execute(
            insert(subs).values(
                id="s", url="http://h", secret="x" * 16, events=["*"], enabled=True, created_at=T0
            )
        )
        oid = conn.execute(
            insert(WebhookOutbox)
            .values(
                subscription_id="s",
                transition_id=tid,
                payload={},
                state="delivered",
                attempts=1,
                next_attempt_at=T0,
            )
            .returning(WebhookOutbox.id)
        ).scalar_one()
    _to(db, "head")
    with db.engine.begin() as conn:
        assert conn.execute(select(WebhookOutbox.id)).scalars().all() == [oid]
        assert conn.execute(select(AttesterTransition.id)).scalars().all() == [tid]
        assert conn.execute(select(WebhookSubscription.deleted_at)).scalars().all() == [None]
        # the newest rows deleted (a pruned delivery, a deleted attester's history)
        conn.execute(delete(WebhookOutbox))
        conn.execute(delete(AttesterTransition))
        tid2 = conn.execute(
            insert(AttesterTransition)
            .values(attester_id="a", at=T0, from_state="unknown", to_state="trusted", cause={})
            .returning(AttesterTransition.id)
        ).scalar_one()
        oid2 = conn.execute(
            insert(WebhookOutbox)
            .values(
                subscription_id="s",
                transition_id=tid2,
                payload={},
                state="pending",
                attempts=0,
                next_attempt_at=T0,
            )
            .returning(WebhookOutbox.id)
        ).scalar_one()
    assert tid2 > tid and oid2 > oid
    _to(db, "0009", down=True)
    with db.engine.connect() as conn:
        assert conn.execute(select(subs.c.id)).scalars().all() == ["s"]
        assert conn.execute(select(WebhookOutbox.__table__.c.id)).scalars().all() == [oid2]
