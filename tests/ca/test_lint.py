"""The lint step refuses what it must: pkilint findings, and per-instance structural errors."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.ek import CertifiableEk
from ca.home import CaHome
from ca.issuance import IssueRequest
from ca.lint import Linter, TbsParts
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import VerificationError

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
CA_KEY = ec.generate_private_key(ec.SECP256R1())
ISSUER = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "lint CA")])


def _cert(
    serial: int = (1 << 100) + 7,
    ski: bool = True,
    after_days: int = 10,
    key: ec.EllipticCurvePublicKey | None = None,
) -> tuple[x509.Certificate, bytes, bytes]:
    ek = key or ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .serial_number(serial)
        .issuer_name(ISSUER)
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ek")]))
        .public_key(ek)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=after_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()), critical=False
        )
    )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ek), critical=False
        )
    cert = builder.sign(CA_KEY, hashes.SHA256())
    spki = ek.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert, cert.public_bytes(serialization.Encoding.DER), spki


@pytest.mark.parametrize(
    ("case", "kwargs", "match"),
    [
        ("fail/lint/pkilint-no-ski", {"ski": False}, r"lint\.pkilint: .*skid"),
        ("fail/lint/serial-short", {"serial": 12345}, r"lint\.serial"),
        ("fail/lint/validity", {"after_days": 0}, r"lint\.validity"),
        ("fail/lint/spki", {"other_spki": True}, r"lint\.spki"),
        ("fail/lint/issuer", {"other_issuer": True}, r"lint\.issuer"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_lint_refuses(case: str, kwargs: dict[str, object], match: str) -> None:
    other_spki = bool(kwargs.pop("other_spki", False))
    other_issuer = bool(kwargs.pop("other_issuer", False))
    cert, der, spki = _cert(**kwargs)  # type: ignore[arg-type]
    if other_spki:
        spki = _cert()[2]
    issuer = x509.Name([]) if other_issuer else ISSUER
    with pytest.raises(VerificationError, match=match):
        Linter("shape").check(cert, der, spki, issuer)


def test_shape_linted_once_then_structural() -> None:
    linter = Linter("shape")
    cert, der, spki = _cert()
    linter.check(cert, der, spki, ISSUER)
    assert len(linter._passed) == 1
    cert2, der2, spki2 = _cert(serial=(1 << 100) + 9)
    linter.check(cert2, der2, spki2, ISSUER)  # same shape: no new pkilint run
    assert len(linter._passed) == 1
    with pytest.raises(VerificationError, match=r"lint\.serial"):  # still checked per instance
        linter.check(*_cert(serial=5)[:2], _cert(serial=5)[2], ISSUER)


def test_lint_every_mode_issues(tmp_path: Path) -> None:
    home = CaHome(tmp_path / "ca")
    home.init(passphrase=PASSPHRASE, ek_profile={"lint": "every"})
    ca = home.open(passphrase=PASSPHRASE)
    try:
        assert ca.issuance.linter.mode == "every"
        for _ in range(2):
            ek = CertifiableEk.from_key(
                ec.generate_private_key(ec.SECP256R1()).public_key(),
                template="bare-pem",
                name=None,
                raw=b"",
            )
            result = ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4()))
            assert result.record.status == "issued"
    finally:
        ca.close()


def _with_ski_value(value: bytes) -> tuple[x509.Certificate, bytes, bytes]:
    """A certificate of _cert()'s shape whose subjectKeyIdentifier extnValue is ``value``."""
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = (
        x509.CertificateBuilder()
        .serial_number((1 << 100) + 11)
        .issuer_name(ISSUER)
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ek")]))
        .public_key(ek)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.14"), value), critical=False
        )
        .sign(CA_KEY, hashes.SHA256())
    )
    spki = ek.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert, cert.public_bytes(serialization.Encoding.DER), spki


def test_extensions_equal_to_the_reference_or_parsed() -> None:
    """After the first certificate of a shape, extensions byte-equal to its are not parsed
    again; a differing subjectKeyIdentifier must be an OCTET STRING, and anything else
    that differs sends the whole set through cryptography's parser."""
    linter = Linter("shape")
    linter.check(*_cert(), ISSUER)
    linter.check(*_with_ski_value(b"\x04\x03abc"), ISSUER)  # another, well-formed SKI
    for bad in (b"\x05\x00", b"\x04\x05abc", b"\x04\x81\x01a", b""):
        with pytest.raises(VerificationError, match=r"lint\.extensions"):
            linter.check(*_with_ski_value(bad), ISSUER)
    # another AKI (differs from the reference's): parsed by cryptography, and fine
    other_ca = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert, _der, spki = _cert()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(other_ca)
    rebuilt = (
        x509.CertificateBuilder()
        .serial_number(cert.serial_number)
        .issuer_name(ISSUER)
        .subject_name(cert.subject)
        .public_key(cert.public_key())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(cert.public_key()), critical=False)
        .sign(CA_KEY, hashes.SHA256())
    )
    linter.check(rebuilt, rebuilt.public_bytes(serialization.Encoding.DER), spki, ISSUER)
    assert len(linter._passed) == 1


def test_tbs_parts_agree_with_cryptography() -> None:
    from asn1crypto import core as asn1

    cert, der, spki = _cert()
    parts = TbsParts.of(der)
    assert parts.spki == spki
    assert parts.issuer == ISSUER.public_bytes()
    got = [(asn1.ObjectIdentifier.load(oid).dotted, flag != b"") for oid, flag in parts.extensions]
    assert got == [(e.oid.dotted_string, e.critical) for e in cert.extensions]
    for ext, value in zip(cert.extensions, parts.extension_values, strict=True):
        assert ext.value.public_bytes() == value


_SAMPLE_DER = _cert()[1]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_tbs_parts_of_mutated_der_is_a_value_or_lint_der(data: st.DataObject) -> None:
    der = _SAMPLE_DER
    at = data.draw(st.integers(0, len(der) - 1))
    insert = data.draw(st.binary(max_size=3))
    cut = data.draw(st.integers(0, 3))
    mutated = der[:at] + insert + der[at + cut :]
    check = "lint.der"
    try:
        TbsParts.of(mutated)
    except VerificationError as exc:
        check = exc.check
    assert check == "lint.der"
