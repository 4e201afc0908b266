"""Normalise EK certificates as real TPMs and files hand them over.

Sources of the quirks handled here:

- TCG PC Client Specific Implementation Specification for Conventional BIOS
  1.21, §7.4.5 (TCG_PCCLIENT_STORED_CERT / TCG_FULL_CERT): TPM 1.2-era NV
  indices store ``10 01`` (tag), a one-byte certType 0 (full cert), a two-byte
  size, ``10 02`` (TCG_FULL_CERT tag) and then the DER; some TPM 2.0 vendors
  kept that header.
- NV indices defined larger than the certificate: readers get trailing 0xFF
  or 0x00 padding after the DER (TPM-NOTES "NV indices and attributes").
- PEM files with an ``openssl x509 -text`` preamble before the PEM block.

Only framing is removed: the certificate's own bytes are never re-encoded, so
signatures are later checked over exactly what the issuer signed.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from vtpm_core.errors import ParseError

__all__ = ["NormalizedCertificate", "normalize_certificate", "read_der_tlv"]

_STORED_CERT_TAG = b"\x10\x01"
_FULL_CERT_TAG = b"\x10\x02"
_PEM_RE = re.compile(
    rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.*?)"
    rb"-----END (?:X509 |TRUSTED )?CERTIFICATE-----",
    re.DOTALL,
)
# a certificate larger than this is not an EK certificate (NV indices hold ~2 KiB)
MAX_CERTIFICATE_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class NormalizedCertificate:
    """The certificate DER found in ``original``, and what was stripped around it."""

    der: bytes
    original: bytes
    notes: tuple[str, ...]


def read_der_tlv(data: bytes, offset: int, structure: str) -> tuple[int, int, int]:
    """Read one DER tag-length header at ``offset``.

    Returns ``(tag, header_length, content_length)``. Only definite lengths
    are accepted (X.690 §10.1: DER always uses the definite form).
    """
    if offset + 2 > len(data):
        raise ParseError(structure, "length", offset, "truncated TLV header")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ParseError(structure, "tag", offset, "multi-byte tags are not used in certificates")
    first = data[offset + 1]
    if first < 0x80:
        return tag, 2, first
    count = first & 0x7F
    if count == 0:
        raise ParseError(structure, "length", offset + 1, "indefinite length (BER) is not DER")
    if count > 4:
        raise ParseError(structure, "length", offset + 1, f"length of {count} bytes is too large")
    if offset + 2 + count > len(data):
        raise ParseError(structure, "length", offset + 1, "truncated length")
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    return tag, 2 + count, length


def _from_pem(data: bytes) -> bytes | None:
    match = _PEM_RE.search(data)
    if match is None:
        return None
    body = b"".join(match.group(1).split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseError("Certificate", "pem", match.start(1), f"bad base64: {exc}") from None


def normalize_certificate(data: bytes) -> NormalizedCertificate:
    """Find the one DER certificate in ``data`` (DER, PEM, NV contents).

    Guarantees: the returned ``der`` is a byte-for-byte slice of the input
    (or of its PEM body) holding exactly one outer SEQUENCE. It does not
    check the inside of the certificate.
    """
    notes: list[str] = []
    if len(data) > MAX_CERTIFICATE_SIZE:
        raise ParseError(
            "Certificate", "size", 0, f"{len(data)} bytes exceeds {MAX_CERTIFICATE_SIZE}"
        )
    body = data
    if b"-----BEGIN" in data:
        pem = _from_pem(data)
        if pem is None:
            raise ParseError("Certificate", "pem", 0, "no CERTIFICATE PEM block")
        if not data.lstrip().startswith(b"-----BEGIN"):
            notes.append("text before the PEM block ignored")
        body = pem
    start = 0
    if body[:2] == _STORED_CERT_TAG and len(body) >= 7 and body[5:7] == _FULL_CERT_TAG:
        if body[2] != 0:
            raise ParseError(
                "TCG_PCCLIENT_STORED_CERT", "certType", 2, f"{body[2]} is not 0 (full)"
            )
        declared = int.from_bytes(body[3:5], "big")
        start = 7
        notes.append(f"TCG stored-cert header (declared size {declared}) stripped")
    if start >= len(body) or body[start] != 0x30:
        seen = f"0x{body[start]:02x}" if start < len(body) else "end of data"
        raise ParseError("Certificate", "tag", start, f"expected SEQUENCE (0x30), got {seen}")
    _, header, length = read_der_tlv(body, start, "Certificate")
    end = start + header + length
    if end > len(body):
        raise ParseError(
            "Certificate",
            "length",
            start,
            f"declares {header + length} bytes, {len(body) - start} present",
        )
    trailing = body[end:]
    if trailing:
        if trailing.strip(b"\xff") == b"" or trailing.strip(b"\x00") == b"":
            notes.append(f"{len(trailing)} bytes of NV padding (0x{trailing[0]:02x}) stripped")
        else:
            notes.append(f"{len(trailing)} trailing bytes after the certificate ignored")
    return NormalizedCertificate(der=body[start:end], original=data, notes=tuple(notes))
