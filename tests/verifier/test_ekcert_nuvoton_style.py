"""A whole EK chain whose CA name is a multi-valued RDN in non-DER SET order (as Nuvoton's).

python-cryptography refuses such certificates (InvalidSetOrdering); OpenSSL
accepts them. The certificates are DER-encoded by hand here so that the SET
order is exactly the one a Nuvoton CA uses (CN, O, C); the signatures are
real (ECDSA P-256 over the original tbsCertificate bytes).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verifier.ekcert import TrustStore, parse_certificate, validate_ek_certificate
from vtpm_core.errors import VerificationError


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, body)


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _attr(oid: str, value: str, tag: int = 0x0C) -> bytes:
    return _seq(_oid(oid), _tlv(tag, value.encode()))


def _ext(oid: str, critical: bool, value: bytes) -> bytes:
    return _seq(_oid(oid), *([_tlv(0x01, b"\xff")] if critical else []), _tlv(0x04, value))


def _time(when: datetime) -> bytes:
    return _tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())


ECDSA_SHA256 = _seq(_oid("1.2.840.10045.4.3.2"))
# CN, O, C in one RDN: the SET is NOT in DER order (C's encoding sorts first)
UNSORTED_NAME = _seq(
    _tlv(
        0x31,
        _attr("2.5.4.3", "Nuvoton-style TPM Root CA 0001")
        + _attr("2.5.4.10", "vtpm-trust test")
        + _attr("2.5.4.6", "TW", 0x13),
    )
)


def _certificate(tbs_fields: list[bytes], key: ec.EllipticCurvePrivateKey) -> bytes:
    tbs = _seq(*tbs_fields)
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _seq(tbs, ECDSA_SHA256, _tlv(0x03, b"\x00" + signature))


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, rsa.RSAPublicKey]:
    base = tmp_path_factory.mktemp("nuvoton")
    now = datetime.now(UTC)
    validity = _seq(_time(now - timedelta(days=1)), _time(now + timedelta(days=365)))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(
        [
            _tlv(0xA0, _tlv(0x02, b"\x02")),
            _tlv(0x02, b"\x01\x10"),
            ECDSA_SHA256,
            UNSORTED_NAME,
            validity,
            UNSORTED_NAME,
            _spki(ca_key.public_key()),
            _tlv(0xA3, _seq(
                _ext("2.5.29.19", True, _seq(_tlv(0x01, b"\xff"))),
                _ext("2.5.29.15", True, _tlv(0x03, b"\x01\x06")),  # keyCertSign, cRLSign
            )),
        ],
        ca_key,
    )  # fmt: skip
    ek_key = rsa.generate_private_key(65537, 2048).public_key()
    tpm_attrs = _seq(_tlv(0x31, _attr("2.23.133.2.1", "id:4E544300", 0x0C)
                                + _attr("2.23.133.2.2", "NPCT75x", 0x0C)
                                + _attr("2.23.133.2.3", "id:00070002", 0x0C)))  # fmt: skip
    ek = _certificate(
        [
            _tlv(0xA0, _tlv(0x02, b"\x02")),
            _tlv(0x02, b"\x42\x42\x42\x42\x42\x42\x42\x42"),
            ECDSA_SHA256,
            UNSORTED_NAME,  # the issuer name copied byte for byte, unsorted
            validity,
            _seq(),  # empty subject, as vendors do
            _spki(ek_key),
            _tlv(0xA3, _seq(
                _ext("2.5.29.19", True, _seq()),
                _ext("2.5.29.15", True, _tlv(0x03, b"\x05\x20")),  # keyEncipherment
                _ext("2.5.29.37", False, _seq(_oid("2.23.133.8.1"))),
                _ext("2.5.29.17", True, _seq(_tlv(0xA4, tpm_attrs))),
            )),
        ],
        ca_key,
    )  # fmt: skip
    (base / "root.der").write_bytes(root)
    (base / "ek.der").write_bytes(ek)
    return base, ek, ek_key


def test_python_cryptography_refuses_and_openssl_accepts(
    chain: tuple[Path, bytes, rsa.RSAPublicKey],
) -> None:
    base, _, _ = chain
    with pytest.raises(ValueError, match="InvalidSetOrdering"):
        x509.load_der_x509_certificate((base / "root.der").read_bytes())
    for name in ("root.der", "ek.der"):
        subprocess.run(
            ["openssl", "x509", "-inform", "der", "-in", str(base / name),
             "-out", str(base / f"{name}.pem")],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(base / "root.der.pem"), str(base / "ek.der.pem")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_lenient_chain_validates_over_original_bytes(
    chain: tuple[Path, bytes, rsa.RSAPublicKey],
) -> None:
    base, ek, ek_key = chain
    result = validate_ek_certificate(ek, TrustStore.load([base / "root.der"]), ek_public=ek_key)
    assert result.certificate.x509 is None and result.chain[1].x509 is None
    assert "InvalidSetOrdering" in (result.certificate.strict_error or "")
    assert (result.tpm_manufacturer, result.tpm_model) == ("id:4E544300", "NPCT75x")
    assert any("not strict DER" in w for w in result.warnings)


def test_a_changed_byte_in_the_unsorted_name_breaks_the_signature(
    chain: tuple[Path, bytes, rsa.RSAPublicKey],
) -> None:
    base, ek, _ = chain
    tampered = bytearray(ek)
    at = bytes(tampered).index(b"NPCT75x")
    tampered[at] = ord("M")
    assert parse_certificate(bytes(tampered)).strict_error is not None
    with pytest.raises(
        VerificationError, match=r"^ek\.chain\.signature: signature does not verify"
    ):
        validate_ek_certificate(bytes(tampered), TrustStore.load([base / "root.der"]))
