"""TCG EK Credential Profile checks on an EK certificate.

TCG EK Credential Profile For TPM Family 2.0, Level 0, Version 2.5:

- §3.2.7 subjectAltName: directoryName with tpmManufacturer
  (2.23.133.2.1), tpmModel (2.23.133.2.2), tpmVersion (2.23.133.2.3).
- §3.2.10 / §3.2.11 basicConstraints cA FALSE; extKeyUsage contains
  tcg-kp-EKCertificate (2.23.133.8.1).
- §3.2.8 keyUsage: keyEncipherment for an RSA EK, keyAgreement for an ECC
  EK (the EK is a restricted decryption key, never a signer).

Some issuers omit EKU and SAN (newer Google vTPM EK certs): certificates
chaining to an anchor on the caller's exemption list skip those two
checks; everything else still applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verifier.ekcert.parse import ASN1_ERRORS, ParsedCertificate
from vtpm_core.errors import VerificationError

__all__ = [
    "OID_EK_CERTIFICATE",
    "OID_SUBJECT_ALT_NAME",
    "EkProfile",
    "TpmSpecification",
    "check_ek_profile",
]

OID_EK_CERTIFICATE = "2.23.133.8.1"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_SUBJECT_DIRECTORY_ATTRIBUTES = "2.5.29.9"
OID_TPM_SPECIFICATION = "2.23.133.2.16"
_TPM_ATTRIBUTES = {
    "2.23.133.2.1": "tpm_manufacturer",
    "2.23.133.2.2": "tpm_model",
    "2.23.133.2.3": "tpm_version",
}
# extensions an EK certificate may mark critical and that we understand
_KNOWN_CRITICAL = {
    "2.5.29.15",  # keyUsage
    "2.5.29.17",  # subjectAltName
    "2.5.29.19",  # basicConstraints
    "2.5.29.32",  # certificatePolicies
    "2.5.29.37",  # extKeyUsage
    "2.5.29.9",  # subjectDirectoryAttributes
}
_CA_USAGES = {"key_cert_sign", "crl_sign"}


@dataclass(frozen=True, slots=True)
class TpmSpecification:
    """tpmSpecification from subjectDirectoryAttributes (family "2.0", level, revision)."""

    family: str
    level: int
    revision: int


@dataclass(frozen=True, slots=True)
class EkProfile:
    """What the TCG profile fields say about the TPM (from a checked certificate)."""

    key_type: str
    tpm_manufacturer: str | None
    tpm_model: str | None
    tpm_version: str | None
    tpm_specification: TpmSpecification | None
    warnings: tuple[str, ...]


def _san_attributes(cert: ParsedCertificate) -> dict[str, str]:
    ext = cert.extension(OID_SUBJECT_ALT_NAME)
    if ext is None:
        return {}
    found: dict[str, str] = {}
    try:
        names = asn1_x509.GeneralNames.load(ext.value)
        for general_name in names:
            if general_name.name != "directory_name":
                continue
            for rdn in general_name.chosen.chosen:
                for attribute in rdn:
                    oid = attribute["type"].dotted
                    if oid in _TPM_ATTRIBUTES:
                        value = attribute["value"].native
                        if not isinstance(value, str):
                            raise ValueError(f"{oid} is not a string")
                        found[_TPM_ATTRIBUTES[oid]] = value
    except ASN1_ERRORS as exc:
        raise VerificationError("ek.profile.san", f"unreadable subjectAltName: {exc}") from None
    return found


def _tpm_specification(cert: ParsedCertificate) -> TpmSpecification | None:
    ext = cert.extension(OID_SUBJECT_DIRECTORY_ATTRIBUTES)
    if ext is None:
        return None
    try:
        attributes = asn1_x509.SubjectDirectoryAttributes.load(ext.value)
        for attribute in attributes:
            if attribute["type"].dotted != OID_TPM_SPECIFICATION:
                continue
            for value in attribute["values"]:
                raw = value.dump()
                spec = asn1_core.Sequence.load(raw)  # SEQUENCE {UTF8String, INTEGER, INTEGER}
                family = spec[0].native
                if isinstance(family, bytes):
                    family = family.decode("utf-8")
                return TpmSpecification(str(family), int(spec[1].native), int(spec[2].native))
    except ASN1_ERRORS:  # UnicodeDecodeError is a ValueError
        return None  # informative only; never a reason to trust or refuse
    return None


def check_ek_profile(cert: ParsedCertificate, *, exempt_eku_and_san: bool) -> EkProfile:
    """Check the TCG EK profile rules above; raise VerificationError("ek.profile.*").

    Does not check the chain, validity or revocation.
    """
    warnings: list[str] = []
    key = cert.public_key
    if isinstance(key, rsa.RSAPublicKey):
        key_type, needed_usage = "rsa", "key_encipherment"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_type, needed_usage = "ecc", "key_agreement"
    else:
        raise VerificationError(
            "ek.profile.key", f"EK key algorithm {cert.public_key_algorithm} is neither RSA nor ECC"
        )
    if cert.version != 3:
        raise VerificationError("ek.profile.version", f"X.509 v{cert.version}, expected v3")
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise VerificationError("ek.profile.critical", f"unknown critical extension {ext.oid}")
    if cert.is_ca:
        raise VerificationError(
            "ek.profile.basic_constraints", "an EK certificate must not be a CA"
        )
    if cert.key_usage is None:
        warnings.append("no keyUsage extension (TPM 1.2-era profile)")
    else:
        if needed_usage not in cert.key_usage:
            raise VerificationError(
                "ek.profile.key_usage",
                f"{key_type.upper()} EK needs {needed_usage},"
                f" keyUsage has {sorted(cert.key_usage)}",
            )
        if cert.key_usage & _CA_USAGES:
            raise VerificationError(
                "ek.profile.key_usage", "an EK must not sign certificates or CRLs"
            )
    eku = cert.extended_key_usage
    if eku is not None and OID_EK_CERTIFICATE not in eku:
        raise VerificationError(
            "ek.profile.eku",
            f"extKeyUsage {list(eku)} lacks tcg-kp-EKCertificate {OID_EK_CERTIFICATE}",
        )
    if eku is None:
        if not exempt_eku_and_san:
            raise VerificationError(
                "ek.profile.eku", f"no extKeyUsage (tcg-kp-EKCertificate {OID_EK_CERTIFICATE})"
            )
        warnings.append("no extKeyUsage: issuer is on the exemption list")
    attributes = _san_attributes(cert)
    if not attributes:
        if not exempt_eku_and_san:
            raise VerificationError(
                "ek.profile.san", "no subjectAltName with TPM manufacturer/model/version"
            )
        warnings.append("no TPM attributes in subjectAltName: issuer is on the exemption list")
    elif "tpm_manufacturer" not in attributes:
        raise VerificationError("ek.profile.san", "subjectAltName lacks tpmManufacturer")
    return EkProfile(
        key_type=key_type,
        tpm_manufacturer=attributes.get("tpm_manufacturer"),
        tpm_model=attributes.get("tpm_model"),
        tpm_version=attributes.get("tpm_version"),
        tpm_specification=_tpm_specification(cert),
        warnings=tuple(warnings),
    )
