"""`vtpm init/create/list/show/start/stop/backup/restore/clone/delete` with the real CA.

tpm2-tools reads the vTPM back; openssl verifies the EK certificates against
the CA's chain; the CA's ledger shows revocation and clone bindings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cli._vtpm_env import VtpmEnv

pytestmark = pytest.mark.swtpm


@pytest.fixture
def env(tmp_path: Path) -> VtpmEnv:
    return VtpmEnv.make(tmp_path)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tool(tcti: str, cwd: Path, *args: str) -> str:
    e = dict(os.environ, TPM2TOOLS_TCTI=tcti)
    r = subprocess.run(list(args), env=e, cwd=cwd, capture_output=True, text=True, timeout=60)
    subprocess.run(["tpm2_flushcontext", "-t"], env=e, capture_output=True, timeout=30)
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout


def test_lifecycle_with_the_real_ca(env: VtpmEnv, tmp_path: Path) -> None:
    r = env.run("create", "vm1", "--json", ca=True)
    assert r.exit_code == 0, r.output
    created = json.loads(r.stdout)
    serials = {e["kind"]: int(e["serial"], 16) for e in created["eks"]}
    assert set(serials) == {"rsa2048", "ecc-p256"}

    r = env.run("list", "--json")
    assert [v["name"] for v in json.loads(r.stdout)] == ["vm1"]
    r = env.run("show", "vm1")
    assert f"vm_id: {created['vm_id']}" in r.stdout and "running: no" in r.stdout

    from vtpm_core.swtpm import free_tcp_port_pair

    port = free_tcp_port_pair()
    r = env.run("start", "vm1", "--port", str(port))
    assert r.exit_code == 0, r.output
    tcti = r.stdout.strip().removeprefix("TPM2TOOLS_TCTI=")
    assert tcti == f"swtpm:host=127.0.0.1,port={port}"
    try:
        assert "running: yes" in env.run("show", "vm1").stdout
        for index, alg, kind in (
            ("0x01c00002", "rsa", "rsa2048"),
            ("0x01c0000a", "ecc", "ecc-p256"),
        ):
            _tool(tcti, tmp_path, "tpm2_nvread", index, "-o", f"{alg}.der")
            _tool(tcti, tmp_path, "tpm2_createek", "-G", alg, "-c", f"{alg}.ctx",
                  "-u", f"{alg}.pem", "-f", "pem")  # fmt: skip
            cert = x509.load_der_x509_certificate((tmp_path / f"{alg}.der").read_bytes())
            ek = serialization.load_pem_public_key((tmp_path / f"{alg}.pem").read_bytes())
            assert _spki(cert.public_key()) == _spki(ek)
            assert cert.serial_number == serials[kind]
            subprocess.run(["openssl", "x509", "-inform", "der", "-in", f"{alg}.der",
                            "-out", f"{alg}.pem.crt"], cwd=tmp_path, check=True)  # fmt: skip
            v = subprocess.run(
                ["openssl", "verify", "-CAfile", str(env.ca_home / "chain.pem"), f"{alg}.pem.crt"],
                cwd=tmp_path, capture_output=True, text=True,
            )  # fmt: skip
            assert v.returncode == 0, v.stdout + v.stderr
        out = _tool(tcti, tmp_path, "tpm2_nvreadpublic")
        assert out.count("value: 0x62072801") == 2
        # a second start is refused while it runs
        r = env.run("start", "vm1", "--port", str(port + 2))
        assert r.exit_code == 1 and "already running" in r.stderr
    finally:
        assert env.run("stop", "vm1").stdout.strip() == "vm1: stopped"
    assert "running: no" in env.run("show", "vm1").stdout

    # QEMU attachment arguments
    sock = tmp_path / "s" / "vm1.ctrl"
    r = env.run("start", "vm1", "--socket", str(sock))
    try:
        assert r.stdout.split() == [
            "-chardev", f"socket,id=chrtpm,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
        ]  # fmt: skip
    finally:
        env.run("stop", "vm1")

    # backup, clone, delete (revokes), restore
    assert env.run("backup", "vm1", "-o", str(tmp_path / "vm1.bak")).exit_code == 0
    r = env.run("clone", "vm1", "vm1-copy", "--mode", "copy", "--json", ca=True)
    assert r.exit_code == 0, r.output
    copy = json.loads(r.stdout)
    assert {int(e["serial"], 16) for e in copy["eks"]} == set(serials.values())
    assert env.ledger_bindings(serials["rsa2048"])[copy["vm_id"]] == "clone-copy"
    r = env.run("clone", "vm1", "vm1-new", "--mode", "replace", "--json", ca=True)
    assert r.exit_code == 0, r.output
    new_serials = {int(e["serial"], 16) for e in json.loads(r.stdout)["eks"]}
    assert not new_serials & set(serials.values())

    r = env.run("delete", "vm1-new", ca=True)
    assert r.exit_code == 0, r.output
    assert all(env.ledger_status(s) == "revoked" for s in new_serials)
    r = env.run("delete", "vm1", ca=True)
    assert "still used by a copy" in r.stdout  # the copy holds the same EK certificates
    assert env.ledger_status(serials["rsa2048"]) == "issued"
    r = env.run("delete", "vm1-copy", ca=True)
    assert r.exit_code == 0, r.output
    assert all(env.ledger_status(s) == "revoked" for s in serials.values())
    assert json.loads(env.run("list", "--json").stdout) == []

    r = env.run("restore", str(tmp_path / "vm1.bak"))
    assert r.exit_code == 0 and r.stdout.startswith("vm1: restored"), r.output
    assert json.loads(env.run("show", "vm1", "--json").stdout)["vm_id"] == created["vm_id"]


def test_create_count_with_progress(env: VtpmEnv) -> None:
    r = env.run("create", "--count", "3", "batch", "--jobs", "2", ca=True)
    assert r.exit_code == 0, r.output
    assert "creating 3 vTPMs" in r.stderr and re.search(r"3 vTPMs in [\d.]+ s", r.stderr)
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["batch-0001", "batch-0002", "batch-0003"]


@pytest.mark.parametrize(
    ("args", "ca", "code", "message"),
    [
        pytest.param(["create", "x"], False, 2, "no CA: give --ca-home", id="fail/create/no-ca"),
        pytest.param(["create", "x", "--ek", "rsa1024"], True, 2, "unknown EK kind 'rsa1024'",
                     id="fail/create/ek-kind"),
        pytest.param(["create", "../x"], True, 2, "invalid vTPM name", id="fail/create/name"),
        pytest.param(["show", "nope"], False, 1, "no vTPM named 'nope'", id="fail/show/unknown"),
        pytest.param(["start", "nope", "--port", "5000", "--socket", "/tmp/s"], False, 2,
                     "either --socket or --port", id="fail/start/both"),
        pytest.param(["clone", "a", "b", "--mode", "copy"], False, 2, "no CA",
                     id="fail/clone/no-ca"),
        pytest.param(["delete", "nope"], False, 2, "no CA", id="fail/delete/no-ca"),
    ],
)  # fmt: skip
def test_cli_refusals(env: VtpmEnv, args: list[str], ca: bool, code: int, message: str) -> None:
    r = env.run(*args, ca=ca)
    assert r.exit_code == code, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_restore_of_a_non_backup_and_a_non_store(env: VtpmEnv, tmp_path: Path) -> None:
    bad = tmp_path / "x.bak"
    bad.write_bytes(b"hello, this is not a backup")
    r = env.run("restore", str(bad))
    assert r.exit_code == 2 and "not a vtpm-trust backup" in r.stderr
    from click.testing import CliRunner

    from vtpm_cli.main import cli

    r = CliRunner().invoke(cli, ["list", "--store", str(tmp_path / "nostore")])
    assert r.exit_code == 2 and "is not a vTPM store" in r.stderr
