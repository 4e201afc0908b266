"""Encoders for the UEFI and TCG structures a measured boot logs.

Byte layouts from the TCG PC Client Platform Firmware Profile (PFP) 1.05,
§10.4 (event data structures: UEFI_VARIABLE_DATA §10.4.2,
UEFI_IMAGE_LOAD_EVENT §10.4.3, UEFI_PLATFORM_FIRMWARE_BLOB §10.4.4,
TCG_PCClientTaggedEvent §10.4.6) and the UEFI 2.9 specification (§10.3
device path nodes, §32.4.1 EFI_SIGNATURE_LIST). All integers little-endian;
GUIDs in the UEFI mixed-endian byte order (``uuid.UUID.bytes_le``).

Encoders only: the parser of these structures lives in ``verifier.eventlog``.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable

__all__ = [
    "EFI_CERT_SHA256_GUID",
    "EFI_CERT_X509_GUID",
    "EFI_GLOBAL_VARIABLE",
    "EFI_IMAGE_SECURITY_DATABASE",
    "LINUX_INITRD_EVENT_ID",
    "LOAD_OPTIONS_EVENT_ID",
    "file_path_device_path",
    "image_load_event",
    "platform_firmware_blob",
    "signature_list",
    "tagged_event",
    "variable_data",
]

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

# Event IDs the Linux EFI stub uses for EV_EVENT_TAG measurements into PCR 9
# (linux/include/linux/efi.h: INITRD_EVENT_TAG_ID, LOAD_OPTIONS_EVENT_TAG_ID).
LINUX_INITRD_EVENT_ID = 0x8F3B22ED
LOAD_OPTIONS_EVENT_ID = 0x8F3B22EC


def variable_data(vendor: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP §10.4.2): GUID, name length in chars, data length, name, data."""
    name16 = name.encode("utf-16-le")
    return vendor.bytes_le + struct.pack("<QQ", len(name16) // 2, len(data)) + name16 + data


def signature_list(signature_type: uuid.UUID, owner: uuid.UUID, entries: Iterable[bytes]) -> bytes:
    """One EFI_SIGNATURE_LIST whose entries all have the same size (UEFI §32.4.1).

    Several sizes (X.509 certificates of different lengths) need one list each.
    """
    items = list(entries)
    if not items:
        return b""
    size = len(items[0])
    if any(len(e) != size for e in items):
        raise ValueError("all entries of one EFI_SIGNATURE_LIST must have one size")
    signature_size = 16 + size
    body = b"".join(owner.bytes_le + e for e in items)
    header = signature_type.bytes_le + struct.pack("<III", 28 + len(body), 0, signature_size)
    return header + body


def file_path_device_path(path: str) -> bytes:
    """A media File Path node (type 4, subtype 4) followed by the end node."""
    path16 = (path + "\0").encode("utf-16-le")
    node = struct.pack("<BBH", 0x04, 0x04, 4 + len(path16)) + path16
    return node + struct.pack("<BBH", 0x7F, 0xFF, 4)


def image_load_event(location: int, length: int, device_path: bytes) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP §10.4.3) with 64-bit UINTN fields."""
    return struct.pack("<QQQQ", location, length, 0, len(device_path)) + device_path


def platform_firmware_blob(base: int, length: int) -> bytes:
    """UEFI_PLATFORM_FIRMWARE_BLOB (PFP §10.4.4): physical address and length."""
    return struct.pack("<QQ", base, length)


def tagged_event(event_id: int, data: bytes) -> bytes:
    """TCG_PCClientTaggedEvent (PFP §10.4.6)."""
    return struct.pack("<II", event_id, len(data)) + data
