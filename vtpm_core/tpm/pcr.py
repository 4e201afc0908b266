"""TPML_PCR_SELECTION and PCR values (tpm2-tools files, JSON).

TPM 2.0 Library Part 2 (rev 1.59): 10.6.1 TPMS_PCR_SELECT, 10.6.2
TPMS_PCR_SELECTION, 10.9.7 TPML_PCR_SELECTION; Part 3, 18.4 TPM2_Quote
(pcrDigest = H(selected PCR values in selection order)).

tpm2-tools 5.x ``tpm2_quote -o FILE`` writes its "serialized" PCR file: a
little-endian dump of the tpm2-tss C structures, not the TPM wire encoding
(tpm2-tools lib/pcr.c ``pcr_fwrite_serialized``)::

    TPML_PCR_SELECTION  u32 count; 16 x { u16 hash; u8 sizeofSelect; u8 pcrSelect[4]; u8 pad }
    u32                 n, the number of TPML_DIGEST blocks that follow
    TPML_DIGEST[n]      u32 count; 8 x { u16 size; u8 buffer[64] }

With ``-F values`` it writes only the concatenated values, which need the
quote's selection to be read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import _marshal
from vtpm_core.tpm._reader import Reader
from vtpm_core.tpm.algorithms import (
    HASH_ALGS,
    TpmAlg,
    digest_size,
    hash_alg,
    hash_name,
    hashlib_new,
)

__all__ = ["MAX_PCR", "PcrSelection", "PcrValues"]

MAX_PCR = 32  # PCR_SELECT_MAX (4 bytes) x 8
_MAX_BANKS = 16  # TPM2_NUM_PCR_BANKS in tpm2-tss
_PCR_SELECT_MAX = 4
_TOOLS = "tpm2_tools.pcrs"
_TOOLS_SELECTION_SIZE = 4 + _MAX_BANKS * 8
_TOOLS_DIGEST_LIST_SIZE = 4 + 8 * (2 + 64)
_HASH_AND_SIZE = struct.Struct(">HB")  # TPMS_PCR_SELECTION: hash, sizeofSelect
_HASH_BANKS = {int(alg): alg for alg in HASH_ALGS}


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """Selected PCRs per bank, banks in the order given, indices ascending.

    ``sizes`` keeps each bank's sizeofSelect as parsed so ``to_bytes`` re-encodes
    exactly; it takes no part in equality.
    """

    banks: tuple[tuple[TpmAlg, tuple[int, ...]], ...]
    sizes: tuple[int, ...] | None = field(default=None, compare=False)

    # -- parsing ---------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> PcrSelection:
        """A TPML_PCR_SELECTION that fills ``data`` exactly."""
        r = Reader(data, "TPML_PCR_SELECTION")
        selection = cls.read(r, "")
        r.end()
        _marshal.check("TPML_PCR_SELECTION", bytes(data))
        return selection

    @classmethod
    def read(cls, r: Reader, prefix: str) -> PcrSelection:
        """Read a TPML_PCR_SELECTION at ``r``'s position (fields named ``prefix`` + ...)."""
        start = r.pos
        count = r.u32(f"{prefix}count")
        if count > _MAX_BANKS:
            raise r.fail(f"{prefix}count", f"{count} banks, at most {_MAX_BANKS}", start)
        banks: list[tuple[TpmAlg, tuple[int, ...]]] = []
        sizes: list[int] = []
        data = r.data
        for i in range(count):
            # fast path: a hash bank not seen yet, sizeofSelect <= 4, its bitmap all
            # there; anything else is read again below, field by field, to say why
            at = r.pos
            if at + 3 <= len(data):
                alg_value, size = _HASH_AND_SIZE.unpack_from(data, at)
                fast = _HASH_BANKS.get(alg_value)
                if (
                    fast is not None
                    and size <= _PCR_SELECT_MAX
                    and at + 3 + size <= len(data)
                    and all(b != fast for b, _ in banks)
                ):
                    r.pos = at + 3 + size
                    banks.append((fast, _indices(data[at + 3 : at + 3 + size])))
                    sizes.append(size)
                    continue
            f = f"{prefix}pcrSelections[{i}]"
            at = r.pos
            alg = r.enum(TpmAlg, f"{f}.hash")
            if alg not in HASH_ALGS:
                raise r.fail(f"{f}.hash", f"{alg.name} is not a hash algorithm", at)
            if any(b == alg for b, _ in banks):
                raise r.fail(f"{f}.hash", f"bank {hash_name(alg)} selected twice", at)
            size = r.u8(f"{f}.sizeofSelect")
            if size > _PCR_SELECT_MAX:
                raise r.fail(
                    f"{f}.sizeofSelect", f"{size} bytes, at most {_PCR_SELECT_MAX}", r.pos - 1
                )
            bitmap = r.take(size, f"{f}.pcrSelect")
            banks.append((alg, _indices(bitmap)))
            sizes.append(size)
        return cls(tuple(banks), tuple(sizes))

    @classmethod
    def from_string(cls, text: str) -> PcrSelection:
        """tpm2-tools syntax: ``sha256:0,1,2+sha1:7`` (ValueError if malformed)."""
        banks: list[tuple[TpmAlg, tuple[int, ...]]] = []
        for part in text.split("+"):
            name, sep, indices = part.partition(":")
            if not sep:
                raise ValueError(f"expected bank:indices, got {part!r}")
            pcrs = sorted({int(i) for i in indices.split(",") if i.strip()})
            if any(not 0 <= p < MAX_PCR for p in pcrs):
                raise ValueError(f"PCR index out of range in {part!r}")
            banks.append((hash_alg(name), tuple(pcrs)))
        return cls(tuple(banks))

    @classmethod
    def from_mapping(cls, selected: Mapping[str | TpmAlg, Iterable[int]]) -> PcrSelection:
        return cls(
            tuple(
                (b if isinstance(b, TpmAlg) else hash_alg(b), tuple(sorted(set(p))))
                for b, p in selected.items()
            )
        )

    # -- encoding and views --------------------------------------------------

    def to_bytes(self) -> bytes:
        """TPML_PCR_SELECTION wire bytes (sizeofSelect as parsed, else at least 3)."""
        out = len(self.banks).to_bytes(4, "big")
        for i, (alg, pcrs) in enumerate(self.banks):
            need = (max(pcrs) // 8 + 1) if pcrs else 0
            size = self.sizes[i] if self.sizes is not None else max(3, need)
            bitmap = bytearray(size)
            for p in pcrs:
                bitmap[p // 8] |= 1 << (p % 8)
            out += alg.to_bytes(2, "big") + bytes([size]) + bytes(bitmap)
        return out

    def as_sets(self) -> dict[str, frozenset[int]]:
        """Bank name -> PCR set, empty banks left out (what two selections must share)."""
        return {hash_name(alg): frozenset(pcrs) for alg, pcrs in self.banks if pcrs}

    @property
    def count(self) -> int:
        return sum(len(pcrs) for _, pcrs in self.banks)

    def __str__(self) -> str:
        text = "+".join(
            f"{hash_name(alg)}:{','.join(map(str, pcrs))}" for alg, pcrs in self.banks if pcrs
        )
        return text or "(none)"


# TPMS_PCR_SELECT: bit j of byte i selects PCR 8i+j. _BITS[i][byte] is that byte's
# PCRs, ascending, for the first _PCR_SELECT_MAX bytes
_BITS = tuple(
    tuple(tuple(8 * i + j for j in range(8) if byte >> j & 1) for byte in range(256))
    for i in range(_PCR_SELECT_MAX)
)


def _indices(bitmap: bytes) -> tuple[int, ...]:
    if len(bitmap) > _PCR_SELECT_MAX:
        return tuple(8 * i + j for i, byte in enumerate(bitmap) for j in range(8) if byte >> j & 1)
    out: tuple[int, ...] = ()
    for i, byte in enumerate(bitmap):
        if byte:
            out += _BITS[i][byte]
    return out


@dataclass(frozen=True, slots=True)
class PcrValues:
    """PCR values per bank: ``values[bank name][index] -> digest`` (read-only).

    Guarantees: known banks only, indices 0..31, each value its bank's digest size.
    Not checked: that the values belong to any quote (``digest`` lets the caller check).
    """

    values: Mapping[str, Mapping[int, bytes]]

    def __post_init__(self) -> None:
        frozen = {}
        for bank, pcrs in self.values.items():
            frozen[bank] = MappingProxyType(dict(sorted(pcrs.items())))
        object.__setattr__(self, "values", MappingProxyType(frozen))

    @classmethod
    def checked(cls, values: Mapping[str, Mapping[int, bytes]], structure: str) -> PcrValues:
        for bank, pcrs in values.items():
            try:
                size = digest_size(hash_alg(bank))
            except ValueError:
                raise ParseError(structure, bank, 0, f"unknown PCR bank {bank!r}") from None
            for pcr, value in pcrs.items():
                if not 0 <= pcr < MAX_PCR:
                    raise ParseError(structure, f"{bank}:{pcr}", 0, "PCR index out of range")
                if len(value) != size:
                    raise ParseError(
                        structure, f"{bank}:{pcr}", 0, f"{len(value)} bytes, expected {size}"
                    )
        return cls({hash_name(hash_alg(b)): dict(p) for b, p in values.items()})

    # -- views -------------------------------------------------------------

    @property
    def selection(self) -> PcrSelection:
        """The PCRs held, banks in TPM_ALG_ID order."""
        banks = sorted(self.values, key=hash_alg)
        return PcrSelection(tuple((hash_alg(b), tuple(self.values[b])) for b in banks))

    def as_sets(self) -> dict[str, frozenset[int]]:
        """``self.selection.as_sets()``, without building the selection."""
        return {hash_name(hash_alg(b)): frozenset(p) for b, p in self.values.items() if p}

    def as_mapping(self) -> dict[str, dict[int, bytes]]:
        return {bank: dict(pcrs) for bank, pcrs in self.values.items()}

    def value(self, bank: str | TpmAlg, index: int) -> bytes:
        name = hash_name(bank) if isinstance(bank, int) else bank
        try:
            return self.values[name][index]
        except KeyError:
            raise VerificationError("pcr.values", f"no value for {name}:{index}") from None

    def select(self, selection: PcrSelection) -> PcrValues:
        """Only the PCRs in ``selection``; VerificationError if one is missing."""
        out: dict[str, dict[int, bytes]] = {}
        for alg, pcrs in selection.banks:
            for p in pcrs:
                out.setdefault(hash_name(alg), {})[p] = self.value(alg, p)
        return PcrValues(out)

    def digest(self, selection: PcrSelection, hash_alg_: TpmAlg | str) -> bytes:
        """H(values in selection order), as TPM2_Quote computes pcrDigest (Part 3, 18.4).

        VerificationError("pcr.values") if a selected PCR has no value, as ``value``.
        """
        alg = hash_alg(hash_alg_) if isinstance(hash_alg_, str) else hash_alg_
        h = hashlib_new(alg)
        empty: Mapping[int, bytes] = {}
        for bank, pcrs in selection.banks:
            if not pcrs:
                continue
            name = hash_name(bank)
            values = self.values.get(name, empty)
            for p in pcrs:
                try:
                    value = values[p]
                except KeyError:
                    raise VerificationError("pcr.values", f"no value for {name}:{p}") from None
                h.update(value)
        return h.digest()

    def to_json(self) -> dict[str, dict[str, str]]:
        """``{"sha256": {"0": "hex", ...}, ...}`` (what ``from_json`` reads)."""
        return {b: {str(i): v.hex() for i, v in pcrs.items()} for b, pcrs in self.values.items()}

    # -- parsing -------------------------------------------------------------

    @classmethod
    def from_json(cls, obj: Any) -> PcrValues:
        """``{"sha256": {"0": "hex", ...}}`` as a parsed JSON object."""
        s = "PcrValues.json"
        if not isinstance(obj, dict):
            raise ParseError(s, "document", 0, "expected an object {bank: {pcr: hex}}")
        out: dict[str, dict[int, bytes]] = {}
        for bank, pcrs in obj.items():
            if not isinstance(pcrs, dict):
                raise ParseError(s, str(bank), 0, "expected an object {pcr: hex}")
            out[str(bank)] = {}
            for index, value in pcrs.items():
                if not re.fullmatch(r"[0-9]{1,2}", str(index)) or not isinstance(value, str):
                    raise ParseError(s, f"{bank}.{index}", 0, 'expected "index": "hex"')
                try:
                    out[str(bank)][int(index)] = bytes.fromhex(value.removeprefix("0x"))
                except ValueError:
                    raise ParseError(s, f"{bank}.{index}", 0, "not hex") from None
        return cls.checked(out, s)

    @classmethod
    def from_tpm2_tools(cls, data: bytes, selection: PcrSelection | None = None) -> PcrValues:
        """``tpm2_quote -o``: the serialized file, or with ``selection`` the ``-F values`` form.

        Without ``selection`` the data must be the serialized file. With it, a
        serialized file must carry that very selection; other data is read as
        the values form (concatenated values in ``selection`` order).
        """
        values_size = (
            sum(digest_size(alg) * len(pcrs) for alg, pcrs in selection.banks)
            if selection is not None
            else -1
        )
        if selection is None or (len(data) != values_size and _looks_serialized(data)):
            values, file_selection = _parse_serialized(data)
            if selection is not None and file_selection.as_sets() != selection.as_sets():
                raise ParseError(
                    _TOOLS,
                    "TPML_PCR_SELECTION",
                    0,
                    f"file selects {file_selection}, expected {selection}",
                )
            return values
        return _parse_values_form(data, selection)

    @classmethod
    def load(cls, data: bytes, selection: PcrSelection | None = None) -> PcrValues:
        """JSON, the tpm2-tools serialized file, or (given ``selection``) its values form."""
        if data.lstrip()[:1] == b"{":
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ParseError("PcrValues.json", "document", 0, str(exc)) from None
            return cls.from_json(obj)
        return cls.from_tpm2_tools(data, selection)


def _looks_serialized(data: bytes) -> bool:
    if len(data) < _TOOLS_SELECTION_SIZE + 4:
        return False
    blocks = int.from_bytes(data[_TOOLS_SELECTION_SIZE : _TOOLS_SELECTION_SIZE + 4], "little")
    return len(data) == _TOOLS_SELECTION_SIZE + 4 + blocks * _TOOLS_DIGEST_LIST_SIZE


def _parse_serialized(data: bytes) -> tuple[PcrValues, PcrSelection]:
    def le(at: int, n: int) -> int:
        return int.from_bytes(data[at : at + n], "little")

    if not _looks_serialized(data):
        raise ParseError(
            _TOOLS,
            "size",
            len(data),
            f"{len(data)} bytes is not the size of a tpm2-tools serialized PCR file "
            f"({_TOOLS_SELECTION_SIZE + 4} + {_TOOLS_DIGEST_LIST_SIZE} per 8 values); "
            "the -F values form needs the quote's PCR selection",
        )
    count = le(0, 4)
    if count > _MAX_BANKS:
        raise ParseError(_TOOLS, "TPML_PCR_SELECTION.count", 0, f"{count} banks, at most 16")
    banks: list[tuple[TpmAlg, tuple[int, ...]]] = []
    for i in range(count):
        at = 4 + 8 * i
        f = f"TPML_PCR_SELECTION.pcrSelections[{i}]"
        try:
            alg = TpmAlg(le(at, 2))
            if alg not in HASH_ALGS:
                raise ValueError
        except ValueError:
            raise ParseError(_TOOLS, f"{f}.hash", at, f"unknown bank 0x{le(at, 2):04x}") from None
        if any(b == alg for b, _ in banks):
            raise ParseError(_TOOLS, f"{f}.hash", at, f"bank {hash_name(alg)} twice")
        size = data[at + 2]
        if size > _PCR_SELECT_MAX:
            raise ParseError(_TOOLS, f"{f}.sizeofSelect", at + 2, f"{size} > {_PCR_SELECT_MAX}")
        banks.append((alg, _indices(data[at + 3 : at + 3 + size])))
    selection = PcrSelection(tuple(banks))
    at = _TOOLS_SELECTION_SIZE
    blocks = le(at, 4)
    expected = -(-selection.count // 8)
    if blocks != expected:
        raise ParseError(
            _TOOLS,
            "digests.count",
            at,
            f"{blocks} TPML_DIGEST blocks, the selection needs {expected}",
        )
    if len(data) != at + 4 + blocks * _TOOLS_DIGEST_LIST_SIZE:
        raise ParseError(
            _TOOLS,
            "digests",
            len(data),
            f"{len(data)} bytes, {blocks} blocks make {at + 4 + blocks * _TOOLS_DIGEST_LIST_SIZE}",
        )
    slots = [(alg, p) for alg, pcrs in banks for p in pcrs]
    out: dict[str, dict[int, bytes]] = {}
    for b in range(blocks):
        base = at + 4 + b * _TOOLS_DIGEST_LIST_SIZE
        n = le(base, 4)
        want = min(8, len(slots) - 8 * b)
        if n != want:
            raise ParseError(_TOOLS, f"digests[{b}].count", base, f"{n} digests, expected {want}")
        for j in range(n):
            alg, pcr = slots[8 * b + j]
            d_at = base + 4 + 66 * j
            size = le(d_at, 2)
            if size != digest_size(alg):
                raise ParseError(
                    _TOOLS,
                    f"digests[{b}].digests[{j}].size",
                    d_at,
                    f"{size} bytes for {hash_name(alg)}:{pcr}, expected {digest_size(alg)}",
                )
            out.setdefault(hash_name(alg), {})[pcr] = data[d_at + 2 : d_at + 2 + size]
    return PcrValues(out), selection


def _parse_values_form(data: bytes, selection: PcrSelection) -> PcrValues:
    out: dict[str, dict[int, bytes]] = {}
    at = 0
    for alg, pcrs in selection.banks:
        size = digest_size(alg)
        for p in pcrs:
            if at + size > len(data):
                raise ParseError(
                    f"{_TOOLS}.values",
                    f"{hash_name(alg)}:{p}",
                    at,
                    f"truncated: {len(data)} bytes for {selection}",
                )
            out.setdefault(hash_name(alg), {})[p] = data[at : at + size]
            at += size
    if at != len(data):
        raise ParseError(
            f"{_TOOLS}.values",
            "end",
            at,
            f"{len(data) - at} trailing bytes after the values of {selection}",
        )
    return PcrValues(out)
