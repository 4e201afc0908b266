"""The store with each key provider: local files, SoftHSM2 (PKCS#11), PyKMIP (KMIP, mTLS).

Every case runs the real thing: swtpm opens the state with the unwrapped
data key, a sealed secret survives backup/restore/rekey, and after
``delete --shred`` the backup no longer restores (the KEK is gone from the
provider), with an error naming provider and key and nothing written.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._keyproviders import SoftHsmToken
from tests.vtpm_core._issuer import SmallIssuer
from tests.vtpm_core._kmip import KmipServer
from tests.vtpm_core._seal import seal, unseal
from vtpm_core.errors import ConfigError, ConflictError, StateError
from vtpm_core.instance import pick_port
from vtpm_core.keyconfig import (
    KmipProviderConfig,
    LocalProviderConfig,
    Pkcs11ProviderConfig,
    ProviderConfig,
)
from vtpm_core.keyprovider import KeyProviderError
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm

SECRET = b"workload secret sealed in the vTPM"
KINDS = ["local", "pkcs11", "kmip"]


def pkcs11_config(softhsm: SoftHsmToken, tmp_path: Path) -> Pkcs11ProviderConfig:
    pin = tmp_path / "hsm.pin"
    pin.write_text(softhsm.pin + "\n")
    pin.chmod(0o600)
    return Pkcs11ProviderConfig(Path(softhsm.module), softhsm.label, pin_file=pin)


def kmip_config(kmip: KmipServer, client: str = "vtpm-client") -> KmipProviderConfig:
    c = kmip.config(client)
    return KmipProviderConfig(c.host, c.port, c.ca, c.cert, c.key)


@pytest.fixture
def provider_config(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, ProviderConfig]]:
    kind = request.param
    if kind == "local":
        yield "files", LocalProviderConfig(Path("keys"), key_per_vtpm=True)
    elif kind == "pkcs11":
        softhsm = request.getfixturevalue("softhsm")
        yield "hsm", pkcs11_config(softhsm, tmp_path)
    else:
        yield "kms", kmip_config(request.getfixturevalue("kmip"))


@pytest.fixture
def kstore(provider_config: tuple[str, ProviderConfig], tmp_path: Path) -> Iterator[VtpmStore]:
    pid, config = provider_config
    store = VtpmStore.init(tmp_path / "store", provider_id=pid, provider=config)
    try:
        yield store
    finally:
        store.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("provider_config", KINDS, indirect=True)
def test_lifecycle(kstore: VtpmStore, issuer: SmallIssuer, tmp_path: Path) -> None:
    """create, start, stop, backup, restore, clone copy/replace, rekey (KEK, data), shred."""
    pid = kstore.providers.default
    rec = kstore.create("vm1", issuer=issuer, ek=["ecc-p256"])
    assert rec.key.provider == pid and rec.key.key_id.startswith("vtpm-") is (pid != "kms")
    with kstore.running("vm1") as tpm:
        seal(tpm, tmp_path / "seal", SECRET)
    backup = kstore.backup("vm1", tmp_path / "vm1.bak")

    restored = kstore.restore(backup, name="vm1-restored")
    assert restored.key == rec.key and restored.vtpm_id == rec.vtpm_id

    copy = kstore.clone("vm1", "vm1-copy", mode="copy", issuer=issuer)
    fresh = kstore.clone("vm1", "vm1-new", mode="replace", issuer=issuer)
    keys = {rec.key.key_id, copy.key.key_id, fresh.key.key_id}
    assert len(keys) == 3  # one KEK per vTPM
    assert copy.key.provider == fresh.key.provider == pid

    # vtpm start (detached daemon, the data key unwrapped by the provider) / vtpm stop
    daemon = kstore.start_detached("vm1", port=pick_port())
    assert kstore.pid("vm1") == daemon.pid
    with pytest.raises(ConflictError, match="'vm1' is running"):
        kstore.rekey("vm1", data=True)
    assert kstore.stop("vm1") and kstore.pid("vm1") is None

    state = kstore.state_dir("vm1") / "tpm2-00.permall"
    before = _sha(state)
    kek_only = kstore.rekey("vm1")
    assert kek_only.key.provider == pid and kek_only.key.key_id != rec.key.key_id
    assert _sha(state) == before  # the state is not rewritten
    # --data: a new data key, the state re-encrypted by swtpm; the sealed secret survives
    rekeyed = kstore.rekey("vm1", data=True)
    assert rekeyed.key.provider == pid and rekeyed.key.key_id != kek_only.key.key_id
    assert kstore.data_key(rekeyed) != kstore.data_key(kek_only)
    assert _sha(state) != before
    assert sorted(p.name for p in kstore.state_dir("vm1").iterdir()) == ["tpm2-00.permall"]
    assert list((kstore.root / "tmp").iterdir()) == []
    for name in ("vm1", "vm1-copy"):
        with kstore.running(name) as tpm:
            got = unseal(tpm, tmp_path / "seal")
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "seal" / "out.bin").read_bytes() == SECRET

    # a rekey keeps the old KEKs (retired): the backup made before still restores
    kstore.delete("vm1-restored", issuer=None)
    assert kstore.restore(backup, name="vm1-restored").key == rec.key
    with pytest.raises(
        ConflictError, match=f"'{rec.key.key_id}' of key provider '{pid}' is shared"
    ):
        kstore.delete("vm1-restored", issuer=None, shred=True)  # vm1 still lists it as retired
    kstore.delete("vm1-restored", issuer=None)
    assert [k.key_id for k in kstore.get("vm1").retired_keys] == [
        rec.key.key_id,
        kek_only.key.key_id,
    ]

    # shred destroys the current KEK and every retired one: no backup of vm1 restores
    late = kstore.backup("vm1", tmp_path / "vm1-late.bak")
    result = kstore.delete("vm1", issuer=None, shred=True)
    assert result.shredded_key == rekeyed.key.key_id and result.kept_keys == ()
    gone = [rekeyed.key.key_id, rec.key.key_id, kek_only.key.key_id]
    assert [k.key_id for k in result.destroyed_keys] == gone
    assert not any(kstore.providers.get(pid).has_key(k) for k in gone)
    for old_backup, key_id in ((backup, rec.key.key_id), (late, rekeyed.key.key_id)):
        with pytest.raises(StateError, match=f"missing key '{key_id}' of key provider '{pid}'"):
            kstore.restore(old_backup, name="vm1-again")
        assert not kstore.exists("vm1-again") and list((kstore.root / "tmp").iterdir()) == []
    # the copy has its own KEK and lives on
    with kstore.running("vm1-copy"):
        pass
    check = kstore.check_provider(pid)
    assert check.ok, check.detail
    assert check.vtpms == 2


@pytest.mark.parametrize("provider_config", ["pkcs11", "kmip"], indirect=True)
def test_rekey_from_local_to_provider(
    provider_config: tuple[str, ProviderConfig],
    issuer: SmallIssuer,
    tmp_path: Path,
) -> None:
    pid, config = provider_config
    with VtpmStore.init(tmp_path / "store") as store:
        rec = store.create("vm1", issuer=None, ek=["ecc-p256"])
        assert rec.key.provider == "local"
        with pytest.raises(ConflictError, match="is shared"):
            store.delete("vm1", issuer=None, shred=True)
        store.add_provider(pid, config)
        assert [p for p in store.providers.configs] == ["local", pid]
        moved = store.rekey("vm1", to=pid)
        assert moved.key.provider == pid
        with store.running("vm1"):
            pass
    with VtpmStore.open(tmp_path / "store") as again:  # the provider map is in store.json
        assert again.get("vm1").key == moved.key
        with again.running("vm1"):
            pass
        result = again.delete("vm1", issuer=None, shred=True)
        # the local shared KEK it was wrapped under before cannot go: it is reported kept
        assert [k.key_id for k in result.destroyed_keys] == [moved.key.key_id]
        assert [(k.provider, k.key_id) for k in result.kept_keys] == [("local", rec.key.key_id)]
        assert again.providers.get("local").has_key(rec.key.key_id)


def test_rekey_failing_half_way_keeps_the_old_key(issuer: SmallIssuer, tmp_path: Path) -> None:
    """A crash between the new wrapping and the commit leaves the old record, still usable."""

    class CrashError(Exception):
        pass

    def hook(point: str) -> None:
        if point == "rekey:wrapped":
            raise CrashError(point)

    with VtpmStore.init(tmp_path / "store") as store:
        rec = store.create("vm1", issuer=None, ek=["ecc-p256"])
    crashing = VtpmStore.open(tmp_path / "store", crash_hook=hook)
    with pytest.raises(CrashError):
        crashing.rekey("vm1")
    with VtpmStore.open(tmp_path / "store") as store:
        assert store.get("vm1").key == rec.key
        with store.running("vm1"):
            pass
        assert store.rekey("vm1").key != rec.key


def test_restore_in_another_store(
    kmip: KmipServer, softhsm: SoftHsmToken, issuer: SmallIssuer, tmp_path: Path
) -> None:
    """The same provider id reaching the same KMS restores; a store without it is told which."""
    with VtpmStore.init(tmp_path / "a", provider_id="kms", provider=kmip_config(kmip)) as a:
        rec = a.create("vm1", issuer=None, ek=["ecc-p256"])
        backup = a.backup("vm1", tmp_path / "vm1.bak")
    with VtpmStore.init(tmp_path / "b", provider_id="kms", provider=kmip_config(kmip)) as b:
        assert b.restore(backup).key == rec.key
        with b.running("vm1"):
            pass
    with VtpmStore.init(tmp_path / "c", provider_id="hsm",
                        provider=pkcs11_config(softhsm, tmp_path)) as c:  # fmt: skip
        with pytest.raises(
            KeyProviderError,
            match=rf"needs key '{rec.key.key_id}' of key provider 'kms' \(kmip, KMIP server "
            rf"127\.0\.0\.1:{kmip.port}\); this store has no such provider \(it has: hsm\)",
        ):
            c.restore(backup)
        assert c.names() == [] and list((c.root / "tmp").iterdir()) == []
    # PKCS#11: another store on the same token reaches the key and restores
    with VtpmStore.init(tmp_path / "e", provider_id="hsm",
                        provider=pkcs11_config(softhsm, tmp_path)) as e:  # fmt: skip
        hsm_rec = e.create("vm2", issuer=None, ek=["ecc-p256"])
        hsm_backup = e.backup("vm2", tmp_path / "vm2.bak")
    with VtpmStore.open(tmp_path / "c") as c:
        assert c.restore(hsm_backup).key == hsm_rec.key
        with c.running("vm2"):
            pass
    # a KMIP client the server does not let use the key: the KMS's answer is named
    with VtpmStore.init(tmp_path / "d", provider_id="kms",
                        provider=kmip_config(kmip, "other-tenant")) as d:  # fmt: skip
        with pytest.raises(KeyProviderError, match=r"key provider 'kms'.*PERMISSION_DENIED"):
            d.restore(backup)
        assert d.names() == []


def test_provider_down(kmip: KmipServer, issuer: SmallIssuer, tmp_path: Path) -> None:
    from tests._server import free_port

    with VtpmStore.init(tmp_path / "s", provider_id="kms", provider=kmip_config(kmip)) as s:
        s.create("vm1", issuer=None, ek=["ecc-p256"])
        state = s.state_dir("vm1") / "tpm2-00.permall"
        before, record = _sha(state), (s.root / "vtpms" / "vm1" / "vtpm.json").read_bytes()
    # point the store at a port nobody listens on
    doc = (tmp_path / "s" / "store.json").read_text()
    (tmp_path / "s" / "store.json").write_text(
        doc.replace(f'"port": {kmip.port}', f'"port": {free_port()}')
    )
    with VtpmStore.open(tmp_path / "s") as s:
        for action in (
            lambda: s.start("vm1"),
            lambda: s.rekey("vm1"),
            lambda: s.backup("vm1", tmp_path / "x.bak"),
            lambda: s.create("vm2", issuer=None, ek=["ecc-p256"]),
        ):
            with pytest.raises(
                KeyProviderError, match=r"'kms'.*KMIP server 127\.0\.0\.1:\d+: cannot connect"
            ):
                action()
        check = s.check_provider("kms")
        assert not check.ok and "cannot connect" in check.detail
        assert _sha(state) == before
        assert (s.root / "vtpms" / "vm1" / "vtpm.json").read_bytes() == record
        assert s.names() == ["vm1"] and not (tmp_path / "x.bak").exists()


def test_init_fails_closed(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    bad = dataclasses.replace(pkcs11_config(softhsm, tmp_path), token_label="nope")
    with pytest.raises(KeyProviderError, match="no token labelled 'nope'"):
        VtpmStore.init(tmp_path / "s", provider_id="hsm", provider=bad)
    assert not (tmp_path / "s" / "store.json").exists()


def test_shared_pkcs11_key(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    """key_per_vtpm false: init creates the shared KEK; shred is refused for it."""
    config = dataclasses.replace(
        pkcs11_config(softhsm, tmp_path), key_per_vtpm=False, key_label="vtpm-kek"
    )
    with VtpmStore.init(tmp_path / "s", provider_id="hsm", provider=config) as s:
        assert s.info().key_id == "vtpm-kek"
        rec = s.create("vm1", issuer=None, ek=["ecc-p256"])
        assert rec.key.key_id == "vtpm-kek"
        with pytest.raises(ConflictError, match="'vtpm-kek' of key provider 'hsm' is shared"):
            s.delete("vm1", issuer=None, shred=True)
        with pytest.raises(
            ConfigError,
            match="already wrapped under the shared key 'vtpm-kek' of key provider 'hsm'",
        ):
            s.rekey("vm1")
