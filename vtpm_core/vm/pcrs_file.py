"""The PCR values file that ``tpm2_quote -o`` writes (tpm2-tools 5.x, ``-F serialized``).

tpm2-tools' default "serialized" format is a little-endian memory dump of
the tpm2-tss C structures (TPM 2.0 Part 2, 10.6.2 TPML_PCR_SELECTION and
10.9.7 TPML_DIGEST, in their C layout, *not* their TPM wire encoding):

    TPML_PCR_SELECTION   u32 count; 16 x { u16 hash; u8 sizeofSelect; u8 pcrSelect[4]; u8 pad }
    u32                  number of TPML_DIGEST blocks that follow
    TPML_DIGEST[n]       u32 count; 8 x { u16 size; u8 buffer[64] }

The values follow the selection order: bank by bank, PCR indices ascending,
eight per TPML_DIGEST block. This is what the guest returns as
``GuestQuote.pcrs_tpm2_tools`` and what ``tpm2_checkquote -f`` reads.

Guarantees: the whole file is accounted for; every selected PCR has exactly
one value of its bank's digest size; unknown banks, bad counts and trailing
bytes raise ParseError. Not checked: that the values match a quote's
pcrDigest (the verifier does that).
"""

from __future__ import annotations

import struct

from vtpm_core.errors import ParseError

__all__ = ["BANK_DIGEST_SIZES", "parse_pcrs_file"]

_STRUCT = "tpm2_tools.pcrs"
_ALG_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
BANK_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_SELECTION_SIZE = 4 + 16 * 8
_DIGEST_LIST_SIZE = 4 + 8 * 66
_MAX_BLOCKS = 3 * 16  # 24 PCRs x 16 banks / 8 per block, generously


def parse_pcrs_file(data: bytes) -> dict[str, dict[int, bytes]]:
    """``{bank: {pcr: value}}`` from a tpm2-tools serialized PCR file."""
    if len(data) < _SELECTION_SIZE + 4:
        raise ParseError(_STRUCT, "TPML_PCR_SELECTION", 0, f"file too short ({len(data)} bytes)")
    (count,) = struct.unpack_from("<I", data, 0)
    if count > 16:
        raise ParseError(_STRUCT, "TPML_PCR_SELECTION.count", 0, f"{count} banks (max 16)")
    wanted: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i in range(count):
        off = 4 + 8 * i
        alg, size = struct.unpack_from("<HB", data, off)
        bank = _ALG_NAMES.get(alg)
        if bank is None:
            raise ParseError(_STRUCT, f"pcrSelections[{i}].hash", off, f"unknown bank {alg:#06x}")
        if bank in seen:
            raise ParseError(_STRUCT, f"pcrSelections[{i}].hash", off, f"bank {bank} twice")
        seen.add(bank)
        if size > 4:
            raise ParseError(
                _STRUCT, f"pcrSelections[{i}].sizeofSelect", off + 2, f"{size} > 4 bytes"
            )
        bits = int.from_bytes(data[off + 3 : off + 3 + size], "little")
        wanted += [(bank, pcr) for pcr in range(8 * size) if bits >> pcr & 1]
    off = _SELECTION_SIZE
    (blocks,) = struct.unpack_from("<I", data, off)
    if blocks > _MAX_BLOCKS or len(data) != off + 4 + blocks * _DIGEST_LIST_SIZE:
        raise ParseError(
            _STRUCT,
            "pcr_values",
            off,
            f"{blocks} TPML_DIGEST blocks do not match the file size ({len(data)} bytes)",
        )
    values: list[tuple[int, bytes]] = []
    for b in range(blocks):
        base = off + 4 + b * _DIGEST_LIST_SIZE
        (n,) = struct.unpack_from("<I", data, base)
        if n > 8:
            raise ParseError(_STRUCT, f"pcr_values[{b}].count", base, f"{n} digests (max 8)")
        for k in range(n):
            d = base + 4 + 66 * k
            (size,) = struct.unpack_from("<H", data, d)
            if size > 64:
                raise ParseError(_STRUCT, f"pcr_values[{b}].digests[{k}].size", d, f"{size} > 64")
            values.append((d, data[d + 2 : d + 2 + size]))
    if len(values) != len(wanted):
        raise ParseError(
            _STRUCT,
            "pcr_values",
            off,
            f"{len(values)} values for {len(wanted)} selected PCRs",
        )
    out: dict[str, dict[int, bytes]] = {bank: {} for bank in seen}
    for (bank, pcr), (where, value) in zip(wanted, values, strict=True):
        if len(value) != BANK_DIGEST_SIZES[bank]:
            raise ParseError(
                _STRUCT,
                f"{bank}:{pcr}",
                where,
                f"{len(value)}-byte value in the {bank} bank (expected {BANK_DIGEST_SIZES[bank]})",
            )
        out[bank][pcr] = value
    return out
