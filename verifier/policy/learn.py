"""Learn a reference-value policy from a known-good boot (issue 5, `vtpm policy learn`).

Reads only what a rule could later trust (see :mod:`verifier.policy.rules`):
events whose data hashes to their digest, image digests as logged. The log
given here is trusted by the operator ("known good"); nothing here proves it.

Learned: secure_boot (from the SecureBoot variable), firmware.scrtm_versions,
firmware.pcr0 (replayed), boot_applications (every PCR 4 boot application's
digest, in the best bank the log has), kernel_cmdlines (exact), db.require
(SHA-256 of every db entry), dbx.min_entries (the dbx size). Each part is
left out when the log has nothing for it.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType

from verifier.eventlog import (
    EfiBoolean,
    EfiVariable,
    IplString,
    ReplayedLog,
    SignatureDatabase,
    Text,
)
from verifier.eventlog.events import EventType
from verifier.policy.schema import (
    BootApplication,
    CmdlinePattern,
    DbPolicy,
    DbxPolicy,
    FirmwarePolicy,
    Policy,
)
from vtpm_core.errors import ConfigError

__all__ = ["learn_policy"]

_BANK_PREFERENCE = ("sha256", "sha384", "sha512", "sha1")
_CMDLINE_PCRS = frozenset({8, 9, 12})


def _app_name(path: str | None, index: int) -> str:
    if not path:
        return f"event-{index}"
    leaf = path.replace("/", "\\").rsplit("\\", 1)[-1].rstrip(")")
    return leaf or f"event-{index}"


def learn_policy(log: ReplayedLog, *, name: str | None = None) -> Policy:
    """A policy that the same boot satisfies. Raises ConfigError if the log offers no rule."""
    bank = next((b for b in _BANK_PREFERENCE if b in log.banks), None)
    secure_boot: bool | None = None
    scrtm: list[str] = []
    apps: list[BootApplication] = []
    cmdlines: list[str] = []
    db: list[bytes] | None = None
    dbx_size: int | None = None
    for e in log.events:
        decoded = e.decoded if e.data_verified else None
        if e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG and isinstance(
            decoded, EfiVariable
        ):
            if decoded.name == "SecureBoot" and isinstance(decoded.value, EfiBoolean):
                secure_boot = decoded.value.enabled
            elif decoded.name in ("db", "dbx") and isinstance(decoded.value, SignatureDatabase):
                entries = [s.data for lst in decoded.value.lists for s in lst.signatures]
                if decoded.name == "db":
                    db = [hashlib.sha256(x).digest() for x in entries]
                else:
                    dbx_size = len(entries)
        elif e.event_type == EventType.EV_S_CRTM_VERSION and isinstance(decoded, Text):
            version = decoded.text.rstrip("\x00")
            if version not in scrtm:
                scrtm.append(version)
        elif (
            e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION
            and bank is not None
            and bank in e.digests
        ):
            digest = e.digests[bank]
            if not any(a.digests.get(bank) == digest for a in apps):
                path = getattr(e.untrusted_decoded, "path_text", None)
                apps.append(
                    BootApplication(_app_name(path, e.index), MappingProxyType({bank: digest}))
                )
        elif (
            e.event_type == EventType.EV_IPL
            and e.pcr in _CMDLINE_PCRS
            and isinstance(decoded, IplString)
            and decoded.kind in ("kernel_cmdline", "load_options")
        ):
            text = decoded.value.rstrip("\x00")
            if text not in cmdlines:
                cmdlines.append(text)
    pcr0 = None
    if bank is not None and 0 in log.pcrs.get(bank, {}):
        pcr0 = MappingProxyType({bank: (bytes(log.pcrs[bank][0]),)})
    firmware = FirmwarePolicy(tuple(scrtm) or None, pcr0) if scrtm or pcr0 is not None else None
    policy = Policy(
        version=1,
        name=name,
        secure_boot=secure_boot,
        boot_applications=tuple(apps) or None,
        kernel_cmdlines=tuple(CmdlinePattern(c, None, None) for c in cmdlines) or None,
        firmware=firmware,
        db=DbPolicy(tuple(db)) if db else None,
        dbx=DbxPolicy((), dbx_size) if dbx_size else None,
        pcrs=None,
    )
    doc = policy.to_dict()
    if len(doc) <= 1 + (name is not None):
        raise ConfigError("the event log has nothing a policy rule could check")
    # round-trip through the schema: what we write is exactly what load() accepts
    return Policy.from_dict(doc)
