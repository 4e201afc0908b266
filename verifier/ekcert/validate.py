"""Validate an EK certificate: the one entry point of :mod:`verifier.ekcert`.

Steps (each failure is a VerificationError naming the check):

1. ``ek.parse`` — normalise (NV padding, TCG stored-cert header) and parse,
   strictly first, leniently for non-DER vendor certs (ParseError).
2. ``ek.chain*`` — build a path to a trust anchor; signatures over the
   original tbsCertificate bytes; SHA-1 and expired CA certificates only
   by explicit option (chain.py).
3. ``ek.validity`` — the EK certificate's own validity window
   (``allow_expired_ek`` to accept an EK cert that outlived its notAfter).
4. ``ek.profile.*`` — TCG EK Credential Profile (profile.py); EKU and SAN
   may be absent only for anchors on ``eku_exempt_anchors``.
5. ``ek.public`` — the certificate's key equals the EK public presented.
6. ``ek.revoked`` / ``ek.crl`` — CRLs given for an issuer in the path.
7. VM identity extension, when our CA wrote one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verifier.ekcert.chain import ChainOptions, TrustStore, build_path
from verifier.ekcert.identity import VmIdentityExtension, read_vm_identity
from verifier.ekcert.parse import ParsedCertificate, PublicKey, parse_certificate
from verifier.ekcert.profile import EkProfile, check_ek_profile
from verifier.ekcert.revocation import CertificateRevocationList, RevocationStatus, check_revocation
from vtpm_core.errors import VerificationError

__all__ = [
    "GOOGLE_EK_ROOTS",
    "EkValidationOptions",
    "ValidatedEkCertificate",
    "validate_ek_certificate",
]

# SHA-256 of the SubjectPublicKeyInfo of trust anchors whose EK certs omit
# EKU and SAN. Google's vTPM EK roots: "EK/AK CA Root" (Google Cloud
# privateCA) and "tpm_ek_root_1"; newer GCE EK certs carry neither EKU nor
# SAN (go-tpm-tools server/ca-certs).
GOOGLE_EK_ROOTS: frozenset[str] = frozenset(
    {
        # CN=EK/AK CA Root, OU=Google Cloud, O=Google LLC
        "56a613f57126a385dd6949294e93b0b566f96ab0573be0c2368e6f5ca779831f",
        # CN=tpm_ek_v1_cloud_host_root-signer-0-2018-04-06T10:58:26-07:00 …, O=Google LLC
        "f23057f4f97d1d90e4cae0ce91d5a0fc99069f0a1bc147021dca33b1e9c4d0d9",
    }
)


class _HasPublicKey(Protocol):
    def public_key(self) -> PublicKey: ...


@dataclass(frozen=True, slots=True)
class EkValidationOptions:
    """Explicit policy relaxations; the defaults are strict."""

    allow_sha1: bool = False
    allow_expired_intermediates: bool = False
    allow_expired_ek: bool = False
    eku_exempt_anchors: frozenset[str] = field(default_factory=lambda: GOOGLE_EK_ROOTS)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class ValidatedEkCertificate:
    """An EK certificate whose path to a trust anchor and profile were checked."""

    certificate: ParsedCertificate
    chain: tuple[ParsedCertificate, ...]
    profile: EkProfile
    revocation: tuple[RevocationStatus, ...]
    vm_identity: VmIdentityExtension | None
    warnings: tuple[str, ...]

    @property
    def anchor(self) -> ParsedCertificate:
        return self.chain[-1]

    @property
    def tpm_manufacturer(self) -> str | None:
        return self.profile.tpm_manufacturer

    @property
    def tpm_model(self) -> str | None:
        return self.profile.tpm_model

    @property
    def tpm_version(self) -> str | None:
        return self.profile.tpm_version

    @property
    def public_key(self) -> PublicKey:
        key = self.certificate.public_key
        assert key is not None  # the profile check refuses certificates without one
        return key


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    """True if two RSA or EC keys are the same key."""
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()
    return False


def validate_ek_certificate(
    cert_bytes: bytes,
    trust: TrustStore,
    *,
    ek_public: PublicKey | _HasPublicKey | None = None,
    crls: tuple[CertificateRevocationList, ...] = (),
    options: EkValidationOptions | None = None,
    intermediates: tuple[ParsedCertificate, ...] = (),
) -> ValidatedEkCertificate:
    """Run steps 1-7 above. Raises ParseError or VerificationError.

    Guarantees on return: the certificate chains to an anchor in ``trust``
    with valid signatures, satisfies the EK profile, holds ``ek_public``
    (when given) and is not revoked by any CRL given for its issuers. It
    does not prove that the EK lives in a TPM (that takes credential
    activation), nor that CRLs were given for every issuer (see
    ``revocation``).
    """
    options = options or EkValidationOptions()
    at = options.clock()
    leaf = parse_certificate(cert_bytes)
    warnings = list(leaf.notes)
    store = trust.with_intermediates(intermediates) if intermediates else trust
    chain, chain_warnings = build_path(
        leaf,
        store,
        at,
        ChainOptions(options.allow_sha1, options.allow_expired_intermediates),
    )
    warnings.extend(chain_warnings)
    if not leaf.not_before <= at <= leaf.not_after:
        window = f"{leaf.not_before:%Y-%m-%d} .. {leaf.not_after:%Y-%m-%d}"
        if not options.allow_expired_ek:
            raise VerificationError(
                "ek.validity", f"EK certificate not valid at {at:%Y-%m-%d} ({window})"
            )
        warnings.append(f"EK certificate outside its validity ({window}) accepted by policy")
    exempt = chain[-1].spki_sha256 in options.eku_exempt_anchors
    profile = check_ek_profile(leaf, exempt_eku_and_san=exempt)
    warnings.extend(profile.warnings)
    if ek_public is not None:
        presented = (
            ek_public
            if isinstance(ek_public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
            else ek_public.public_key()
        )
        if leaf.public_key is None or not same_public_key(leaf.public_key, presented):
            raise VerificationError(
                "ek.public", "the certificate's key is not the EK public presented"
            )
    revocation = check_revocation(chain, crls, at, allow_sha1=options.allow_sha1)
    return ValidatedEkCertificate(
        certificate=leaf,
        chain=chain,
        profile=profile,
        revocation=revocation,
        vm_identity=read_vm_identity(leaf),
        warnings=tuple(warnings),
    )
