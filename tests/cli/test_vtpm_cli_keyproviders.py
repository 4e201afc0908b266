"""`vtpm init --key-provider`, `vtpm key-providers list/check/add`, `vtpm rekey`, `delete --shred`.

Against a real PyKMIP server (mutual TLS) and a SoftHSM2 token; the rekey
crash test SIGKILLs a real `vtpm rekey` at its named points.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests._keyproviders import SoftHsmToken
from tests.vtpm_core._kmip import KmipServer
from vtpm_cli.main import cli
from vtpm_core.instance import pick_port
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).parent / "vtpm")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def kmip_file(kmip: KmipServer, directory: Path) -> Path:
    """A KMIP settings file with paths relative to it (as an operator would write it)."""
    config = kmip.config()
    for src in (config.ca, config.cert, config.key):
        (directory / src.name).write_bytes(src.read_bytes())
    (directory / config.key.name).chmod(0o600)
    path = directory / "kmip.yaml"
    path.write_text(
        f"host: 127.0.0.1\nport: {kmip.port}\nca: {config.ca.name}\n"
        f"cert: {config.cert.name}\nkey: {config.key.name}\n"
    )
    return path


def pkcs11_file(softhsm: SoftHsmToken, directory: Path, pin: str | None = None) -> Path:
    pin_file = directory / "hsm.pin"
    pin_file.write_text((pin or softhsm.pin) + "\n")
    pin_file.chmod(0o600)
    path = directory / "hsm.yaml"
    path.write_text(
        json.dumps({"module": softhsm.module, "token_label": softhsm.label, "pin_file": "hsm.pin"})
    )
    return path


def test_kmip_store_from_the_cli(kmip: KmipServer, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    settings = kmip_file(kmip, tmp_path)
    r = run("init", "--store", store, "--key-provider", "kmip", "--provider-id", "kms",
            "--kmip-config", str(settings))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "key provider kms key id (one per vTPM)" in r.output
    doc = json.loads((tmp_path / "store" / "store.json").read_text())
    assert doc["default_key_provider"] == "kms"
    assert doc["key_providers"]["kms"]["ca"] == str(tmp_path / kmip.config().ca.name)

    r = run("create", "vm1", "--store", store, "--ek", "ecc-p256", "--ek-cert-mode", "external")
    assert r.exit_code == 0, r.output
    shown = json.loads(run("show", "vm1", "--store", store, "--json").output)
    assert shown["key_provider"] == "kms"
    key_id = shown["key_id"]

    listed = json.loads(run("key-providers", "list", "--store", store, "--json").output)
    assert listed == [
        {
            "id": "kms",
            "kind": "kmip",
            "where": f"KMIP server 127.0.0.1:{kmip.port}",
            "default": True,
            "key_per_vtpm": True,
            "vtpms": 1,
        }
    ]
    r = run("key-providers", "check", "--store", store)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"kms: ok (kmip, KMIP server 127.0.0.1:{kmip.port})")

    r = run("backup", "vm1", "--store", store, "-o", str(tmp_path / "vm1.bak"))
    assert r.exit_code == 0 and f"needs key {key_id} of key provider kms" in r.output

    r = run("rekey", "vm1", "--store", store)
    assert r.exit_code == 0, r.output
    assert f"vm1: rewrapped from kms/{key_id} to kms/" in r.output
    r = run("rekey", "vm1", "--store", store, "--data", "--json")
    assert r.exit_code == 0, r.output
    (moved,) = json.loads(r.output)
    assert moved["data_key"] == "new" and moved["to"]["provider"] == "kms"
    r = run("start", "vm1", "--store", store, "--port", str(pick_port()))
    assert r.exit_code == 0, r.output
    r = run("rekey", "vm1", "--store", store, "--data")
    assert r.exit_code == 1 and "'vm1' is running; `vtpm stop vm1` first" in r.output
    assert run("stop", "vm1", "--store", store).exit_code == 0

    r = run("delete", "vm1", "--store", store, "--keep-certs", "--shred")
    assert r.exit_code == 0, r.output
    assert f"keys destroyed: kms/{moved['to']['key_id']} kms/{key_id} kms/" in r.output
    assert "its backups cannot be restored" in r.output
    # the backup was made before both rekeys: shred destroyed its (retired) key too
    r = run("restore", str(tmp_path / "vm1.bak"), "--store", store)
    assert r.exit_code == 1
    assert f"missing key '{key_id}' of key provider 'kms'" in r.output
    assert "ITEM_NOT_FOUND" in r.output


def test_add_pkcs11_and_move_a_vtpm_there(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    assert run("init", "--store", store).exit_code == 0
    r = run("create", "vm1", "--store", store, "--ek", "ecc-p256", "--ek-cert-mode", "external")
    assert r.exit_code == 0, r.output
    r = run("delete", "vm1", "--store", store, "--keep-certs", "--shred")
    assert r.exit_code == 1 and "is shared" in r.output

    r = run("key-providers", "add", "hsm", "--store", store, "--kind", "pkcs11",
            "--config", str(pkcs11_file(softhsm, tmp_path)))  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("rekey", "vm1", "--store", store, "--to", "hsm")
    assert r.exit_code == 0, r.output
    assert " to hsm/vtpm-" in r.output
    r = run("create", "vm2", "--store", store, "--ek", "ecc-p256", "--ek-cert-mode", "external",
            "--key-provider", "hsm")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("key-providers", "check", "--store", store, "--json")
    assert r.exit_code == 0, r.output
    checks = {c["id"]: c for c in json.loads(r.output)}
    assert checks["hsm"]["ok"] and checks["hsm"]["vtpms"] == 2
    assert checks["local"]["ok"] and checks["local"]["vtpms"] == 0

    # a wrong PIN: check fails naming the provider and the token's answer, exit 1
    pkcs11_file(softhsm, tmp_path, pin="0000")
    r = run("key-providers", "check", "hsm", "--store", store)
    assert r.exit_code == 1
    assert "hsm: FAILED (pkcs11" in r.output and "CKR_PIN_INCORRECT" in r.output
    r = run("start", "vm1", "--store", store)
    assert r.exit_code == 1
    assert "key provider 'hsm'" in r.output and "CKR_PIN_INCORRECT" in r.output

    r = run("key-providers", "check", "nope", "--store", store)
    assert r.exit_code == 1 and "no key provider 'nope'" in r.output
    r = run("create", "vm3", "--store", store, "--key-provider", "nope", "--ek-cert-mode",
            "external")  # fmt: skip
    assert r.exit_code == 1 and "no key provider 'nope' (it has: hsm, local)" in r.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(["--key-provider", "kmip"], "needs its settings file", id="fail/init/no-file"),
        pytest.param(["--key-provider", "pkcs11", "--kmip-config", "x"], "another kind",
                     id="fail/init/other-kind"),
    ],
)  # fmt: skip
def test_init_refuses(tmp_path: Path, args: list[str], match: str) -> None:
    r = run("init", "--store", str(tmp_path / "s"), *args)
    assert r.exit_code == 2 and match in r.output
    assert not (tmp_path / "s" / "store.json").exists()


def test_init_settings_typo(tmp_path: Path) -> None:
    bad = tmp_path / "kmip.yaml"
    bad.write_text("host: 127.0.0.1\nport: 5696\nca: a\ncert: b\nkey: c\nkey_per_vm: true\n")
    r = run("init", "--store", str(tmp_path / "s"), "--key-provider", "kmip",
            "--kmip-config", str(bad))  # fmt: skip
    assert r.exit_code == 2
    assert "key_providers.kmip.key_per_vm" in r.output and "unknown field" in r.output


@pytest.mark.parametrize(
    ("args", "point"),
    [
        pytest.param([], "rekey:unwrapped", id="kek/unwrapped"),
        pytest.param([], "rekey:wrapped", id="kek/wrapped"),
        pytest.param([], "rekey:committed", id="kek/committed"),
        pytest.param(["--data"], "rekey:unwrapped", id="data/unwrapped"),
        pytest.param(["--data"], "rekey-data:wrapped", id="data/wrapped"),
        pytest.param(["--data"], "rekey-data:staged", id="data/staged"),
        pytest.param(["--data"], "rekey-data:committed", id="data/committed"),
    ],
)
def test_rekey_killed(tmp_path: Path, args: list[str], point: str) -> None:
    """SIGKILL at each named point: the vTPM opens with the old or the new key, never neither.

    With --data the state must be the old file under the old key, or the
    re-encrypted one under the new key; the old KEK is never lost.
    """
    store = str(tmp_path / "store")
    assert run("init", "--store", store).exit_code == 0
    r = run("create", "vm1", "--store", store, "--ek", "ecc-p256", "--ek-cert-mode", "external")
    assert r.exit_code == 0, r.output
    with VtpmStore.open(Path(store)) as s:
        old = s.get("vm1").key
        old_state = (s.state_dir("vm1") / "tpm2-00.permall").read_bytes()
        old_data_key = s.data_key(s.get("vm1"))
    env = dict(os.environ, VTPM_STORE=store, VTPM_CRASH_AT=point)
    proc = subprocess.Popen([VTPM, "rekey", "vm1", *args], env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        assert proc.stderr.readline().decode().strip() == f"paused at {point}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    committed = point.endswith(":committed")
    with VtpmStore.open(Path(store)) as s:
        now = s.get("vm1")
        assert (now.key == old) is not committed
        state = (s.state_dir("vm1") / "tpm2-00.permall").read_bytes()
        assert (state == old_state) is not (committed and args == ["--data"])
        assert (s.data_key(now) == old_data_key) is not (committed and args == ["--data"])
        with s.running("vm1"):
            pass
        assert s.providers.get("local").has_key(old.key_id)  # the old KEK is never lost
        assert list((s.root / "tmp").iterdir()) == []  # the dead rekey's staging is cleared


def test_shred_killed_between_keys(tmp_path: Path) -> None:
    """SIGKILL after the first KEK is destroyed: the vTPM is still listed, cannot start (saying
    which key is missing), and `delete --shred` again finishes the job."""
    store = str(tmp_path / "store")
    assert run("init", "--store", store, "--key-per-vtpm").exit_code == 0
    r = run("create", "vm1", "--store", store, "--ek", "ecc-p256", "--ek-cert-mode", "external")
    assert r.exit_code == 0, r.output
    assert run("rekey", "vm1", "--store", store).exit_code == 0
    with VtpmStore.open(Path(store)) as s:
        keys = [k.key_id for k in s.get("vm1").all_keys()]
    env = dict(os.environ, VTPM_STORE=store, VTPM_CRASH_AT="delete:key-destroyed")
    proc = subprocess.Popen(
        [VTPM, "delete", "vm1", "--keep-certs", "--shred"], env=env, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        assert proc.stderr.readline().decode().strip() == "paused at delete:key-destroyed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    with VtpmStore.open(Path(store)) as s:
        assert s.names() == ["vm1"]
        assert [s.providers.get("local").has_key(k) for k in keys] == [False, True]
    r = run("start", "vm1", "--store", store)
    assert r.exit_code == 1 and f"missing key '{keys[0]}' of key provider 'local'" in r.output
    r = run("delete", "vm1", "--store", store, "--keep-certs", "--shred")
    assert r.exit_code == 0, r.output
    assert "its backups cannot be restored" in r.output
    with VtpmStore.open(Path(store)) as s:
        assert s.names() == [] and not any(s.providers.get("local").has_key(k) for k in keys)
