"""EK certificates for EKs that tpm2-tools created on a real swtpm, every field checked with
asn1crypto (an independent parser), the chain with `openssl verify`."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import uuid
from pathlib import Path

import pytest
from asn1crypto import core, x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca.ek import CertifiableEk
from ca.home import CaHome, OpenedCa
from ca.issuance import IssueRequest
from ca.ledger import CertRecord
from ca.lint import pkilint_findings
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import ConflictError, ParseError, VerificationError
from vtpm_core.tpm.public import Public
from vtpm_core.vm_identity import VM_IDENTITY_OID, VmIdentity

pytestmark = pytest.mark.swtpm

VM = uuid.UUID("6f1c2d4e-8a9b-4c3d-9e0f-112233445566")
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def _issue(ca: OpenedCa, ek: bytes, vm: uuid.UUID = VM, **kw: object) -> tuple[bytes, int, bool]:
    request = IssueRequest(ek=CertifiableEk.load(ek, allow_bare_key=False), vm_id=vm, **kw)  # type: ignore[arg-type]
    result = ca.issuance.issue(request)
    return result.certificate_der, result.record.serial, result.reissued


def _ext(cert: x509.Certificate, oid: str) -> x509.Extension:
    found = [e for e in cert["tbs_certificate"]["extensions"] if e["extn_id"].dotted == oid]
    assert len(found) == 1, oid
    return found[0]


@pytest.mark.parametrize(
    ("kind", "usage"), [("ek-rsa", "key_encipherment"), ("ek-ecc", "key_agreement")]
)
def test_every_field(opened: OpenedCa, tpm_keys: dict[str, bytes], kind: str, usage: str) -> None:
    der, serial, reissued = _issue(
        opened,
        tpm_keys[kind],
        vm_name="web-01",
        vtpm_instance_id="vtpm-7",
        tpm_manufacturer="id:49424D00",
        tpm_model="swtpm",
        tpm_version="id:20191023",
        created_at=T0,
    )
    assert not reissued
    cert = x509.Certificate.load(der)
    tbs = cert["tbs_certificate"]
    assert tbs["version"].native == "v3"
    # serial: positive, >= 64 bits, <= 20 octets
    assert serial == tbs["serial_number"].native
    assert 64 <= serial.bit_length() <= 159
    # the EK key exactly
    public = Public.load(tpm_keys[kind])
    assert (
        tbs["subject_public_key_info"].dump()
        == CertifiableEk.load(tpm_keys[kind], allow_bare_key=False).spki_der
    )
    # empty subject -> critical SAN with the three TPM attributes, each its own RDN
    assert tbs["subject"].native == {}
    san = _ext(cert, "2.5.29.17")
    assert san["critical"].native is True
    (general_name,) = san["extn_value"].parsed
    assert general_name.name == "directory_name"
    rdns = general_name.chosen.chosen
    assert [[(a["type"].dotted, a["value"].native) for a in rdn] for rdn in rdns] == [
        [("2.23.133.2.1", "id:49424D00")],
        [("2.23.133.2.2", "swtpm")],
        [("2.23.133.2.3", "id:20191023")],
    ]
    assert all(isinstance(rdn[0]["value"], core.UTF8String) for rdn in rdns)
    # subjectDirectoryAttributes: tpmSpecification ("2.0", level 0, revision 164)
    sda = _ext(cert, "2.5.29.9")
    assert sda["critical"].native is False
    # (asn1crypto knows tpmSpecification: an independent decoder of the TCG structure)
    assert sda["extn_value"].parsed.native == [
        {"type": "tpm_specification", "values": [{"family": "2.0", "level": 0, "revision": 164}]}
    ]
    # basicConstraints cA FALSE critical; keyUsage critical, exactly one bit
    bc = _ext(cert, "2.5.29.19")
    assert bc["critical"].native is True and bc["extn_value"].parsed["ca"].native is False
    ku = _ext(cert, "2.5.29.15")
    assert ku["critical"].native is True and ku["extn_value"].parsed.native == {usage}
    # EKU tcg-kp-EKCertificate, AKI = the CA's SKI
    eku = _ext(cert, "2.5.29.37")
    assert eku["critical"].native is False
    assert [p.dotted for p in eku["extn_value"].parsed] == ["2.23.133.8.1"]
    aki = _ext(cert, "2.5.29.35")["extn_value"].parsed["key_identifier"].native
    ca_cert = x509.Certificate.load(opened.material.certificate.public_bytes(Encoding.DER))
    assert aki == ca_cert.key_identifier
    assert tbs["issuer"] == ca_cert["tbs_certificate"]["subject"]
    # VM identity: non-critical, decoded by asn1crypto via the shared module
    vmx = _ext(cert, VM_IDENTITY_OID)
    assert vmx["critical"].native is False
    identity = VmIdentity.parse(vmx["extn_value"].native)
    assert (identity.vm_id, identity.vm_name, identity.vtpm_instance_id, identity.created_at) == (
        VM,
        "web-01",
        "vtpm-7",
        T0,
    )
    # no CRL DP / AIA unless configured, no unique ids
    names = {e["extn_id"].dotted for e in tbs["extensions"]}
    assert "2.5.29.31" not in names and "1.3.6.1.5.5.7.1.1" not in names
    assert tbs["issuer_unique_id"].native is None and tbs["subject_unique_id"].native is None
    # the ledger row
    record = opened.ledger.get(serial)
    assert record.status == "issued" and record.certificate_der == der
    assert record.ek_name == public.name().hex()
    assert record.ek_template == ("L-1" if kind == "ek-rsa" else "L-2")
    # pkilint's RFC 5280 lint passes on the real (CA-signed) certificate too
    assert pkilint_findings(der) == []


def test_openssl_verifies_chain(
    opened: OpenedCa, tpm_keys: dict[str, bytes], tmp_path: Path
) -> None:
    der, _, _ = _issue(opened, tpm_keys["ek-ecc"])
    (tmp_path / "ek.der").write_bytes(der)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(opened.home / "chain.pem"), str(tmp_path / "ek.der")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_configured_subject_and_urls(tmp_path: Path, tpm_keys: dict[str, bytes]) -> None:
    home = CaHome(tmp_path / "ca")
    home.init(
        passphrase=PASSPHRASE,
        ek_profile={
            "subject": "CN=vtpm EK,O=Example",
            "crl_url": "http://ca.example/crl",
            "ocsp_url": "http://ca.example/ocsp",
            "ca_issuers_url": "http://ca.example/ca.pem",
        },
    )
    ca = home.open(passphrase=PASSPHRASE)
    try:
        der, _, _ = _issue(ca, tpm_keys["ek-rsa"])
    finally:
        ca.close()
    cert = x509.Certificate.load(der)
    assert cert.subject.native == {"common_name": "vtpm EK", "organization_name": "Example"}
    assert _ext(cert, "2.5.29.17")["critical"].native is False  # subject set: SAN non-critical
    assert cert.crl_distribution_points[0]["distribution_point"].native == ["http://ca.example/crl"]
    assert cert.ocsp_urls == ["http://ca.example/ocsp"]
    aia = _ext(cert, "1.3.6.1.5.5.7.1.1")["extn_value"].parsed.native
    assert {a["access_method"]: a["access_location"] for a in aia} == {
        "ocsp": "http://ca.example/ocsp",
        "ca_issuers": "http://ca.example/ca.pem",
    }


def test_same_ek_same_certificate(opened: OpenedCa, tpm_keys: dict[str, bytes]) -> None:
    der1, serial1, first = _issue(opened, tpm_keys["ek-rsa"])
    der2, serial2, again = _issue(opened, tpm_keys["ek-rsa"])
    assert (first, again) == (False, True)
    assert (serial1, der1) == (serial2, der2)
    assert len(opened.ledger.all_records()) == 1


def test_other_vm_refused_unless_clone_by_copy(
    opened: OpenedCa, tpm_keys: dict[str, bytes]
) -> None:
    _, serial, _ = _issue(opened, tpm_keys["ek-ecc"])
    clone = uuid.uuid4()
    with pytest.raises(
        ConflictError, match=r"EK already certified .* unless the request says it is a clone"
    ):
        _issue(opened, tpm_keys["ek-ecc"], vm=clone)
    with pytest.raises(ConflictError, match="clone"):  # clone of a VM the EK is not bound to
        _issue(opened, tpm_keys["ek-ecc"], vm=clone, clone_of=uuid.uuid4())
    ek = CertifiableEk.load(tpm_keys["ek-ecc"], allow_bare_key=False)
    result = opened.issuance.issue(IssueRequest(ek=ek, vm_id=clone, clone_of=VM))
    assert (result.record.serial, result.binding, result.reissued) == (serial, "clone-copy", True)
    record = opened.ledger.get(serial)
    assert opened.ledger.bindings_of(record) == {str(VM): "original", str(clone): "clone-copy"}
    # the clone asking again is idempotent
    again = opened.issuance.issue(IssueRequest(ek=ek, vm_id=clone))
    assert (again.record.serial, again.binding) == (serial, "clone-copy")


def test_pending_row_is_completed_once(opened: OpenedCa, tpm_keys: dict[str, bytes]) -> None:
    """A crash between 'record' and 'sign' leaves a pending row; the next request signs it."""
    ek = CertifiableEk.load(tpm_keys["ek-rsa"], allow_bare_key=False)
    request = IssueRequest(ek=ek, vm_id=VM)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stand_in = opened.issuance.build(request, now, now, now + dt.timedelta(days=1))
    from cryptography import x509 as cx509

    cert = cx509.load_der_x509_certificate(stand_in)
    record = _pending(ek, cert.serial_number, cert.tbs_certificate_bytes, now)
    assert opened.ledger.reserve(record, now)
    assert opened.ledger.get(record.serial).status == "pending"
    result = opened.issuance.issue(request)
    assert result.record.serial == record.serial and result.record.status == "issued"
    assert x509.Certificate.load(result.certificate_der)["tbs_certificate"].dump() == record.tbs_der


def _pending(ek: CertifiableEk, serial: int, tbs: bytes, now: dt.datetime) -> CertRecord:
    end = now + dt.timedelta(days=1)
    return CertRecord(
        serial,
        ek.name,
        ek.spki_sha256,
        ek.template,
        ek.key_type,
        str(VM),
        "",
        "",
        now,
        end,
        "pending",
        None,
        None,
        tbs,
        None,
    )


def _tamper(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= value
    return bytes(out)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("fail/ek/plain-key", VerificationError, r"ek\.template: not a TCG EK: objectAttributes"),
        ("fail/ek/ak", VerificationError, r"ek\.template: not a TCG EK: objectAttributes"),
        ("fail/ek/attributes-flipped", VerificationError, r"ek\.template: .*objectAttributes"),
        ("fail/ek/policy-tampered", VerificationError, r"ek\.template: .*authPolicy"),
        ("fail/ek/truncated", ParseError, r"TPM"),
        ("fail/ek/trailing-byte", ParseError, r"TPM"),
        ("fail/ek/bare-pem", VerificationError, r"ek\.bare_key"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_refuses_non_ek(
    tpm_keys: dict[str, bytes], case: str, error: type[Exception], match: str
) -> None:
    rsa = tpm_keys["ek-rsa"]
    data = {
        "fail/ek/plain-key": tpm_keys["key"],
        "fail/ek/ak": tpm_keys["ak"],
        # TPM2B: size(2) type(2) nameAlg(2) objectAttributes(4) authPolicy(2+32)
        "fail/ek/attributes-flipped": _tamper(rsa, 9, 0x40),  # userWithAuth on
        "fail/ek/policy-tampered": _tamper(rsa, 12, 0x01),
        "fail/ek/truncated": rsa[:-7],
        "fail/ek/trailing-byte": rsa + b"\x00",
        "fail/ek/bare-pem": tpm_keys["ek-rsa-pem"],
    }[case]
    with pytest.raises(error, match=match):
        CertifiableEk.load(data, allow_bare_key=False)


def test_bare_pem_only_when_allowed_and_recorded(
    opened: OpenedCa, tpm_keys: dict[str, bytes]
) -> None:
    ek = CertifiableEk.load(tpm_keys["ek-rsa-pem"], allow_bare_key=True)
    assert (ek.template, ek.name) == ("bare-pem", None)
    # same key as the TPM2B form: one EK, one certificate
    assert (
        ek.spki_sha256 == CertifiableEk.load(tpm_keys["ek-rsa"], allow_bare_key=False).spki_sha256
    )
    result = opened.issuance.issue(IssueRequest(ek=ek, vm_id=VM))
    assert opened.ledger.get(result.record.serial).ek_template == "bare-pem"
    assert hashlib.sha256(ek.spki_der).hexdigest() == result.record.ek_public_sha256


@pytest.mark.parametrize("kind", ["ek-rsa", "ek-ecc"])
@pytest.mark.parametrize("years", [1, 40])  # UTCTime and (from 2050) GeneralizedTime
@pytest.mark.parametrize("model", [None, "model"])  # the profile's SAN (encoded once), another
def test_spliced_tbs_equals_cryptography_builder(
    opened: OpenedCa, tpm_keys: dict[str, bytes], kind: str, years: int, model: str | None
) -> None:
    """The hot path splices DER; cryptography's builder is the reference it must equal."""
    from cryptography import x509 as cx509

    ek = CertifiableEk.load(tpm_keys[kind], allow_bare_key=False)
    request = IssueRequest(
        ek=ek, vm_id=VM, vm_name="ü" * 200, vtpm_instance_id="i", tpm_model=model, created_at=T0
    )
    # validity given in another time zone: the certificate says the same instant in UTC
    after = (T0 + dt.timedelta(days=365 * years)).astimezone(dt.timezone(dt.timedelta(hours=-7)))
    serial = (1 << 126) | 12345
    reference = cx509.load_der_x509_certificate(
        opened.issuance.build(request, T0, T0, after, serial)
    ).tbs_certificate_bytes
    assert opened.issuance.build_tbs(request, T0, T0, after, serial) == reference


_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
_WHEN = st.datetimes(
    min_value=dt.datetime(1950, 1, 1),
    max_value=dt.datetime(2200, 12, 31),
    timezones=st.just(dt.UTC),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    vm_id=st.uuids(),
    vm_name=_TEXT,
    instance=_TEXT,
    model=st.none() | st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
    created=_WHEN,
    not_before=_WHEN,
    days=st.integers(min_value=1, max_value=40_000),
    serial_bits=st.integers(min_value=64, max_value=158),
    serial_low=st.integers(min_value=0),
)
def test_spliced_tbs_equals_builder_for_any_values(
    opened: OpenedCa,
    tpm_keys: dict[str, bytes],
    vm_id: uuid.UUID,
    vm_name: str,
    instance: str,
    model: str | None,
    created: dt.datetime,
    not_before: dt.datetime,
    days: int,
    serial_bits: int,
    serial_low: int,
) -> None:
    """build_tbs (spliced bytes, hand-formatted times) == cryptography's builder, for
    random VM identities, SAN strings, validity dates (UTCTime and GeneralizedTime) and
    serials."""
    from cryptography import x509 as cx509

    ek = CertifiableEk.load(tpm_keys["ek-ecc"], allow_bare_key=False)
    request = IssueRequest(
        ek=ek, vm_id=vm_id, vm_name=vm_name, vtpm_instance_id=instance, tpm_model=model,
        created_at=created,
    )  # fmt: skip
    not_before = not_before.replace(microsecond=0)
    not_after = not_before + dt.timedelta(days=days)
    serial = (1 << serial_bits) | (serial_low % (1 << serial_bits))
    reference = cx509.load_der_x509_certificate(
        opened.issuance.build(request, created, not_before, not_after, serial)
    ).tbs_certificate_bytes
    assert opened.issuance.build_tbs(request, created, not_before, not_after, serial) == reference
