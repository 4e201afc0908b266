"""The lint cache in the CA home (ca.lint.LintCache): a fresh process skips pkilint for a
lint key this CA issued a certificate of, and for nothing else."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import ca.lint
from ca.ek import CertifiableEk
from ca.home import CaHome
from ca.issuance import IssueRequest
from ca.lint import LintCache, Linter, TbsParts, lint_key
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import VerificationError

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _ek(kind: str = "ecc") -> CertifiableEk:
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ecc"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    return CertifiableEk.from_key(key.public_key(), template="bare-pem", name=None, raw=b"")


def _issue_in_a_fresh_process(home: Path, **request: str) -> dict[str, object]:
    """Open the CA home and issue one ECC EK certificate in a new interpreter; report
    whether pkilint was imported and how the issuance went."""
    script = f"""
import json, sys, uuid
sys.path.insert(0, {str(REPO)!r})
from cryptography.hazmat.primitives.asymmetric import ec
from ca.ek import CertifiableEk
from ca.home import CaHome
from ca.issuance import IssueRequest
from vtpm_core.errors import VerificationError
ek = CertifiableEk.from_key(ec.generate_private_key(ec.SECP256R1()).public_key(),
                            template="bare-pem", name=None, raw=b"")
ca = CaHome({str(home)!r}).open(passphrase={PASSPHRASE!r})
try:
    result = ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4(), **{request!r}))
    outcome = result.record.status
except VerificationError as exc:
    outcome = str(exc)
finally:
    ca.close()
print(json.dumps({{"pkilint": "pkilint" in sys.modules, "outcome": outcome}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A CA home that issued one ECC and one RSA certificate (so two cache entries)."""
    CaHome(tmp_path / "ca").init(passphrase=PASSPHRASE)
    ca_ = CaHome(tmp_path / "ca").open(passphrase=PASSPHRASE)
    try:
        for kind in ("ecc", "rsa"):
            ca_.issuance.issue(IssueRequest(ek=_ek(kind), vm_id=uuid.uuid4()))
    finally:
        ca_.close()
    return tmp_path / "ca"


def test_a_cache_hit_does_not_import_pkilint(home: Path) -> None:
    assert len(list((home / "lint-cache").glob("*.der"))) == 2
    assert _issue_in_a_fresh_process(home) == {"pkilint": False, "outcome": "issued"}
    # the control: without the cache the same issuance imports (and runs) pkilint
    for entry in (home / "lint-cache").iterdir():
        entry.unlink()
    assert _issue_in_a_fresh_process(home) == {"pkilint": True, "outcome": "issued"}
    assert len(list((home / "lint-cache").glob("*.der"))) == 1  # learnt again


def test_a_changed_shape_is_linted_again(home: Path) -> None:
    """Another TPM model in the SAN is another lint key: pkilint runs, and the new
    key gets its own entry."""
    doc = _issue_in_a_fresh_process(home, tpm_model="another model")
    assert doc == {"pkilint": True, "outcome": "issued"}
    assert len(list((home / "lint-cache").glob("*.der"))) == 3
    doc = _issue_in_a_fresh_process(home, tpm_model="another model")
    assert doc == {"pkilint": False, "outcome": "issued"}


def test_pkilint_runs_once_per_key_across_openings(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real = ca.lint.pkilint_findings

    def counting(der: bytes) -> list[str]:
        calls.append(der)
        return real(der)

    monkeypatch.setattr(ca.lint, "pkilint_findings", counting)
    for model in (None, None, "m2", "m2", None):
        opened = CaHome(home).open(passphrase=PASSPHRASE)  # a new Linter each time
        try:
            extra = {"tpm_model": model} if model else {}
            opened.issuance.issue(IssueRequest(ek=_ek(), vm_id=uuid.uuid4(), **extra))
        finally:
            opened.close()
    assert len(calls) == 1  # only the first "m2"


# -- the key, the entries, and what is still refused -------------------------------

CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "cache CA")])
CA_CERT = (
    x509.CertificateBuilder()
    .serial_number(1 << 70)
    .issuer_name(CA_NAME)
    .subject_name(CA_NAME)
    .public_key(CA_KEY.public_key())
    .not_valid_before(NOW)
    .not_valid_after(NOW + dt.timedelta(days=3650))
    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(CA_KEY.public_key()), critical=False)
    .sign(CA_KEY, hashes.SHA256())
)


def _cert(
    *,
    signer: ec.EllipticCurvePrivateKey = CA_KEY,
    ski: bool = True,
    serial: int = (1 << 100) + 7,
    after: dt.datetime = NOW + dt.timedelta(days=10),
) -> tuple[x509.Certificate, bytes, bytes]:
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .serial_number(serial)
        .issuer_name(CA_NAME)
        .subject_name(x509.Name([]))
        .public_key(ek)
        .not_valid_before(NOW)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ek.example")]), critical=True)
    )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ek), critical=False
        )
    cert = builder.sign(signer, hashes.SHA256())
    spki = ek.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert, cert.public_bytes(serialization.Encoding.DER), spki


def _key(der: bytes) -> str:
    return lint_key(TbsParts.of(der), ca.lint._pkilint_version())


def test_what_the_key_holds() -> None:
    a, b = _cert()[1], _cert()[1]
    assert _key(a) == _key(b)  # other key bits, other SKI value: the same key
    assert _key(_cert(serial=(1 << 90) + 3)[1]) == _key(a)  # other serial
    assert _key(_cert(after=NOW + dt.timedelta(days=99))[1]) == _key(a)  # other instant
    # another time type (GeneralizedTime from 2050), another pkilint: another key
    assert _key(_cert(after=dt.datetime(2051, 1, 1, tzinfo=dt.UTC))[1]) != _key(a)
    assert lint_key(TbsParts.of(a), "0.0.1") != _key(a)
    assert _key(_cert(ski=False)[1]) != _key(a)  # another extension list


def test_an_entry_counts_only_as_a_certificate_of_this_ca_of_its_key(tmp_path: Path) -> None:
    cache = LintCache(tmp_path / "lint-cache", CA_CERT)
    version = ca.lint._pkilint_version()
    good = _cert()[1]
    key = _key(good)
    assert cache.get(key, version) is None  # nothing yet
    cache.put(key, good)
    assert cache.get(key, version) == TbsParts.of(good).extension_ders
    entry = tmp_path / "lint-cache" / f"{key}.der"
    forged = {
        "signed by another key": _cert(signer=ec.generate_private_key(ec.SECP256R1()))[1],
        "the CA certificate itself": CA_CERT.public_bytes(serialization.Encoding.DER),
        "a certificate of another key": _cert(ski=False)[1],
        "truncated": good[:-10],
        "not DER": b"garbage",
        "too large": good + b"\x00" * (1 << 16),
    }
    for why, der in forged.items():
        entry.write_bytes(der)
        assert cache.get(key, version) is None, why
    entry.unlink()
    assert cache.get(key, version) is None


def test_a_bad_certificate_is_refused_with_the_cache_warm(tmp_path: Path) -> None:
    cache = LintCache(tmp_path / "lint-cache", CA_CERT)
    first = Linter("shape", cache)
    cert, der, spki = _cert()
    first.check(cert, der, spki, CA_NAME)
    first.issued(der)  # the CA "signed" it: the entry is stored
    assert len(list((tmp_path / "lint-cache").glob("*.der"))) == 1
    fresh = Linter("shape", cache)  # a new process
    cert, der, spki = _cert()
    fresh.check(cert, der, spki, CA_NAME)  # a hit
    # ... and yet every instance is checked, and other keys go to pkilint
    cases = {
        r"lint\.serial": _cert(serial=12345),
        r"lint\.pkilint: .*skid": _cert(ski=False),
    }
    for match, (c, d, s) in cases.items():
        for linter in (fresh, Linter("shape", cache)):
            with pytest.raises(VerificationError, match=match):
                linter.check(c, d, s, CA_NAME)
    with pytest.raises(VerificationError, match=r"lint\.spki"):
        Linter("shape", cache).check(cert, der, _cert()[2], CA_NAME)
    # a refused certificate leaves no entry behind
    assert len(list((tmp_path / "lint-cache").glob("*.der"))) == 1


def test_every_mode_ignores_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = LintCache(tmp_path / "lint-cache", CA_CERT)
    cert, der, spki = _cert()
    cache.put(_key(der), der)
    calls: list[bytes] = []
    monkeypatch.setattr(ca.lint, "pkilint_findings", lambda d: calls.append(d) or [])
    Linter("every", cache).check(cert, der, spki, CA_NAME)
    Linter("shape", cache).check(cert, der, spki, CA_NAME)
    assert len(calls) == 1


def test_only_what_pkilint_passed_is_stored(tmp_path: Path) -> None:
    """A certificate that passed on the in-process shape alone (another SAN value) is
    not stored: its lint key was never shown to pkilint."""
    cache = LintCache(tmp_path / "lint-cache", CA_CERT)
    linter = Linter("shape", cache)
    cert, der, spki = _cert()
    linter.check(cert, der, spki, CA_NAME)
    linter.issued(der)
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    other = (
        x509.CertificateBuilder()
        .serial_number(cert.serial_number + 2)
        .issuer_name(CA_NAME)
        .subject_name(x509.Name([]))
        .public_key(ek)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("other.example")]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ek), critical=False)
        .sign(CA_KEY, hashes.SHA256())
    )
    other_der = other.public_bytes(serialization.Encoding.DER)
    linter.check(
        other,
        other_der,
        ek.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        CA_NAME,
    )
    linter.issued(other_der)
    assert [p.stem for p in (tmp_path / "lint-cache").glob("*.der")] == [_key(der)]


@pytest.mark.parametrize(
    ("validity", "ok"),
    [
        (b"\x17\x0d261101000000Z\x17\x0d261111000000Z", True),
        (b"\x17\x0d261101000000Z\x18\x0f20510101000000Z", True),
        (b"\x17\x0d261101000000Z\x18\x0f20491231235959Z", False),  # GeneralizedTime < 2050
        (b"\x17\x0b2611010000Z\x17\x0d261111000000Z", False),  # no seconds
        (b"\x17\x0d261101000000+\x17\x0d261111000000Z", False),  # not Z
        (b"\x17\x0d261101000000Z", False),  # one time
    ],
    ids=[
        "ok/utc",
        "ok/generalized-2051",
        "fail/generalized-2049",
        "fail/no-seconds",
        "fail/not-zulu",
        "fail/one-time",
    ],
)
def test_time_types_per_instance(validity: bytes, ok: bool) -> None:
    der = bytes([0x30, len(validity)]) + validity
    if ok:
        ca.lint._check_times(der)
    else:
        with pytest.raises(VerificationError, match=r"lint\.validity"):
            ca.lint._check_times(der)
