"""The vTPM store against real swtpm, with tpm2-tools as the independent reader.

Checks: EK certificates at 0x01C00002 / 0x01C0000A carry exactly the EK that
tpm2_createek derives; NV attributes 0x62072801 and size = DER length; the
state on disk is encrypted (no certificate DER in it, swtpm without the key
cannot open it); a wrong or missing key fails naming the vTPM and key id and
leaves the state byte-identical; detached start/stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import Tools
from tests.vtpm_core._issuer import SmallIssuer
from vtpm_core.errors import ConflictError, NotFoundError, StateError, TpmError
from vtpm_core.record import VtpmRecord
from vtpm_core.store import VtpmStore
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm.public import Public

pytestmark = pytest.mark.swtpm


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_readback_with_tpm2_tools(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    record = store.create("vm1", issuer=issuer)
    assert [ek.kind for ek in record.eks] == ["rsa2048", "ecc-p256"]
    # the CA was told who the TPM is
    req = issuer.requests[0]
    assert req.vm_name == "vm1" and req.vm_id == record.vm_id and req.template_id == "L-1"
    assert req.tpm_manufacturer == 0x49424D00  # "IBM", swtpm/libtpms
    with store.running("vm1", transport="tcp") as tpm:
        tools = Tools(tpm, tmp_path)
        for index, alg, kind in (
            ("0x01c00002", "rsa", "rsa2048"),
            ("0x01c0000a", "ecc", "ecc-p256"),
        ):
            tools.run("tpm2_nvread", index, "-o", f"{alg}.der")
            der = (tmp_path / f"{alg}.der").read_bytes()
            assert der == record.ek(kind).certificate_der
            cert = x509.load_der_x509_certificate(der)
            tools.run(
                "tpm2_createek", "-G", alg, "-c", f"{alg}.ctx", "-u", f"{alg}.pub", "-f", "pem"
            )
            ek_pem = serialization.load_pem_public_key((tmp_path / f"{alg}.pub").read_bytes())
            assert _spki(cert.public_key()) == _spki(ek_pem)
            assert Public.parse_tpm2b(record.ek(kind).public).same_key(ek_pem)  # type: ignore[arg-type]
        out = tools.run("tpm2_nvreadpublic").stdout
    for nv, kind in ((0x01C00002, "rsa2048"), (0x01C0000A, "ecc-p256")):
        block = out.split(f"0x{nv:x}:")[1]
        assert re.search(r"value: 0x62072801", block), block
        size = int(re.search(r"size: (\d+)", block).group(1))  # type: ignore[union-attr]
        assert size == len(record.ek(kind).certificate_der or b"")
    # metadata round-trips
    assert VtpmRecord.parse(record.raw) == record
    assert store.names() == ["vm1"] and store.get("vm1") == record


def test_state_on_disk_is_encrypted(store: VtpmStore, issuer: SmallIssuer, tmp_path: Path) -> None:
    record = store.create("vm1", issuer=issuer)
    state = store.state_dir("vm1") / "tpm2-00.permall"
    blob = state.read_bytes()
    for ek in record.eks:
        assert ek.certificate_der is not None
        assert ek.certificate_der not in blob
        assert ek.certificate_der[-64:] not in blob  # not even the signature tail
    before = _sha(state)
    # swtpm without the key cannot read it ...
    with pytest.raises(TpmError, match="swtpm exited"):
        SwtpmProcess(store.state_dir("vm1"), log_file=tmp_path / "nokey.log").start()
    assert "Could not initialize libtpms" in (tmp_path / "nokey.log").read_text()
    assert _sha(state) == before
    # ... and neither the wrapped key nor the KEK file holds the data key in clear
    meta = (store.root / "vtpms" / "vm1" / "vtpm.json").read_bytes()
    assert b"wrapped" in meta


@pytest.mark.parametrize(
    "case",
    ["fail/key/other-kek", "fail/key/missing", "fail/key/swapped-data-key"],
)
def test_wrong_key_names_vtpm_and_key_and_keeps_state(
    store: VtpmStore, issuer: SmallIssuer, case: str
) -> None:
    rec = store.create("vm1", issuer=issuer)
    state = store.state_dir("vm1") / "tpm2-00.permall"
    before = state.read_bytes()
    kek = store.root / "keys" / f"{rec.key.key_id}.kek"
    if case == "fail/key/other-kek":
        kek.write_bytes(os.urandom(32))
        match = rf"vTPM 'vm1': wrong key '{rec.key.key_id}'.*state untouched"
    elif case == "fail/key/missing":
        kek.unlink()
        match = rf"vTPM 'vm1': missing key '{rec.key.key_id}'"
    else:
        # a well-wrapped but different data key: only swtpm can notice
        other = store.wrap_new(rec.vtpm_id, os.urandom(32))
        store.write_record(store.root / "vtpms" / "vm1", dataclasses.replace(rec, key=other))
        match = rf"vTPM 'vm1': swtpm cannot decrypt its state .*key id '{rec.key.key_id}'"
    transports: tuple[Literal["tcp", "qemu"], ...] = ("tcp", "qemu")
    for transport in transports:
        with pytest.raises(StateError, match=match):
            store.start("vm1", transport=transport)
    with pytest.raises(StateError, match=match):
        store.start_detached("vm1", port=None)
    assert state.read_bytes() == before
    assert store.pid("vm1") is None


def test_detached_start_stop_tcp_and_qemu(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    record = store.create("vm1", issuer=issuer)
    from vtpm_core.swtpm import free_tcp_port_pair

    port = free_tcp_port_pair()
    d = store.start_detached("vm1", port=port)
    try:
        assert store.pid("vm1") == d.pid
        env = dict(os.environ, TPM2TOOLS_TCTI=d.tcti)
        got = subprocess.run(
            ["tpm2_nvread", "0x01c0000a", "-o", str(tmp_path / "c.der")],
            env=env, capture_output=True, timeout=30,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "c.der").read_bytes() == record.ek("ecc-p256").certificate_der
        with pytest.raises(ConflictError, match="already running"):
            store.start_detached("vm1", port=port + 2)
        with pytest.raises(ConflictError, match="is running"):
            store.delete("vm1", issuer=issuer)
    finally:
        assert store.stop("vm1") is True
    assert store.pid("vm1") is None and store.stop("vm1") is False
    sock = tmp_path / "q" / "vm1.ctrl"
    q = store.start_detached("vm1", socket_path=sock)
    try:
        assert sock.exists()
        assert q.qemu_args() == [
            "-chardev", f"socket,id=chrtpm,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0",
        ]  # fmt: skip
    finally:
        store.stop("vm1")
    assert not os.path.exists(f"/proc/{q.pid}/cmdline") or store.pid("vm1") is None


def test_name_conflicts_and_unknown_names(store: VtpmStore, issuer: SmallIssuer) -> None:
    store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    with pytest.raises(ConflictError, match="already exists"):
        store.create("vm1", issuer=issuer)
    with pytest.raises(NotFoundError, match="no vTPM named 'nope'"):
        store.get("nope")
    assert not list((store.root / "tmp").iterdir())


def test_delete_revokes_and_destroys(store: VtpmStore, issuer: SmallIssuer) -> None:
    rec = store.create("vm1", issuer=issuer)
    wrapped = rec.key.wrapped
    result = store.delete("vm1", issuer=issuer)
    assert sorted(result.revoked) == sorted(ek.serial for ek in rec.eks if ek.serial)
    assert {s for s, _ in issuer.revoked} == {ek.serial for ek in rec.eks}
    assert not (store.root / "vtpms" / "vm1").exists()
    assert store.names() == []
    for p in store.root.rglob("*"):
        if p.is_file():
            assert wrapped not in p.read_bytes()


def test_external_mode_leaves_cert_indices_empty(store: VtpmStore, tmp_path: Path) -> None:
    rec = store.create("ext", issuer=None)
    assert rec.ek_cert_mode == "external"
    assert all(ek.certificate_der is None and ek.serial is None for ek in rec.eks)
    with store.running("ext") as tpm:
        out = Tools(tpm, tmp_path).run("tpm2_getcap", "handles-nv-index").stdout
    assert "0x1c00002" not in out.lower() and "0x1c0000a" not in out.lower()


def test_dead_staging_is_cleared_on_open(store: VtpmStore) -> None:
    stale = store.root / "tmp" / "999999999-abcdef"
    stale.mkdir()
    (stale / "junk").write_bytes(b"x")
    VtpmStore.open(store.root)
    assert not stale.exists()


def test_managed_start_for_qemu_and_unix(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    record = store.create("vm1", issuer=issuer, ek=["ecc-p256"])
    sockets = tmp_path / "s"
    with store.running("vm1", transport="qemu", socket_dir=sockets) as tpm:
        args = tpm.qemu_args()
        assert args[1] == f"socket,id=chrtpm,path={sockets / 'swtpm.ctrl'}"
        assert (sockets / "swtpm.ctrl").exists()
    with store.running("vm1", transport="unix", socket_dir=sockets) as tpm:
        from vtpm_core.provision import read_nv

        assert read_nv(tpm.esapi(), 0x01C0000A) == record.ek("ecc-p256").certificate_der
