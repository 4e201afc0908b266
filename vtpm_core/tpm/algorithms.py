"""TPM algorithm identifiers and hash helpers.

TCG Algorithm Registry (rev 1.32), section 3 (TPM_ALG_ID) and section 4
(TPM_ECC_CURVE); TPM 2.0 Part 2, section 6.3 and 6.4. Only the values this
project meets are listed; unknown values are rejected by the parsers.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "HASH_ALGS",
    "EccCurve",
    "TpmAlg",
    "cryptography_curve",
    "cryptography_hash",
    "digest_size",
    "hash_alg",
    "hash_name",
    "hashlib_new",
]


class TpmAlg(enum.IntEnum):
    """TPM_ALG_ID (TCG Algorithm Registry, section 3)."""

    ERROR = 0x0000
    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class EccCurve(enum.IntEnum):
    """TPM_ECC_CURVE (TCG Algorithm Registry, section 4)."""

    NONE = 0x0000
    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


# hash algorithm -> (hashlib name, digest size)
HASH_ALGS: dict[TpmAlg, tuple[str, int]] = {
    TpmAlg.SHA1: ("sha1", 20),
    TpmAlg.SHA256: ("sha256", 32),
    TpmAlg.SHA384: ("sha384", 48),
    TpmAlg.SHA512: ("sha512", 64),
    TpmAlg.SM3_256: ("sm3_256", 32),
    TpmAlg.SHA3_256: ("sha3_256", 32),
    TpmAlg.SHA3_384: ("sha3_384", 48),
    TpmAlg.SHA3_512: ("sha3_512", 64),
}
_BY_NAME = {name: alg for alg, (name, _) in HASH_ALGS.items()}
_BY_NAME["sm3"] = TpmAlg.SM3_256
_SHA3_SIZES = ("256", "384", "512")

_CRYPTOGRAPHY_HASHES: dict[TpmAlg, type[hashes.HashAlgorithm]] = {
    TpmAlg.SHA1: hashes.SHA1,
    TpmAlg.SHA256: hashes.SHA256,
    TpmAlg.SHA384: hashes.SHA384,
    TpmAlg.SHA512: hashes.SHA512,
    TpmAlg.SHA3_256: hashes.SHA3_256,
    TpmAlg.SHA3_384: hashes.SHA3_384,
    TpmAlg.SHA3_512: hashes.SHA3_512,
}

_CURVES: dict[EccCurve, type[ec.EllipticCurve]] = {
    EccCurve.NIST_P192: ec.SECP192R1,
    EccCurve.NIST_P224: ec.SECP224R1,
    EccCurve.NIST_P256: ec.SECP256R1,
    EccCurve.NIST_P384: ec.SECP384R1,
    EccCurve.NIST_P521: ec.SECP521R1,
}


# the same lookups for an int or TpmAlg, the hot path (a TpmAlg key hashes as its
# int); anything else, and any miss, takes the checked path and its exact error
_HASH_MEMBERS: dict[int, TpmAlg] = {int(alg): alg for alg in HASH_ALGS}
_HASH_NAMES: dict[int, str] = {int(alg): name for alg, (name, _) in HASH_ALGS.items()}
_HASH_SIZES: dict[int, int] = {int(alg): size for alg, (_, size) in HASH_ALGS.items()}


def _hash(alg: int) -> TpmAlg:
    member = _HASH_MEMBERS.get(alg) if type(alg) in (int, TpmAlg) else None
    if member is not None:
        return member
    try:
        tpm_alg = TpmAlg(alg)
    except ValueError:
        raise ValueError(f"unknown hash algorithm 0x{alg:04x}") from None
    if tpm_alg not in HASH_ALGS:
        raise ValueError(f"{tpm_alg.name} (0x{alg:04x}) is not a hash algorithm")
    return tpm_alg


def hash_name(alg: int) -> str:
    """hashlib-style name of a TPM hash algorithm ("sha1", "sha256", ...); ValueError if unknown."""
    name = _HASH_NAMES.get(alg) if type(alg) in (int, TpmAlg) else None
    return name if name is not None else HASH_ALGS[_hash(alg)][0]


def hash_alg(name: str) -> TpmAlg:
    """TPM_ALG_ID of a hash name ("sha256", "SHA-256", "sha3_256"); ValueError if unknown."""
    if type(name) is str:  # a canonical name is its own normal form
        alg = _BY_NAME.get(name)
        if alg is not None:
            return alg
    key = name.strip().lower().replace("-", "")
    if key not in _BY_NAME and key.startswith("sha3") and key[4:].lstrip("_") in _SHA3_SIZES:
        key = "sha3_" + key[4:].lstrip("_")  # "SHA3-256" -> "sha3_256"
    alg = _BY_NAME.get(key)
    if alg is None:
        raise ValueError(f"unknown hash algorithm {name!r}")
    return alg


def digest_size(alg: int) -> int:
    """Digest size in bytes of a TPM hash algorithm; ValueError if unknown."""
    size = _HASH_SIZES.get(alg) if type(alg) in (int, TpmAlg) else None
    return size if size is not None else HASH_ALGS[_hash(alg)][1]


def hashlib_new(alg: int, data: bytes = b"") -> hashlib._Hash:
    """A hashlib object for a TPM hash algorithm; ValueError if hashlib lacks it (e.g. SM3)."""
    constructor = _HASHLIB_CONSTRUCTORS.get(alg)
    if constructor is not None:  # hashlib.sha256(data) is hashlib.new("sha256", data)
        return constructor(data)
    name = hash_name(alg)
    try:
        return hashlib.new(name, data)
    except ValueError:
        raise ValueError(f"hash algorithm {name} is not available in hashlib") from None


# hashlib's named constructors, by TPM_ALG_ID (an int looks up an IntEnum key); the
# enum conversion and hashlib.new's name lookup cost more than hashing a TPM Name
_HASHLIB_CONSTRUCTORS: dict[int, Callable[[bytes], hashlib._Hash]] = {
    alg: getattr(hashlib, name)
    for alg, (name, _) in HASH_ALGS.items()
    if callable(getattr(hashlib, name, None))
}


def cryptography_hash(alg: int) -> hashes.HashAlgorithm:
    """A ``cryptography`` hash instance for a TPM hash algorithm; ValueError if unsupported."""
    cls = _CRYPTOGRAPHY_HASHES.get(_hash(alg))
    if cls is None:
        raise ValueError(f"hash algorithm {hash_name(alg)} is not supported by cryptography")
    return cls()


def cryptography_curve(curve: int) -> ec.EllipticCurve:
    """A ``cryptography`` curve for a TPM_ECC_CURVE; ValueError if unsupported."""
    try:
        cls = _CURVES[EccCurve(curve)]
    except (ValueError, KeyError):
        raise ValueError(f"unsupported ECC curve 0x{curve:04x}") from None
    return cls()
