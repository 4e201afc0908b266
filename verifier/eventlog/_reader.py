"""A bounds-checked little-endian reader that turns every short read into a ParseError.

All TCG PC Client log structures (PFP §10.2) and the UEFI structures inside
their event data are little-endian. Offsets reported in errors are absolute
byte offsets within the buffer the caller started from (``base`` lets a
decoder of an event's data report offsets within the whole log).
"""

from __future__ import annotations

from vtpm_core.errors import ParseError


class Reader:
    """Sequential reader over ``data``; never raises anything but ParseError."""

    __slots__ = ("_base", "_data", "_pos", "structure")

    def __init__(self, data: bytes, structure: str, *, base: int = 0, start: int = 0) -> None:
        self._data = data
        self._pos = start
        self._base = base
        self.structure = structure

    @property
    def pos(self) -> int:
        """Position relative to the start of this reader's buffer."""
        return self._pos

    @property
    def offset(self) -> int:
        """Absolute offset (base + position), as reported in errors."""
        return self._base + self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def error(self, field: str, message: str, *, at: int | None = None) -> ParseError:
        return ParseError(self.structure, field, self.offset if at is None else at, message)

    def take(self, n: int, field: str) -> bytes:
        pos = self._pos
        end = pos + n
        if n < 0 or end > len(self._data):
            self._short(n, field)
        self._pos = end
        return self._data[pos:end]

    def _short(self, n: int, field: str) -> None:
        if n < 0:
            raise self.error(field, f"negative length {n}")
        raise self.error(field, f"truncated: need {n} bytes, only {self.remaining} left")

    def _int(self, n: int, field: str) -> int:
        pos = self._pos
        end = pos + n
        if end > len(self._data):
            self._short(n, field)
        self._pos = end
        return int.from_bytes(self._data[pos:end], "little")

    def u8(self, field: str) -> int:
        pos = self._pos
        if pos >= len(self._data):
            self._short(1, field)
        self._pos = pos + 1
        return self._data[pos]

    def u16(self, field: str) -> int:
        return self._int(2, field)

    def u32(self, field: str) -> int:
        return self._int(4, field)

    def u64(self, field: str) -> int:
        return self._int(8, field)

    def char16z(self, field: str) -> bytes:
        """CHAR16s up to a NUL CHAR16 (consumed, not returned): what reading 2 bytes at
        a time until b"\\x00\\x00" reads, with the same error when there is none."""
        data, start = self._data, self._pos
        at = data.find(b"\x00\x00", start)
        while at >= 0 and (at - start) % 2:
            at = data.find(b"\x00\x00", at + 1)
        if at < 0:
            self._pos = start + (len(data) - start) // 2 * 2  # every whole CHAR16 read
            self._short(2, field)
        self._pos = at + 2
        return data[start:at]

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def expect_end(self, field: str) -> None:
        if self.remaining:
            raise self.error(field, f"{self.remaining} unexpected trailing bytes")
