"""Database engines, transactions and Alembic migrations of the attestation service.

The hot paths (challenge, evidence) run their few statements on the shared
DB-API fast path (:mod:`vtpm_core.dbfast`, through :meth:`Database.raw` and
:class:`RawConnection`): the driver
executes SQL written once, without SQLAlchemy's per-statement compilation,
result and event machinery, which cost more than the statements themselves.
Values are stored exactly as SQLAlchemy stores them (SQLite: naive-UTC
``YYYY-MM-DD HH:MM:SS.ffffff`` text, JSON text, 0/1; PostgreSQL: timestamptz,
json, boolean), so the ORM reads what the hot paths write and the reverse.

SQLite (the embedded default) runs in WAL mode with ``BEGIN IMMEDIATE`` for
every transaction: a writer takes the database lock when it begins, so two
processes never both read a nonce as unused and then race to write
(SQLite, "Write-Ahead Logging" and "BEGIN TRANSACTION", section 2). On
PostgreSQL the conditional ``UPDATE ... WHERE used = false`` takes a row lock,
so the second of two concurrent updates re-checks the predicate after the
first commits and matches no row (PostgreSQL 15 manual, section 13.2.1).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from vtpm_core.dbfast import FastPath
from vtpm_core.errors import ConfigError

__all__ = ["Database", "RawConnection", "make_engine", "schema_is_current", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate transactions."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite would
            # otherwise begin lazily, as DEFERRED)
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # reads see one WAL snapshot without taking the write lock
            readonly = conn.get_execution_options().get("vtpm_readonly", False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    raise ConfigError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (idempotent; serialised on PostgreSQL)."""
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the latest migration."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current == head


class _SqliteWriteQueue:
    """Serialises this service's SQLite writers: a thread mutex, then ``flock`` on a file
    next to the database (every gunicorn worker opens its own).

    SQLite itself lets a writer that finds the database locked sleep in its busy
    handler (1, 2, 5, 10... ms), so contending writers sleep while the lock is
    free most of the time; a write takes ~0.1 ms. Waiting on ``flock`` instead,
    the kernel wakes the next writer when the lock is released. Writers that do
    not take it (migrations, the registration and policy transactions) still
    meet SQLite's own lock and busy timeout: correctness never depends on this.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._mutex = threading.Lock()
        self._fd = -1
        self._pid = 0

    def acquire(self) -> None:
        self._mutex.acquire()
        try:
            if self._pid != os.getpid():  # opened per process (not inherited across fork)
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._mutex.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def close(self) -> None:
        with self._mutex:
            if self._pid == os.getpid() and self._fd >= 0:
                os.close(self._fd)
            self._fd, self._pid = -1, 0


class RawConnection:
    """This thread's fast connection (vtpm_core.dbfast) for one request's hot-path statements.

    SQL uses ``:name`` parameters. Outside :meth:`write` each statement is its
    own transaction (one consistent snapshot); inside it, the block's statements
    are one transaction, SQLite's begun ``IMMEDIATE`` (the write lock first, as
    everywhere else in the service). A statement that finds the database gone
    outside a block (or at its BEGIN) is retried once on a new connection
    (dbfast's one retry rule); constraint violations arrive as ConstraintError.
    """

    __slots__ = ("_conn", "_db", "sqlite")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn = db.fast.connection()
        self.sqlite = db.sqlite

    def one(self, sql: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""
        return self._conn.one(sql, params)

    def all(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row of a query."""
        return [tuple(r) for r in self._conn.execute(sql, params).fetchall()]

    def run(self, sql: str, params: Mapping[str, Any]) -> int:
        """Execute a statement; the number of rows it changed."""
        return self._conn.run(sql, params)

    @contextmanager
    def write(self) -> Iterator[None]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self.writing(), self._conn.block():
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around single-statement writes outside :meth:`write`: on SQLite, wait for
        this service's other writers first (see ``_SqliteWriteQueue``)."""
        queue = self._db.write_queue
        if queue is None:
            yield
            return
        queue.acquire()
        try:
            yield
        finally:
            queue.release()

    def close(self) -> None:
        """Done with the request (an unfinished transaction rolled back)."""
        self._conn.reset()

    @property
    def for_update(self) -> str:
        """Row-lock suffix for a SELECT (SQLite's IMMEDIATE transaction already holds the lock)."""
        return "" if self.sqlite else " FOR UPDATE"

    # values, stored as SQLAlchemy's types store them

    def ts(self, value: datetime) -> Any:
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if self.sqlite:
            return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return value

    def from_ts(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def json_in(self, value: Any) -> Any:
        if self.sqlite:
            return json.dumps(value)
        from psycopg.types.json import Json

        return Json(value)

    @staticmethod
    def json_out(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value


class Database:
    """An engine and its session factory; ``transaction()`` is the unit of work."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sqlite = self.engine.dialect.name == "sqlite"
        # the hot paths' connections (one per thread, retried instead of pre-pinged)
        self.fast = FastPath.over_engine(self.engine, "verifier database")
        database = self.engine.url.database
        self.write_queue = (
            _SqliteWriteQueue(f"{database}.writers")
            if self.sqlite and database and database != ":memory:"
            else None
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(vtpm_readonly=True)
        self._readers = sessionmaker(self._read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work (on SQLite it does not take the write lock)."""
        with self._readers() as session, session.begin():
            yield session

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A bare read-only connection (no ORM session): for single hot-path lookups."""
        with self._read_engine.connect() as conn:
            yield conn

    @contextmanager
    def raw(self) -> Iterator[RawConnection]:
        """This thread's fast DB-API connection for one request's hot-path statements."""
        conn = RawConnection(self)
        try:
            yield conn
        finally:
            conn.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        if self.write_queue is not None:
            self.write_queue.close()
        self.fast.close()
        self.engine.dispose()
