"""The DB-API fast path beside SQLAlchemy, shared by the CA ledger and the verifier service.

The hot statements (an issuance's two ledger writes; a challenge's and an
evidence submission's few statements) run on a bare DB-API connection: the
driver executes SQL written once, without SQLAlchemy's per-statement
compilation, result and event machinery, which cost more than SQLite itself.
Everything else keeps using SQLAlchemy on the same engine.

One connection policy: each thread keeps one DB-API connection per
:class:`FastPath`, opened through the engine (so its ``connect`` listeners,
such as SQLite's pragmas, run) and detached from the pool (a checkout and
checkin cost about 11 us per statement group), or for a SQLite file straight
through :mod:`sqlite3` (:meth:`FastPath.sqlite_file`: no SQLAlchemy import).
It is in autocommit mode: a statement outside :meth:`FastConnection.block` is
its own transaction, and a
block is an explicit ``BEGIN``/``COMMIT`` (on PostgreSQL that saves a round
trip before every read). :meth:`FastPath.close` closes every thread's
connection; one that fails is dropped and the thread opens a new one.

One retry rule: a statement that finds the connection gone (a restarted or
terminated PostgreSQL backend, a closed SQLite handle) is retried once, on a
new connection, when nothing of a transaction was done on the old one (a
statement outside a block, or the ``BEGIN`` itself). A failure inside a block,
or a second failure, is a :class:`~vtpm_core.errors.StateError` naming the
database.

One error mapping (:func:`project_error`): a constraint violation becomes a
:class:`~vtpm_core.errors.ConstraintError` (the callers turn that into their
own answer: "the EK is taken", "the attester is gone"); every other driver
error a :class:`~vtpm_core.errors.StateError`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vtpm_core.errors import ConstraintError, StateError, UnavailableError, VtpmTrustError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["FastConnection", "FastPath", "project_error"]

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def project_error(dbapi: Any, exc: BaseException, what: str) -> VtpmTrustError:
    """The project's error for driver error ``exc`` of module ``dbapi`` (sqlite3, psycopg)."""
    if isinstance(exc, dbapi.IntegrityError):
        return ConstraintError(f"{what}: constraint violated: {exc}")
    return UnavailableError(f"{what} unavailable: {exc}")


class FastConnection:
    """One thread's autocommit DB-API connection with one reused cursor.

    SQL uses ``:name`` parameters (translated once per statement text for
    psycopg's ``%(name)s``).
    """

    __slots__ = ("_conn", "_cursor", "_generation", "_owner", "_raw", "in_block")

    def __init__(self, owner: FastPath, generation: int) -> None:
        self._owner = owner
        self._generation = generation
        self._raw: Any = None
        self._conn: Any = None
        self._cursor: Any = None
        self.in_block = False
        self._connect()

    def _connect(self) -> None:
        owner = self._owner
        raw, conn = owner.open()
        if owner.on_connect is not None:
            owner.on_connect(conn)
        self._raw, self._conn, self._cursor = raw, conn, conn.cursor()
        owner._hold(raw)

    def _drop(self) -> None:
        raw, self._raw = self._raw, None
        self.in_block = False
        if raw is not None:
            self._owner._release(raw)
            # the driver's connection itself, not the pool's wrapper: that would roll
            # back first and, on a connection the server cut, log a traceback for it
            with contextlib.suppress(Exception):  # it failed already; the caller raises
                self._conn.close()

    def execute(self, sql: str, params: Mapping[str, Any] | tuple[()] = ()) -> Any:
        """Run one statement; the cursor (fetch from it before the next statement)."""
        owner = self._owner
        stmt = owner.translate(sql)
        dbapi = owner.dbapi
        if self._raw is None:
            self._connect()
        try:
            self._cursor.execute(stmt, params)
            return self._cursor
        except dbapi.Error as exc:
            if isinstance(exc, dbapi.IntegrityError):
                raise project_error(dbapi, exc, owner.what) from exc
            retry = not self.in_block and owner.is_disconnect(exc, self._conn)
            self._drop()
            if not retry:
                raise project_error(dbapi, exc, owner.what) from exc
            first = exc
        self._connect()
        try:
            self._cursor.execute(stmt, params)
            return self._cursor
        except dbapi.Error as exc:
            if isinstance(exc, dbapi.IntegrityError):
                raise project_error(dbapi, exc, owner.what) from exc
            self._drop()
            raise StateError(
                f"{owner.what} unavailable: {exc} (after reconnecting, first failure: {first})"
            ) from exc

    def one(self, sql: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def run(self, sql: str, params: Mapping[str, Any]) -> int:
        """Execute a statement; the number of rows it changed."""
        return int(self.execute(sql, params).rowcount)

    @contextmanager
    def block(self, *, immediate: bool = True) -> Iterator[None]:
        """One transaction: committed when the block ends, rolled back when it raises.
        On SQLite ``immediate`` takes the write lock at ``BEGIN``."""
        self.execute("BEGIN IMMEDIATE" if self._owner.sqlite and immediate else "BEGIN")
        self.in_block = True
        try:
            yield
        except BaseException:
            self._end("ROLLBACK")
            raise
        self._end("COMMIT")

    def _end(self, command: str) -> None:
        self.in_block = False
        if self._raw is None:
            return  # dropped on a failure inside the block: nothing to end
        try:
            self._cursor.execute(command)
        except self._owner.dbapi.Error as exc:
            self._drop()
            raise project_error(self._owner.dbapi, exc, self._owner.what) from exc

    def reset(self) -> None:
        """Roll back a block left open (a caller that stopped midway)."""
        if self.in_block:
            self._end("ROLLBACK")


class FastPath:
    """The per-thread fast connections of one engine (see the module docstring).

    ``what`` names the database in errors ("ledger", "verifier database");
    ``on_connect`` runs on each new DB-API connection.
    """

    def __init__(
        self,
        what: str,
        *,
        sqlite: bool,
        dbapi: Any,
        connect: Callable[[], tuple[Any, Any]],
        is_disconnect: Callable[[BaseException, Any], bool],
        on_connect: Callable[[Any], None] | None = None,
    ) -> None:
        self.what = what
        self.sqlite = sqlite
        self.dbapi = dbapi
        self._open = connect
        self._is_disconnect = is_disconnect
        self.on_connect = on_connect
        self._translated: dict[str, str] = {}
        self._local = threading.local()
        self._held: list[Any] = []
        self._lock = threading.Lock()
        self._generation = 0

    @classmethod
    def over_engine(
        cls, engine: Engine, what: str, on_connect: Callable[[Any], None] | None = None
    ) -> FastPath:
        """Connections opened through ``engine`` (its ``connect`` listeners run), detached."""
        dialect = engine.dialect
        if dialect.name not in ("sqlite", "postgresql"):
            raise StateError(f"{what}: no fast path for database {dialect.name!r}")
        sqlite = dialect.name == "sqlite"

        def connect() -> tuple[Any, Any]:
            try:
                raw = engine.raw_connection()
            except Exception as exc:  # sqlalchemy wraps the driver's error
                raise UnavailableError(f"{what} unavailable: {getattr(exc, 'orig', exc)}") from exc
            raw.detach()
            conn: Any = raw.dbapi_connection
            if sqlite:
                conn.isolation_level = None  # no implicit BEGIN: explicit blocks only
            else:
                conn.rollback()  # whatever the dialect's first-connect queries began
                conn.autocommit = True
            return raw, conn

        return cls(
            what,
            sqlite=sqlite,
            dbapi=dialect.loaded_dbapi,
            connect=connect,
            is_disconnect=lambda exc, conn: bool(dialect.is_disconnect(exc, conn, None)),  # type: ignore[arg-type]
            on_connect=on_connect,
        )

    @classmethod
    def sqlite_file(
        cls,
        path: str,
        what: str,
        pragmas: tuple[str, ...],
        on_connect: Callable[[Any], None] | None = None,
    ) -> FastPath:
        """Connections to one SQLite file straight through :mod:`sqlite3` (no SQLAlchemy
        import: a one-shot command's cold start), each set up with ``pragmas``."""
        import sqlite3

        def connect() -> tuple[Any, Any]:
            try:
                # closed by close() from whichever thread calls it
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                for pragma in pragmas:
                    conn.execute(f"PRAGMA {pragma}").close()
            except sqlite3.Error as exc:
                raise UnavailableError(f"{what} unavailable: {path}: {exc}") from exc
            return conn, conn

        def is_disconnect(exc: BaseException, _conn: Any) -> bool:
            # the rule of SQLAlchemy's pysqlite dialect: a closed handle is a lost connection
            return isinstance(exc, sqlite3.ProgrammingError) and "closed database" in str(exc)

        return cls(
            what,
            sqlite=True,
            dbapi=sqlite3,
            connect=connect,
            is_disconnect=is_disconnect,
            on_connect=on_connect,
        )

    def open(self) -> tuple[Any, Any]:
        """A new DB-API connection in autocommit mode: (what to close, the connection)."""
        return self._open()

    def is_disconnect(self, exc: BaseException, conn: Any) -> bool:
        return self._is_disconnect(exc, conn)

    def translate(self, sql: str) -> str:
        """``:name`` parameters in the driver's style (psycopg: ``%(name)s``), cached."""
        out = self._translated.get(sql)
        if out is None:
            out = sql if self.sqlite else _PARAM.sub(r"%(\1)s", sql)
            self._translated[sql] = out
        return out

    def connection(self) -> FastConnection:
        """This thread's connection (opened on first use, and after close())."""
        conn: FastConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn._generation != self._generation:
            conn = FastConnection(self, self._generation)
            self._local.conn = conn
        return conn

    def _hold(self, raw: Any) -> None:
        with self._lock:
            self._held.append(raw)

    def _release(self, raw: Any) -> None:
        with self._lock:
            if raw in self._held:
                self._held.remove(raw)

    def close(self) -> None:
        """Close every thread's connection (call when no thread is using one)."""
        with self._lock:
            held, self._held = self._held, []
            self._generation += 1
        for raw in held:
            with contextlib.suppress(Exception):
                raw.close()
