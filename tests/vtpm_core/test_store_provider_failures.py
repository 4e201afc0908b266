"""A key provider that is down or refuses: every command names the provider, the key and the
answer, and the store is left byte-for-byte as it was.

Real components throughout: a private PyKMIP server that the test stops (so
"down" is a server that went away, not a wrong port), a key revoked on that
server, and a SoftHSM2 token opened with a wrong PIN.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests._keyproviders import SoftHsmToken
from tests.vtpm_core._kmip import kmip_server
from tests.vtpm_core.test_store_keyproviders import kmip_config, pkcs11_config
from vtpm_core.errors import VtpmTrustError
from vtpm_core.instance import pick_port
from vtpm_core.keyprovider_kmip import KmipKeyProvider
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm

Action = Callable[[VtpmStore], object]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of the store (but run/, logs of running vTPMs) and its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "run"
    }


def _actions(tmp_path: Path, backup: Path) -> dict[str, Action]:
    """Every command that needs the vTPM's key (or a new one) from the provider."""
    return {
        "start": lambda s: s.start("vm1"),
        "start-detached": lambda s: s.start_detached("vm1", port=pick_port()),
        "backup": lambda s: s.backup("vm1", tmp_path / "new.bak"),
        "restore": lambda s: s.restore(backup, name="vm1-restored"),
        "clone-copy": lambda s: s.clone("vm1", "vm1-copy", mode="copy", issuer=None),
        "clone-replace": lambda s: s.clone("vm1", "vm1-new", mode="replace", issuer=None),
        "rekey": lambda s: s.rekey("vm1"),
        "rekey-data": lambda s: s.rekey("vm1", data=True),
        "delete-shred": lambda s: s.delete("vm1", issuer=None, shred=True),
    }


def _all_refused(store: VtpmStore, actions: dict[str, Action], key_id: str, *said: str) -> None:
    """Each action fails naming the provider's answer ``said`` and the vTPM's key id (but a
    new vTPM, whose key does not exist yet); the store does not change."""
    for what, action in actions.items():
        before = _snapshot(store.root)
        with pytest.raises(VtpmTrustError) as info:
            action(store)
        message = str(info.value)
        for part in said:
            assert part in message, (what, message)
        if what != "clone-replace":
            assert key_id in message, (what, message)
        assert _snapshot(store.root) == before, (what, message)
    assert store.names() == ["vm1"] and list((store.root / "tmp").iterdir()) == []
    assert store.pid("vm1") is None


def test_kmip_server_down(tmp_path: Path) -> None:
    with kmip_server(tmp_path / "kms") as server:
        config = kmip_config(server)
        with VtpmStore.init(tmp_path / "s", provider_id="kms", provider=config) as store:
            key = store.create("vm1", issuer=None, ek=["ecc-p256"]).key
            backup = store.backup("vm1", tmp_path / "vm1.bak")
    # the server process is gone: every command names the provider, the key, the failure
    with VtpmStore.open(tmp_path / "s") as store:
        where = f"KMIP server 127.0.0.1:{config.port}: cannot connect"
        _all_refused(store, _actions(tmp_path, backup), key.key_id, "'kms'", where)
        check = store.check_provider("kms")
        assert not check.ok and where in check.detail
        assert store.stop("vm1") is False  # stopping needs no key: it still answers


def test_kmip_revoked_key_and_shred_on_the_server(tmp_path: Path) -> None:
    """A key the KMS revoked is refused with the server's answer; shred destroys it there."""
    with kmip_server(tmp_path / "kms") as server:
        db = tmp_path / "kms" / "kmip.sqlite"
        with VtpmStore.init(
            tmp_path / "s", provider_id="kms", provider=kmip_config(server)
        ) as store:
            key = store.create("vm1", issuer=None, ek=["ecc-p256"]).key
            backup = store.backup("vm1", tmp_path / "vm1.bak")
            other = store.create("vm2", issuer=None, ek=["ecc-p256"]).key
            admin = KmipKeyProvider(server.config())
            try:
                from kmip.core.enums import RevocationReasonCode

                with admin._call(key.key_id, "Revoke") as client:
                    client.revoke(RevocationReasonCode.KEY_COMPROMISE, key.key_id)
                assert admin.key_state(key.key_id) == "COMPROMISED"
            finally:
                admin.close()
            actions = _actions(tmp_path, backup)
            del actions["delete-shred"], actions["clone-replace"]  # these need no old key
            store_names = store.names()
            assert store_names == ["vm1", "vm2"]
            for what, action in actions.items():
                before = _snapshot(store.root)
                with pytest.raises(VtpmTrustError) as info:
                    action(store)
                message = str(info.value)
                assert "'kms'" in message and key.key_id in message, (what, message)
                assert "Decrypt" in message, (what, message)  # the operation the KMS refused
                assert _snapshot(store.root) == before, (what, message)
            with store.running("vm2"):  # the other vTPM's key is not affected
                pass

            # shred: Revoke (already revoked: skipped) + Destroy; gone from the server's DB
            assert _kmip_objects(db, key.key_id) == 1
            assert store.delete("vm1", issuer=None, shred=True).shredded_key == key.key_id
            assert _kmip_objects(db, key.key_id) == 0
            # an active key is revoked first (a KMS refuses to Destroy an active key)
            assert _kmip_objects(db, other.key_id) == 1
            store.delete("vm2", issuer=None, shred=True)
            assert _kmip_objects(db, other.key_id) == 0
            with pytest.raises(
                VtpmTrustError,
                match=rf"missing key '{key.key_id}' of key provider 'kms'.*ITEM_NOT_FOUND",
            ):
                store.restore(backup)
            assert store.names() == [] and list((store.root / "tmp").iterdir()) == []


def _kmip_objects(db: Path, uid: str) -> int:
    """How many managed objects with Unique Identifier ``uid`` the PyKMIP server stores."""
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM managed_objects WHERE uid = ?", (int(uid),)
        ).fetchone()
    return int(n)


def test_pkcs11_wrong_pin(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    config = pkcs11_config(softhsm, tmp_path)
    with VtpmStore.init(tmp_path / "s", provider_id="hsm", provider=config) as store:
        key = store.create("vm1", issuer=None, ek=["ecc-p256"]).key
        backup = store.backup("vm1", tmp_path / "vm1.bak")
    assert config.pin_file is not None
    config.pin_file.write_text("0000\n")
    with VtpmStore.open(tmp_path / "s") as store:
        token = f"PKCS#11 token '{softhsm.label}'"
        _all_refused(
            store, _actions(tmp_path, backup), key.key_id, "'hsm'", token, "CKR_PIN_INCORRECT"
        )
        check = store.check_provider("hsm")
        assert not check.ok and "CKR_PIN_INCORRECT" in check.detail


def test_restore_where_the_token_lacks_the_key(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    """Same provider id, another token (without the key): refused naming both; nothing written."""
    with VtpmStore.init(
        tmp_path / "a", provider_id="hsm", provider=pkcs11_config(softhsm, tmp_path)
    ) as a:
        key = a.create("vm1", issuer=None, ek=["ecc-p256"]).key
        backup = a.backup("vm1", tmp_path / "vm1.bak")
    other = f"{softhsm.label}-b"
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", other,
         "--pin", softhsm.pin, "--so-pin", "5678"],
        check=True, capture_output=True,
    )  # fmt: skip
    import pkcs11

    pkcs11.unload(softhsm.module)  # SoftHSM2 lists its tokens at C_Initialize
    config = dataclasses.replace(pkcs11_config(softhsm, tmp_path), token_label=other)
    with VtpmStore.init(tmp_path / "b", provider_id="hsm", provider=config) as b:
        before = _snapshot(b.root)
        with pytest.raises(
            VtpmTrustError,
            match=rf"vTPM 'vm1': missing key '{key.key_id}' of key provider 'hsm' .*"
            rf"token '{other}'.*state untouched",
        ):
            b.restore(backup)
        assert _snapshot(b.root) == before and b.names() == []
