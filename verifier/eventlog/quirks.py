"""The one table of firmware and boot-loader quirks this parser works around.

Each quirk has a stable id. Whenever one is applied, the parser or the data
check records an :class:`AppliedQuirk` naming it and the event; the
:class:`~verifier.eventlog.replay.ReplayedLog` reports them all as warnings.
Nothing here changes a digest or a PCR value: the quirks only widen what we
accept as "the data that was measured" for an event, or what we accept as
the end of the log, and always visibly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["QUIRKS", "AppliedQuirk", "Quirk", "summarize", "summarize_applied"]


@dataclass(frozen=True, slots=True)
class Quirk:
    """A named deviation from the TCG PFP spec seen in real logs."""

    id: str
    summary: str
    seen_in: str


@dataclass(frozen=True, slots=True)  # slots: one GC-counted object per quirk, not two
class AppliedQuirk:
    """One application of a quirk: which, where (event index or None) and detail."""

    quirk_id: str
    event_index: int | None
    detail: str

    def __str__(self) -> str:
        where = f"event {self.event_index}" if self.event_index is not None else "log"
        return f"quirk {self.quirk_id} applied to {where}: {self.detail}"


_TABLE = (
    Quirk(
        "log-trailing-padding",
        "The log buffer ends with fill after the last event: 0xFF (any length) or 0x00 "
        "(16 bytes or more), up to the end of the firmware's log area (a log copied from "
        "that area rather than the kernel's exact-size file). The fill is the end of the "
        "log instead of being parsed as events; fill followed by anything else, and a "
        "record with a PCR index out of range, are still refused.",
        "logs read from ACPI TPM2/TCPA log areas",
    ),
    Quirk(
        "no-action-empty-digest-list",
        "A crypto-agile EV_NO_ACTION record lists no digests (digests.count 0) instead of "
        "one zero digest per bank. EV_NO_ACTION is never extended (PFP §10.4.1), so the "
        "record is read and never replayed; an extending record with a bank missing is "
        "still refused (no quoted bank would prove it). go-attestation and tpm2-tss read "
        "such records too.",
        "built logs (go-attestation and FAPI parse digest lists of any length)",
    ),
    Quirk(
        "grub-command-string",
        "GRUB 2 logs EV_IPL data 'grub_cmd: CMD\\0' (or 'grub_cmd CMD\\0') but the digest "
        "covers only 'CMD' (upstream GRUB) or 'CMD\\0' (RHEL 8 GRUB): the label is not measured.",
        "every GRUB 2 log in the corpus (PCR 8)",
    ),
    Quirk(
        "grub-kernel-cmdline-string",
        "GRUB 2 logs EV_IPL data 'kernel_cmdline: LINE\\0' (or 'grub_kernel_cmdline LINE\\0') "
        "but the digest covers only 'LINE', without the label and the NUL.",
        "every GRUB 2 log in the corpus (PCR 8)",
    ),
    Quirk(
        "ipl-description-only",
        "GRUB 2 (PCR 9: the name of each file it measured) and shim (PCR 14: 'MokList', "
        "'MokListX', 'MokListTrusted') log EV_IPL events whose data names what was measured "
        "instead of being it. Such data is a description the digest cannot prove: "
        "data_verified is None for it, never True.",
        "every GRUB 2 and shim log in the corpus",
    ),
    Quirk(
        "variable-boot-digest-of-whole-structure",
        "An EV_EFI_VARIABLE_BOOT digest covers the whole UEFI_VARIABLE_DATA instead of only "
        "VariableData as PFP §10.4.4 says (the whole structure is what EV_EFI_VARIABLE_BOOT2 "
        "hashes).",
        "physical_postcode, hirs_tpmlog_legacy_sha1, workstation_archlinux_sdboot, "
        "unknown_crypto_agile_eventlog",
    ),
    Quirk(
        "variable-driver-config-digest-of-data-only",
        "An EV_EFI_VARIABLE_DRIVER_CONFIG digest covers only VariableData instead of the "
        "whole UEFI_VARIABLE_DATA (PFP §10.4.4).",
        "physical_linux_tpm12_sha1 (TPM 1.2 era firmware)",
    ),
    Quirk(
        "variable-data-trailing-bytes",
        "A variable event's data goes on after the UEFI_VARIABLE_DATA its lengths describe "
        "(PFP §10.4.4): the extra bytes are kept as EfiVariable.trailing and not "
        "interpreted; digest_covers says whether the digest proves them. tcglog-parser "
        "reports such events (tcglog-check --ignore-trailing-bytes).",
        "built logs; the corpus's shim events with trailing bytes need "
        "shim-authority-extra-trailing-byte instead",
    ),
    Quirk(
        "shim-authority-extra-trailing-byte",
        "shim's EV_EFI_VARIABLE_AUTHORITY event data (UEFI_VARIABLE_DATA of its vendor or db "
        "certificate) is one byte longer than what it hashed; the digest covers all but the "
        "last byte.",
        "gce_cos93_amdsev, gce_debian10, physical_postcode, hirs_tpmlog_legacy_sha1",
    ),
)

QUIRKS: Mapping[str, Quirk] = MappingProxyType({q.id: q for q in _TABLE})


def summarize(applied: Iterable[AppliedQuirk]) -> tuple[str, ...]:
    """One line per quirk: event-level ones grouped ("applied to 49 event(s): events 28-75, 79"),
    log-level ones as they are."""
    log_level: list[AppliedQuirk] = []
    per_event: dict[str, list[int]] = {}
    for q in applied:
        if q.event_index is None:
            log_level.append(q)
        elif q.quirk_id in per_event:  # (setdefault would build a list per quirk)
            per_event[q.quirk_id].append(q.event_index)
        else:
            per_event[q.quirk_id] = [q.event_index]
    return summarize_applied(log_level, per_event)


def summarize_applied(
    log_level: Iterable[AppliedQuirk], per_event: Mapping[str, list[int]]
) -> tuple[str, ...]:
    """:func:`summarize`, given the log-level quirks and, per quirk id in order of first
    application, the events it was applied to."""
    lines = [str(q) for q in log_level]
    for quirk_id, indices in per_event.items():
        lines.append(
            f"quirk {quirk_id} applied to {len(indices)} event(s): events {_ranges(indices)}"
        )
    return tuple(lines)


def _ranges(indices: list[int]) -> str:
    """ "3-5, 8" for [3, 4, 5, 8]: runs of consecutive event indices."""
    if not indices:
        return ""
    parts: list[str] = []
    start = prev = indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = i
        prev = i
    parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)
