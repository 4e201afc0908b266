"""Measured-boot simulator: extend a vTPM's PCRs as UEFI firmware and the boot loader would.

Given a :class:`BootDescription`, :func:`simulate_boot` extends every bank
the event log covers, in the order an OVMF + systemd-boot + Linux EFI stub
boot does (TCG PC Client PFP 1.05 §3.3.4 "PCR usage", §10.4.1 event types):

1. PCR 0: S-CRTM version, platform firmware blobs.
2. PCR 7: SecureBoot, PK, KEK, db, dbx (EV_EFI_VARIABLE_DRIVER_CONFIG), separator.
3. PCR 1: BootOrder and Boot0000 (EV_EFI_VARIABLE_BOOT).
4. PCR 4: "Calling EFI Application from Boot Option"; PCR 0-6 separators.
5. PCR 4: each boot application's Authenticode digest; with secure boot on,
   PCR 7 logs the db entry that authorised the first image (EV_EFI_VARIABLE_AUTHORITY).
6. PCR 12: the kernel command line as systemd-boot logs it (EV_IPL, UTF-16LE);
   PCR 9: the EFI stub's load options and initrd (EV_EVENT_TAG).
7. PCR 5: the two Exit Boot Services actions.

It writes the matching crypto-agile event log. Guarantee: the returned
``pcrs`` are what the log replays to, and what the TPM holds afterwards when
its PCRs started at zero (a fresh swtpm, locality 0, no other extends).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtpm_core.measured_boot import uefi
from vtpm_core.measured_boot.description import BootDescription
from vtpm_core.measured_boot.tcg_log import BANK_ALG_IDS, EventLogWriter, EventType

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

__all__ = ["SimulatedBoot", "active_banks", "build_boot_log", "extend_pcrs", "simulate_boot"]

# Owner GUID of the signature entries the simulator writes (any fixed GUID).
_OWNER = uuid.UUID("0e5d4f66-8b1a-4b8e-9d6f-7674706d2d74")


@dataclass(frozen=True, slots=True)
class SimulatedBoot:
    """The event log a simulated boot wrote and the PCR values it extends to."""

    eventlog: bytes
    pcrs: dict[str, dict[int, bytes]]


def _load_option(description: str, device_path: bytes) -> bytes:
    """EFI_LOAD_OPTION (UEFI 2.9 §3.1.3): attributes, path length, description, path."""
    desc16 = (description + "\0").encode("utf-16-le")
    return struct.pack("<IH", 1, len(device_path)) + desc16 + device_path


def build_boot_log(desc: BootDescription, banks: Sequence[str]) -> EventLogWriter:
    """Compute the events of one boot (no TPM involved)."""
    log = EventLogWriter(banks=tuple(banks))
    gv, sdb = uefi.EFI_GLOBAL_VARIABLE, uefi.EFI_IMAGE_SECURITY_DATABASE

    # 1. PCR 0: firmware
    log.add(0, EventType.EV_S_CRTM_VERSION, (desc.firmware_version + "\0").encode("utf-16-le"))
    for blob in desc.firmware_blobs:
        data = uefi.platform_firmware_blob(blob.base, blob.measured.length)
        log.add_digests(
            0,
            EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB,
            data,
            {b: blob.measured.digest(b) for b in banks},
        )

    # 2. PCR 7: secure-boot configuration (digest = H(UEFI_VARIABLE_DATA))
    def x509_lists(certs: Sequence[bytes]) -> bytes:
        return b"".join(uefi.signature_list(uefi.EFI_CERT_X509_GUID, _OWNER, [c]) for c in certs)

    variables = [
        (gv, "SecureBoot", b"\x01" if desc.secure_boot else b"\x00"),
        (gv, "PK", x509_lists(desc.pk)),
        (gv, "KEK", x509_lists(desc.kek)),
        (sdb, "db", x509_lists(desc.db)),
        (sdb, "dbx", uefi.signature_list(uefi.EFI_CERT_SHA256_GUID, _OWNER, desc.dbx_sha256)),
    ]
    for vendor, name, value in variables:
        log.add(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, uefi.variable_data(vendor, name, value))
    log.add(7, EventType.EV_SEPARATOR, bytes(4))

    # 3. PCR 1: boot variables
    first_path = (
        desc.boot_applications[0].path if desc.boot_applications else "\\EFI\\BOOT\\BOOTX64.EFI"
    )
    boot0000 = _load_option("Linux Boot Manager", uefi.file_path_device_path(first_path))
    log.add(1, EventType.EV_EFI_VARIABLE_BOOT, uefi.variable_data(gv, "BootOrder", b"\x00\x00"))
    log.add(1, EventType.EV_EFI_VARIABLE_BOOT, uefi.variable_data(gv, "Boot0000", boot0000))

    # 4. PCR 4 action, then separators 0-6
    log.add(4, EventType.EV_EFI_ACTION, b"Calling EFI Application from Boot Option")
    for pcr in range(7):
        log.add(pcr, EventType.EV_SEPARATOR, bytes(4))

    # 5. PCR 4: boot applications (digest = Authenticode hash of the image)
    location = 0x7E000000
    for i, app in enumerate(desc.boot_applications):
        data = uefi.image_load_event(location, app.length, uefi.file_path_device_path(app.path))
        log.add_digests(
            4,
            EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
            data,
            {b: app.digest(b) for b in banks},
        )
        location += 0x01000000
        if i == 0 and desc.secure_boot and desc.db:
            authority = uefi.variable_data(sdb, "db", _OWNER.bytes_le + desc.db[0])
            log.add(7, EventType.EV_EFI_VARIABLE_AUTHORITY, authority)

    # 6. command line and initrd
    if desc.kernel_cmdline is not None:
        options = (desc.kernel_cmdline + "\0").encode("utf-16-le")
        log.add(12, EventType.EV_IPL, options)
        log.add(
            9,
            EventType.EV_EVENT_TAG,
            uefi.tagged_event(uefi.LOAD_OPTIONS_EVENT_ID, b"LOADED_IMAGE::LoadOptions\0"),
            measured=options,
        )
    if desc.initrd is not None:
        tag = uefi.tagged_event(uefi.LINUX_INITRD_EVENT_ID, b"Linux initrd\0")
        log.add_digests(9, EventType.EV_EVENT_TAG, tag, {b: desc.initrd.digest(b) for b in banks})

    # 7. PCR 5: ExitBootServices
    log.add(5, EventType.EV_EFI_ACTION, b"Exit Boot Services Invocation")
    log.add(5, EventType.EV_EFI_ACTION, b"Exit Boot Services Returned with Success")
    return log


def active_banks(esapi: ESAPI) -> tuple[str, ...]:
    """The PCR banks the TPM has allocated (any PCR selected), among those we can log."""
    from tpm2_pytss.constants import TPM2_CAP

    _more, data = esapi.get_capability(TPM2_CAP.PCRS, 0, 1)
    by_id = {alg: name for name, (alg, _size) in BANK_ALG_IDS.items()}
    banks = []
    for sel in data.data.assignedPCR:
        if int(sel.hash) in by_id and any(bytes(sel.pcrSelect)[: sel.sizeofSelect]):
            banks.append(by_id[int(sel.hash)])
    return tuple(banks)


def simulate_boot(
    desc: BootDescription, esapi: ESAPI, banks: Sequence[str] | None = None
) -> SimulatedBoot:
    """Extend the TPM's PCRs for ``desc`` and return the event log and expected PCRs.

    ``banks`` defaults to every allocated bank of the TPM, so the log covers
    what a verifier may quote. Does not reset PCRs: start from a fresh TPM.
    """
    chosen = tuple(banks) if banks is not None else active_banks(esapi)
    return extend_pcrs(esapi, build_boot_log(desc, chosen))


def extend_pcrs(esapi: ESAPI, log: EventLogWriter) -> SimulatedBoot:
    """Extend the TPM's PCRs with every event of ``log`` (a :func:`build_boot_log` with
    events added, say); the log's bytes and the PCR values it extends to."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    for pcr, digests in log.extends():
        values = [
            TPMT_HA(hashAlg=BANK_ALG_IDS[bank][0], digest=TPMU_HA(**{bank: digest}))
            for bank, digest in digests.items()
        ]
        esapi.pcr_extend(ESYS_TR.PCR0 + pcr, TPML_DIGEST_VALUES(values))
    return SimulatedBoot(eventlog=log.to_bytes(), pcrs=log.pcrs())
