"""EK certificate validation: normalise, parse, path to a trust anchor, TCG profile, CRLs.

Specs: RFC 5280 (X.509 paths and CRLs); TCG EK Credential Profile for TPM
Family 2.0 v2.5; TCG PC Client Implementation Spec 1.21 §7.4.5 (stored-cert
header).

    trust = TrustStore.load(["roots/"], ["intermediates.pem"])
    ek = validate_ek_certificate(cert_bytes, trust, ek_public=ek_public)
    ek.tpm_manufacturer, ek.chain, ek.warnings
"""

from verifier.ekcert.chain import ChainOptions, TrustStore, build_path, load_certificates
from verifier.ekcert.identity import VmIdentityExtension, read_vm_identity
from verifier.ekcert.normalize import NormalizedCertificate, normalize_certificate
from verifier.ekcert.parse import Extension, ParsedCertificate, PublicKey, parse_certificate
from verifier.ekcert.profile import EkProfile, TpmSpecification, check_ek_profile
from verifier.ekcert.revocation import CertificateRevocationList, RevocationStatus, check_revocation
from verifier.ekcert.validate import (
    GOOGLE_EK_ROOTS,
    EkValidationOptions,
    ValidatedEkCertificate,
    same_public_key,
    validate_ek_certificate,
)

__all__ = [
    "GOOGLE_EK_ROOTS",
    "CertificateRevocationList",
    "ChainOptions",
    "EkProfile",
    "EkValidationOptions",
    "Extension",
    "NormalizedCertificate",
    "ParsedCertificate",
    "PublicKey",
    "RevocationStatus",
    "TpmSpecification",
    "TrustStore",
    "ValidatedEkCertificate",
    "VmIdentityExtension",
    "build_path",
    "check_ek_profile",
    "check_revocation",
    "load_certificates",
    "normalize_certificate",
    "parse_certificate",
    "read_vm_identity",
    "same_public_key",
    "validate_ek_certificate",
]
