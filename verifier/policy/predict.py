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
way. A UKI adds a second value, its ``.linux`` section's digest: systemd-stub starts
the kernel with LoadImage and the firmware measures it too (seen on the real VM).
Not predicted: PCR 7 authorities (a binary signed by another db certificate).

systemd's own predictions (issue 20) are taken as they are shipped:

- ``.pcrlock`` components (:mod:`verifier.policy.pcrlock`): their PCR 4 records are
  boot application digests (the component's name says which boot application it
  replaces, as for a binary; a variant already allowed keeps its entry open); their
  PCR 11 records, with every variant, give the PCR 11 values of the location range; a
  record on another PCR must be an event of the base log (it then changes nothing), or
  the prediction is refused (from a policy base it is listed as not checked);
- PCR 11 of a UKI (:mod:`verifier.policy.uki`): computed from a ``--uki`` binary (and
  held against its ``.pcrsig``), or read from ``systemd-measure calculate --json``.

PCR 11 values become windowed literal values (``pcrs.<bank>.11``); the base's own PCR 11
values (pinned in the policy, or from a log: the stub's PCR 11 events replayed and
extended with each phase) get ``valid_until``. A ``--uki`` alone pins PCR 11 only when
the base has PCR 11 values to keep (else a machine on the old kernel would fail at once).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from verifier.eventlog import ReplayedLog
from verifier.eventlog.events import EventType
from verifier.policy.learn import learn_policy
from verifier.policy.pcrlock import Component, pcr_states
from verifier.policy.schema import BANK_SIZES, Policy, format_time
from verifier.policy.uki import DEFAULT_PHASES, Pcr11Value, check_pcrsig, uki_pcr11
from vtpm_core.authenticode import PeImage, authenticode_digest
from vtpm_core.errors import ConfigError, ParseError

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
_PCR11 = 11
_PCR11_KEY = str(_PCR11)


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
    pcrlock: Sequence[Component] = (),
    pcr11: Sequence[Pcr11Value] = (),
    phases: Sequence[str] = DEFAULT_PHASES,
) -> tuple[Policy, tuple[Prediction, ...]]:
    """The policy revision and its explanation. Raises ConfigError when nothing is to
    be predicted, a binary's role has no counterpart, a ``.pcrlock`` record can be
    mapped to no rule, a UKI's ``.pcrsig`` disagrees, or the base policy pins literal
    PCR values the update changes (they cannot be windowed)."""
    if not artefacts and cmdline is None and not pcrlock and not pcr11:
        raise ConfigError(
            "nothing to predict: give a new binary, a command line, .pcrlock files or PCR 11 values"
        )
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
    needs_slot = artefacts or any(c.records(4) for c in pcrlock)
    slots = _slots(base, doc) if needs_slot else []
    for art in artefacts:
        predictions.append(_predict_binary(art, slots, doc, until))
        if art.role == "uki":
            predictions.append(_uki_kernel(art, slots, doc))
    new11: list[Pcr11Value] = list(pcr11)
    for art in artefacts:
        if art.role == "uki":
            new11 += _uki_values(art, base, policy, phases, predictions)
    for comp in pcrlock:
        predictions += _predict_component(comp, base, slots, doc, until)
    if pcrlock:
        new11 += _pcrlock_values(pcrlock, base, policy)
    if new11:
        predictions += _predict_pcr11(new11, base, policy, doc, until, phases)
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


def _slots(base: ReplayedLog | Policy, doc: dict[str, Any]) -> list[tuple[str, _Slot]]:
    apps: list[dict[str, Any]] = doc.setdefault("boot_applications", [])
    if isinstance(base, ReplayedLog):
        slots = _log_slots(base, doc)
    else:
        slots = [(a.get("name", "?"), _Slot(a, f"policy entry {a.get('name', '?')}")) for a in apps]
    if not slots:
        raise ConfigError("the base has no boot application for the new binaries to replace")
    return slots


def _predict_binary(
    art: Artefact, slots: list[tuple[str, _Slot]], doc: dict[str, Any], until: str
) -> Prediction:
    apps: list[dict[str, Any]] = doc["boot_applications"]
    _, slot = slots[_pick(art.role, [p for p, _ in slots])]
    old = slot.entry
    banks = [b for b in old if b not in ("name", "valid_until", "note")]
    new = {"name": art.name} | {b: authenticode_digest(art.image, b).hex() for b in banks}
    if any(all(a.get(b) == new[b] for b in banks) for a in apps):
        return Prediction(f"{art.name} already allowed", art.name, "nothing")
    new["note"] = f"predicted from {art.name} ({art.role}): replaces {slot.description}"
    old["valid_until"] = until
    old["note"] = f"replaced by {art.name} ({art.role}); accepted until {until}"
    apps.append(new)
    digest = ", ".join(f"{b}:{new[b]}" for b in banks)
    return Prediction(
        f"boot application {art.name} {digest}",
        f"{art.name} ({art.role}, Authenticode)",
        f"{slot.description} (old value valid until {until})",
    )


def _uki_kernel(art: Artefact, slots: list[tuple[str, _Slot]], doc: dict[str, Any]) -> Prediction:
    """The UKI's ``.linux`` section as a boot application of its own: systemd-stub (252
    on the real VM, tests/vm/test_predict_vm.py) starts the kernel with LoadImage, so
    the firmware logs a second PCR 4 event with the section's Authenticode digest (from
    a VenMedia device path). Added even when an entry already allows that digest with
    an end: the kernel is part of the update and must outlive the window."""
    apps: list[dict[str, Any]] = doc["boot_applications"]
    _, slot = slots[_pick(art.role, [p for p, _ in slots])]
    banks = [b for b in slot.entry if b not in ("name", "valid_until", "note")]
    pe = PeImage.parse(art.image)
    section = next((s for s in pe.sections if s.name == b".linux"), None)
    if section is None:
        raise ConfigError(f"{art.name}: a UKI needs a .linux section (found none)")
    image = pe.section_data(section)
    name = f"{art.name}:.linux"
    try:
        new = {"name": name} | {b: authenticode_digest(image, b).hex() for b in banks}
    except ParseError as exc:  # nothing the stub could LoadImage: nothing more allowed
        return Prediction(f"{name} not predicted", name, f"nothing: not a PE image ({exc})")
    if any("valid_until" not in a and all(a.get(b) == new[b] for b in banks) for a in apps):
        return Prediction(f"{name} already allowed", name, "nothing")
    new["note"] = (
        f"predicted from the .linux section of {art.name}, which replaces {slot.description}:"
        " systemd-stub starts it with LoadImage (its own PCR 4 event, after the UKI's)"
    )
    apps.append(new)
    digest = ", ".join(f"{b}:{new[b]}" for b in banks)
    return Prediction(
        f"boot application {name} {digest}",
        f"{art.name} (uki .linux section, Authenticode)",
        "nothing: its own PCR 4 event, after the UKI's",
    )


def _role_of(component: str) -> str | None:
    leaf = component.lower()
    for role in ("shim", "grub", "systemd-boot", "kernel"):
        if any(h in leaf for h in _NAME_HINTS[role]) or (role == "kernel" and "uki" in leaf):
            return role
    return None


def _predict_component(
    comp: Component,
    base: ReplayedLog | Policy,
    slots: list[tuple[str, _Slot]],
    doc: dict[str, Any],
    until: str,
) -> list[Prediction]:
    """A component's PCR 4 records as boot applications; its other records (but PCR 11)
    confirmed against the base log."""
    apps: list[dict[str, Any]] = doc.get("boot_applications", [])
    out: list[Prediction] = []
    logged: dict[tuple[int, str, bytes], str] = {}
    if isinstance(base, ReplayedLog):
        for e in base.events:
            for b, d in e.digests.items():
                logged.setdefault((e.pcr, b, d), f"event {e.index} ({e.type_name}, PCR {e.pcr})")
    kept: list[dict[str, Any]] = []
    added: list[tuple[dict[str, Any], str]] = []
    unchecked = 0
    for variant in comp.variants:
        for r in variant.records:
            if r.pcr == _PCR11:
                continue
            seen = next((logged[(r.pcr, b, d)] for b, d in r.digests.items()
                         if (r.pcr, b, d) in logged), None)  # fmt: skip
            if r.pcr != 4:
                if seen is None and isinstance(base, ReplayedLog):
                    raise ConfigError(
                        f"{r.where}: PCR {r.pcr} digest {_first(r.digests)} is in no event of the"
                        " base log, and only PCR 4 (boot applications) and PCR 11 are predicted"
                        " from .pcrlock files"
                    )
                unchecked += seen is None
                continue
            digests = {b: d.hex() for b, d in r.digests.items() if b in BANK_SIZES}
            entry = next((a for a in apps if any(a.get(b) == v for b, v in digests.items())), None)
            if entry is not None:
                kept.append(entry)
                continue
            if seen is not None:
                continue  # (an EV_SEPARATOR or EV_EFI_ACTION of the base boot: unchanged)
            label = Path(variant.path).name
            new = {"name": f"{comp.name}/{label}", **digests}
            added.append((new, r.where))
    role = _role_of(comp.name)
    slot = slots[_pick(role, [p for p, _ in slots])][1] if role is not None and added else None
    for new, where in added:
        replaces = "nothing (no boot application of its role)" if slot is None else slot.description
        new["note"] = f"predicted by {where}: replaces {replaces}"
        apps.append(new)
        digest = ", ".join(f"{b}:{new[b]}" for b in new if b in BANK_SIZES)
        out.append(
            Prediction(f"boot application {new['name']} {digest}", f"{where} (.pcrlock)", replaces)
        )
    if slot is not None and not any(slot.entry is k for k in kept):
        slot.entry["valid_until"] = until
        slot.entry["note"] = f"replaced by component {comp.name}; accepted until {until}"
        out[-1] = Prediction(
            out[-1].value, out[-1].artefact, f"{out[-1].replaces} (old value valid until {until})"
        )
    if unchecked:
        out.append(
            Prediction(
                f"{unchecked} record(s) of {comp.name} on PCRs other than 4 and 11 not checked",
                comp.name,
                "nothing (no base log to hold them against)",
            )
        )
    if not out and not comp.records(_PCR11):
        out.append(Prediction(f"component {comp.name} changes nothing", comp.name, "nothing"))
    return out


def _first(digests: Any) -> str:
    bank, value = next(iter(digests.items()))
    return f"{bank}:{value.hex()}"


def _pcr11_banks(base: ReplayedLog | Policy, policy: Policy) -> tuple[str, ...]:
    banks = [b for b, p in (policy.pcrs or {}).items() if _PCR11 in p]
    if not banks and isinstance(base, ReplayedLog):
        banks = sorted({b for e in base.events if e.pcr == _PCR11 for b in e.digests})
    return tuple(banks)


def _uki_values(
    art: Artefact,
    base: ReplayedLog | Policy,
    policy: Policy,
    phases: Sequence[str],
    predictions: list[Prediction],
) -> list[Pcr11Value]:
    banks = _pcr11_banks(base, policy)
    values, what = uki_pcr11(art.image, art.name, banks=banks or ("sha256",), phases=phases)
    pe = PeImage.parse(art.image)
    sections = {s.name: s for s in pe.sections}
    if b".pcrsig" in sections:
        key = sections.get(b".pcrpkey")
        matched = check_pcrsig(
            pe.section_data(sections[b".pcrsig"]),
            None if key is None else pe.section_data(key),
            values,
            art.name,
        )
        what += f"; its .pcrsig's {matched} signed polic{'y' if matched == 1 else 'ies'} match"
        values = tuple(dataclasses.replace(v, source=what) for v in values)
    if not banks:
        predictions.append(
            Prediction(
                f"PCR 11 of {what} not pinned",
                art.name,
                "nothing: the base has no PCR 11 value to keep accepted (pin it with"
                " --pcr11-json or from a base that has one)",
            )
        )
        return []
    return list(values)


def _pcrlock_values(
    components: Sequence[Component], base: ReplayedLog | Policy, policy: Policy
) -> list[Pcr11Value]:
    if not any(c.records(_PCR11) for c in components):
        return []
    banks = _pcr11_banks(base, policy) or ("sha256",)
    out = []
    for bank in banks:
        for value, label in pcr_states(components, _PCR11, bank):
            out.append(Pcr11Value(bank, label, value, ".pcrlock components"))
    return out


def _base_pcr11(
    base: ReplayedLog | Policy, policy: Policy, phases: Sequence[str]
) -> dict[tuple[str, bytes], str]:
    """The base's PCR 11 values, each with what it is."""
    out: dict[tuple[str, bytes], str] = {}
    for bank, pcrs in (policy.pcrs or {}).items():
        for v in pcrs.get(_PCR11, ()):
            out[(bank, v)] = "a base policy value"
    if isinstance(base, ReplayedLog):
        events = [e for e in base.events if e.pcr == _PCR11]
        for bank in sorted({b for e in events for b in e.digests}):
            value = bytes(hashlib.new(bank).digest_size)
            for e in events:
                value = hashlib.new(bank, value + e.digests[bank]).digest()
            first, last = events[0].index, events[-1].index
            for phase in phases:
                v = value
                for word in phase.split(":") if phase else ():
                    v = hashlib.new(bank, v + hashlib.new(bank, word.encode()).digest()).digest()
                out[(bank, v)] = f"events {first}-{last} (PCR 11), phase {phase or '(stub only)'}"
    return out


def _phase_text(phase: str) -> str:
    if phase.startswith("after "):
        return phase  # (.pcrlock: the components extended so far)
    return f"phase {phase or '(stub only)'}"


def _predict_pcr11(
    values: Sequence[Pcr11Value],
    base: ReplayedLog | Policy,
    policy: Policy,
    doc: dict[str, Any],
    until: str,
    phases: Sequence[str],
) -> list[Prediction]:
    """The values as windowed literal PCR 11 values; the base's own get ``valid_until``."""
    old = _base_pcr11(base, policy, phases)
    pcrs: dict[str, dict[str, list[Any]]] = doc.setdefault("pcrs", {})
    new_keys = {(v.bank, v.value) for v in values}
    replaced = ", ".join(sorted({w.split(", phase")[0] for w in old.values()})) or (
        "nothing (the base pinned no PCR 11 value: a machine quoting another PCR 11 fails"
        " pcrs.<bank>.11)"
    )
    for (bank, value), what in old.items():
        if (bank, value) in new_keys:
            continue
        entry = {"value": value.hex(), "valid_until": until,
                 "note": f"PCR 11 of the base ({what}); accepted until {until}"}  # fmt: skip
        items = [i for i in pcrs.setdefault(bank, {}).get(_PCR11_KEY, [])
                 if (i["value"] if isinstance(i, dict) else i) != value.hex()]  # fmt: skip
        pcrs[bank][_PCR11_KEY] = [*items, entry]
    out = []
    for v in values:
        items = pcrs.setdefault(v.bank, {}).setdefault(_PCR11_KEY, [])
        if any((i["value"] if isinstance(i, dict) else i) == v.value.hex() for i in items):
            if (v.bank, v.value) not in old:
                continue
            out.append(Prediction(f"PCR 11 {v.bank}:{v.value.hex()} already allowed",
                                  v.describe(), "nothing"))  # fmt: skip
            continue
        items.append({"value": v.value.hex(), "note": f"predicted: {v.describe()}"})
        out.append(
            Prediction(
                f"PCR 11 {v.bank}:{v.value.hex()} ({_phase_text(v.phase)})",
                v.source,
                f"{replaced}" + (f" (old values valid until {until})" if old else ""),
            )
        )
    return out


def _cmdline_events(log: ReplayedLog) -> str:
    found = [
        f"event {e.index} (PCR {e.pcr})"
        for e in log.events_of_type(EventType.EV_IPL)
        if e.pcr in (8, 9, 12)
        and getattr(e.decoded, "kind", None) in ("kernel_cmdline", "load_options")
    ]
    return ", ".join(found) or "no logged command line"
