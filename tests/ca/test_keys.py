"""CA keys: the encrypted PKCS#8 file (never plaintext) and a real SoftHSM2 PKCS#11 token."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from asn1crypto import keys as akeys
from asn1crypto import pem

from ca.ek import CertifiableEk
from ca.home import CaHome
from ca.issuance import IssueRequest
from ca.keys import FileSigningKey, Pkcs11Config
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import ConfigError, StateError

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def test_key_file_is_encrypted_pkcs8(ca_home: CaHome) -> None:
    path = ca_home.path / "ca-key.p8"
    data = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600
    label, _, der = pem.unarmor(data)
    assert label == "ENCRYPTED PRIVATE KEY"
    info = akeys.EncryptedPrivateKeyInfo.load(der)
    assert info["encryption_algorithm"]["algorithm"].native == "pbes2"
    # nothing in it parses as a plaintext PrivateKeyInfo
    with pytest.raises(ValueError, match=r"."):
        akeys.PrivateKeyInfo.load(der).native  # noqa: B018


@pytest.mark.parametrize(
    ("case", "passphrase", "match"),
    [
        ("fail/key/wrong-passphrase", b"wrong", "cannot decrypt CA key .*wrong passphrase"),
        ("fail/key/no-passphrase", None, "the CA key is encrypted: give --passphrase-file"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_wrong_or_missing_passphrase(
    ca_home: CaHome, case: str, passphrase: bytes | None, match: str
) -> None:
    with pytest.raises((StateError, ConfigError), match=match):
        ca_home.open(passphrase=passphrase)


def test_plaintext_key_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "plain.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(StateError, match="not an encrypted PKCS#8 file"):
        FileSigningKey.load(path, PASSPHRASE)


@pytest.mark.swtpm
def test_pkcs11_softhsm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tpm_keys: dict[str, bytes]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    label = f"vtpm-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
    )
    home = CaHome(tmp_path / "ca")
    config = Pkcs11Config(SOFTHSM, label, "vtpm-ca")
    home.init(pkcs11=config, pin="1234", key_type="ecdsa-p256")
    assert not (home.path / "ca-key.p8").exists()
    with pytest.raises(StateError, match="cannot open PKCS#11 token"):
        home.open(pin="0000")
    ca = home.open(pin="1234")
    try:
        # the private key is sensitive and never extractable
        from pkcs11 import Attribute, ObjectClass

        key = ca.material.key._private  # type: ignore[attr-defined]
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        assert key.object_class == ObjectClass.PRIVATE_KEY
        ek = CertifiableEk.load(tpm_keys["ek-rsa"], allow_bare_key=False)
        result = ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4()))
        (tmp_path / "ek.der").write_bytes(result.certificate_der)
        crl = ca.revocation.crl()
        (tmp_path / "crl.der").write_bytes(crl)
    finally:
        ca.close()
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(home.path / "chain.pem"), str(tmp_path / "ek.der")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    crl_ok = subprocess.run(
        [
            "openssl",
            "crl",
            "-inform",
            "der",
            "-in",
            str(tmp_path / "crl.der"),
            "-CAfile",
            str(home.path / "chain.pem"),
            "-noout",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "verify OK" in crl_ok.stderr + crl_ok.stdout
