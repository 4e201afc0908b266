"""The ledger on SQLite (WAL, the default) and PostgreSQL: one EK, one certificate, also when
several threads (each its own connection) race for the same EK; revocation is complete."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ca.ek import CertifiableEk
from ca.home import CaHome, OpenedCa
from ca.issuance import IssueRequest
from ca.ledger import CertQuery, CertRecord, Ledger
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import ConfigError, ConflictError, NotFoundError


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_ca(request: pytest.FixtureRequest, ca_home: CaHome) -> Iterator[OpenedCa]:
    if request.param == "sqlite":
        ca = ca_home.open(passphrase=PASSPHRASE)
        with ca.ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    else:
        url = request.getfixturevalue("postgres_url")
        ca = ca_home.open(
            passphrase=PASSPHRASE, database=url, ledger_prefix=f"t{uuid.uuid4().hex[:10]}_"
        )
    try:
        yield ca
    finally:
        if request.param == "postgres":
            ca.ledger.drop_schema()
        ca.close()


def _eks(count: int) -> list[CertifiableEk]:
    from cryptography.hazmat.primitives.asymmetric import ec

    return [
        CertifiableEk.from_key(
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            template="bare-pem",
            name=None,
            raw=b"",
        )
        for _ in range(count)
    ]


def test_race_for_one_ek_gives_one_certificate(ledger_ca: OpenedCa) -> None:
    (ek,) = _eks(1)
    vm = uuid.uuid4()
    serials: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            serials.append(ledger_ca.issuance.issue(IssueRequest(ek=ek, vm_id=vm)).record.serial)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(serials)) == 1 and len(serials) == 8
    assert len(ledger_ca.ledger.all_records()) == 1


def test_columns_and_revocation(ledger_ca: OpenedCa) -> None:
    a, b = _eks(2)
    ra = ledger_ca.issuance.issue(IssueRequest(ek=a, vm_id=uuid.uuid4(), vm_name="a")).record
    ledger_ca.issuance.issue(IssueRequest(ek=b, vm_id=uuid.uuid4()))
    record = ledger_ca.ledger.get(ra.serial)
    assert (record.status, record.key_type, record.vm_name) == ("issued", "ecc-nist-p256", "a")
    assert record.ek_public_sha256 == a.spki_sha256 and record.not_before < record.not_after
    revoked = ledger_ca.revocation.revoke(ra.serial, "key-compromise")
    assert revoked.status == "revoked" and revoked.revocation_reason == "key-compromise"
    assert revoked.revoked_at is not None
    assert [r.serial for r in ledger_ca.ledger.revoked()] == [ra.serial]
    with pytest.raises(ConflictError, match="already revoked"):
        ledger_ca.revocation.revoke(ra.serial, "superseded")
    with pytest.raises(NotFoundError, match="no certificate with serial"):
        ledger_ca.revocation.revoke(12345, "superseded")
    from cryptography import x509

    crl = x509.load_der_x509_crl(ledger_ca.revocation.crl())
    assert [e.serial_number for e in crl] == [ra.serial]
    assert crl.is_signature_valid(ledger_ca.material.key.public_key)


@pytest.mark.postgres
def test_two_processes_share_postgres(ca_home: CaHome, postgres_url: str) -> None:
    """Two opened CAs (as two gunicorn workers would) on one PostgreSQL ledger agree."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    one = ca_home.open(passphrase=PASSPHRASE, database=postgres_url, ledger_prefix=prefix)
    two = ca_home.open(passphrase=PASSPHRASE, database=postgres_url, ledger_prefix=prefix)
    try:
        (ek,) = _eks(1)
        vm = uuid.uuid4()
        first = one.issuance.issue(IssueRequest(ek=ek, vm_id=vm))
        second = two.issuance.issue(IssueRequest(ek=ek, vm_id=vm))
        assert second.reissued and second.record.serial == first.record.serial
        engine = sa.create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                count = conn.exec_driver_sql(f"select count(*) from {prefix}certificates").scalar()  # noqa: S608
        finally:
            engine.dispose()
        assert count == 1
    finally:
        one.ledger.drop_schema()
        one.close()
        two.close()


def test_default_ledger_is_sqlite_in_home(ca_home: CaHome) -> None:
    ca = ca_home.open(passphrase=PASSPHRASE)
    try:
        assert ca.ledger.engine.url.database == str(Path(ca_home.path) / "ledger.db")
    finally:
        ca.close()


def test_issued_record_is_what_the_ledger_holds(ledger_ca: OpenedCa) -> None:
    """The IssueResult's record (built field by field on the hot path) equals the row."""
    (ek,) = _eks(1)
    result = ledger_ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4(), vm_name="r"))
    assert result.record == ledger_ca.ledger.get(result.record.serial)
    assert result.record.status == "issued"
    assert result.record.certificate_der == result.certificate_der


def test_broken_hot_connection_is_replaced(ledger_ca: OpenedCa) -> None:
    """A write that finds its connection closed under its feet reconnects once and lands."""
    first, second = _eks(2)
    ledger_ca.issuance.issue(IssueRequest(ek=first, vm_id=uuid.uuid4()))
    fastpath = ledger_ca.ledger._fastpath
    assert fastpath is not None
    fastpath.connection()._conn.close()  # under the ledger's feet
    result = ledger_ca.issuance.issue(IssueRequest(ek=second, vm_id=uuid.uuid4()))
    assert ledger_ca.ledger.get(result.record.serial).status == "issued"


def test_sqlite_checkpoints_off_the_request_thread(
    ca_home: CaHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issuance writes wake the checkpointer thread; it moves the WAL into the
    database file, and close() stops it."""
    from ca import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_CHECKPOINT_EVERY", 4)
    ca = ca_home.open(passphrase=PASSPHRASE)
    try:
        for ek in _eks(6):  # 12 commits: the thread is woken 3 times
            ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4()))
        checkpointer = ca.ledger._checkpointer
        assert checkpointer is not None and checkpointer._thread.is_alive()
        deadline = time.monotonic() + 30
        while checkpointer.completed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpointer.completed >= 1
        serials = [r.serial for r in ca.ledger.all_records()]
        assert len(serials) == 6
    finally:
        ca.close()
    assert not checkpointer._thread.is_alive()
    reopened = ca_home.open(passphrase=PASSPHRASE)
    try:
        assert sorted(r.serial for r in reopened.ledger.all_records()) == sorted(serials)
    finally:
        reopened.close()


def _seed(ledger: Ledger, count: int) -> list[CertRecord]:
    """``count`` issued rows through the ledger's own write path, one second apart."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    records = []
    for i in range(count):
        record = CertRecord(
            serial=0x8000 + i * 7919, ek_name=f"000b{i:060x}", ek_public_sha256=f"{i:064x}",
            ek_template="L-2", key_type="ecc-nist-p256", vm_id=str(uuid.UUID(int=i + 1)),
            vm_name=f"host-{i:03}", vtpm_instance_id="", not_before=start,
            not_after=start + dt.timedelta(days=365), status="pending", revoked_at=None,
            revocation_reason=None, tbs_der=b"\x30\x00", certificate_der=None,
        )  # fmt: skip
        assert ledger.reserve(record, start + dt.timedelta(seconds=i))
        assert ledger.complete(record.serial, b"\x30\x00")
        records.append(record)
    return records


def test_search_pages_follow_the_index_order(ledger_ca: OpenedCa) -> None:
    ledger = ledger_ca.ledger
    records = _seed(ledger, 60)
    when = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    revoked = [records[i] for i in (3, 17, 40, 41, 59)]
    for n, record in enumerate(revoked):  # revoked in this order, a minute apart
        ledger.revoke(record.serial, "superseded", when + dt.timedelta(minutes=n))
    counts = ledger.status_counts()
    assert counts == {"pending": 0, "issued": 55, "revoked": 5}
    seen: list[str] = []
    for page in (1, 2, 3):
        rows, total = ledger.search(CertQuery(page=page, size=25), counts)
        assert total == 60
        seen += [r["serial"] for r in rows]
    assert seen == [f"{r.serial:x}" for r in reversed(records)]  # newest first, each once
    rows, total = ledger.search(CertQuery(descending=False, size=25))
    assert total == 60 and [r["serial"] for r in rows] == [f"{r.serial:x}" for r in records[:25]]
    rows, total = ledger.search(CertQuery(status="revoked", sort="revoked"), counts)
    assert total == 5 and [r["serial"] for r in rows] == [f"{r.serial:x}" for r in revoked[::-1]]
    assert rows[0]["revoked_at"] == when + dt.timedelta(minutes=4)
    rows, total = ledger.search(CertQuery(status="issued", page=3, size=25), counts)
    assert total == 55 and len(rows) == 5
    rows, total = ledger.search(CertQuery(q="host-04", field="vm_name"))
    assert total == 10 and {r["vm_name"] for r in rows} == {f"host-04{i}" for i in range(10)}
    rows, total = ledger.search(CertQuery(q="host-04", status="revoked"))
    assert [r["serial"] for r in rows] == [f"{records[i].serial:x}" for i in (41, 40)]
    assert "tbs_der" not in rows[0] and "certificate_der" not in rows[0]
    with pytest.raises(ConfigError, match="sort=revoked needs status=revoked"):
        CertQuery(sort="revoked")
    summary = ledger.revocation_summary()
    assert summary == {"reasons": {"superseded": 5}, "latest": when + dt.timedelta(minutes=4)}


def test_a_clone_by_copy_is_found_by_its_vm_id(ledger_ca: OpenedCa) -> None:
    (record,) = _seed(ledger_ca.ledger, 1)
    clone = str(uuid.uuid4())
    ledger_ca.ledger.bind_clone(
        ledger_ca.ledger.get(record.serial), clone, record.vm_id, dt.datetime.now(dt.UTC)
    )
    for field in ("vm_id", "any"):
        rows, total = ledger_ca.ledger.search(CertQuery(q=clone[:13], field=field))
        assert total == 1 and rows[0]["vm_id"] == record.vm_id, field


def test_an_older_ledger_gets_the_console_indexes(ledger_ca: OpenedCa) -> None:
    """A ledger made before the console's indexes gets them when next opened."""
    ledger = ledger_ca.ledger
    prefix = ledger._prefix

    def indexes() -> set[str]:
        inspector = sa.inspect(ledger.engine)
        names = set()
        for table in (f"{prefix}certificates", f"{prefix}bindings"):
            names |= {str(i["name"]) for i in inspector.get_indexes(table)}
        return {n for n in names if n.startswith(f"ix_{prefix}")}

    made = indexes()
    assert f"ix_{prefix}certs_status_revoked" in made and len(made) == 8
    with ledger.engine.begin() as conn:
        for name in made:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    assert indexes() == set()
    again = Ledger(ledger.url, prefix=prefix)
    try:
        again.create_schema()
        assert indexes() == made
        again.create_schema()  # and once they are there, nothing to do
    finally:
        again.close()
