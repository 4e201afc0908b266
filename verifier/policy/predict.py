"""Predict a policy revision for an update before any machine boots it (issue 20).

Input: the last verified event log of an attester (or a learned policy) and the new
artefacts of an update: EFI binaries (kernel / UKI, shim, GRUB, systemd-boot), whose
Authenticode digests are what the firmware will log in PCR 4
(EV_EFI_BOOT_SERVICES_APPLICATION), and a new kernel command line (EV_IPL, PCR 8/9/12).

Output: the base policy with the new values allowed beside the old ones; the old
values they replace get ``valid_until`` (they stop being accepted when the window
ends) and every touched value a ``note``. Each :class:`Prediction` says which
artefact gave which value and which event (or policy entry) it replaces.

Which event a binary replaces: the PCR 4 boot application whose file name names its
role (``shim*``, ``grub*``, ``systemd-boot*`` / ``BOOTX64.EFI`` for a loader;
``vmlinuz*``, ``linux*``, ``*.efi`` under ``\\EFI\\Linux`` for a kernel or UKI), else
by position in the chain (shim first, the kernel last, the loader just before it).
From a policy alone there are no events: the entry is matched by its name the same
way. Not predicted: PCR 7 authorities (a binary signed by another db certificate),
systemd ``.pcrlock`` files and UKI PCR 11 values (not done).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from verifier.eventlog import ReplayedLog
from verifier.eventlog.events import EventType
from verifier.policy.learn import learn_policy
from verifier.policy.schema import Policy, format_time
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import ConfigError

__all__ = ["ROLES", "Artefact", "Prediction", "predict_policy"]

ROLES = ("kernel", "uki", "shim", "grub", "systemd-boot")
_NAME_HINTS = {
    "shim": ("shim",),
    "grub": ("grub",),
    "systemd-boot": ("systemd-boot", "bootx64.efi"),
    "kernel": ("vmlinuz", "linux", "bzimage", "kernel"),
    "uki": ("vmlinuz", "linux", "bzimage", "kernel"),
}
_WINDOWED_PCRS = frozenset({4, 8, 9, 12})


@dataclass(frozen=True, slots=True)
class Artefact:
    """A new EFI binary of an update and its role in the boot chain."""

    role: str
    name: str
    image: bytes

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"artefact {self.name}: unknown role {self.role!r} (known: {ROLES})")


@dataclass(frozen=True, slots=True)
class Prediction:
    """One predicted value: what it is, where it came from, what it replaces."""

    value: str
    artefact: str
    replaces: str

    def __str__(self) -> str:
        return f"{self.value}: from {self.artefact}; replaces {self.replaces}"


@dataclass(frozen=True, slots=True)
class _Slot:
    """A boot application the update replaces: its policy entry and, from a log, event."""

    entry: dict[str, Any]
    description: str


def _leaf(name: str) -> str:
    return name.replace("/", "\\").rsplit("\\", 1)[-1].rstrip(")").lower()


def _pick(role: str, names: Sequence[str]) -> int:
    """The index in ``names`` (the chain's boot applications, in order) ``role`` replaces."""
    hints = _NAME_HINTS[role]
    leaves = [_leaf(n) for n in names]
    for i, leaf in enumerate(leaves):
        if any(h in leaf for h in hints):
            return i
    if role in ("kernel", "uki"):
        return len(names) - 1
    if role == "shim":
        return 0
    return max(len(names) - 2, 0)


def _log_slots(log: ReplayedLog, doc: dict[str, Any]) -> list[tuple[str, _Slot]]:
    apps = doc.get("boot_applications", [])
    out = []
    for e in log.events_of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION):
        path = getattr(e.untrusted_decoded, "path_text", None) or f"event-{e.index}"
        entry = next(
            (a for a in apps if any(a.get(b) == d.hex() for b, d in e.digests.items())), None
        )
        if entry is not None:
            out.append((path, _Slot(entry, f"event {e.index} (PCR 4, {path})")))
    return out


def predict_policy(
    base: ReplayedLog | Policy,
    artefacts: Sequence[Artefact],
    *,
    cmdline: str | None,
    valid_until: datetime,
    name: str | None = None,
) -> tuple[Policy, tuple[Prediction, ...]]:
    """The policy revision and its explanation. Raises ConfigError when nothing is to
    be predicted, a binary's role has no counterpart, or the base policy pins literal
    PCR values the update changes (they cannot be windowed)."""
    if not artefacts and cmdline is None:
        raise ConfigError("nothing to predict: give a new binary and/or a command line")
    if valid_until.tzinfo is None:
        raise ConfigError("--valid-until needs a time zone (e.g. 2027-01-31T00:00:00Z)")
    policy = learn_policy(base, name=name) if isinstance(base, ReplayedLog) else base
    doc = policy.to_dict()
    if name is not None:
        doc["name"] = name
    pinned = sorted(i for p in (policy.pcrs or {}).values() for i in p if i in _WINDOWED_PCRS)
    if pinned:
        raise ConfigError(
            f"the base policy pins literal values of PCR {pinned}, which the update changes;"
            " remove them (boot_applications and kernel_cmdlines say the same, windowed)"
        )
    until = format_time(valid_until)
    predictions: list[Prediction] = []
    if artefacts:
        apps: list[dict[str, Any]] = doc.setdefault("boot_applications", [])
        if isinstance(base, ReplayedLog):
            slots = _log_slots(base, doc)
        else:
            slots = [
                (a.get("name", "?"), _Slot(a, f"policy entry {a.get('name', '?')}")) for a in apps
            ]
        if not slots:
            raise ConfigError("the base has no boot application for the new binaries to replace")
        for art in artefacts:
            _, slot = slots[_pick(art.role, [p for p, _ in slots])]
            old = slot.entry
            banks = [b for b in old if b not in ("name", "valid_until", "note")]
            new = {"name": art.name} | {b: authenticode_digest(art.image, b).hex() for b in banks}
            if any(all(a.get(b) == new[b] for b in banks) for a in apps):
                predictions.append(Prediction(f"{art.name} already allowed", art.name, "nothing"))
                continue
            new["note"] = f"predicted from {art.name} ({art.role}): replaces {slot.description}"
            old["valid_until"] = until
            old["note"] = f"replaced by {art.name} ({art.role}); accepted until {until}"
            apps.append(new)
            digest = ", ".join(f"{b}:{new[b]}" for b in banks)
            predictions.append(
                Prediction(
                    f"boot application {art.name} {digest}",
                    f"{art.name} ({art.role}, Authenticode)",
                    f"{slot.description} (old value valid until {until})",
                )
            )
    if cmdline is not None:
        lines: list[dict[str, Any]] = doc.setdefault("kernel_cmdlines", [])
        if not any(c.get("exact") == cmdline for c in lines):
            replaced = _cmdline_events(base) if isinstance(base, ReplayedLog) else "policy entries"
            for c in lines:
                c["valid_until"] = until
                c.setdefault("note", f"replaced by the new command line; accepted until {until}")
            lines.append({"exact": cmdline, "note": f"predicted command line: replaces {replaced}"})
            predictions.append(
                Prediction(
                    f"kernel command line {cmdline!r}",
                    "--cmdline",
                    f"{replaced} (old value(s) valid until {until})",
                )
            )
    return Policy.from_dict(doc), tuple(predictions)


def _cmdline_events(log: ReplayedLog) -> str:
    found = [
        f"event {e.index} (PCR {e.pcr})"
        for e in log.events_of_type(EventType.EV_IPL)
        if e.pcr in (8, 9, 12)
        and getattr(e.decoded, "kind", None) in ("kernel_cmdline", "load_options")
    ]
    return ", ".join(found) or "no logged command line"
