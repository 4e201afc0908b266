"""TPMT_SIGNATURE and its verification.

TPM 2.0 Library Part 2 (rev 1.59): 11.3.1 TPMS_SIGNATURE_RSA, 11.3.2
TPMS_SIGNATURE_ECC, 11.3.3 TPMU_SIGNATURE, 11.3.4 TPMT_SIGNATURE. Part 1,
B.7 (RSASSA-PSS): a TPM uses the largest salt the key allows, or the digest
length in FIPS mode; libtpms uses the digest length. ``verify`` accepts any
salt length (PSS.AUTO) since the signature is still bound to the message.

Parsing covers every TPMU_SIGNATURE member tpm2-tss knows (RSA, ECC, HMAC,
NULL); ``verify`` supports RSASSA, RSAPSS and ECDSA with SHA-1/256/384/512.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import _marshal
from vtpm_core.tpm._reader import Reader
from vtpm_core.tpm.algorithms import HASH_ALGS, TpmAlg, cryptography_hash, hash_name
from vtpm_core.tpm.public import Public

__all__ = ["Signature"]

_RSA_SIGS = (TpmAlg.RSASSA, TpmAlg.RSAPSS)
_ECC_SIGS = (TpmAlg.ECDSA, TpmAlg.ECDAA, TpmAlg.SM2, TpmAlg.ECSCHNORR)
# the hashes verify accepts (cryptography_hash would give the same classes)
_VERIFY_HASHES: dict[TpmAlg, type[hashes.HashAlgorithm]] = {
    TpmAlg.SHA1: hashes.SHA1,
    TpmAlg.SHA256: hashes.SHA256,
    TpmAlg.SHA384: hashes.SHA384,
    TpmAlg.SHA512: hashes.SHA512,
}
_MAX_RSA_KEY_BYTES = 512
_MAX_ECC_KEY_BYTES = 128


@dataclass(frozen=True, slots=True)
class Signature:
    """A TPMT_SIGNATURE: algorithm, hash and the signature value(s), plus ``raw``.

    ``hash_alg`` is NULL for a NULL signature. ``hmac`` holds an HMAC
    signature's digest; we parse it but cannot verify it.
    """

    sig_alg: TpmAlg
    hash_alg: TpmAlg
    rsa_signature: bytes | None
    ecdsa_r: int | None
    ecdsa_s: int | None
    raw: bytes
    hmac: bytes | None = None

    @classmethod
    def parse(cls, data: bytes) -> Signature:
        """A TPMT_SIGNATURE (``tpm2_quote -s``, ``tpm2_sign -o``) filling ``data`` exactly."""
        r = Reader(data, "TPMT_SIGNATURE")
        sig_alg = r.enum(TpmAlg, "sigAlg")
        if sig_alg == TpmAlg.NULL:
            r.end()
            return cls(sig_alg, TpmAlg.NULL, None, None, None, bytes(data))
        at = r.pos
        h = r.enum(TpmAlg, "signature.hash")
        if h not in HASH_ALGS:
            raise r.fail("signature.hash", f"{h.name} is not a hash algorithm", at)
        rsa_sig = hmac = None
        sig_r = sig_s = None
        if sig_alg in _RSA_SIGS:
            rsa_sig = r.tpm2b("signature.rsa.sig", _MAX_RSA_KEY_BYTES)
        elif sig_alg in _ECC_SIGS:
            sig_r = int.from_bytes(r.tpm2b("signature.ecc.signatureR", _MAX_ECC_KEY_BYTES), "big")
            sig_s = int.from_bytes(r.tpm2b("signature.ecc.signatureS", _MAX_ECC_KEY_BYTES), "big")
        elif sig_alg == TpmAlg.HMAC:
            hmac = r.take(HASH_ALGS[h][1], "signature.hmac.digest")
        else:
            raise r.fail("sigAlg", f"{sig_alg.name} is not a signature scheme", 0)
        r.end()
        _marshal.check("TPMT_SIGNATURE", bytes(data))
        return cls(sig_alg, h, rsa_sig, sig_r, sig_s, bytes(data), hmac)

    def to_bytes(self) -> bytes:
        return self.raw

    @property
    def hash_name(self) -> str:
        return hash_name(self.hash_alg)

    @property
    def scheme(self) -> str:
        """ "rsassa", "rsapss", "ecdsa", ... (tpm2-tools spelling)."""
        return self.sig_alg.name.lower()

    def to_der(self) -> bytes:
        """The ECDSA signature as a DER Ecdsa-Sig-Value (ValueError for other schemes)."""
        if self.ecdsa_r is None or self.ecdsa_s is None:
            raise ValueError(f"a {self.scheme} signature has no ECDSA (r, s)")
        return encode_dss_signature(self.ecdsa_r, self.ecdsa_s)

    def verify(
        self,
        public: Public | rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        message: bytes,
        check: str = "signature",
    ) -> None:
        """Raise VerificationError(``check``) unless this signs exactly ``message`` with ``public``.

        Checks: the scheme is RSASSA, RSAPSS or ECDSA and fits the key type;
        the hash is SHA-1/256/384/512; the signature verifies over ``message``.
        Not checked: whether the key's own attributes or scheme allow this
        signature (restricted, sign): the caller checks the key.
        """
        try:
            key = public.public_key() if isinstance(public, Public) else public
        except ParseError as exc:
            raise VerificationError(check, f"unusable public key: {exc}") from None
        hash_class = _VERIFY_HASHES.get(self.hash_alg)
        if hash_class is not None:
            algorithm: hashes.HashAlgorithm = hash_class()
        else:  # says which of the two ways the hash is unsupported
            try:
                cryptography_hash(self.hash_alg)
            except ValueError as exc:
                raise VerificationError(check, f"unsupported hash: {exc}") from None
            raise VerificationError(check, f"unsupported hash {self.hash_alg.name}")
        try:
            if self.sig_alg == TpmAlg.ECDSA:
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise VerificationError(check, "ECDSA signature but the key is not ECC")
                key.verify(self.to_der(), message, ec.ECDSA(algorithm))
            elif self.sig_alg in _RSA_SIGS:
                if not isinstance(key, rsa.RSAPublicKey):
                    raise VerificationError(
                        check, f"{self.scheme} signature but the key is not RSA"
                    )
                assert self.rsa_signature is not None
                if len(self.rsa_signature) != (key.key_size + 7) // 8:
                    raise VerificationError(
                        check,
                        f"RSA signature is {len(self.rsa_signature)} bytes, "
                        f"the key needs {(key.key_size + 7) // 8}",
                    )
                pad: padding.AsymmetricPadding = (
                    padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO)
                    if self.sig_alg == TpmAlg.RSAPSS
                    else padding.PKCS1v15()
                )
                key.verify(self.rsa_signature, message, pad, algorithm)
            else:
                raise VerificationError(check, f"cannot verify a {self.scheme} signature")
        except InvalidSignature:
            raise VerificationError(
                check, f"{self.scheme}/{self.hash_name} signature does not verify with the key"
            ) from None
        except ValueError as exc:  # e.g. r or s out of range
            raise VerificationError(check, f"malformed signature: {exc}") from None
