"""Clone by copy keeps the TPM (secrets unseal), clone by replace makes a new one (they do not)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Tools
from tests.vtpm_core._issuer import SmallIssuer
from tests.vtpm_core._seal import seal, unseal
from vtpm_core.errors import ConflictError, NotFoundError
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
SECRET = b"sealed-in-the-source-vtpm"


def _ek_pub(store: VtpmStore, name: str, work: Path) -> bytes:
    work.mkdir(parents=True, exist_ok=True)
    with store.running(name) as tpm:
        Tools(tpm, work).run("tpm2_createek", "-G", "ecc", "-c", "ek.ctx", "-u", "ek.pub")
    return (work / "ek.pub").read_bytes()


def test_copy_keeps_secrets_replace_does_not(
    store: VtpmStore, issuer: SmallIssuer, tmp_path: Path
) -> None:
    src = store.create("src", issuer=issuer)
    with store.running("src") as tpm:
        seal(tpm, tmp_path / "sealed", SECRET)
    copy = store.clone("src", "copy", mode="copy", issuer=issuer)
    repl = store.clone("src", "repl", mode="replace", issuer=issuer)

    # copy: same EKs and certificates, new VM identity, the CA saw a clone binding
    assert copy.eks == src.eks and copy.vm_id != src.vm_id and copy.vtpm_id != src.vtpm_id
    assert copy.origin.kind == "clone-copy" and copy.origin.source_vm_id == src.vm_id
    clone_reqs = [r for r in issuer.requests if r.clone_of is not None]
    assert [r.clone_of for r in clone_reqs] == [src.vm_id, src.vm_id]
    assert {r.vm_id for r in clone_reqs} == {copy.vm_id}
    assert copy.key.wrapped != src.key.wrapped  # re-wrapped under the copy's vTPM id
    # replace: all new
    assert repl.origin.kind == "clone-replace"
    for a, b in zip(repl.eks, src.eks, strict=True):
        assert a.kind == b.kind and a.public != b.public and a.serial != b.serial
    assert store.data_key(repl) != store.data_key(src)

    assert _ek_pub(store, "copy", tmp_path / "e1") == _ek_pub(store, "src", tmp_path / "e2")
    assert _ek_pub(store, "repl", tmp_path / "e3") != _ek_pub(store, "src", tmp_path / "e4")

    for name, expect in (("src", True), ("copy", True), ("repl", False)):
        work = tmp_path / f"unseal-{name}"
        shutil.copytree(tmp_path / "sealed", work)
        with store.running(name) as tpm:
            got = unseal(tpm, work)
        if expect:
            assert got.returncode == 0, got.stderr
            assert (work / "out.bin").read_bytes() == SECRET
        else:
            assert got.returncode != 0
            assert not (work / "out.bin").exists()

    # deleting the source keeps the certificates the copy still uses
    result = store.delete("src", issuer=issuer)
    assert result.revoked == () and set(result.kept) == {ek.serial for ek in src.eks}
    assert issuer.revoked == []


def test_clone_refusals(store: VtpmStore, issuer: SmallIssuer) -> None:
    store.create("src", issuer=issuer, ek=["ecc-p256"])
    with pytest.raises(NotFoundError, match="no vTPM named 'nope'"):
        store.clone("nope", "x", mode="copy", issuer=issuer)
    with pytest.raises(ConflictError, match="already exists"):
        store.clone("src", "src", mode="copy", issuer=issuer)
    assert store.names() == ["src"]
