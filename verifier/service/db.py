"""Database engines, transactions and Alembic migrations of the attestation service.

SQLite (the embedded default) runs in WAL mode with ``BEGIN IMMEDIATE`` for
every transaction: a writer takes the database lock when it begins, so two
processes never both read a nonce as unused and then race to write
(SQLite, "Write-Ahead Logging" and "BEGIN TRANSACTION", section 2). On
PostgreSQL the conditional ``UPDATE ... WHERE used = false`` takes a row lock,
so the second of two concurrent updates re-checks the predicate after the
first commits and matches no row (PostgreSQL 15 manual, section 13.2.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from vtpm_core.errors import ConfigError

__all__ = ["Database", "make_engine", "schema_is_current", "upgrade"]

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


class Database:
    """An engine and its session factory; ``transaction()`` is the unit of work."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
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

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()
