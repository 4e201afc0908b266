"""Replay IMA entries into PCR 10, per bank, the way the kernel extends each bank.

Linux security/integrity/ima/ima_queue.c (``ima_add_template_entry``,
``ima_pcr_extend``) and ima_crypto.c (``ima_calc_field_array_hash``):

- kernels since 5.8 (:attr:`ExtendMode.PER_BANK`) extend each bank with the
  template digest in that bank's algorithm; a violation with all ones of the
  bank's size;
- older kernels (:attr:`ExtendMode.SHA1_PADDED`) extend every bank with the
  SHA-1 template digest zero-padded to the bank's size; a violation with 20
  bytes of ones, zero-padded.

This proves nothing on its own: the caller compares the result with a
quoted PCR 10 (``verifier.ima.appraise.advance`` does that step by step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from verifier.ima.appraise import BANK_SIZES
from verifier.ima.entries import Extender, ExtendMode, ImaEntry, hash_name
from vtpm_core.errors import VerificationError

__all__ = ["BANK_SIZES", "ExtendMode", "Extender", "extend_value", "extend_values", "replay"]


def _size(bank: str) -> int:
    size = BANK_SIZES.get(bank)
    if size is None:
        raise VerificationError("ima.banks", f"unknown PCR bank {bank!r}")
    return size


def extend_value(entry: ImaEntry, bank: str, mode: ExtendMode = ExtendMode.PER_BANK) -> bytes:
    """What the kernel extended PCR 10's ``bank`` with for ``entry``."""
    size = _size(bank)
    if mode is ExtendMode.SHA1_PADDED:
        value = b"\xff" * 20 if entry.is_violation else entry.template_digest("sha1")
        return value + bytes(size - 20)
    if entry.is_violation:
        return b"\xff" * size
    try:
        return entry.template_digest(bank)
    except ValueError:
        raise VerificationError("ima.banks", f"cannot compute the {bank} bank here") from None


def extend_values(
    mode: ExtendMode = ExtendMode.PER_BANK, banks: Iterable[str] = tuple(BANK_SIZES)
) -> Extender:
    """``entry -> {bank: value}`` for ``verifier.ima.appraise.advance``."""
    chosen = tuple(banks)
    if mode is ExtendMode.PER_BANK:
        try:
            makers = tuple((b, _constructor(b)) for b in chosen)
        except (ValueError, VerificationError):
            makers = None  # extend_value names the bank on first use
        if makers is not None:
            ones = MappingProxyType({b: b"\xff" * _size(b) for b in chosen})

            def per_bank(entry: ImaEntry) -> Mapping[str, bytes]:
                # the hot path of incremental appraisal: one hash object per bank, no lookups
                if entry.is_violation:
                    return ones
                data = entry.template_data
                return {b: make(data).digest() for b, make in makers}

            return Extender(mode, chosen, per_bank)
    return Extender(mode, chosen, lambda entry: {b: extend_value(entry, b, mode) for b in chosen})


def _constructor(bank: str) -> Callable[[bytes], Any]:
    _size(bank)
    name = hash_name(bank)
    constructor = getattr(hashlib, name, None)
    if constructor is not None:
        return constructor  # type: ignore[no-any-return]
    hashlib.new(name)  # ValueError where this hashlib lacks it
    return lambda data: hashlib.new(name, data)


def replay(
    entries: Iterable[ImaEntry],
    banks: Iterable[str],
    *,
    start: Mapping[str, bytes] | None = None,
    mode: ExtendMode = ExtendMode.PER_BANK,
) -> dict[str, bytes]:
    """PCR 10 per bank after ``entries``, from ``start`` (all zeros after a reset)."""
    chosen = tuple(banks)
    pcr = {b: bytes(_size(b)) for b in chosen}
    if start is not None:
        for b in chosen:
            if len(start.get(b, b"")) != _size(b):
                raise VerificationError("ima.replay", f"no {_size(b)}-byte start value for {b}")
            pcr[b] = bytes(start[b])
    for entry in entries:
        for b in chosen:
            pcr[b] = hashlib.new(hash_name(b), pcr[b] + extend_value(entry, b, mode)).digest()
    return pcr
