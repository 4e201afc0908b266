"""Parse X.509 certificates the way real TPM vendors encode them.

RFC 5280 §4.1 (Certificate, TBSCertificate). Strategy:

1. Split the outer ``Certificate ::= SEQUENCE { tbsCertificate,
   signatureAlgorithm, signatureValue }`` ourselves and keep the
   tbsCertificate bytes exactly as received: every signature is verified over
   them, never over a re-encoding.
2. Parse strictly with python-cryptography (DER as X.690 requires).
3. If it refuses the certificate (Nuvoton CA names with SET members out of
   DER order, explicitly encoded defaults in some Intel certs), fall back to
   asn1crypto, which reads BER-ish input, and say so in ``strict_error``.

Fields are always read through asn1crypto (one code path for both cases);
the strict parse decides whether ``x509`` (a cryptography object) exists.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import algos as asn1_algos
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from verifier.ekcert.normalize import normalize_certificate, read_der_tlv
from vtpm_core.errors import ParseError, VerificationError

__all__ = [
    "Extension",
    "ParsedCertificate",
    "PublicKey",
    "names_equal",
    "parse_certificate",
    "verify_signature",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# signatureAlgorithm OID -> (family, hash); RFC 4055, RFC 5758
_SIGNATURE_ALGORITHMS: dict[str, tuple[str, str]] = {
    "1.2.840.113549.1.1.5": ("rsa", "sha1"),
    "1.2.840.113549.1.1.14": ("rsa", "sha224"),
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
    "1.2.840.113549.1.1.10": ("rsapss", ""),
    "1.2.840.10045.4.1": ("ecdsa", "sha1"),
    "1.2.840.10045.4.3.1": ("ecdsa", "sha224"),
    "1.2.840.10045.4.3.2": ("ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "sha384"),
    "1.2.840.10045.4.3.4": ("ecdsa", "sha512"),
}


@dataclass(frozen=True, slots=True)
class Extension:
    """One X.509 extension: OID, criticality and the extnValue contents."""

    oid: str
    critical: bool
    value: bytes


@dataclass(frozen=True, slots=True)
class ParsedCertificate:
    """A certificate's fields, with the bytes its signature covers.

    Nothing here is trusted: a parsed certificate has not been checked
    against any issuer (see :mod:`verifier.ekcert.chain`).
    """

    der: bytes
    tbs_bytes: bytes
    signature_algorithm: str
    signature_parameters: bytes | None
    signature: bytes
    version: int
    serial_number: int
    issuer_der: bytes
    subject_der: bytes
    issuer: str
    subject: str
    not_before: datetime
    not_after: datetime
    spki_der: bytes
    public_key: PublicKey | None
    public_key_algorithm: str
    extensions: tuple[Extension, ...]
    subject_key_id: bytes | None
    authority_key_id: bytes | None
    is_ca: bool | None
    path_length: int | None
    key_usage: frozenset[str] | None
    extended_key_usage: tuple[str, ...] | None
    strict_error: str | None
    notes: tuple[str, ...]
    x509: x509.Certificate | None

    @property
    def fingerprint_sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()

    @property
    def self_issued(self) -> bool:
        return names_equal(self.issuer_der, self.subject_der)

    def extension(self, oid: str) -> Extension | None:
        for ext in self.extensions:
            if ext.oid == oid:
                return ext
        return None


def names_equal(a: bytes, b: bytes) -> bool:
    """RFC 5280 §7.1 name comparison (case- and space-insensitive strings)."""
    if a == b:
        return True
    try:
        return bool(asn1_x509.Name.load(a) == asn1_x509.Name.load(b))
    except (ValueError, TypeError):
        return False


def _split_outer(der: bytes) -> tuple[bytes, bytes, bytes]:
    """Certificate -> (tbsCertificate bytes, signatureAlgorithm bytes, signatureValue bytes)."""
    _, header, length = read_der_tlv(der, 0, "Certificate")
    parts: list[bytes] = []
    offset = header
    end = header + length
    while offset < end and len(parts) < 3:
        _, h, n = read_der_tlv(der, offset, "Certificate")
        if offset + h + n > end:
            raise ParseError("Certificate", f"element{len(parts)}", offset, "runs past the end")
        parts.append(der[offset : offset + h + n])
        offset += h + n
    if len(parts) != 3 or offset != end:
        raise ParseError("Certificate", "sequence", offset, "expected exactly 3 elements")
    return parts[0], parts[1], parts[2]


def _load_public_key(
    spki: asn1_keys.PublicKeyInfo, spki_der: bytes
) -> tuple[PublicKey | None, str]:
    algorithm = spki["algorithm"]["algorithm"].native
    try:
        key = load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key, algorithm
    if algorithm in ("rsa", "rsaes_oaep", "rsassa_pss"):
        # older STM/Infineon EKs are id-RSAES-OAEP keys that OpenSSL 3 will not
        # load; the key itself is an ordinary RSAPublicKey (RFC 4055 §1.2)
        parsed = spki["public_key"].parsed
        numbers = rsa.RSAPublicNumbers(parsed["public_exponent"].native, parsed["modulus"].native)
        return numbers.public_key(), algorithm
    return None, algorithm


# What asn1crypto raises on hostile DER (AttributeError included: a mutated tag can
# turn a field into a type without .native). Every lenient decode catches all of them.
ASN1_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


def _optional(getter: Any, what: str) -> Any:
    try:
        return getter()
    except ASN1_ERRORS as exc:
        raise ParseError("Certificate", what, 0, f"malformed extension: {exc}") from None


def parse_certificate(data: bytes) -> ParsedCertificate:
    """Parse one certificate from DER, PEM or NV contents (see normalize).

    Raises ParseError for anything that is not a certificate. Does not
    verify any signature and does not judge the content.
    """
    normalized = normalize_certificate(data)
    der = normalized.der
    tbs, sig_alg_der, sig_value_der = _split_outer(der)
    notes = list(normalized.notes)
    strict: x509.Certificate | None = None
    strict_error: str | None = None
    with warnings.catch_warnings():
        # cryptography warns about over-long name attributes (Google's CNs)
        warnings.simplefilter("ignore")
        try:
            strict = x509.load_der_x509_certificate(der)
            _ = strict.tbs_certificate_bytes
        except (ValueError, x509.InvalidVersion) as exc:
            strict_error = str(exc)
            strict = None
            notes.append(f"not strict DER, read leniently: {strict_error}")
    try:
        cert = asn1_x509.Certificate.load(der)
        tbs_obj = cert["tbs_certificate"]
        version = {"v1": 1, "v2": 2, "v3": 3}[tbs_obj["version"].native]
        serial = int(tbs_obj["serial_number"].native)
        issuer_obj = tbs_obj["issuer"]
        subject_obj = tbs_obj["subject"]
        issuer_der = issuer_obj.dump()
        subject_der = subject_obj.dump()
        validity = tbs_obj["validity"]
        not_before = validity["not_before"].native
        not_after = validity["not_after"].native
        spki = tbs_obj["subject_public_key_info"]
        spki_der = spki.dump()
        sig_alg = asn1_algos.SignedDigestAlgorithm.load(sig_alg_der)
        sig_oid = sig_alg["algorithm"].dotted
        params = sig_alg["parameters"]
        sig_params = None if params.native is None else params.dump()
        signature = cert["signature_value"].native
        inner_alg = tbs_obj["signature"].dump()
        extensions = tuple(
            Extension(
                ext["extn_id"].dotted, bool(ext["critical"].native), ext["extn_value"].contents
            )
            for ext in tbs_obj["extensions"]
        )
        issuer_text = issuer_obj.human_friendly
        subject_text = subject_obj.human_friendly
    except ASN1_ERRORS as exc:
        raise ParseError("Certificate", "tbsCertificate", 0, f"unreadable: {exc}") from None
    if inner_alg != sig_alg_der:
        # RFC 5280 §4.1.1.2: the two must be identical
        raise ParseError(
            "Certificate", "signatureAlgorithm", 0, "differs from tbsCertificate.signature"
        )
    if not isinstance(signature, bytes) or sig_value_der[0] != 0x03:
        raise ParseError("Certificate", "signatureValue", 0, "not a BIT STRING")
    oids = [e.oid for e in extensions]
    if len(set(oids)) != len(oids):
        raise ParseError(
            "Certificate", "extensions", 0, "an extension appears twice (RFC 5280 §4.2)"
        )
    try:
        public_key, key_algorithm = _load_public_key(spki, spki_der)
    except ASN1_ERRORS as exc:
        raise ParseError("Certificate", "subjectPublicKeyInfo", 0, f"unreadable: {exc}") from None
    ski = _optional(lambda: cert.key_identifier, "subjectKeyIdentifier")
    aki = _optional(lambda: cert.authority_key_identifier, "authorityKeyIdentifier")
    bc = _optional(lambda: cert.basic_constraints_value, "basicConstraints")
    ku = _optional(lambda: cert.key_usage_value, "keyUsage")
    eku = _optional(lambda: cert.extended_key_usage_value, "extKeyUsage")
    is_ca = _optional(lambda: None if bc is None else bool(bc["ca"].native), "basicConstraints")
    path_length = _optional(
        lambda: None if bc is None else bc["path_len_constraint"].native, "basicConstraints"
    )
    key_usage = _optional(lambda: None if ku is None else frozenset(ku.native), "keyUsage")
    ext_key_usage = _optional(
        lambda: None if eku is None else tuple(p.dotted for p in eku), "extKeyUsage"
    )
    return ParsedCertificate(
        der=der,
        tbs_bytes=tbs,
        signature_algorithm=sig_oid,
        signature_parameters=sig_params,
        signature=signature,
        version=version,
        serial_number=serial,
        issuer_der=issuer_der,
        subject_der=subject_der,
        issuer=issuer_text,
        subject=subject_text,
        not_before=not_before,
        not_after=not_after,
        spki_der=spki_der,
        public_key=public_key,
        public_key_algorithm=key_algorithm,
        extensions=extensions,
        subject_key_id=ski,
        authority_key_id=aki,
        is_ca=is_ca,
        path_length=path_length,
        key_usage=key_usage,
        extended_key_usage=ext_key_usage,
        strict_error=strict_error,
        notes=tuple(notes),
        x509=strict,
    )


def signature_hash_name(algorithm_oid: str, parameters: bytes | None) -> str:
    """The hash a signatureAlgorithm uses ("sha1", "sha256", …)."""
    family, hash_name = _SIGNATURE_ALGORITHMS.get(algorithm_oid, ("", ""))
    if family == "rsapss":
        if parameters is None:
            return "sha1"  # RFC 4055 §3.1 default
        return str(
            asn1_algos.RSASSAPSSParams.load(parameters)["hash_algorithm"]["algorithm"].native
        )
    return hash_name


def verify_signature(
    check: str,
    key: PublicKey | None,
    algorithm_oid: str,
    parameters: bytes | None,
    signature: bytes,
    signed: bytes,
    *,
    allow_sha1: bool,
) -> None:
    """Verify ``signature`` over exactly ``signed``; raise VerificationError(check) if not."""
    family, _ = _SIGNATURE_ALGORITHMS.get(algorithm_oid, ("", ""))
    if not family:
        raise VerificationError(check, f"unsupported signature algorithm {algorithm_oid}")
    if key is None:
        raise VerificationError(check, "the issuer's public key type is not supported")
    try:
        hash_name = signature_hash_name(algorithm_oid, parameters)
    except ASN1_ERRORS as exc:
        raise VerificationError(check, f"bad RSASSA-PSS parameters: {exc}") from None
    if hash_name not in _HASHES:
        raise VerificationError(check, f"unsupported signature hash {hash_name}")
    if hash_name == "sha1" and not allow_sha1:
        raise VerificationError(
            check, "SHA-1 signature refused (needs the explicit allow-sha1 policy)"
        )
    algorithm = _HASHES[hash_name]()
    try:
        if family == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise VerificationError(check, "ECDSA signature but the issuer key is not EC")
            key.verify(signature, signed, ec.ECDSA(algorithm))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise VerificationError(check, "RSA signature but the issuer key is not RSA")
            pad: padding.AsymmetricPadding
            if family == "rsapss":
                salt = 20
                if parameters is not None:
                    salt = int(asn1_algos.RSASSAPSSParams.load(parameters)["salt_length"].native)
                pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=salt)
            else:
                pad = padding.PKCS1v15()
            key.verify(signature, signed, pad, algorithm)
    except InvalidSignature:
        raise VerificationError(check, "signature does not verify with the issuer's key") from None
