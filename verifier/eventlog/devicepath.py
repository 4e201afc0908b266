"""EFI_DEVICE_PATH_PROTOCOL decoding (UEFI Specification 2.10, §10.2 and §10.3).

A device path is a sequence of nodes (Type u8, SubType u8, Length u16
including the 4-byte header) ending with an End node (0x7F/0xFF). We keep
every node's raw bytes and render the common nodes in the UEFI text form
(§10.6.1), e.g. ``PciRoot(0x0)/Pci(0x1,0x0)/HD(1,GPT,...)/\\EFI\\BOOT\\BOOTX64.EFI``;
nodes we do not render show as ``Path(type,subtype,hex)`` per §10.6.1.6.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from verifier.eventlog._reader import Reader
from verifier.eventlog.guids import format_guid
from vtpm_core.errors import ParseError

__all__ = ["DevicePath", "DevicePathNode", "device_path_ok"]

END_TYPE = 0x7F
END_ENTIRE = 0xFF


@dataclass(frozen=True, slots=True, repr=False)
class DevicePathNode:
    """One node: its type, subtype, node data (after the header) and text form.

    ``text`` is rendered when read (it never fails): a verifier that only
    checks digests never formats the paths of the images it appraises.
    """

    type: int
    subtype: int
    data: bytes

    @property
    def text(self) -> str:
        return _text(self.type, self.subtype, self.data)

    def __repr__(self) -> str:
        return (
            f"DevicePathNode(type={self.type!r}, subtype={self.subtype!r}, "
            f"data={self.data!r}, text={self.text!r})"
        )


@dataclass(frozen=True, slots=True)
class DevicePath:
    """A decoded device path (without its End node) and its raw bytes."""

    nodes: tuple[DevicePathNode, ...]
    raw: bytes

    @property
    def text(self) -> str:
        return "/".join(n.text for n in self.nodes)

    @property
    def file_path(self) -> str | None:
        """The last media file-path node (e.g. ``\\EFI\\BOOT\\BOOTX64.EFI``), if any."""
        for node in reversed(self.nodes):
            if node.type == 0x04 and node.subtype == 0x04:
                return node.text
        return None

    @classmethod
    def parse(cls, data: bytes, *, base: int = 0, max_nodes: int = 256) -> DevicePath:
        """Decode ``data``; stops at the first End-Entire node (trailing bytes ignored).

        A missing End node is accepted at the exact end of the data (some
        firmware omits it); a node running past the data is a ParseError.
        """
        nodes: list[DevicePathNode] = []
        pos, end = 0, len(data)
        while pos < end:
            if len(nodes) >= max_nodes:
                raise ParseError(
                    _STRUCTURE, "Type", base + pos, f"more than {max_nodes} device path nodes"
                )
            if pos + 4 > end:
                raise _bad_node(data, pos, base)
            node_type, subtype, length = _HEADER.unpack_from(data, pos)
            if length < 4 or pos + length > end:
                raise _bad_node(data, pos, base)
            body = data[pos + 4 : pos + length]
            pos += length
            if node_type == END_TYPE and subtype == END_ENTIRE:
                break
            nodes.append(DevicePathNode(node_type, subtype, body))
        return cls(tuple(nodes), data)


_STRUCTURE = "EFI_DEVICE_PATH_PROTOCOL"
_HEADER = struct.Struct("<BBH")


def device_path_ok(data: bytes, max_nodes: int = 256) -> bool:
    """True exactly when ``DevicePath.parse(data, max_nodes=max_nodes)`` returns: the
    same walk over the node headers, building nothing (the appraisal path's check)."""
    pos, end, count = 0, len(data), 0
    unpack = _HEADER.unpack_from
    while pos < end:
        if count >= max_nodes or pos + 4 > end:
            return False
        node_type, subtype, length = unpack(data, pos)
        if length < 4 or pos + length > end:
            return False
        pos += length
        if node_type == END_TYPE and subtype == END_ENTIRE:
            break
        count += 1
    return True


def _bad_node(data: bytes, pos: int, base: int) -> ParseError:
    """The error for the node at ``pos``, which is short or too long: read it field by
    field to say which field and where."""
    r = Reader(data, _STRUCTURE, base=base, start=pos)
    try:
        at = r.offset
        r.u8("Type")
        r.u8("SubType")
        length = r.u16("Length")
        if length < 4:
            return r.error("Length", f"node length {length} is below the 4-byte header", at=at)
        r.take(length - 4, "data")
    except ParseError as exc:
        return exc
    raise AssertionError(f"device path node at {pos} is well formed")  # pragma: no cover


def _u(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start : start + size], "little")


def _utf16z(data: bytes) -> str:
    text = data.decode("utf-16-le", errors="replace")
    return text.split("\x00", 1)[0]


def _text(node_type: int, subtype: int, d: bytes) -> str:
    n = len(d)
    if node_type == 0x01:  # hardware
        if subtype == 0x01 and n == 2:
            return f"Pci(0x{d[1]:x},0x{d[0]:x})"
        if subtype == 0x03 and n == 16 + 4:
            return f"MemoryMapped(0x{_u(d, 0, 4):x},0x{_u(d, 4, 8):x},0x{_u(d, 12, 8):x})"
        if subtype == 0x04 and n >= 16:
            return f"VenHw({format_guid(d[:16])}{_hex_tail(d[16:])})"
    elif node_type == 0x02:  # ACPI
        if subtype == 0x01 and n == 8:
            hid, uid = _u(d, 0, 4), _u(d, 4, 4)
            if hid in (0x0A0341D0, 0x0A0841D0):  # PNP0A03 / PNP0A08
                return f"PciRoot(0x{uid:x})"
            return f"Acpi(0x{hid:08x},0x{uid:x})"
    elif node_type == 0x03:  # messaging
        if subtype == 0x02 and n == 4:
            return f"Scsi(0x{_u(d, 0, 2):x},0x{_u(d, 2, 2):x})"
        if subtype == 0x05 and n == 2:
            return f"USB(0x{d[0]:x},0x{d[1]:x})"
        if subtype == 0x0B and n >= 32:
            return f"MAC({d[:6].hex()},0x{d[32]:x})" if n > 32 else f"MAC({d[:6].hex()})"
        if subtype == 0x0C and n >= 4:
            return "IPv4(...)"
        if subtype == 0x12 and n == 6:
            return f"Sata(0x{_u(d, 0, 2):x},0x{_u(d, 2, 2):x},0x{_u(d, 4, 2):x})"
        if subtype == 0x17 and n == 12:
            return f"NVMe(0x{_u(d, 0, 4):x},{d[4:12].hex('-').upper()})"
        if subtype == 0x0A and n >= 16:
            return f"VenMsg({format_guid(d[:16])}{_hex_tail(d[16:])})"
        if subtype == 0x18 and n >= 0:
            return f"Uri({d.decode('ascii', errors='replace')})"
    elif node_type == 0x04:  # media
        if subtype == 0x01 and n == 38:
            number, start, size = _u(d, 0, 4), _u(d, 4, 8), _u(d, 12, 8)
            signature, fmt, sig_type = d[20:36], d[36], d[37]
            if sig_type == 0x02:
                return f"HD({number},GPT,{format_guid(signature)},0x{start:x},0x{size:x})"
            if sig_type == 0x01:
                return f"HD({number},MBR,0x{_u(signature, 0, 4):08x},0x{start:x},0x{size:x})"
            return f"HD({number},{fmt},{sig_type},0x{start:x},0x{size:x})"
        if subtype == 0x02 and n >= 16:
            return f"CDROM(0x{_u(d, 0, 4):x},0x{_u(d, 4, 8):x},0x{_u(d, 12, 8):x})"
        if subtype == 0x03 and n >= 16:
            return f"VenMedia({format_guid(d[:16])}{_hex_tail(d[16:])})"
        if subtype == 0x04:
            return _utf16z(d)
        if subtype == 0x06 and n == 16:
            return f"FvFile({format_guid(d)})"
        if subtype == 0x07 and n == 16:
            return f"Fv({format_guid(d)})"
        if subtype == 0x08 and n == 16:
            return f"Offset(0x{_u(d, 0, 8):x},0x{_u(d, 8, 8):x})"
    elif node_type == 0x05 and subtype == 0x01 and n >= 4:  # BIOS boot specification
        return f"BBS(0x{_u(d, 0, 2):x},{_cstr(d[4:])},0x{_u(d, 2, 2):x})"
    return f"Path({node_type},{subtype},{d.hex()})"


def _cstr(d: bytes) -> str:
    return d.split(b"\x00", 1)[0].decode("ascii", errors="replace")


def _hex_tail(d: bytes) -> str:
    return f",{d.hex()}" if d else ""
