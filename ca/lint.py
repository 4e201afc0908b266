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

from asn1crypto import core as asn1
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.der import read_tlv
from vtpm_core.errors import VerificationError
from vtpm_core.vm_identity import VM_IDENTITY_OID

__all__ = ["Linter", "Shape", "TbsParts", "pkilint_findings", "shape_of", "structural_check"]

Shape = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class TbsParts:
    """The top-level DER elements of a certificate's TBSCertificate (RFC 5280 4.1).

    ``extensions`` holds, per extension in order, (extnID DER, critical DER): the
    critical BOOLEAN exactly as encoded, ``b""`` when it is absent (DEFAULT FALSE);
    ``extension_ders`` each whole Extension, and ``extension_values`` each extnValue's
    content (the DER inside the OCTET STRING).
    """

    signature_algorithm: bytes
    issuer: bytes
    subject: bytes
    spki: bytes
    spki_algorithm: bytes
    extensions: tuple[tuple[bytes, bytes], ...]
    extension_ders: tuple[bytes, ...] = ()
    extension_values: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, certificate_der: bytes) -> TbsParts:
        """Cut a certificate that cryptography already parsed (so the DER is well-formed)."""
        try:
            _, content, _ = read_tlv(certificate_der, 0)
            _, pos, tbs_end = read_tlv(certificate_der, content)
            parts = []
            while pos < tbs_end:  # read_tlv inlined for the short forms
                size = certificate_der[pos + 1]
                if size < 0x80:
                    end = pos + 2 + size
                else:
                    _, _, end = read_tlv(certificate_der, pos)
                if end > tbs_end:
                    raise ValueError("a TBSCertificate element runs past its end")
                parts.append((certificate_der[pos], pos, end))
                pos = end
            if len(parts) < 7 or parts[0][0] != 0xA0:
                raise ValueError("not a v3 TBSCertificate")
            cut = [certificate_der[a:b] for _, a, b in parts]
            _, spki_content, _ = read_tlv(cut[6], 0)
            _, _, spki_alg_end = read_tlv(cut[6], spki_content)
            extensions: list[tuple[bytes, bytes]] = []
            ders: list[bytes] = []
            values: list[bytes] = []
            if parts[-1][0] == 0xA3:
                block = cut[-1]
                _, seq, _ = read_tlv(block, 0)
                _, pos, ext_end = read_tlv(block, seq)
                while pos < ext_end:  # read_tlv inlined for the short forms: ~2x faster
                    size = block[pos + 1]
                    if size < 0x80:
                        inner, end = pos + 2, pos + 2 + size
                    else:
                        _, inner, end = read_tlv(block, pos)
                    if end > ext_end:
                        raise ValueError("an Extension runs past the extensions")
                    size = block[inner + 1]  # extnID
                    if block[inner] != 0x06 or size >= 0x80:
                        raise ValueError("extnID is not a short OBJECT IDENTIFIER")
                    oid_end = inner + 2 + size
                    flag_end = oid_end + 3 if block[oid_end] == 0x01 else oid_end
                    size = block[flag_end + 1]  # extnValue
                    if size < 0x80:
                        tag, value, value_end = block[flag_end], flag_end + 2, flag_end + 2 + size
                    else:
                        tag, value, value_end = read_tlv(block, flag_end)
                    if (
                        tag != 0x04
                        or value_end != end
                        or (flag_end != oid_end and block[oid_end + 1] != 1)
                    ):
                        raise ValueError("not an Extension: extnID, [critical,] extnValue")
                    extensions.append((block[inner:oid_end], block[oid_end:flag_end]))
                    ders.append(block[pos:end])
                    values.append(block[value:value_end])
                    pos = end
                if pos != ext_end:
                    raise ValueError("extensions run past their SEQUENCE")
        except (ValueError, IndexError) as exc:
            raise VerificationError("lint.der", f"TBSCertificate does not cut: {exc}") from None
        return cls(
            cut[2],
            cut[3],
            cut[5],
            cut[6],
            cut[6][spki_content:spki_alg_end],
            tuple(extensions),
            tuple(ders),
            tuple(values),
        )


def shape_of(cert: x509.Certificate, parts: TbsParts | None = None) -> Shape:
    """What pkilint's verdict depends on beyond the checked per-instance values.

    The issuer, the SPKI bytes, the serial range and the validity order are checked on
    every instance by :func:`structural_check`; the key *type* (the SPKI's
    AlgorithmIdentifier, which names the curve) and *size* (the SPKI's length, which
    fixes the RSA modulus size) and the extension layout are the shape.
    """
    if parts is None:
        parts = TbsParts.of(cert.public_bytes(serialization.Encoding.DER))
    return (
        cert.version,
        parts.signature_algorithm,
        parts.spki_algorithm,
        len(parts.spki),
        parts.subject == _EMPTY_NAME,
        parts.extensions,
    )


_EMPTY_NAME = b"\x30\x00"


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


def structural_check(
    cert: x509.Certificate,
    parts: TbsParts,
    spki_der: bytes,
    issuer_der: bytes,
    reference: tuple[bytes, ...] | None = None,
) -> None:
    """Per-instance checks (numbered as in the module docstring, step 2).

    ``parts`` is ``cert``'s TBS cut by :meth:`TbsParts.of`; the SPKI and the issuer
    are compared as exact DER bytes. ``reference``: the Extension DERs of a
    certificate of the same shape that pkilint passed and cryptography parsed;
    see :func:`_extensions_parse`.
    """
    if cert.version != x509.Version.v3:
        raise VerificationError("lint.version", f"expected v3, got {cert.version.name}")
    serial = cert.serial_number
    if serial <= 0 or serial.bit_length() < 64 or serial.bit_length() > 159:
        raise VerificationError(
            "lint.serial", f"serial must be positive, 64..159 bits (got {serial.bit_length()})"
        )
    if not cert.not_valid_before_utc < cert.not_valid_after_utc:
        raise VerificationError("lint.validity", "notBefore is not before notAfter")
    if parts.spki != spki_der:
        raise VerificationError("lint.spki", "subjectPublicKeyInfo is not exactly the EK key")
    if parts.issuer != issuer_der:
        raise VerificationError("lint.issuer", "issuer is not the CA's subject")
    _extensions_parse(cert, parts, reference)


_OID_SKI = b"\x06\x03\x55\x1d\x0e"  # 2.5.29.14
# cryptography does not parse this extension's value (an UnrecognizedExtension): a
# full parse checks nothing in it either
_OID_VM_IDENTITY = bytes(asn1.ObjectIdentifier(VM_IDENTITY_OID).dump())


def _extensions_parse(
    cert: x509.Certificate, parts: TbsParts, reference: tuple[bytes, ...] | None
) -> None:
    """Every extension value parses (the check is the parse).

    An Extension byte-identical to the same-shape reference's extension at the same
    position parsed then (parsing is deterministic: doing it again tells nothing);
    a subjectKeyIdentifier that differs is checked here (an OCTET STRING, RFC 5280
    4.2.1.2); the VM identity extension is opaque to cryptography either way. If
    anything else differs, cryptography parses them all (~14 us: the SAN's names
    become Python objects), as it does without a reference.
    """
    if reference is not None and len(reference) == len(parts.extension_ders):
        rest = [
            i
            for i, (der, ref) in enumerate(zip(parts.extension_ders, reference, strict=True))
            if der != ref
        ]
        if all(
            parts.extensions[i][0] == _OID_VM_IDENTITY
            or (
                parts.extensions[i][0] == _OID_SKI and _is_key_identifier(parts.extension_values[i])
            )
            for i in rest
        ):
            return
    try:
        for ext in cert.extensions:  # parsing each value is the check
            _ = ext.value
    except (ValueError, x509.DuplicateExtension) as exc:
        raise VerificationError("lint.extensions", f"an extension does not parse: {exc}") from None


def _checked_here(oid: bytes, value: bytes) -> bool:
    return oid == _OID_VM_IDENTITY or (oid == _OID_SKI and _is_key_identifier(value))


def _is_key_identifier(value: bytes) -> bool:
    """KeyIdentifier ::= OCTET STRING, short form, filling ``value`` exactly."""
    return len(value) >= 2 and value[0] == 0x04 and value[1] < 0x80 and value[1] == len(value) - 2


@dataclass
class Linter:
    """Remembers which shapes pkilint passed (per process, never persisted)."""

    mode: str = "shape"
    # shape -> the Extension DERs of the certificate pkilint passed for it
    _passed: dict[Shape, tuple[bytes, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(
        self,
        cert: x509.Certificate,
        certificate_der: bytes,
        spki_der: bytes,
        issuer: x509.Name | bytes,
        full: Callable[[], bytes] | None = None,
    ) -> None:
        """Raises VerificationError ``lint.*``; ``cert`` is ``certificate_der`` parsed.

        ``issuer`` is the CA subject (a Name, or its DER). ``full`` makes the same
        certificate with a real (stand-in) signature for pkilint, when
        ``certificate_der`` carries a placeholder signature.
        """
        issuer_der = issuer if isinstance(issuer, bytes) else issuer.public_bytes()
        parts = TbsParts.of(certificate_der)
        shape = shape_of(cert, parts)
        with self._lock:
            reference = self._passed.get(shape)
        structural_check(cert, parts, spki_der, issuer_der, reference)
        if reference is not None and self.mode == "shape":
            return
        findings = pkilint_findings(full() if full is not None else certificate_der)
        if findings:
            raise VerificationError("lint.pkilint", "; ".join(findings))
        with self._lock:
            self._passed.setdefault(shape, parts.extension_ders)
