"""Hash algorithms of PCR banks: TPM_ALG_ID values (TPM 2.0 Part 2 §6.3, TCG
Algorithm Registry) and how to compute them.

Bank names are the lower-case registry names ("sha1", "sha256", "sm3_256",
...). An algorithm the registry lists but this Python cannot compute is still
parsed (its digest size comes from the Spec ID event) and carried, but it
cannot be replayed; one we do not know at all is named ``alg_0x....``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ALGORITHMS", "HashAlgorithm", "algorithm_by_id", "algorithm_by_name"]


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
        if self.hashlib_name is None:
            return False
        try:
            hashlib.new(self.hashlib_name)
        except ValueError:
            return False
        return True

    def hash(self, data: bytes) -> bytes:
        if self.hashlib_name is None:
            raise ValueError(f"{self.name} cannot be computed")
        return hashlib.new(self.hashlib_name, data).digest()

    def extend(self, pcr: bytes, digest: bytes) -> bytes:
        """PCR_new = H(PCR_old || digest) (TPM 2.0 Part 1 §17.3)."""
        return self.hash(pcr + digest)


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
