"""Bounds-checked big-endian reader for TPM wire structures (TPM 2.0 Part 1, 18).

Every read names the field it is reading so a short or malformed input
becomes a ParseError naming the structure, field and byte offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from vtpm_core.errors import ParseError

E = TypeVar("E")


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

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, max_size: int | None = None) -> bytes:
        start = self.pos
        size = self.u16(f"{field}.size")
        if max_size is not None and size > max_size:
            raise self.fail(f"{field}.size", f"{size} bytes, at most {max_size}", start)
        return self.take(size, f"{field}.buffer")

    def enum(self, convert: Callable[[int], E], field: str, width: int = 2) -> E:
        start = self.pos
        value = self.u16(field) if width == 2 else self.u32(field)
        try:
            return convert(value)
        except ValueError:
            raise self.fail(field, f"unknown value 0x{value:0{2 * width}x}", start) from None

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("end", f"{len(self.data) - self.pos} trailing bytes")
