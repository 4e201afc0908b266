"""Bounds-checked big-endian reader for TPM wire structures (TPM 2.0 Part 1, 18).

Every read names the field it is reading so a short or malformed input
becomes a ParseError naming the structure, field and byte offset.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import TypeVar

from vtpm_core.errors import ParseError

E = TypeVar("E")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Reads ``data`` front to back; never reads past its end."""

    __slots__ = ("base", "data", "pos", "structure")

    def __init__(self, data: bytes, structure: str, base: int = 0) -> None:
        self.data = bytes(data)
        self.structure = structure
        self.pos = 0
        self.base = base  # offset of data[0] in the caller's buffer, for messages

    def fail(self, field: str, message: str, at: int | None = None) -> ParseError:
        return ParseError(
            self.structure, field, self.base + (self.pos if at is None else at), message
        )

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(field, f"truncated: need {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    # u8/u16/u32/u64/tpm2b/enum are on every parse's path: they read in place (no
    # slice) and build the field names of their messages only when they fail.
    def u8(self, field: str) -> int:
        pos = self.pos
        if pos + 1 > len(self.data):
            raise self.fail(field, f"truncated: need 1 bytes, {len(self.data) - pos} left")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self, field: str) -> int:
        return self._unsigned(_U16, field)

    def u32(self, field: str) -> int:
        return self._unsigned(_U32, field)

    def u64(self, field: str) -> int:
        return self._unsigned(_U64, field)

    def _unsigned(self, fmt: struct.Struct, field: str) -> int:
        """A big-endian unsigned integer of ``fmt.size`` bytes, read in place."""
        pos, size = self.pos, fmt.size
        if pos + size > len(self.data):
            raise self.fail(field, f"truncated: need {size} bytes, {len(self.data) - pos} left")
        self.pos = pos + size
        value: int = fmt.unpack_from(self.data, pos)[0]
        return value

    def tpm2b(self, field: str, max_size: int | None = None) -> bytes:
        start = self.pos
        if start + 2 > len(self.data):
            raise self.fail(
                f"{field}.size", f"truncated: need 2 bytes, {len(self.data) - start} left"
            )
        size: int = _U16.unpack_from(self.data, start)[0]
        if max_size is not None and size > max_size:
            raise self.fail(f"{field}.size", f"{size} bytes, at most {max_size}", start)
        self.pos = start + 2
        if start + 2 + size > len(self.data):
            raise self.fail(
                f"{field}.buffer",
                f"truncated: need {size} bytes, {len(self.data) - start - 2} left",
            )
        self.pos = start + 2 + size
        return self.data[start + 2 : start + 2 + size]

    def enum(self, convert: Callable[[int], E], field: str, width: int = 2) -> E:
        start = self.pos
        value = self.u16(field) if width == 2 else self.u32(field)
        if isinstance(convert, enum.EnumMeta):  # a dict lookup, not the Enum call protocol
            member = convert._value2member_map_.get(value)
            if member is not None:
                return member  # type: ignore[return-value]
        try:
            return convert(value)
        except ValueError:
            raise self.fail(field, f"unknown value 0x{value:0{2 * width}x}", start) from None

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("end", f"{len(self.data) - self.pos} trailing bytes")
