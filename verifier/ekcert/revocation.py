"""Revocation of EK certificates (and their CAs) against CRLs.

RFC 5280 §5 (CRL profile) and §6.3 (CRL processing), reduced to complete,
directly issued CRLs, as our CA publishes them:

1. A CRL applies to a certificate when its issuer name equals the
   certificate's issuer name and its signature verifies with the key of the
   certificate's issuer in the validated path (over the CRL's original
   tbsCertList bytes).
2. A CRL whose nextUpdate is before the checking time is stale: a stale CRL
   for the issuer fails closed rather than being ignored.
3. A certificate whose serial number is listed is revoked.

Certificates whose issuer has no CRL among those given are reported as "not
checked" by the caller; that is the caller's policy decision.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from asn1crypto import crl as asn1_crl

from verifier.ekcert.normalize import read_der_tlv
from verifier.ekcert.parse import ASN1_ERRORS, ParsedCertificate, names_equal, verify_signature
from vtpm_core.errors import ConfigError, ParseError, VerificationError

__all__ = ["CertificateRevocationList", "RevocationStatus", "check_revocation"]


@dataclass(frozen=True, slots=True)
class CertificateRevocationList:
    """An unverified CRL: issuer, times, revoked serials and the signed bytes."""

    der: bytes
    tbs_bytes: bytes
    issuer_der: bytes
    issuer: str
    this_update: datetime
    next_update: datetime | None
    revoked: frozenset[int]
    signature_algorithm: str
    signature_parameters: bytes | None
    signature: bytes

    @classmethod
    def parse(cls, data: bytes) -> CertificateRevocationList:
        """Parse a DER or PEM CRL. Raises ParseError."""
        if b"-----BEGIN X509 CRL-----" in data:
            import base64
            import binascii

            start = data.index(b"-----BEGIN X509 CRL-----") + len(b"-----BEGIN X509 CRL-----")
            end = data.find(b"-----END X509 CRL-----", start)
            if end == -1:
                raise ParseError("CRL", "pem", start, "unterminated PEM block")
            try:
                data = base64.b64decode(b"".join(data[start:end].split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ParseError("CRL", "pem", start, f"bad base64: {exc}") from None
        if not data or data[0] != 0x30:
            raise ParseError("CRL", "tag", 0, "expected a DER SEQUENCE")
        _, header, length = read_der_tlv(data, 0, "CRL")
        der = data[: header + length]
        if len(der) != header + length:
            raise ParseError("CRL", "length", 0, "truncated")
        _, tbs_header, tbs_length = read_der_tlv(der, header, "CRL.tbsCertList")
        tbs = der[header : header + tbs_header + tbs_length]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crl = asn1_crl.CertificateList.load(der)
                tbs_obj = crl["tbs_cert_list"]
                revoked = frozenset(
                    int(entry["user_certificate"].native)
                    for entry in tbs_obj["revoked_certificates"]
                )
                sig_alg = crl["signature_algorithm"]
                params = sig_alg["parameters"]
                next_update = tbs_obj["next_update"].native
                return cls(
                    der=der,
                    tbs_bytes=tbs,
                    issuer_der=tbs_obj["issuer"].dump(),
                    issuer=tbs_obj["issuer"].human_friendly,
                    this_update=tbs_obj["this_update"].native,
                    next_update=next_update,
                    revoked=revoked,
                    signature_algorithm=sig_alg["algorithm"].dotted,
                    signature_parameters=None if params.native is None else params.dump(),
                    signature=crl["signature"].native,
                )
        except ASN1_ERRORS as exc:
            raise ParseError("CRL", "tbsCertList", 0, f"unreadable: {exc}") from None

    @classmethod
    def load(cls, path: Path | str) -> CertificateRevocationList:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read CRL {path}: {exc.strerror}") from None
        return cls.parse(data)


@dataclass(frozen=True, slots=True)
class RevocationStatus:
    """Per certificate in the path (leaf first, anchor excluded): checked or not."""

    subject: str
    serial_number: int
    checked_by: str | None


def check_revocation(
    path: tuple[ParsedCertificate, ...],
    crls: tuple[CertificateRevocationList, ...],
    at: datetime,
    *,
    allow_sha1: bool = False,
) -> tuple[RevocationStatus, ...]:
    """Check every non-anchor certificate of ``path`` against the CRLs that apply.

    Raises VerificationError("ek.revoked") for a listed serial,
    ("ek.crl") for a stale CRL or a CRL naming the issuer whose signature
    does not verify.
    """
    statuses: list[RevocationStatus] = []
    for cert, issuer in itertools.pairwise(path):
        checked_by = None
        for crl in crls:
            if not names_equal(crl.issuer_der, cert.issuer_der):
                continue
            verify_signature(
                "ek.crl",
                issuer.public_key,
                crl.signature_algorithm,
                crl.signature_parameters,
                crl.signature,
                crl.tbs_bytes,
                allow_sha1=allow_sha1,
            )
            if crl.next_update is not None and crl.next_update < at:
                raise VerificationError(
                    "ek.crl",
                    f"CRL of {crl.issuer} is stale (nextUpdate {crl.next_update:%Y-%m-%d %H:%M})",
                )
            if cert.serial_number in crl.revoked:
                raise VerificationError(
                    "ek.revoked",
                    f"certificate serial 0x{cert.serial_number:x} ({cert.subject or 'EK'})"
                    f" is revoked by {crl.issuer}",
                )
            checked_by = crl.issuer
        statuses.append(RevocationStatus(cert.subject, cert.serial_number, checked_by))
    return tuple(statuses)
