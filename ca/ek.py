"""The EK public key a request asks the CA to certify, checked at the boundary.

TCG EK Credential Profile 2.x, section 2.1.5 (EK templates): an EK certificate
certifies a key created from a TCG EK template. Given a TPM2B_PUBLIC the CA
checks it against the templates (attributes, authPolicy, symmetric, scheme,
key size) with :func:`vtpm_core.tpm.templates.require_ek_template`; a bare PEM
key carries no attributes, so it is accepted only when the caller says so
explicitly, and the ledger records it as ``pem``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm_core.errors import VerificationError
from vtpm_core.tpm.public import Public
from vtpm_core.tpm.templates import read_ek_tpm2b, require_ek_template

__all__ = ["CertifiableEk"]

EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
# (The P-256 SubjectPublicKeyInfo was once spliced here from the point's bytes; it
# saved 1.3 us of a 310 us issuance, bench/tricks.py 2026-12-07: cryptography encodes it.)


@dataclass(frozen=True, slots=True)
class CertifiableEk:
    """An EK public key that passed the EK checks (or an explicitly allowed bare key)."""

    public_key: EkPublicKey
    spki_der: bytes
    spki_sha256: str  # hex SHA-256 of the DER SubjectPublicKeyInfo: the ledger's EK key
    name: str | None  # hex TPM Name (nameAlg || H(TPMT_PUBLIC)); None for a bare key
    template: str  # EK template id ("L-1", "H-2", ...) or "bare-pem"
    key_type: str  # "rsa-2048", "ecc-nist-p256", ...
    raw: bytes  # the bytes received

    @classmethod
    def load(cls, data: bytes, *, allow_bare_key: bool) -> CertifiableEk:
        """Parse TPM2B_PUBLIC / TPMT_PUBLIC / PEM and check it is an EK.

        Raises ParseError (malformed, with offset), VerificationError naming the
        mismatching template field, or VerificationError ``ek.bare_key`` for a PEM
        key without ``allow_bare_key``.
        """
        # No libtss2-mu second read here (docs/tpm-structures.md, "The tpm2-tss
        # cross-check"): the EK template check requires every byte before
        # ``unique`` to equal the template's, whose encoding the tests pin to
        # libtss2-mu's marshalling, and cryptography validates the point in ``unique``.
        # A TPM2B_PUBLIC made from a template (every real EK) is read by comparing
        # those bytes (read_ek_tpm2b); anything else goes through the full parser.
        fast = read_ek_tpm2b(data)
        if fast is not None:
            public, ek_template = fast
            key = public.public_key()  # validates the point (or the modulus)
            return cls.from_key(
                key, template=ek_template.id, name=public.name().hex(), raw=bytes(data)
            )
        public = Public.load(data, cross_check=False)
        key = public.public_key()
        if public.from_pem:
            if not allow_bare_key:
                raise VerificationError(
                    "ek.bare_key",
                    "a bare public key cannot be checked against the EK templates; "
                    "pass it as a TPM2B_PUBLIC or allow bare keys explicitly",
                )
            template, name = "bare-pem", None
        else:
            template = str(require_ek_template(public).id)
            name = public.name().hex()
        return cls.from_key(key, template=template, name=name, raw=bytes(data))

    @classmethod
    def from_key(
        cls, key: EkPublicKey, *, template: str, name: str | None, raw: bytes
    ) -> CertifiableEk:
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if isinstance(key, rsa.RSAPublicKey):
            key_type = f"rsa-{key.key_size}"
        else:
            key_type = {
                "secp256r1": "ecc-nist-p256",
                "secp384r1": "ecc-nist-p384",
                "secp521r1": "ecc-nist-p521",
            }.get(key.curve.name, key.curve.name)
        return cls(key, spki, hashlib.sha256(spki).hexdigest(), name, template, key_type, raw)

    @property
    def is_rsa(self) -> bool:
        # key_type was derived from the key's class in from_key (an ABC isinstance
        # check costs ~0.8 us, and this is asked several times per issuance)
        return self.key_type.startswith("rsa-")
