"""Hash algorithms of PCR banks: TPM_ALG_ID values (TPM 2.0 Part 2 §6.3, TCG
Algorithm Registry) and how to compute them.

Bank names are the lower-case registry names ("sha1", "sha256", "sm3_256",
...). An algorithm the registry lists but this Python cannot compute is still
parsed (its digest size comes from the Spec ID event) and carried, but it
cannot be replayed; one we do not know at all is named ``alg_0x....``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Protocol, cast

__all__ = ["ALGORITHMS", "Hash", "HashAlgorithm", "algorithm_by_id", "algorithm_by_name"]


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """One TPM_ALG_ID hash: its id, bank name, digest size and hashlib name."""

    alg_id: int
    name: str
    digest_size: int
    hashlib_name: str | None

    @property
    def computable(self) -> bool:
        """True when this Python can compute the hash (so the bank can be replayed)."""
        return self.hashlib_name is not None and _constructor(self.hashlib_name) is not None

    def hash(self, data: bytes) -> bytes:
        if self.hashlib_name is None:
            raise ValueError(f"{self.name} cannot be computed")
        new = _constructor(self.hashlib_name)
        if new is None:
            return hashlib.new(self.hashlib_name, data).digest()  # raises ValueError
        return new(data).digest()

    @property
    def new(self) -> Callable[[bytes], Hash]:
        """hashlib's constructor for this algorithm, for loops that hash many times:
        ``alg.new(data).digest() == alg.hash(data)``. ValueError if not computable."""
        new = None if self.hashlib_name is None else _constructor(self.hashlib_name)
        if new is None:
            raise ValueError(f"{self.name} cannot be computed")
        return new

    @property
    def openssl_name(self) -> str:
        """The name OpenSSL fetches this digest by ("SHA256", "SM3", "SHA3-256"), for the
        C replay (verifier/eventlog/_native.c); ValueError if not computable."""
        if self.hashlib_name is None:
            raise ValueError(f"{self.name} cannot be computed")
        return self.hashlib_name.upper().replace("_", "-")

    def extend(self, pcr: bytes, digest: bytes) -> bytes:
        """PCR_new = H(PCR_old || digest) (TPM 2.0 Part 1 §17.3)."""
        return self.hash(pcr + digest)


class Hash(Protocol):
    """What hashlib's constructors return, as far as PCR arithmetic needs it."""

    def digest(self) -> bytes: ...


@lru_cache(maxsize=64)
def _constructor(hashlib_name: str) -> Callable[[bytes], Hash] | None:
    """hashlib's constructor for ``hashlib_name``, or None when this Python lacks it.

    Memoised: ``hashlib.new(name)`` looks the name up on every call.
    """
    try:
        hashlib.new(hashlib_name)
    except ValueError:
        return None
    named = getattr(hashlib, hashlib_name, None)
    if callable(named):
        return cast("Callable[[bytes], Hash]", named)
    return partial(hashlib.new, hashlib_name)


ALGORITHMS: tuple[HashAlgorithm, ...] = (
    HashAlgorithm(0x0004, "sha1", 20, "sha1"),
    HashAlgorithm(0x000B, "sha256", 32, "sha256"),
    HashAlgorithm(0x000C, "sha384", 48, "sha384"),
    HashAlgorithm(0x000D, "sha512", 64, "sha512"),
    HashAlgorithm(0x0012, "sm3_256", 32, "sm3"),
    HashAlgorithm(0x0027, "sha3_256", 32, "sha3_256"),
    HashAlgorithm(0x0028, "sha3_384", 48, "sha3_384"),
    HashAlgorithm(0x0029, "sha3_512", 64, "sha3_512"),
)

_BY_ID = {a.alg_id: a for a in ALGORITHMS}
_BY_NAME = {a.name: a for a in ALGORITHMS}


def algorithm_by_id(alg_id: int, digest_size: int) -> HashAlgorithm:
    """The algorithm for ``alg_id``; an unknown id gets a non-computable placeholder."""
    known = _BY_ID.get(alg_id)
    if known is not None:
        return known
    return HashAlgorithm(alg_id, f"alg_0x{alg_id:04x}", digest_size, None)


def algorithm_by_name(name: str) -> HashAlgorithm | None:
    return _BY_NAME.get(name)
