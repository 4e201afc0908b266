"""`vtpm ca ...` end to end as a user runs it: root and subordinate mode (parent CA made with
openssl), issue-ek from tpm2-tools files, revoke, crl, and one-line errors with exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ca.conftest import PASSPHRASE

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).with_name("vtpm"))


def vtpm(*args: str, cwd: Path, ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "VTPM_CA_PASSPHRASE": PASSPHRASE.decode(), **env}
    result = subprocess.run(
        [VTPM, "ca", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture(scope="module")
def initialised_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `vtpm ca init` per module; tests get a copy (the CLI start-up costs ~1 s)."""
    d = tmp_path_factory.mktemp("cli-home")
    vtpm("init", "--home", "h", cwd=d)
    return d / "h"


@pytest.fixture
def ek_files(tmp_path: Path, tpm_keys: dict[str, bytes]) -> Path:
    for name in ("ek-rsa", "ek-ecc", "ak", "key"):
        (tmp_path / f"{name}.pub").write_bytes(tpm_keys[name])
    (tmp_path / "ek-rsa.pem").write_bytes(tpm_keys["ek-rsa-pem"])
    return tmp_path


def test_root_issue_revoke_crl(ek_files: Path) -> None:
    d = ek_files
    out = vtpm(
        "init",
        "--home",
        "h",
        "--key-type",
        "ecdsa-p384",
        "--subject",
        "CN=Test VMCA,O=T",
        "--validity-years",
        "5",
        cwd=d,
    )
    assert "root CA created" in out.stdout
    first = vtpm(
        "issue-ek",
        "--home",
        "h",
        "--ek-public",
        "ek-rsa.pub",
        "--vm-name",
        "a",
        "--tpm-manufacturer",
        "0x49424D00",
        "--out",
        "rsa.pem",
        cwd=d,
    )
    again = vtpm("issue-ek", "--home", "h", "--ek-public", "ek-rsa.pub", "--out", "rsa2.pem", cwd=d)
    serial = first.stdout.split("serial ")[1].split()[0]
    assert first.stdout.startswith("issued:") and again.stdout.startswith("existing certificate:")
    assert (d / "rsa.pem").read_bytes() == (d / "rsa2.pem").read_bytes()
    assert openssl("verify", "-CAfile", "h/chain.pem", "rsa.pem", cwd=d).returncode == 0
    text = openssl("x509", "-in", "rsa.pem", "-noout", "-text", cwd=d).stdout
    assert "Signature Algorithm: ecdsa-with-SHA384" in text and "2.23.133.8.1" in text
    listing = vtpm("list", "--home", "h", cwd=d).stdout
    assert serial in listing and "L-1" in listing
    vtpm("revoke", "--home", "h", serial, "--reason", "superseded", cwd=d)
    vtpm("crl", "--home", "h", "--out", "crl.der", cwd=d)
    openssl("crl", "-inform", "der", "-in", "crl.der", "-out", "crl.pem", cwd=d)
    (d / "all.pem").write_bytes((d / "h/chain.pem").read_bytes() + (d / "crl.pem").read_bytes())
    check = openssl("verify", "-crl_check", "-CAfile", "all.pem", "rsa.pem", cwd=d)
    assert check.returncode != 0 and "certificate revoked" in check.stdout + check.stderr


@pytest.mark.parametrize(
    ("case", "args", "code", "message"),
    [
        (
            "fail/cli/no-home",
            ["crl", "--home", "nohome", "--out", "x"],
            2,
            "error: nohome is not a CA home",
        ),
        (
            "fail/cli/wrong-passphrase",
            ["crl", "--home", "h", "--out", "x"],
            1,
            "error: cannot decrypt CA key h/ca-key.p8: wrong passphrase?",
        ),
        (
            "fail/cli/not-an-ek",
            ["issue-ek", "--home", "h", "--ek-public", "key.pub", "--out", "x"],
            1,
            "error: ek.template: not a TCG EK: objectAttributes",
        ),
        (
            "fail/cli/ak",
            ["issue-ek", "--home", "h", "--ek-public", "ak.pub", "--out", "x"],
            1,
            "error: ek.template: not a TCG EK",
        ),
        (
            "fail/cli/truncated",
            ["issue-ek", "--home", "h", "--ek-public", "cut.pub", "--out", "x"],
            2,
            "error: TPM",
        ),
        (
            "fail/cli/bare-pem",
            ["issue-ek", "--home", "h", "--ek-public", "ek-rsa.pem", "--out", "x"],
            1,
            "error: ek.bare_key",
        ),
        (
            "fail/cli/bad-vm-id",
            [
                "issue-ek",
                "--home",
                "h",
                "--ek-public",
                "ek-rsa.pub",
                "--vm-id",
                "vm1",
                "--out",
                "x",
            ],
            2,
            "error: --vm-id: not a UUID",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_one_line_errors(
    ek_files: Path, initialised_home: Path, case: str, args: list[str], code: int, message: str
) -> None:
    d = ek_files
    shutil.copytree(initialised_home, d / "h")
    (d / "cut.pub").write_bytes((d / "ek-rsa.pub").read_bytes()[:120])
    env = {"VTPM_CA_PASSPHRASE": "wrong"} if case == "fail/cli/wrong-passphrase" else {}
    result = vtpm(*args, cwd=d, ok=False, **env)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bare_pem_with_flag(ek_files: Path, initialised_home: Path) -> None:
    d = ek_files
    shutil.copytree(initialised_home, d / "h")
    out = vtpm(
        "issue-ek",
        "--home",
        "h",
        "--ek-public",
        "ek-rsa.pem",
        "--allow-bare-key",
        "--out",
        "bare.pem",
        cwd=d,
    )
    assert "bare-pem" in out.stdout


def test_subordinate_under_openssl_parent(ek_files: Path) -> None:
    d = ek_files
    made = openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "parent.key",
        "-out",
        "parent.pem",
        "-subj",
        "/CN=Enterprise Root",
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    assert made.returncode == 0, made.stderr
    out = vtpm(
        "init",
        "--home",
        "sub",
        "--subordinate",
        "--csr-out",
        "sub.csr",
        "--subject",
        "CN=VMCA Sub,O=Example",
        cwd=d,
    )
    assert "CSR written" in out.stdout
    checked = openssl("req", "-in", "sub.csr", "-verify", "-noout", cwd=d)
    assert "verify OK" in checked.stdout + checked.stderr, checked.stderr
    early = vtpm(
        "issue-ek", "--home", "sub", "--ek-public", "ek-ecc.pub", "--out", "x", cwd=d, ok=False
    )
    assert early.returncode == 1 and "import-chain" in early.stderr
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    signed = openssl(
        "x509",
        "-req",
        "-in",
        "sub.csr",
        "-CA",
        "parent.pem",
        "-CAkey",
        "parent.key",
        "-out",
        "sub.pem",
        "-days",
        "1000",
        "-extfile",
        "ext.cnf",
        cwd=d,
    )
    assert signed.returncode == 0, signed.stderr
    wrong = vtpm("import-chain", "--home", "sub", "parent.pem", "parent.pem", cwd=d, ok=False)
    assert "not for this CA's key" in wrong.stderr
    vtpm("import-chain", "--home", "sub", "sub.pem", "parent.pem", cwd=d)
    vtpm("issue-ek", "--home", "sub", "--ek-public", "ek-ecc.pub", "--out", "ecc.pem", cwd=d)
    chain = (d / "sub/chain.pem").read_text()
    assert chain.count("BEGIN CERTIFICATE") == 2
    ok = openssl("verify", "-CAfile", "parent.pem", "-untrusted", "sub/ca.pem", "ecc.pem", cwd=d)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the EK certificate does not verify against the sub CA alone as a trust anchor
    # without the parent (openssl needs the full chain to a self-signed root)
    alone = openssl("verify", "-CAfile", "sub/ca.pem", "ecc.pem", cwd=d)
    assert alone.returncode != 0
