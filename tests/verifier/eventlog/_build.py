"""A tiny crypto-agile log builder for tests that need events no real log has
(error separators, unknown types, forged data). Real-log tests use the corpus."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}


def spec_id_header(banks: Sequence[str] = ("sha1", "sha256")) -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    for bank in banks:
        body += struct.pack("<HH", ALG_IDS[bank], hashlib.new(bank).digest_size)
    body += b"\x00"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def event2(
    pcr: int,
    event_type: int,
    data: bytes,
    banks: Sequence[str] = ("sha1", "sha256"),
    digest_of: bytes | None = None,
) -> bytes:
    """A TCG_PCR_EVENT2 whose digests are H(digest_of) (default: H(data))."""
    measured = data if digest_of is None else digest_of
    out = struct.pack("<III", pcr, event_type, len(banks))
    for bank in banks:
        out += struct.pack("<H", ALG_IDS[bank]) + hashlib.new(bank, measured).digest()
    return out + struct.pack("<I", len(data)) + data


def log(*events: bytes, banks: Sequence[str] = ("sha1", "sha256")) -> bytes:
    return spec_id_header(banks) + b"".join(events)


def legacy_event(pcr: int, event_type: int, data: bytes, digest_of: bytes | None = None) -> bytes:
    """A TCG_PCR_EVENT (SHA-1 log format) whose digest is SHA-1(digest_of) (default: data)."""
    measured = data if digest_of is None else digest_of
    digest = hashlib.sha1(measured).digest()
    return struct.pack("<II", pcr, event_type) + digest + struct.pack("<I", len(data)) + data


def no_action(data: bytes, banks: Sequence[str] = ("sha1", "sha256")) -> bytes:
    """An EV_NO_ACTION TCG_PCR_EVENT2 in PCR 0 with all-zero digests (PFP §10.4.1)."""
    out = struct.pack("<III", 0, 3, len(banks))
    for bank in banks:
        out += struct.pack("<H", ALG_IDS[bank]) + bytes(hashlib.new(bank).digest_size)
    return out + struct.pack("<I", len(data)) + data
