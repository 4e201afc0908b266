"""The ``boot_aggregate`` values a kernel computes from PCRs 0-9 (Linux ima_crypto.c).

``ima_calc_boot_aggregate_tfm``: the bank's hash over PCRs 0-7, and, for
every bank but SHA-1 (kernels since 5.8), also PCRs 8-9. The entry's d-ng
field names the bank's algorithm. Give this the *quoted* PCR values, so the
boot_aggregate entry is checked against what the TPM signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from verifier.ima.entries import hash_name
from verifier.ima.policy import Digest, canonical_algorithm

__all__ = ["boot_aggregates"]


def boot_aggregates(quoted: Mapping[str, Mapping[int, bytes]]) -> tuple[Digest, ...]:
    """The (algorithm, digest) a kernel may have recorded, per quoted bank with PCRs 0-7
    (0-9 for non-SHA-1 banks); banks without them are left out."""
    out: list[Digest] = []
    for bank, pcrs in sorted(quoted.items()):
        last = 8 if bank == "sha1" else 10
        if not all(i in pcrs for i in range(last)):
            continue
        try:
            h = hashlib.new(hash_name(bank))
        except ValueError:
            continue
        for i in range(last):
            h.update(pcrs[i])
        out.append((canonical_algorithm(hash_name(bank)), h.digest()))
    return tuple(out)
