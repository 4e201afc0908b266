"""Writer for the crypto-agile TCG PC Client event log.

Layout per the TCG PC Client Platform Firmware Profile 1.05, §10.2.1
(TCG_PCR_EVENT, used once for the Spec ID event), §10.2.2 (TCG_PCR_EVENT2)
and §10.4.5.1 (TCG_EfiSpecIdEvent, "Spec ID Event03"). Little-endian.

The writer records what the simulator extends; it computes the digests of
each event for every bank and keeps the running PCR values, so the caller
can compare them with what the TPM reports.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["BANK_ALG_IDS", "EventLogWriter", "EventType"]

# TPM_ALG_ID and digest size per bank name (TPM 2.0 Part 2 §6.3)
BANK_ALG_IDS: Mapping[str, tuple[int, int]] = {
    "sha1": (0x0004, 20),
    "sha256": (0x000B, 32),
    "sha384": (0x000C, 48),
    "sha512": (0x000D, 64),
}


class EventType:
    """Event types (PFP §10.4.1) the simulator writes."""

    EV_NO_ACTION = 0x00000003
    EV_SEPARATOR = 0x00000004
    EV_EVENT_TAG = 0x00000006
    EV_S_CRTM_VERSION = 0x00000008
    EV_IPL = 0x0000000D
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0


@dataclass
class EventLogWriter:
    """Accumulates TCG_PCR_EVENT2 records and the PCR values they extend to."""

    banks: Sequence[str]
    _body: bytearray = field(default_factory=bytearray)
    _pcrs: dict[str, dict[int, bytes]] = field(default_factory=dict)
    _extends: list[tuple[int, dict[str, bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [b for b in self.banks if b not in BANK_ALG_IDS]
        if unknown or not self.banks:
            raise ValueError(f"unsupported or empty bank list: {list(self.banks)}")

    def add(self, pcr: int, event_type: int, data: bytes, measured: bytes | None = None) -> None:
        """Append one event; its digest is H(measured), or H(data) when measured is None.

        PFP defines which: for variables, actions, separators and IPL strings
        the digest is over the event data; for images, firmware blobs and the
        initrd it is over something the log only describes.
        """
        payload = data if measured is None else measured
        digests = {bank: hashlib.new(bank, payload).digest() for bank in self.banks}
        self.add_digests(pcr, event_type, data, digests)

    def add_digests(
        self, pcr: int, event_type: int, data: bytes, digests: Mapping[str, bytes]
    ) -> None:
        """Append one event with precomputed digests (e.g. Authenticode hashes)."""
        record = bytearray(struct.pack("<III", pcr, event_type, len(self.banks)))
        for bank in self.banks:
            alg_id, size = BANK_ALG_IDS[bank]
            digest = digests[bank]
            if len(digest) != size:
                raise ValueError(f"{bank} digest must be {size} bytes, got {len(digest)}")
            record += struct.pack("<H", alg_id) + digest
            if event_type != EventType.EV_NO_ACTION:
                old = self._pcrs.setdefault(bank, {}).get(pcr, bytes(size))
                self._pcrs[bank][pcr] = hashlib.new(bank, old + digest).digest()
        record += struct.pack("<I", len(data)) + data
        self._body += record
        if event_type != EventType.EV_NO_ACTION:
            self._extends.append((pcr, {bank: digests[bank] for bank in self.banks}))

    def extends(self) -> list[tuple[int, dict[str, bytes]]]:
        """(pcr, digest per bank) of every extending event, in log order."""
        return list(self._extends)

    def pcrs(self) -> dict[str, dict[int, bytes]]:
        """PCR values the events extend to, per bank (PCRs start at zero)."""
        return {bank: dict(values) for bank, values in self._pcrs.items()}

    def to_bytes(self) -> bytes:
        """The whole log: the Spec ID event, then every TCG_PCR_EVENT2."""
        spec = bytearray(b"Spec ID Event03\0")
        # platformClass 0 (client), spec 2.0 errata 2, uintnSize 2 (64-bit)
        spec += struct.pack("<IBBBB", 0, 0, 2, 2, 2)
        spec += struct.pack("<I", len(self.banks))
        for bank in self.banks:
            spec += struct.pack("<HH", *BANK_ALG_IDS[bank])
        spec += b"\0"  # vendorInfoSize
        header = struct.pack("<II", 0, EventType.EV_NO_ACTION) + bytes(20)
        header += struct.pack("<I", len(spec)) + spec
        return bytes(header) + bytes(self._body)
