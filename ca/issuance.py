"""Issuing EK certificates in two steps (STYLE "The CA"; boulder's prepare/issue).

1. Decide: same EK again -> the existing certificate (same serial); a new VM
   for a certified EK -> refused unless it is a clone by copy of a bound VM.
2. Build the would-be certificate from the profile (stand-in signature,
   :mod:`ca.keys`) and lint it (:mod:`ca.lint`).
3. Record the TBSCertificate in the ledger as ``pending`` (a concurrent
   request for the same EK loses on the UNIQUE constraint and goes back to 1).
4. Sign the recorded TBS once with the CA key; check the signature; store the
   certificate as ``issued``.

What this module does not check: that the EK is an EK (done at the boundary by
:class:`ca.ek.CertifiableEk`) and who may ask (the HTTP layer's tokens).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto import core as asn1
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID

from ca.der import encode_tlv, read_tlv
from ca.ek import CertifiableEk
from ca.keys import SigningKey
from ca.ledger import CertRecord, Ledger
from ca.lint import Linter
from ca.profile import (
    OID_TCG_KP_EK_CERTIFICATE,
    OID_TPM_MANUFACTURER,
    OID_TPM_MODEL,
    OID_TPM_SPECIFICATION,
    OID_TPM_VERSION,
    EkProfile,
    TpmSpecification,
)
from vtpm_core.errors import ConflictError, StateError, VerificationError
from vtpm_core.vm_identity import VM_IDENTITY_OID, VmIdentity

__all__ = ["CaMaterial", "EkIssuance", "IssueRequest", "IssueResult", "assemble_certificate"]

Clock = Callable[[], dt.datetime]
RandomBytes = Callable[[int], bytes]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class CaMaterial:
    """The CA's key, its certificate and the chain up to (and including) the root."""

    key: SigningKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # CA certificate first, root last

    @property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


@dataclass(frozen=True, slots=True)
class IssueRequest:
    ek: CertifiableEk
    vm_id: uuid.UUID
    vm_name: str = ""
    vtpm_instance_id: str = ""
    tpm_manufacturer: str | None = None  # "id:XXXXXXXX"; None: the profile's default
    tpm_model: str | None = None
    tpm_version: str | None = None
    clone_of: uuid.UUID | None = None
    created_at: dt.datetime | None = None  # VM identity createdAt; None: issuance time


@dataclass(frozen=True, slots=True)
class IssueResult:
    record: CertRecord
    certificate_der: bytes
    chain_pem: bytes
    reissued: bool  # True when the EK already had this certificate
    binding: str  # "original" or "clone-copy"


def _tpm_specification_der(spec: TpmSpecification) -> bytes:
    """SubjectDirectoryAttributes (RFC 5280 4.2.1.8) with one tpmSpecification attribute.

    TCG EK profile 3.2.8: TPMSpecification ::= SEQUENCE { family UTF8String,
    level INTEGER, revision INTEGER }.
    """
    value = encode_tlv(
        0x30,
        asn1.UTF8String(spec.family).dump()
        + asn1.Integer(spec.level).dump()
        + asn1.Integer(spec.revision).dump(),
    )
    # Attribute ::= SEQUENCE { type OID, values SET OF value }
    attribute = encode_tlv(
        0x30,
        asn1.ObjectIdentifier(OID_TPM_SPECIFICATION.dotted_string).dump() + encode_tlv(0x31, value),
    )
    return encode_tlv(0x30, attribute)


def assemble_certificate(tbs: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbs, signatureAlgorithm (= tbs.signature), BIT STRING }."""
    _, content, _ = read_tlv(tbs, 0)
    pos = content
    tag, _, end = read_tlv(tbs, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    _, _, pos = read_tlv(tbs, pos)  # serialNumber
    _, _, alg_end = read_tlv(tbs, pos)
    return encode_tlv(0x30, tbs + tbs[pos:alg_end] + encode_tlv(0x03, b"\x00" + signature))


class EkIssuance:
    """The issuing service. Thread-safe as far as its parts are (the ledger and the key)."""

    def __init__(
        self,
        ca: CaMaterial,
        profile: EkProfile,
        ledger: Ledger,
        *,
        clock: Clock = _now,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.ca = ca
        self.profile = profile
        self.ledger = ledger
        self.clock = clock
        self.random_bytes = random_bytes
        self.linter = Linter(profile.lint)
        # Values that are the same for every certificate, built once.
        try:
            ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key)
        self._sda = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("2.5.29.9"), _tpm_specification_der(profile.spec)
        )
        self._eku = x509.ExtendedKeyUsage([OID_TCG_KP_EK_CERTIFICATE])
        self._crldp = (
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(profile.crl_url)], None, None, None
                    )
                ]
            )
            if profile.crl_url
            else None
        )
        access = []
        if profile.ocsp_url:
            access.append(
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(profile.ocsp_url),
                )
            )
        if profile.ca_issuers_url:
            access.append(
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(profile.ca_issuers_url),
                )
            )
        self._aia = x509.AuthorityInformationAccess(access) if access else None

    # -- step 1 ----------------------------------------------------------------

    def issue(self, request: IssueRequest) -> IssueResult:
        # Optimistic: try to record a new certificate first; the UNIQUE constraint on
        # the EK tells us when it exists, and then we answer from the ledger.
        for _ in range(3):
            result = self._issue_new(request)
            if result is not None:
                return result
            existing = self.ledger.find_by_ek(request.ek.spki_sha256)
            if existing is not None:
                return self._existing(existing, request)
        raise StateError("could not record the certificate (ledger contention)")

    def _existing(self, record: CertRecord, request: IssueRequest) -> IssueResult:
        if record.status == "revoked":
            raise ConflictError(
                f"the certificate {record.serial:x} of this EK is revoked "
                f"({record.revocation_reason}); a revoked EK is not certified again"
            )
        bound = self.ledger.bindings_of(record)
        vm = str(request.vm_id)
        if vm in bound:
            kind = bound[vm]
        elif request.clone_of is not None and str(request.clone_of) in bound:
            self.ledger.bind_clone(record, vm, str(request.clone_of), self.clock())
            kind = "clone-copy"
        else:
            raise ConflictError(
                f"EK already certified (serial {record.serial:x}) for VM {record.vm_id}; "
                f"VM {vm} is refused unless the request says it is a clone by copy of a bound VM"
            )
        if record.status == "pending":  # a crash between record and sign: finish it
            record = self._sign_recorded(record)
        assert record.certificate_der is not None
        return IssueResult(record, record.certificate_der, self.ca.chain_pem, True, kind)

    # -- steps 2-4 -------------------------------------------------------------

    def _issue_new(self, request: IssueRequest) -> IssueResult | None:
        now = self.clock().replace(microsecond=0)
        not_before = now - dt.timedelta(minutes=5)  # clock skew of relying parties
        not_after = not_before + self.profile.validity
        stand_in_der = self.build(request, now, not_before, not_after)
        cert = x509.load_der_x509_certificate(stand_in_der)
        self.linter.check(cert, stand_in_der, request.ek.spki_der, self.ca.certificate.subject)
        tbs = cert.tbs_certificate_bytes
        record = CertRecord(
            serial=cert.serial_number,
            ek_name=request.ek.name,
            ek_public_sha256=request.ek.spki_sha256,
            ek_template=request.ek.template,
            key_type=request.ek.key_type,
            vm_id=str(request.vm_id),
            vm_name=request.vm_name,
            vtpm_instance_id=request.vtpm_instance_id,
            not_before=not_before,
            not_after=not_after,
            status="pending",
            revoked_at=None,
            revocation_reason=None,
            tbs_der=tbs,
            certificate_der=None,
        )
        if not self.ledger.reserve(record, now):
            return None  # someone else recorded this EK (or, rarely, this serial): re-read
        signed = self._sign_recorded(record)
        assert signed.certificate_der is not None
        return IssueResult(signed, signed.certificate_der, self.ca.chain_pem, False, "original")

    def _sign_recorded(self, record: CertRecord) -> CertRecord:
        der = assemble_certificate(record.tbs_der, self.ca.key.sign(record.tbs_der))
        if self.ca.key.signs_remotely:
            # A token could sign with another key than the certificate's: check each
            # signature. A file key was matched with ca.pem when the CA was opened.
            self._check_signature(record.tbs_der, der)
        if not self.ledger.complete(record.serial, der):
            current = self.ledger.get(record.serial)
            if current.certificate_der is None:
                raise StateError(f"certificate {record.serial:x} is {current.status}, not issued")
            return current
        return dataclasses.replace(record, status="issued", certificate_der=der)

    def _check_signature(self, tbs: bytes, der: bytes) -> None:
        # A token (or a wrong key file) could sign with another key: verify once.
        _, content, _ = read_tlv(der, 0)
        _, _, tbs_end = read_tlv(der, content)
        _, _, alg_end = read_tlv(der, tbs_end)
        _, sig_start, sig_end = read_tlv(der, alg_end)
        signature = der[sig_start + 1 : sig_end]
        public = self.ca.key.public_key
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, tbs, padding.PKCS1v15(), self.ca.key.hash_algorithm)
            else:
                public.verify(signature, tbs, ec.ECDSA(self.ca.key.hash_algorithm))
        except Exception as exc:
            raise VerificationError(
                "ca.signature", "the CA key's signature does not verify with the CA certificate"
            ) from exc

    def serial(self) -> int:
        # RFC 5280 4.1.2.2: positive, <= 20 octets; the top bit is set so every serial
        # has exactly serial_random_bits + 1 bits, and all the rest are random.
        bits = self.profile.serial_random_bits
        value = int.from_bytes(self.random_bytes((bits + 7) // 8), "big") >> (-bits % 8)
        return (1 << bits) | value

    def build(
        self,
        request: IssueRequest,
        now: dt.datetime,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> bytes:
        """The would-be certificate, signed by the stand-in key (never by the CA key)."""
        p = self.profile
        ek = request.ek
        san_name = x509.Name(
            [
                x509.RelativeDistinguishedName(
                    [
                        x509.NameAttribute(
                            OID_TPM_MANUFACTURER, request.tpm_manufacturer or p.default_manufacturer
                        )
                    ]
                ),
                x509.RelativeDistinguishedName(
                    [x509.NameAttribute(OID_TPM_MODEL, request.tpm_model or p.default_model)]
                ),
                x509.RelativeDistinguishedName(
                    [x509.NameAttribute(OID_TPM_VERSION, request.tpm_version or p.default_version)]
                ),
            ]
        )
        identity = VmIdentity.build(
            request.vm_id, request.vm_name, request.vtpm_instance_id, request.created_at or now
        )
        builder = (
            x509.CertificateBuilder()
            .serial_number(self.serial())
            .issuer_name(self.ca.certificate.subject)
            .subject_name(p.subject)
            .public_key(ek.public_key)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # TCG EK profile 3.2.10: basicConstraints cA FALSE, critical
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # 3.2.11: keyEncipherment for RSA EKs, keyAgreement for ECC EKs; critical
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=ek.is_rsa,
                    data_encipherment=False,
                    key_agreement=not ek.is_rsa,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(self._aki, critical=False)
            # RFC 5280 4.2.1.2: end-entity certificates SHOULD carry an SKI (pkilint checks it)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ek.public_key), critical=False)
            # 3.2.9: SAN directoryName with the TPM attributes; RFC 5280 4.2.1.6: critical
            # when the subject is empty, and (TCG) SHOULD NOT be critical otherwise.
            .add_extension(
                x509.SubjectAlternativeName([x509.DirectoryName(san_name)]),
                critical=len(p.subject) == 0,
            )
            .add_extension(self._sda, critical=False)  # 3.2.8 tpmSpecification
            .add_extension(self._eku, critical=False)  # 3.2.12 tcg-kp-EKCertificate
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(VM_IDENTITY_OID), identity.raw),
                critical=False,
            )
        )
        if self._crldp is not None:
            builder = builder.add_extension(self._crldp, critical=False)
        if self._aia is not None:
            builder = builder.add_extension(self._aia, critical=False)
        return builder.sign(self.ca.key.stand_in, self.ca.key.hash_algorithm).public_bytes(
            serialization.Encoding.DER
        )
