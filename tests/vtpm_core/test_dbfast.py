"""The shared DB-API fast path on SQLite and PostgreSQL: autocommit statements and blocks,
constraint violations as ConstraintError, and the one retry on a lost connection (a
terminated backend, a stopped server): once it works, a second failure is a StateError."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests._pgcluster import PgCluster
from vtpm_core.dbfast import FastPath
from vtpm_core.errors import ConstraintError, StateError


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fast(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FastPath]:
    url = (
        f"sqlite:///{tmp_path / 'fast.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = sa.create_engine(url)
    table = f"t_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (k VARCHAR(8) PRIMARY KEY, v INTEGER)")
    path = FastPath(engine, "test database")
    path.table = table  # type: ignore[attr-defined]
    try:
        yield path
    finally:
        path.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        engine.dispose()


def _terminate(fast: FastPath) -> None:
    """Kill the server side of this thread's connection (PostgreSQL) or close it (SQLite)."""
    conn = fast.connection()
    if fast.sqlite:
        conn._conn.close()
        return
    pid = conn.one("SELECT pg_backend_pid()", {})
    assert pid is not None
    admin = sa.create_engine(fast.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            assert c.exec_driver_sql(f"SELECT pg_terminate_backend({pid[0]})").scalar() is True
    finally:
        admin.dispose()


def test_statements_blocks_and_constraints(fast: FastPath) -> None:
    table = fast.table  # type: ignore[attr-defined]
    conn = fast.connection()
    assert conn.run(f"INSERT INTO {table} (k, v) VALUES (:k, :v)", {"k": "a", "v": 1}) == 1
    with pytest.raises(ConstraintError, match="test database: constraint violated"):
        conn.run(f"INSERT INTO {table} (k, v) VALUES (:k, :v)", {"k": "a", "v": 2})
    with pytest.raises(RuntimeError), conn.block():
        conn.run(f"UPDATE {table} SET v = :v WHERE k = :k", {"k": "a", "v": 9})
        raise RuntimeError("rolled back")
    assert conn.one(f"SELECT v FROM {table} WHERE k = :k", {"k": "a"}) == (1,)
    with conn.block():
        conn.run(f"UPDATE {table} SET v = :v WHERE k = :k", {"k": "a", "v": 3})
    # another thread has its own connection and sees what was committed
    seen: list[object] = []
    thread = threading.Thread(
        target=lambda: seen.append(
            (fast.connection() is not conn, fast.connection().one(f"SELECT v FROM {table}", {}))
        )
    )
    thread.start()
    thread.join()
    assert seen == [(True, (3,))]


def test_lost_connection_is_retried_once(fast: FastPath) -> None:
    table = fast.table  # type: ignore[attr-defined]
    before = fast.connection()._conn
    _terminate(fast)
    conn = fast.connection()
    assert conn.run(f"INSERT INTO {table} (k, v) VALUES (:k, :v)", {"k": "b", "v": 1}) == 1
    assert conn._conn is not before
    assert conn.one(f"SELECT v FROM {table} WHERE k = :k", {"k": "b"}) == (1,)


def test_lost_connection_inside_a_block_is_not_retried(fast: FastPath) -> None:
    table = fast.table  # type: ignore[attr-defined]
    conn = fast.connection()
    with pytest.raises(StateError, match="test database unavailable"), conn.block():
        conn.run(f"INSERT INTO {table} (k, v) VALUES (:k, :v)", {"k": "c", "v": 1})
        _terminate(fast)
        conn.run(f"INSERT INTO {table} (k, v) VALUES (:k, :v)", {"k": "d", "v": 1})
    # nothing of the block landed; the next statement reconnects
    assert conn.one(f"SELECT count(*) FROM {table}", {}) == (0,)


@pytest.mark.postgres
def test_second_failure_is_a_state_error(tmp_path: Path) -> None:
    """The server goes away: the retry's reconnect fails too, and that is a clear error;
    once it is back the same FastPath works again."""
    with PgCluster.create(tmp_path) as pg:
        engine = sa.create_engine(pg.url())
        fast = FastPath(engine, "verifier database")
        try:
            assert fast.connection().one("SELECT 1", {}) == (1,)
            pg.stop()
            with pytest.raises(StateError, match="verifier database unavailable") as caught:
                fast.connection().one("SELECT 1", {})
            assert "Traceback" not in str(caught.value)
            pg.start()
            assert fast.connection().one("SELECT 1", {}) == (1,)
        finally:
            fast.close()
            engine.dispose()
