"""Backup and restore: same EK, same NV certificates, same sealed secret; clear refusals."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from tests.conftest import Tools
from tests.vtpm_core._issuer import SmallIssuer
from tests.vtpm_core._seal import seal, unseal
from vtpm_core.backup import MAGIC, Backup
from vtpm_core.errors import ConflictError, ParseError, StateError, VerificationError
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
SECRET = b"disk-unlock-key-0123456789abcdef"


def _ek_and_certs(store: VtpmStore, name: str, work: Path) -> tuple[bytes, bytes, bytes]:
    work.mkdir(parents=True, exist_ok=True)
    with store.running(name) as tpm:
        tools = Tools(tpm, work)
        tools.run("tpm2_createek", "-G", "rsa", "-c", "ek.ctx", "-u", "ek.pub")
        tools.run("tpm2_nvread", "0x01c00002", "-o", "rsa.der")
        tools.run("tpm2_nvread", "0x01c0000a", "-o", "ecc.der")
    return tuple((work / f).read_bytes() for f in ("ek.pub", "rsa.der", "ecc.der"))  # type: ignore[return-value]


def _rebuild(data: bytes, edit: object) -> bytes:
    """Re-frame a backup after ``edit(doc)`` with a correct digest (the MAC stays old)."""
    n = struct.unpack_from(">I", data, len(MAGIC))[0]
    body = data[len(MAGIC) + 4 : len(MAGIC) + 4 + n]
    mac = data[-32:]
    doc = json.loads(body)
    edit(doc)  # type: ignore[operator]
    new = json.dumps(doc).encode()
    signed = MAGIC + struct.pack(">I", len(new)) + new
    return signed + hashlib.sha256(signed).digest() + mac


def test_backup_restore_gives_back_the_same_vtpm(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    rec = store.create("vm1", issuer=issuer)
    with store.running("vm1") as tpm:
        seal(tpm, tmp_path / "seal", SECRET)
    before = _ek_and_certs(store, "vm1", tmp_path / "a")
    backup = store.backup("vm1", tmp_path / "vm1.bak")
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    store.delete("vm1", issuer=None)
    restored = store.restore(backup)
    assert restored == rec.renamed("vm1").__class__.parse(restored.raw)
    assert restored.vtpm_id == rec.vtpm_id and restored.eks == rec.eks
    assert _ek_and_certs(store, "vm1", tmp_path / "b") == before
    with store.running("vm1") as tpm:
        got = unseal(tpm, tmp_path / "seal")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "seal" / "out.bin").read_bytes() == SECRET
    # restoring again under the same name is a conflict; under a new name it works
    with pytest.raises(ConflictError, match="already exists"):
        store.restore(backup)
    assert store.restore(backup, name="vm1-again").eks == rec.eks


def test_restore_without_the_key_fails_clearly(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    rec = store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    backup = store.backup("vm1", tmp_path / "vm1.bak")
    other = VtpmStore.init(tmp_path / "other-store")  # another key provider, other KEK
    with pytest.raises(StateError, match=rf"vTPM 'vm1': missing key '{rec.key.key_id}'"):
        other.restore(backup)
    (store.root / "keys" / f"{rec.key.key_id}.kek").write_bytes(os.urandom(32))
    store.delete("vm1", issuer=None)
    with pytest.raises(StateError, match=rf"vTPM 'vm1': wrong key '{rec.key.key_id}'"):
        store.restore(backup)
    assert store.names() == [] and other.names() == []


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        pytest.param("no-state", StateError, "holds no vTPM state .*cannot be restored without",
                     id="fail/state/missing"),
        pytest.param("empty-state", StateError, "holds no vTPM state", id="fail/state/empty"),
        pytest.param("bit-flip", VerificationError, "backup.digest: SHA-256 mismatch",
                     id="fail/digest/bit-flip"),
        pytest.param("truncated", ParseError, "truncated or extended", id="fail/length/truncated"),
        pytest.param("magic", ParseError, "not a vtpm-trust backup", id="fail/magic/other-file"),
        pytest.param("short", ParseError, "too short", id="fail/magic/short"),
        pytest.param("altered", VerificationError, "backup.mac: .*altered",
                     id="fail/mac/altered-metadata"),
        pytest.param("swapped-state", VerificationError, "backup.mac",
                     id="fail/mac/other-state"),
        pytest.param("bad-record", ParseError, r"record\.eks\[0\]\.public", id="fail/record/field"),
    ],
)  # fmt: skip
def test_bad_backups_are_refused(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path, case: str,
    exc: type[Exception], match: str,
) -> None:  # fmt: skip
    store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    data = store.backup("vm1", tmp_path / "vm1.bak").read_bytes()
    store.delete("vm1", issuer=None)
    if case == "no-state":
        data = _rebuild(data, lambda d: d.pop("state"))
    elif case == "empty-state":
        data = _rebuild(data, lambda d: d.__setitem__("state", {}))
    elif case == "bit-flip":
        data = data[:100] + bytes([data[100] ^ 0x40]) + data[101:]
    elif case == "truncated":
        data = data[:-1]
    elif case == "magic":
        data = b"-----BEGIN CERTIFICATE-----\n" + data
    elif case == "short":
        data = MAGIC[:5]
    elif case == "altered":
        data = _rebuild(
            data, lambda d: d["record"].__setitem__("created_at", "2001-01-01T00:00:00Z")
        )
    elif case == "swapped-state":
        blob = base64.b64encode(os.urandom(1400)).decode()
        data = _rebuild(data, lambda d: d["state"].__setitem__("tpm2-00.permall", blob))
    elif case == "bad-record":
        data = _rebuild(data, lambda d: d["record"]["eks"][0].__setitem__("public", "!!"))
    path = tmp_path / "bad.bak"
    path.write_bytes(data)
    with pytest.raises(exc, match=match):
        store.restore(path)
    assert store.names() == []
    assert not list((store.root / "tmp").iterdir())


def test_backup_parse_round_trip(store: VtpmStore, issuer: SmallIssuer, tmp_path: Path) -> None:
    rec = store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    data = store.backup("vm1", tmp_path / "b").read_bytes()
    parsed = Backup.parse(data)
    assert parsed.record == rec
    assert parsed.state["tpm2-00.permall"] == store.read_state("vm1")["tpm2-00.permall"]
    parsed.verify_mac(store.data_key(rec))
    with pytest.raises(VerificationError, match=r"backup\.mac"):
        parsed.verify_mac(os.urandom(32))


def test_backup_of_a_vtpm_without_state_is_refused(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    (store.state_dir("vm1") / "tpm2-00.permall").unlink()
    with pytest.raises(StateError, match=r"has no state file.*could not be restored"):
        store.backup("vm1", tmp_path / "b")
    assert not (tmp_path / "b").exists()
