"""Retention: old results and long-expired nonces are deleted in batches; nothing else is."""

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
from verifier.service.models import Attester, Nonce, Result
from verifier.service.retention import _LOCK_KEY, Pruner, RetentionPolicy, prune
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
    raw["retention_days"] = 0
    cfg_file.write_text(yaml.safe_dump(raw))
    plain = create_app(load_config(tmp_path / "home"), migrate=True)
    assert "pruner" not in plain.extensions["vtpm_verifier"]
    plain.extensions["vtpm_verifier"]["db"].dispose()
    raw["retention_days"] = -1
    cfg_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="retention_days"):
        load_config(tmp_path / "home")
