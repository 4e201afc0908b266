"""The issued-certificate ledger (SQLAlchemy Core): SQLite WAL by default, PostgreSQL by URL.

One row per certificate, keyed by serial; a UNIQUE constraint on the EK's
SubjectPublicKeyInfo hash makes "one EK, one certificate" hold across
processes sharing the database (the second INSERT fails, the caller re-reads).
A row is written ``pending`` with the TBSCertificate before the CA key signs
(STYLE "The CA": record what will be signed, then sign once) and becomes
``issued`` with the certificate DER. Bindings record which VMs an EK is bound to
(the certificate row names the original VM; the bindings table adds each clone by copy).

The ledger is complete for what it answers: the status of a serial it never
recorded is ``None`` (OCSP "unknown"), never "good".
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vtpm_core.dbfast import FastPath
from vtpm_core.errors import (
    ConfigError,
    ConflictError,
    ConstraintError,
    NotFoundError,
    StateError,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["CertRecord", "Ledger"]

# RFC 5280 section 5.3.1 CRLReason names (ours: lower-case with hyphens)
REASONS = (
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "certificate-hold",
    "privilege-withdrawn",
    "aa-compromise",
)


@dataclass(frozen=True, slots=True)
class CertRecord:
    serial: int
    ek_name: str | None
    ek_public_sha256: str
    ek_template: str
    key_type: str
    vm_id: str
    vm_name: str
    vtpm_instance_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    status: str  # pending | issued | revoked
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    tbs_der: bytes
    certificate_der: bytes | None


_INSERT_COLUMNS = (
    "serial", "ek_name", "ek_public_sha256", "ek_template", "key_type", "vm_id", "vm_name",
    "vtpm_instance_id", "not_before", "not_after", "status", "tbs_der", "created_at",
)  # fmt: skip
_COMPLETE_PARAMS = ("b_der", "b_serial")  # the UPDATE's parameters, in order


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class _Core:
    """The ledger's SQLAlchemy side: engine, tables and prepared statements.

    Built on first use: a one-shot issuance on a SQLite ledger whose tables
    exist (``vtpm create``) writes through the fast path only and never
    imports SQLAlchemy (about 0.15 s of a cold start).
    """

    def __init__(self, url: str, prefix: str) -> None:
        import sqlalchemy as sa

        try:
            self.engine = sa.create_engine(url)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise StateError(f"cannot open ledger database {url!r}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.meta = sa.MetaData()
        self.certs = sa.Table(
            f"{prefix}certificates",
            self.meta,
            sa.Column("serial", sa.String(42), primary_key=True),  # hex, up to 159 bits
            sa.Column("ek_name", sa.String(140)),
            sa.Column("ek_public_sha256", sa.String(64), nullable=False, unique=True),
            sa.Column("ek_template", sa.String(16), nullable=False),
            sa.Column("key_type", sa.String(32), nullable=False),
            sa.Column("vm_id", sa.String(36), nullable=False),
            sa.Column("vm_name", sa.String(1024), nullable=False),
            sa.Column("vtpm_instance_id", sa.String(1024), nullable=False),
            sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
            sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("revoked_at", sa.DateTime(timezone=True)),
            sa.Column("revocation_reason", sa.String(32)),
            sa.Column("tbs_der", sa.LargeBinary, nullable=False),
            sa.Column("certificate_der", sa.LargeBinary),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        self.bindings = sa.Table(
            f"{prefix}bindings",
            self.meta,
            sa.Column("ek_public_sha256", sa.String(64), primary_key=True),
            sa.Column("vm_id", sa.String(36), primary_key=True),
            sa.Column("serial", sa.String(42), nullable=False),
            sa.Column("kind", sa.String(16), nullable=False),  # original | clone-copy
            sa.Column("clone_of", sa.String(36)),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        self.by_ek = sa.select(self.certs).where(self.certs.c.ek_public_sha256 == sa.bindparam("h"))
        self.by_serial = sa.select(self.certs).where(self.certs.c.serial == sa.bindparam("s"))
        self.insert = self.certs.insert()
        self.complete = (
            self.certs.update()
            .where(self.certs.c.serial == sa.bindparam("b_serial"))
            .where(self.certs.c.status == "pending")
            .values(status="issued", certificate_der=sa.bindparam("b_der"))
        )


def _sqlite_file(url: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URL (None for anything else)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url[len("sqlite:///") :]
    return path if path and path != ":memory:" else None


class Ledger:
    """Ledger tables (optionally name-prefixed, so tests can isolate their tables)."""

    _checkpointer: _Checkpointer | None

    def __init__(self, url: str, *, prefix: str = "ca_") -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", prefix):
            raise ConfigError(f"ledger table prefix {prefix!r}: lower-case letters, digits, _")
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        self.url = url
        self._prefix = prefix
        self._certs_name = f"{prefix}certificates"
        self._bindings_name = f"{prefix}bindings"
        self._core_lock = threading.Lock()
        self._core_built: _Core | None = None
        self._checkpointer = None
        self._checkpointer_lock = threading.Lock()
        # The two writes of every issuance bypass SQLAlchemy's statement execution (it
        # costs ~5x what SQLite itself does): fixed SQL on the shared DB-API fast path
        # (vtpm_core.dbfast: one connection per thread, retried once on a disconnect).
        # sqlite3 and psycopg bind these values as SQLAlchemy's column types do (they
        # have no bind processors there), so Core reads what the fast path writes.
        # Reads and every other write use SQLAlchemy Core.
        path = _sqlite_file(url)
        self._fastpath: FastPath | None
        if path is not None:
            self._sqlite = True
            self._fastpath = FastPath.sqlite_file(
                path, "ledger", _SQLITE_PRAGMAS, self._on_fast_connect
            )
        else:
            engine = self._core.engine  # built now: a bad URL fails here
            self._sqlite = engine.dialect.name == "sqlite"
            self._fastpath = (
                FastPath.over_engine(engine, "ledger", self._on_fast_connect)
                if engine.dialect.name in ("sqlite", "postgresql")
                else None
            )
        self._insert_sql = (
            f"INSERT INTO {self._certs_name} ({', '.join(_INSERT_COLUMNS)}) "  # noqa: S608 - checked prefix
            f"VALUES ({', '.join(':' + c for c in _INSERT_COLUMNS)})"
        )
        self._complete_sql = (
            f"UPDATE {self._certs_name} SET status = 'issued', certificate_der = :b_der "  # noqa: S608
            "WHERE serial = :b_serial AND status = 'pending'"
        )

    @property
    def _core(self) -> _Core:
        core = self._core_built
        if core is None:
            with self._core_lock:
                core = self._core_built
                if core is None:
                    core = self._core_built = _Core(self.url, self._prefix)
        return core

    @property
    def engine(self) -> sa.Engine:
        return self._core.engine

    def create_schema(self) -> None:
        if self._core_built is None and self._fastpath is not None and self._fastpath.sqlite:
            # both tables there (every open but the first): no SQLAlchemy needed
            present = self._fastpath.connection().one(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (:c, :b)",
                {"c": self._certs_name, "b": self._bindings_name},
            )
            if present == (2,):
                return
        self._core.meta.create_all(self._core.engine)

    def drop_schema(self) -> None:
        self._core.meta.drop_all(self._core.engine)

    def close(self) -> None:
        if self._fastpath is not None:
            self._fastpath.close()
        with self._checkpointer_lock:
            checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        if self._core_built is not None:
            self._core_built.engine.dispose()

    # -- reads ---------------------------------------------------------------

    @staticmethod
    def _record(row: Any) -> CertRecord:
        m = row._mapping
        return CertRecord(
            serial=int(m["serial"], 16),
            ek_name=m["ek_name"],
            ek_public_sha256=m["ek_public_sha256"],
            ek_template=m["ek_template"],
            key_type=m["key_type"],
            vm_id=m["vm_id"],
            vm_name=m["vm_name"],
            vtpm_instance_id=m["vtpm_instance_id"],
            not_before=_utc(m["not_before"]),  # type: ignore[arg-type]
            not_after=_utc(m["not_after"]),  # type: ignore[arg-type]
            status=m["status"],
            revoked_at=_utc(m["revoked_at"]),
            revocation_reason=m["revocation_reason"],
            tbs_der=bytes(m["tbs_der"]),
            certificate_der=bytes(m["certificate_der"]) if m["certificate_der"] else None,
        )

    def find_by_ek(self, spki_sha256: str) -> CertRecord | None:
        import sqlalchemy as sa

        try:
            with self.engine.connect() as conn:
                row = conn.execute(self._core.by_ek, {"h": spki_sha256}).first()
        except sa.exc.OperationalError as exc:
            raise StateError(f"ledger unavailable: {exc.orig}") from exc
        return self._record(row) if row is not None else None

    def get(self, serial: int) -> CertRecord:
        with self.engine.connect() as conn:
            row = conn.execute(self._core.by_serial, {"s": f"{serial:x}"}).first()
        if row is None:
            raise NotFoundError(f"no certificate with serial {serial:x}")
        return self._record(row)

    def find(self, serial: int) -> CertRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(self._core.by_serial, {"s": f"{serial:x}"}).first()
        return self._record(row) if row is not None else None

    def all_records(self) -> list[CertRecord]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(self._core.certs).order_by(self._core.certs.c.created_at)
            ).all()
        return [self._record(r) for r in rows]

    def revoked(self) -> list[CertRecord]:
        import sqlalchemy as sa

        query = sa.select(self._core.certs).where(self._core.certs.c.status == "revoked")
        with self.engine.connect() as conn:
            return [self._record(r) for r in conn.execute(query).all()]

    def bindings_of(self, record: CertRecord) -> dict[str, str]:
        """vm_id -> kind for every VM this EK is bound to: the certificate's own VM
        ("original", from the certificate row) and each clone by copy."""
        import sqlalchemy as sa

        query = sa.select(self._core.bindings.c.vm_id, self._core.bindings.c.kind).where(
            self._core.bindings.c.ek_public_sha256 == record.ek_public_sha256
        )
        with self.engine.connect() as conn:
            bound = {r.vm_id: r.kind for r in conn.execute(query).all()}
        bound[record.vm_id] = "original"
        return bound

    # -- writes --------------------------------------------------------------

    def reserve(self, record: CertRecord, now: dt.datetime) -> bool:
        """Insert a ``pending`` row; False if the EK (or, rarely, the serial) is taken."""
        # in _INSERT_COLUMNS order (the fast path binds them by position)
        values = (
            f"{record.serial:x}", record.ek_name, record.ek_public_sha256, record.ek_template,
            record.key_type, record.vm_id, record.vm_name, record.vtpm_instance_id,
            record.not_before, record.not_after, "pending", record.tbs_der, now,
        )  # fmt: skip
        return self._write(self._insert_sql, values, "insert", _INSERT_COLUMNS)

    def complete(self, serial: int, certificate_der: bytes) -> bool:
        """pending -> issued; False when another process completed it first."""
        params = (certificate_der, f"{serial:x}")
        return self._write(self._complete_sql, params, "complete", _COMPLETE_PARAMS)

    def _on_fast_connect(self, connection: Any) -> None:
        if not self._sqlite:
            return
        # the checkpointer thread checkpoints for this connection; its own automatic
        # checkpoint stays as a backstop should that thread fall behind
        cursor = connection.cursor()
        cursor.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_PAGES}")
        cursor.close()
        with self._checkpointer_lock:
            if self._checkpointer is None and self._fastpath is not None:
                self._checkpointer = _Checkpointer(self._fastpath.open)

    def _write(self, sql: str, values: tuple[Any, ...], core: str, names: tuple[str, ...]) -> bool:
        """Run one statement in its own transaction; False on a constraint violation.

        ``values`` are the statement's parameters in ``names``' order; ``core`` names
        the same statement in :class:`_Core` (for databases without a fast path).
        """
        params = dict(zip(names, values, strict=True))
        if self._fastpath is None:
            from sqlalchemy.exc import IntegrityError

            try:
                with self.engine.begin() as conn:
                    return bool(conn.execute(getattr(self._core, core), params).rowcount == 1)
            except IntegrityError:
                return False
        try:
            count = self._fastpath.connection().run(sql, params)
        except ConstraintError:
            return False
        if self._checkpointer is not None:
            self._checkpointer.committed()
        return count == 1

    def bind_clone(self, record: CertRecord, vm_id: str, clone_of: str, now: dt.datetime) -> None:
        """Record a clone by copy: the same EK (same certificate) bound to another VM."""
        from sqlalchemy.exc import IntegrityError

        try:
            with self.engine.begin() as conn:
                conn.execute(
                    self._core.bindings.insert(),
                    {
                        "ek_public_sha256": record.ek_public_sha256,
                        "vm_id": vm_id,
                        "serial": f"{record.serial:x}",
                        "kind": "clone-copy",
                        "clone_of": clone_of,
                        "created_at": now,
                    },
                )
        except IntegrityError:
            return  # the same clone binding recorded concurrently: idempotent

    def revoke(self, serial: int, reason: str, when: dt.datetime) -> CertRecord:
        """issued -> revoked. Revoking again with any reason is refused (ConflictError)."""
        if reason not in REASONS:
            raise ConflictError(
                f"unknown revocation reason {reason!r} (one of {', '.join(REASONS)})"
            )
        record = self.get(serial)
        if record.status == "revoked":
            raise ConflictError(f"certificate {serial:x} is already revoked")
        if record.status != "issued":
            raise ConflictError(f"certificate {serial:x} is {record.status}, not issued")
        query = (
            self._core.certs.update()
            .where(
                self._core.certs.c.serial == f"{serial:x}", self._core.certs.c.status == "issued"
            )
            .values(status="revoked", revoked_at=when, revocation_reason=reason)
        )
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount != 1:
                raise ConflictError(f"certificate {serial:x} changed while revoking")
        return self.get(serial)


# SQLite WAL with synchronous=NORMAL fsyncs only at checkpoints. SQLite's automatic
# checkpoint (every 1000 WAL pages) runs inside the commit that crosses the mark,
# so one issuance in a few hundred waited for two fsyncs (10-20 ms on the build
# machine). The issuance writes instead wake a thread every _CHECKPOINT_EVERY
# commits (about the same number of pages) that runs a PASSIVE checkpoint: the
# same fsync cadence, so the same loss window on power failure, off the request.
_CHECKPOINT_EVERY = 256
_BACKSTOP_PAGES = 10000


class _Checkpointer:
    """One thread per SQLite ledger running PASSIVE WAL checkpoints when woken."""

    def __init__(self, connect: Callable[[], tuple[Any, Any]]) -> None:
        self._connect = connect
        self._commits = 0
        self._wake = threading.Event()
        self._stopping = False
        self.completed = 0  # checkpoints run (for tests and debugging)
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        self._commits += 1  # a lost increment under a race only delays one checkpoint
        if self._commits >= _CHECKPOINT_EVERY:
            self._commits = 0
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        raw, conn = self._connect()
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                cursor = conn.cursor()
                try:
                    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    cursor.fetchall()
                    self.completed += 1
                except Exception:  # noqa: S112 - the backstop checkpoint remains
                    continue
                finally:
                    cursor.close()
        finally:
            raw.close()


_SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()
