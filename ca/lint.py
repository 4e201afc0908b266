"""Linting would-be EK certificates: pkilint (RFC 5280) plus a per-instance structural check.

Why two parts (measured, see docs/ca.md): pkilint decodes the certificate with
pyasn1 and runs ~100 validators, which costs milliseconds per certificate,
more than the rest of issuance together. Every EK certificate of one CA has
one of a handful of *shapes*: the same extension OIDs in the same order with
the same criticality, the same issuer, the same signature algorithm, the same
SPKI algorithm. Only the values that vary per certificate (serial, validity,
key, SAN attribute strings, VM identity) differ, and those come from checked
inputs. So, in ``shape`` mode (default):

1. the first certificate of each shape is linted by pkilint's RFC 5280
   certificate validators; any finding of severity WARNING or worse refuses it
   (and the shape stays unlinted, so the next one is linted again);
2. every certificate (including the first) gets :func:`structural_check`:
   v3, serial positive and within 64..159 bits, notBefore < notAfter, the SPKI
   is exactly the EK's, the issuer is exactly the CA subject, every extension
   value re-parses, and its shape equals a shape pkilint passed.

``every`` mode lints every certificate with pkilint (for audits; slow).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from vtpm_core.errors import VerificationError

__all__ = ["Linter", "Shape", "pkilint_findings", "shape_of"]

Shape = tuple[object, ...]


def shape_of(cert: x509.Certificate) -> Shape:
    """What pkilint's verdict depends on beyond the checked per-instance values.

    The issuer, the SPKI bytes, the serial range and the validity order are checked on
    every instance by :func:`structural_check`; the key *type* and the extension layout
    are the shape.
    """
    key = cert.public_key()
    curve = getattr(key, "curve", None)
    return (
        cert.version,
        cert.signature_algorithm_oid.dotted_string,
        type(key).__name__,
        curve.name if curve is not None else getattr(key, "key_size", None),
        len(cert.subject) == 0,
        tuple((e.oid.dotted_string, e.critical) for e in cert.extensions),
    )


def pkilint_findings(certificate_der: bytes) -> list[str]:
    """pkilint's RFC 5280 certificate lint: findings of severity WARNING and above."""
    from pkilint import loader
    from pkilint.pkix import certificate, extension, name
    from pkilint.validation import ValidationFindingSeverity

    validator = certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )
    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(certificate_der, "ek")
    results = validator.validate(doc.root)
    out = []
    for result in results:
        for finding in result.finding_descriptions:
            if finding.finding.severity <= ValidationFindingSeverity.WARNING:
                out.append(f"{finding.finding.code} at {result.node.path}")
    return out


def structural_check(cert: x509.Certificate, spki_der: bytes, issuer: x509.Name) -> None:
    """Per-instance checks (numbered as in the module docstring, step 2)."""
    from cryptography.hazmat.primitives import serialization

    if cert.version != x509.Version.v3:
        raise VerificationError("lint.version", f"expected v3, got {cert.version.name}")
    serial = cert.serial_number
    if serial <= 0 or serial.bit_length() < 64 or serial.bit_length() > 159:
        raise VerificationError(
            "lint.serial", f"serial must be positive, 64..159 bits (got {serial.bit_length()})"
        )
    if not cert.not_valid_before_utc < cert.not_valid_after_utc:
        raise VerificationError("lint.validity", "notBefore is not before notAfter")
    got = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if got != spki_der:
        raise VerificationError("lint.spki", "subjectPublicKeyInfo is not exactly the EK key")
    if cert.issuer != issuer:
        raise VerificationError("lint.issuer", "issuer is not the CA's subject")
    for ext in cert.extensions:  # parsing each value is the check
        _ = ext.value


@dataclass
class Linter:
    """Remembers which shapes pkilint passed (per process, never persisted)."""

    mode: str = "shape"
    _passed: set[Shape] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(
        self,
        cert: x509.Certificate,
        certificate_der: bytes,
        spki_der: bytes,
        issuer: x509.Name,
        full: Callable[[], bytes] | None = None,
    ) -> None:
        """Raises VerificationError ``lint.*``; ``cert`` is ``certificate_der`` parsed.

        ``full`` makes the same certificate with a real (stand-in) signature for
        pkilint, when ``certificate_der`` carries a placeholder signature.
        """
        structural_check(cert, spki_der, issuer)
        shape = shape_of(cert)
        with self._lock:
            known = shape in self._passed
        if known and self.mode == "shape":
            return
        findings = pkilint_findings(full() if full is not None else certificate_der)
        if findings:
            raise VerificationError("lint.pkilint", "; ".join(findings))
        with self._lock:
            self._passed.add(shape)
