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

__all__ = ["CERT_SORTS", "CERT_STATUSES", "SEARCH_FIELDS", "CertQuery", "CertRecord", "Ledger"]

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


CERT_STATUSES = ("pending", "issued", "revoked")
# what a search matches, as a prefix: the VM id (the certificate's, or a clone's bound to
# its EK), the serial (hex), the EK's TPM Name (hex), the VM name; "any" is all four
SEARCH_FIELDS = ("any", "vm_id", "serial", "ek_name", "vm_name")
# sort name -> column; each has an index ending in the serial (see _INDEXES)
CERT_SORTS = ("created", "revoked")
_MAX_CLONE_MATCHES = 1000

# The console's searches and pages (ca/console), each an index range read: name suffix,
# table suffix, columns, PostgreSQL varchar_pattern_ops (a LIKE 'prefix%' whatever the
# database's collation). Created with the tables, and added to a ledger made before them
# (CREATE INDEX IF NOT EXISTS at open: `vtpm ca serve` opens once before forking workers).
_INDEXES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("certs_created", "certificates", ("created_at", "serial"), False),
    ("certs_status_created", "certificates", ("status", "created_at", "serial"), False),
    ("certs_status_revoked", "certificates", ("status", "revoked_at", "serial"), False),
    ("certs_serial_prefix", "certificates", ("serial",), True),
    ("certs_vm_id", "certificates", ("vm_id",), True),
    ("certs_ek_name", "certificates", ("ek_name",), True),
    ("certs_vm_name", "certificates", ("vm_name",), True),
    ("bindings_vm_id", "bindings", ("vm_id",), True),
)


@dataclass(frozen=True, slots=True)
class CertQuery:
    """A checked search of the ledger: prefix text and the field it matches, a status
    filter, the sort (``revoked`` only with ``status="revoked"``) and direction, a page."""

    q: str = ""
    field: str = "any"
    status: str = ""
    sort: str = "created"
    descending: bool = True
    page: int = 1
    size: int = 50

    def __post_init__(self) -> None:
        if self.field not in SEARCH_FIELDS:
            raise ConfigError(f"search field {self.field!r}: one of {', '.join(SEARCH_FIELDS)}")
        if self.status not in ("", *CERT_STATUSES):
            raise ConfigError(f"status {self.status!r}: one of {', '.join(CERT_STATUSES)}")
        if self.sort not in CERT_SORTS:
            raise ConfigError(f"sort {self.sort!r}: one of {', '.join(CERT_SORTS)}")
        if self.sort == "revoked" and self.status != "revoked":
            raise ConfigError("sort=revoked needs status=revoked")
        if self.page < 1 or self.size < 1:
            raise ConfigError(f"page {self.page} of size {self.size}: both from 1")


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def normal_serial(text: str) -> str:
    """A serial as the ledger writes it: lower-case hex, no ``0x``, colons or leading
    zeros (``openssl x509 -serial`` prints ``serial=0A1B...``; ``-text`` prints colons)."""
    value = text.strip().lower().replace(":", "")
    value = value.removeprefix("serial=").removeprefix("0x")
    return value.lstrip("0") or ("0" if value else "")


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
        for name, table, columns, pattern in _INDEXES:
            t = self.certs if table == "certificates" else self.bindings
            sa.Index(
                f"ix_{prefix}{name}",
                *(t.c[c] for c in columns),
                postgresql_ops=dict.fromkeys(columns, "varchar_pattern_ops") if pattern else {},
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
        """The tables and their indexes, those missing (a ledger older than an index
        gets it here)."""
        if self._core_built is None and self._fastpath is not None and self._fastpath.sqlite:
            # tables and indexes there (every open but the first): no SQLAlchemy needed
            names = [self._certs_name, self._bindings_name]
            names += [f"ix_{self._prefix}{index[0]}" for index in _INDEXES]
            params = {f"n{i}": n for i, n in enumerate(names)}
            present = self._fastpath.connection().one(
                "SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'index') "  # noqa: S608
                f"AND name IN ({', '.join(':' + k for k in params)})",
                params,
            )
            if present == (len(names),):
                return
        import sqlalchemy as sa

        core = self._core
        core.meta.create_all(core.engine)
        with core.engine.begin() as conn:
            for table in (core.certs, core.bindings):
                for index in table.indexes:
                    conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))

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

    # -- the console's searches (ca/console) -----------------------------------

    def status_counts(self) -> dict[str, int]:
        """Certificates per status (every status named), from the (status, ...) index."""
        import sqlalchemy as sa

        certs = self._core.certs
        counts = dict.fromkeys(CERT_STATUSES, 0)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(certs.c.status, sa.func.count()).group_by(certs.c.status))
            for status, n in rows:
                counts[str(status)] = int(n)
        return counts

    def search_where(self, query: CertQuery, conn: sa.Connection) -> list[Any]:
        """The conditions of a search (clones' serials are read from ``conn`` first)."""
        import sqlalchemy as sa

        certs, bindings = self._core.certs, self._core.bindings
        where: list[Any] = []
        if query.q:
            text = query.q
            match: list[Any] = []
            if query.field in ("any", "vm_id"):
                like = _like(text.lower())
                match.append(certs.c.vm_id.like(like, escape="\\"))
                # clones by copy: their serials first (an index read), so the search stays
                # an OR of index scans (a subquery in the OR would scan the table)
                clones = conn.execute(
                    sa.select(bindings.c.serial)
                    .where(bindings.c.vm_id.like(like, escape="\\"))
                    .limit(_MAX_CLONE_MATCHES + 1)
                ).scalars()
                serials = sorted(set(clones))
                if len(serials) > _MAX_CLONE_MATCHES:
                    raise ConfigError(
                        f"VM id prefix {text!r} matches over {_MAX_CLONE_MATCHES} clones: "
                        "give more of the VM id"
                    )
                if serials:
                    match.append(certs.c.serial.in_(serials))
            if query.field in ("any", "serial") and normal_serial(text):
                match.append(certs.c.serial.like(_like(normal_serial(text)), escape="\\"))
            if query.field in ("any", "ek_name"):
                match.append(certs.c.ek_name.like(_like(text.lower()), escape="\\"))
            if query.field in ("any", "vm_name"):
                match.append(certs.c.vm_name.like(_like(text), escape="\\"))
            where.append(sa.or_(*match) if match else sa.false())
        if query.status:
            where.append(certs.c.status == query.status)
        return where

    def page_select(self, query: CertQuery, where: list[Any]) -> sa.Select[Any]:
        """One page's statement (bench/ca_console.py explains it): a deferred join, the
        page's serials read from the sort's index (skipping OFFSET entries), then only
        those rows read, without the certificate and TBS bytes."""
        import sqlalchemy as sa

        certs = self._core.certs
        col = certs.c.created_at if query.sort == "created" else certs.c.revoked_at
        if query.sort == "revoked":  # the (status, revoked_at, serial) index
            order: tuple[Any, ...] = (certs.c.status, col, certs.c.serial)
        elif query.status:  # (status, created_at, serial)
            order = (certs.c.status, col, certs.c.serial)
        else:  # (created_at, serial)
            order = (col, certs.c.serial)
        ordered = tuple(c.desc() if query.descending else c.asc() for c in order)
        page = (
            sa.select(certs.c.serial)
            .where(*where)
            .order_by(*ordered)
            .limit(query.size)
            .offset((query.page - 1) * query.size)
            .subquery("page")
        )
        columns = [c for c in certs.c if c.name not in ("tbs_der", "certificate_der")]
        return sa.select(*columns).join(page, page.c.serial == certs.c.serial).order_by(*ordered)

    def search(
        self, query: CertQuery, counts: dict[str, int] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of matching certificates (ledger columns, no DER) and how many match.

        ``counts`` (from :meth:`status_counts`) saves the count query when no text is
        searched: the total is then the counts' sum, or the filtered status's count."""
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            where = self.search_where(query, conn)
            rows = [dict(r._mapping) for r in conn.execute(self.page_select(query, where))]
            if query.q or counts is None:
                count = sa.select(sa.func.count()).select_from(self._core.certs).where(*where)
                total = int(conn.execute(count).scalar_one())
            else:
                total = counts[query.status] if query.status else sum(counts.values())
        for row in rows:
            for key in ("not_before", "not_after", "revoked_at", "created_at"):
                row[key] = _utc(row[key])
        return rows, total

    def revocation_summary(self) -> dict[str, Any]:
        """Revoked certificates per reason and the latest revocation time (the CRL's
        content without building it)."""
        import sqlalchemy as sa

        certs = self._core.certs
        revoked = certs.c.status == "revoked"
        with self.engine.connect() as conn:
            reasons = {
                str(reason): int(n)
                for reason, n in conn.execute(
                    sa.select(certs.c.revocation_reason, sa.func.count())
                    .where(revoked)
                    .group_by(certs.c.revocation_reason)
                )
            }
            latest = conn.execute(sa.select(sa.func.max(certs.c.revoked_at)).where(revoked))
            last = _utc(latest.scalar_one())
        return {"reasons": reasons, "latest": last}

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
