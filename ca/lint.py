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

The lint cache (``shape`` mode, :class:`LintCache`, ``HOME/lint-cache/`` in
the CA home) carries step 1 across processes, so a one-shot ``vtpm create``
does not import pkilint (~0.2 s) for a certificate like one it linted before.
Its key, :func:`lint_key`, is stricter than the in-process shape: the SHA-256
of everything pkilint's verdict can depend on except the values that vary per
certificate and are checked on every instance instead. Kept in the key:

- the pkilint version and :data:`LINT_PROFILE` (the validators run and the
  severity cut), so an upgrade lints again;
- the signature AlgorithmIdentifier, the issuer and the subject, as encoded;
- the validity's two time types (UTCTime / GeneralizedTime);
- the SPKI's AlgorithmIdentifier and its key's form: for RSA the modulus
  length and the public exponent, for EC the point's length and format byte,
  for anything else the whole SPKI;
- per extension, in order: extnID, critical as encoded, and the whole
  extnValue, except the two below.

Left out, because they vary per certificate and are checked per instance
(:func:`structural_check`, on every certificate, cache hit or not):

- serialNumber (positive, 64..159 bits); notBefore/notAfter instants (before
  one another; each time in the type and form RFC 5280 4.1.2.5 requires for
  its year); the key's own bits (the SPKI is exactly the EK's, which the CA
  parsed with cryptography, and its form is in the key); the signature value
  (pkilint does not verify it; the CA checks its own);
- subjectKeyIdentifier's value: only its length is in the key; per instance it
  must be a KeyIdentifier (an OCTET STRING, RFC 5280 4.2.1.2);
- the VM identity extension's value: pkilint has no decoder for its OID and
  reads it as an opaque OCTET STRING; :mod:`vtpm_core.vm_identity` built it
  from checked inputs.

Integrity: an entry is ``HOME/lint-cache/<key>.der``, the first certificate of
that key this CA issued after pkilint passed it (written after signing). It
counts only if it verifies as issued by the CA certificate (a signature by the
CA key), is not the CA certificate itself (the one certificate that key signs
without this lint), and its own lint key is its file name. So a forged entry
needs the CA key, and can only name a key of a certificate this CA issued,
which pkilint passed when it was issued. What is not bound: the pkilint
version in the key is recomputed on the entry as it is today, so someone who
can write the CA home could keep an entry that an older pkilint passed across
a pkilint upgrade; with the same access they can rewrite ``ca.yaml`` (the
profile every certificate is built from). ``every`` mode ignores the cache;
deleting the directory only makes the next certificate of each key lint again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca.der import encode_oid, read_tlv
from vtpm_core.errors import VerificationError
from vtpm_core.vm_identity import VM_IDENTITY_OID

__all__ = [
    "LINT_PROFILE",
    "LintCache",
    "Linter",
    "Shape",
    "TbsParts",
    "lint_key",
    "pkilint_findings",
    "shape_of",
    "structural_check",
]

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
    validity: bytes = b""  # the Validity SEQUENCE, as encoded

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
            cut[4],
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


# What pkilint_findings runs. Part of every lint cache key: change it with the
# validators or the severity cut below, so that the cache lints again.
LINT_PROFILE = "pkilint pkix certificate: issuer, validity, subject, extensions, spki; >= WARNING"


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
    if parts.validity:
        _check_times(parts.validity)
    if parts.spki != spki_der:
        raise VerificationError("lint.spki", "subjectPublicKeyInfo is not exactly the EK key")
    if parts.issuer != issuer_der:
        raise VerificationError("lint.issuer", "issuer is not the CA's subject")
    _extensions_parse(cert, parts, reference)


def _check_times(validity: bytes) -> None:
    """RFC 5280 4.1.2.5: UTCTime YYMMDDHHMMSSZ through 2049, GeneralizedTime
    YYYYMMDDHHMMSSZ from 2050 on; nothing else (pkilint's rule, per instance)."""
    try:
        _, pos, end = read_tlv(validity, 0)
        times = []
        while pos < end:
            tag, start, pos = read_tlv(validity, pos)
            times.append((tag, validity[start:pos]))
    except (ValueError, IndexError):
        raise VerificationError("lint.validity", "the Validity does not parse") from None
    if len(times) != 2:
        raise VerificationError("lint.validity", f"expected 2 times, got {len(times)}")
    for name, (tag, text) in zip(("notBefore", "notAfter"), times, strict=True):
        digits, zulu = text[:-1], text[-1:]
        ok = zulu == b"Z" and digits.isdigit()
        if tag == 0x17:  # any YY is a year 1950..2049, where UTCTime is the type
            ok = ok and len(text) == 13
        elif tag == 0x18:
            ok = ok and len(text) == 15 and int(digits[:4]) >= 2050
        else:
            ok = False
        if not ok:
            raise VerificationError(
                "lint.validity",
                f"{name} {text!r} is not the time type RFC 5280 4.1.2.5 requires for its year",
            )


_OID_SKI = b"\x06\x03\x55\x1d\x0e"  # 2.5.29.14
# cryptography does not parse this extension's value (an UnrecognizedExtension): a
# full parse checks nothing in it either
_OID_VM_IDENTITY = encode_oid(VM_IDENTITY_OID)


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


_CACHE_FORMAT = b"vtpm-trust lint-cache 1"
_OID_RSA = encode_oid("1.2.840.113549.1.1.1")
_OID_EC = encode_oid("1.2.840.10045.2.1")
_MAX_ENTRY = 1 << 16  # an EK certificate is ~1 KiB


def _key_form(spki: bytes, algorithm: bytes) -> bytes:
    """What of the key pkilint can see beyond its bits (see the module docstring)."""
    try:
        _, content, _ = read_tlv(spki, 0)
        _, _, alg_end = read_tlv(spki, content)
        _, bits, bits_end = read_tlv(spki, alg_end)
        if _OID_EC in algorithm:  # unused-bits octet, then the point's format byte
            return b"ec" + (bits_end - bits).to_bytes(4, "big") + spki[bits : bits + 2]
        if _OID_RSA in algorithm:  # RSAPublicKey ::= SEQUENCE { modulus, publicExponent }
            _, inner, _ = read_tlv(spki, bits + 1)
            _, n_start, n_end = read_tlv(spki, inner)
            _, _, e_end = read_tlv(spki, n_end)
            return b"rsa" + (n_end - n_start).to_bytes(4, "big") + spki[n_end:e_end]
    except (ValueError, IndexError):
        pass
    return b"spki" + spki  # an unknown form: no sharing across keys


def lint_key(parts: TbsParts, pkilint_version: str) -> str:
    """The lint cache key (hex SHA-256) of a certificate cut into ``parts``; what is in
    it and what is left out, and why, is in the module docstring."""
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)

    for item in (_CACHE_FORMAT, pkilint_version.encode(), LINT_PROFILE.encode()):
        put(item)
    put(parts.signature_algorithm)
    put(parts.issuer)
    put(parts.subject)
    put(bytes(t for t in _time_tags(parts.validity)))
    put(parts.spki_algorithm)
    put(_key_form(parts.spki, parts.spki_algorithm))
    for (oid, critical), value in zip(parts.extensions, parts.extension_values, strict=True):
        put(oid)
        put(critical)
        if oid == _OID_SKI:
            put(b"key identifier of " + len(value).to_bytes(2, "big") + b" octets")
        elif oid == _OID_VM_IDENTITY:
            put(b"opaque to pkilint")
        else:
            put(value)
    return h.hexdigest()


def _time_tags(validity: bytes) -> list[int]:
    tags = []
    try:
        _, pos, end = read_tlv(validity, 0)
        while pos < end:
            tag, _, pos = read_tlv(validity, pos)
            tags.append(tag)
    except (ValueError, IndexError):
        return [0]
    return tags


class LintCache:
    """Lint keys pkilint passed, kept in the CA home across processes.

    ``directory/<key>.der`` holds the first certificate of that key the CA
    issued; see the module docstring for what makes an entry count. A missing,
    unreadable or failing entry is a miss (the certificate is linted), never
    an error.
    """

    def __init__(self, directory: Path, ca_certificate: x509.Certificate) -> None:
        self.directory = Path(directory)
        self._ca = ca_certificate
        self._ca_der = ca_certificate.public_bytes(serialization.Encoding.DER)

    def get(self, key: str, pkilint_version: str) -> tuple[bytes, ...] | None:
        """The Extension DERs of the entry for ``key``, if it counts; else None."""
        try:
            with open(self.directory / f"{key}.der", "rb") as f:
                der = f.read(_MAX_ENTRY + 1)
        except OSError:
            return None
        if len(der) > _MAX_ENTRY or der == self._ca_der:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(self._ca)  # issuer name and the CA key's signature
            parts = TbsParts.of(der)
        except (ValueError, TypeError, InvalidSignature, VerificationError):
            return None
        if parts.subject == parts.issuer or lint_key(parts, pkilint_version) != key:
            return None
        return parts.extension_ders

    def put(self, key: str, certificate_der: bytes) -> None:
        """Store an entry (atomically: a reader sees the old file, the new one or none).
        A home that cannot be written costs the next process a pkilint run, nothing else."""
        tmp = self.directory / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.directory.mkdir(mode=0o755, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(certificate_der)
            os.replace(tmp, self.directory / f"{key}.der")
        except OSError:
            tmp.unlink(missing_ok=True)


def _pkilint_version() -> str:
    """The installed pkilint's version, read from its metadata (pkilint is not imported).

    The ``Version:`` of the one ``pkilint-*.dist-info`` beside the package (what
    ``importlib.metadata.version`` reads, without importing importlib.metadata and
    its email and zipfile modules: ~8 ms of a ``vtpm create``); anything else goes
    to importlib.metadata.
    """
    spec = importlib.util.find_spec("pkilint")
    if spec is not None and spec.submodule_search_locations:
        site = Path(next(iter(spec.submodule_search_locations))).parent
        found = list(site.glob("pkilint-*.dist-info"))
        if len(found) == 1:
            try:
                header = (found[0] / "METADATA").read_text(encoding="utf-8").split("\n\n", 1)[0]
            except OSError:
                header = ""
            for line in header.splitlines():
                if line.startswith("Version: "):
                    return line[len("Version: ") :].strip()
    from importlib import metadata

    return metadata.version("pkilint")


@dataclass
class Linter:
    """Remembers which shapes pkilint passed: per process, and (with ``cache``) per CA home."""

    mode: str = "shape"
    cache: LintCache | None = None
    # shape -> the Extension DERs of the certificate pkilint passed for it
    _passed: dict[Shape, tuple[bytes, ...]] = field(default_factory=dict)
    # lint keys pkilint itself passed in this process, stored once their certificate is signed
    _unstored: set[str] = field(default_factory=set)
    _version: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _key(self, parts: TbsParts) -> str:
        if not self._version:
            self._version = _pkilint_version()
        return lint_key(parts, self._version)

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
        ``certificate_der`` carries a placeholder signature. Call :meth:`issued`
        with the signed certificate, so the cache learns what pkilint passed.
        """
        issuer_der = issuer if isinstance(issuer, bytes) else issuer.public_bytes()
        parts = TbsParts.of(certificate_der)
        shape = shape_of(cert, parts)
        with self._lock:
            reference = self._passed.get(shape)
        structural_check(cert, parts, spki_der, issuer_der, reference)
        if reference is not None and self.mode == "shape":
            return
        key = None
        if self.mode == "shape" and self.cache is not None:
            key = self._key(parts)
            stored = self.cache.get(key, self._version)
            if stored is not None:  # a certificate of this key pkilint passed, this CA signed
                with self._lock:
                    self._passed.setdefault(shape, stored)
                return
        findings = pkilint_findings(full() if full is not None else certificate_der)
        if findings:
            raise VerificationError("lint.pkilint", "; ".join(findings))
        with self._lock:
            self._passed.setdefault(shape, parts.extension_ders)
            if key is not None:
                self._unstored.add(key)

    def issued(self, certificate_der: bytes) -> None:
        """The CA signed ``certificate_der``: if pkilint passed its lint key in this
        process, store it as that key's cache entry."""
        if self.cache is None or not self._unstored:
            return
        key = self._key(TbsParts.of(certificate_der))
        with self._lock:
            if key not in self._unstored:
                return
            self._unstored.discard(key)
        self.cache.put(key, certificate_der)
