"""Policy rules over replayed, digest-checked events.

A rule is a small object with one method, ``check(evidence)``, that returns
nothing or raises :class:`PolicyViolationError` carrying one or more :class:`Failure`
(rule id, AR4SI claim, the event, expected and actual). Rules compose with
:class:`AllOf` (every child runs; all failures are collected, not just the
first) and :class:`AnyOf`. An empty AllOf/AnyOf is a ConfigError at
construction, never a silent pass. The rules here also list their failures
through ``failures(evidence)`` (``check`` raises what it returns), which AllOf
reads: a failing child then costs no exception and no message nobody reads.

What a rule may trust (TCG PC Client PFP v1.05 §10; TPM-NOTES "Event logs"):

1. Only events in a PCR the quote covered (``BootEvidence.covered``): replay
   proves digests only there.
2. Decoded data only where ``data_verified`` is True (the data hashes to the
   digest). An event whose data is proven false (``data_verified`` False) is
   reported as a failure whenever a rule would read it: a forged event must
   never satisfy a rule, nor hide one.
3. Image digests (boot applications) are the digests themselves; their
   decoded device path is only a description.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol, TypeVar

from verifier.eventlog import (
    EfiBoolean,
    EfiVariable,
    IplString,
    ReplayedEvent,
    ReplayedLog,
    SignatureDatabase,
)
from verifier.eventlog import Text as TextEvent
from verifier.eventlog.decode import IPL_BYTE_PREFIXES, ipl_kind
from verifier.eventlog.efivars import variable_name
from verifier.eventlog.events import EventType
from verifier.policy.schema import (
    BootApplication,
    CmdlinePattern,
    DbPolicy,
    DbxPolicy,
    PcrWindow,
    Policy,
    SbatPolicy,
    format_time,
)
from verifier.sbat import SbatLevel
from vtpm_core.errors import ConfigError, ParseError, VerificationError

__all__ = [
    "AllOf",
    "AnyOf",
    "BootApplicationsRule",
    "BootEvidence",
    "DbRule",
    "DbxRule",
    "EventRef",
    "Failure",
    "KernelCmdlineRule",
    "PcrValueRule",
    "PolicyViolationError",
    "Rule",
    "SbatRule",
    "ScrtmVersionRule",
    "SecureBootRule",
    "rules_for",
]

CONFIGURATION = "configuration"
EXECUTABLES = "executables"

_CMDLINE_PCRS = frozenset({8, 9, 12})
_CMDLINE_KINDS = frozenset({"kernel_cmdline", "load_options"})
_CMDLINE_LABELS = tuple(p for p, kind in IPL_BYTE_PREFIXES if kind == "kernel_cmdline")


@dataclass(frozen=True, slots=True)
class EventRef:
    index: int
    pcr: int
    type_name: str

    @classmethod
    def of(cls, event: ReplayedEvent) -> EventRef:
        return cls(event.index, event.pcr, event.type_name)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "pcr": self.pcr, "type": self.type_name}

    def __str__(self) -> str:
        return f"event {self.index} ({self.type_name}, PCR {self.pcr})"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed expectation: which rule, which claim it bears on, where, what."""

    rule: str
    claim: str
    message: str
    expected: str
    actual: str
    event: EventRef | None = None

    def __str__(self) -> str:
        where = f"{self.event}: " if self.event is not None else ""
        return f"{self.rule}: {where}{self.message} (expected {self.expected}, got {self.actual})"

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "claim": self.claim,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
            "event": None if self.event is None else self.event.to_json(),
        }


class PolicyViolationError(VerificationError):
    """Raised by a rule; carries every failure it found."""

    def __init__(self, failures: tuple[Failure, ...]) -> None:
        self.failures = failures
        super().__init__("policy", "; ".join(str(f) for f in failures))


class BootEvidence:
    """What rules read: replayed events plus the PCR values a quote proved.

    ``covered``: bank -> PCR indices whose replay matched the quote; ``pcrs``:
    the quoted values (bank -> index -> value). Build it only from a
    ReplayedLog (``log.verify(pcrs)``), or its events, and a verified quote.
    Immutable (``covered`` is read once, when it is built). From a ReplayedLog,
    events are built only as rules read them. ``now``: the appraisal time, against
    which ``valid_until`` is enforced (given by the caller, e.g. a re-appraisal's
    time; the wall clock when None).
    """

    __slots__ = (
        "_by_index",
        "_by_type",
        "_covered",
        "_log",
        "_variables",
        "covered",
        "now",
        "pcrs",
    )

    now: datetime
    pcrs: Mapping[str, Mapping[int, bytes]]
    covered: Mapping[str, frozenset[int]]
    _log: ReplayedLog | None
    _by_type: dict[int, tuple[ReplayedEvent, ...]]
    _by_index: dict[int, ReplayedEvent]
    _variables: dict[str | None, list[int]]
    _covered: frozenset[int]

    def __init__(
        self,
        events: ReplayedLog | tuple[ReplayedEvent, ...],
        pcrs: Mapping[str, Mapping[int, bytes]],
        covered: Mapping[str, frozenset[int]],
        now: datetime | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "now", datetime.now(UTC) if now is None else now)
        setattr_(self, "pcrs", pcrs)
        setattr_(self, "covered", covered)
        setattr_(self, "_covered", frozenset().union(*covered.values()))
        if isinstance(events, ReplayedLog):
            setattr_(self, "_log", events)
            setattr_(self, "_by_type", {})
            setattr_(self, "_by_index", {})
        else:
            setattr_(self, "_log", None)
            by_type: dict[int, list[ReplayedEvent]] = {}
            for e in events:
                by_type.setdefault(e.event_type, []).append(e)
            setattr_(self, "_by_type", {t: tuple(v) for t, v in by_type.items()})
            setattr_(self, "_by_index", {e.index: e for e in events})
        setattr_(self, "_variables", {})

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BootEvidence is immutable (cannot set {name})")

    @property
    def events(self) -> tuple[ReplayedEvent, ...]:
        if self._log is not None:
            return self._log.events
        return tuple(self._by_index.values())

    def of_type(self, event_type: int) -> tuple[ReplayedEvent, ...]:
        if self._log is not None:
            return self._log.events_of_type(event_type)
        return self._by_type.get(event_type, ())

    def unverified_of_type(self, event_type: int) -> list[tuple[int, int, bytes]]:
        """(index, PCR, data) of the events of ``event_type``, NOTHING about the data
        proven: to pass over events on sight (a GRUB command is no kernel command line)
        before reading the others through :meth:`event`."""
        if self._log is not None:
            return self._log.unverified_events(event_type)
        return [(e.index, e.pcr, e.untrusted_data) for e in self._by_type.get(event_type, ())]

    def variable_events(self, name: str) -> tuple[ReplayedEvent, ...]:
        """The EV_EFI_VARIABLE_DRIVER_CONFIG events whose raw data names variable ``name``
        (NOTHING about them proven: read ``data_verified``). The names are read once."""
        by_name = self._variables
        if not by_name:
            by_name[None] = []  # (marks the index as built)
            for index, _, data in self.unverified_of_type(EventType.EV_EFI_VARIABLE_DRIVER_CONFIG):
                key = variable_name(data)
                if key in by_name:
                    by_name[key].append(index)
                else:
                    by_name[key] = [index]
        return tuple(map(self.event, by_name.get(name, ())))

    def event(self, index: int) -> ReplayedEvent:
        """Event ``index`` of the log, as replayed (what its digest proves)."""
        if self._log is not None:
            return self._log.event(index)
        return self._by_index[index]

    @property
    def data_mismatches(self) -> tuple[ReplayedEvent, ...]:
        """The events whose data is proven NOT to be what was measured."""
        if self._log is not None:
            return self._log.data_mismatches
        return tuple(e for e in self._by_index.values() if e.data_verified is False)

    def is_covered(self, pcr: int) -> bool:
        return pcr in self._covered

    def banks_covering(self, pcr: int) -> tuple[str, ...]:
        return tuple([b for b, s in self.covered.items() if pcr in s])


class Rule(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def claim(self) -> str: ...

    def check(self, evidence: BootEvidence) -> None:
        """Return if satisfied; raise PolicyViolationError with every failure otherwise."""


class _Collects:
    """A rule that lists its failures; ``check`` raises them (the :class:`Rule` protocol).

    :class:`AllOf` reads ``failures`` of such children, so a failing child costs no
    exception raised and caught, and no message joined that nobody reads.
    """

    __slots__ = ()

    def failures(self, evidence: BootEvidence) -> Sequence[Failure]:
        """Every failure, in order; empty if satisfied."""
        raise NotImplementedError

    def check(self, evidence: BootEvidence) -> None:
        failures = self.failures(evidence)
        if failures:
            raise PolicyViolationError(tuple(failures))


# -- composition ---------------------------------------------------------------------------


class AllOf(_Collects):
    """Every child must pass; every child runs and all failures are reported."""

    __slots__ = ("children", "claim", "id")

    def __init__(self, children: tuple[Rule, ...], rule_id: str = "all-of") -> None:
        if not children:
            raise ConfigError(f"{rule_id}: an empty all-of would pass anything")
        self.children = children
        self.id = rule_id
        self.claim = children[0].claim

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        failures: list[Failure] = []
        for child in self.children:
            if isinstance(child, _Collects):
                failures += child.failures(evidence)
                continue
            try:
                child.check(evidence)
            except PolicyViolationError as exc:
                failures.extend(exc.failures)
        return failures


class AnyOf:
    """At least one child must pass; if none does, every child's failures are reported."""

    __slots__ = ("children", "claim", "id")

    def __init__(self, children: tuple[Rule, ...], rule_id: str = "any-of") -> None:
        if not children:
            raise ConfigError(f"{rule_id}: an empty any-of can never pass")
        self.children = children
        self.id = rule_id
        self.claim = children[0].claim

    def check(self, evidence: BootEvidence) -> None:
        failures: list[Failure] = []
        for child in self.children:
            try:
                child.check(evidence)
                return
            except PolicyViolationError as exc:
                failures.extend(exc.failures)
        raise PolicyViolationError(tuple(failures))


# -- helpers -------------------------------------------------------------------------------


class _Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def claim(self) -> str: ...


def _fail(
    rule: _Named, message: str, expected: str, actual: str, event: EventRef | None = None
) -> Failure:
    return Failure(rule.id, rule.claim, message, expected, actual, event)


def _expired(
    rule: _Named,
    now: datetime,
    values: Sequence[BootApplication | CmdlinePattern],
    event: EventRef,
) -> Failure:
    """The event matches only values whose window has closed: which, and when."""
    last = max(v.valid_until for v in values if v.valid_until is not None)
    names = ", ".join(
        f"{_value_name(v)} (valid until {format_time(v.valid_until)})"
        for v in values
        if v.valid_until is not None
    )
    return Failure(
        f"{rule.id}.valid_until",
        rule.claim,
        f"the allowed value expired: {names}",
        f"a value valid at {format_time(now)}",
        f"expired at {format_time(last)}",
        event,
    )


def _value_name(v: BootApplication | CmdlinePattern) -> str:
    if isinstance(v, CmdlinePattern):
        return f"command line {v.describe()}"
    digest = ", ".join(f"{b}:{d.hex()}" for b, d in v.digests.items())
    return f"boot application {v.name or '?'} {digest}"


def _not_quoted(rule: _Named, message: str, e: ReplayedEvent) -> Failure:
    return _fail(rule, message, f"PCR {e.pcr} quoted", "not quoted", EventRef.of(e))


_D = TypeVar("_D")


def _trusted(
    rule: _Named,
    evidence: BootEvidence,
    e: ReplayedEvent,
    kind: type[_D],
    what: tuple[str, str],
    failures: list[Failure],
) -> _D | None:
    """``e``'s decoded data if the quote covers its PCR and the data hashes to its digest;
    else None, with a failure appended (``what``: the uncovered and the mismatch message)."""
    if not evidence.is_covered(e.pcr):
        failures.append(_not_quoted(rule, what[0], e))
        return None
    decoded = e.untrusted_decoded if e.data_verified is True else None  # (= e.decoded then)
    if not isinstance(decoded, kind):
        failures.append(
            _fail(rule, what[1], "data hashing to the digest", "mismatch", EventRef.of(e))
        )
        return None
    return decoded


def _variable_untrusted(name: str) -> tuple[str, str]:
    return (
        f"{name} is in a PCR the quote does not cover",
        f"{name} event data does not match its digest (forged?)",
    )


_VARIABLE_UNTRUSTED = {name: _variable_untrusted(name) for name in ("SecureBoot", "db", "dbx")}


def _variables(
    evidence: BootEvidence, name: str, rule: _Named
) -> tuple[list[tuple[ReplayedEvent, EfiVariable]], list[Failure]]:
    """EV_EFI_VARIABLE_DRIVER_CONFIG events for ``name``: the trusted ones, and failures
    for those that may not be trusted (uncovered PCR, data not matching digest)."""
    good: list[tuple[ReplayedEvent, EfiVariable]] = []
    bad: list[Failure] = []
    what = _VARIABLE_UNTRUSTED.get(name) or _variable_untrusted(name)
    for e in evidence.variable_events(name):  # (other variables are not decoded at all)
        var = e.untrusted_decoded
        if not isinstance(var, EfiVariable) or var.name != name:
            continue
        trusted = _trusted(rule, evidence, e, EfiVariable, what, bad)
        if trusted is not None:
            good.append((e, trusted))
    return good, bad


_SHA256_SIZE = 32


class _References:
    """A db/dbx variable's entries, and ``in``: does a reference name one? A reference is
    the entry itself (hash entries) or the SHA-256 of it (certificates). Entries are
    hashed in order only until the reference is found (a learned policy's references
    are the certificates' hashes). Public data: no constant-time compare needed."""

    __slots__ = ("_entries", "_hashed", "_hashes", "_raw", "count")

    def __init__(self, var: EfiVariable) -> None:
        value = var.value
        entries = (
            [d for lst in value.lists for d in lst.entry_data()]
            if isinstance(value, SignatureDatabase)
            else []
        )
        self.count = len(entries)
        self._entries = entries
        # a few certificates: compared by ==, which looks at the length first (a set
        # would hash every 1.5 KB certificate); many hash entries (dbx): a set
        self._raw: list[bytes] | frozenset[bytes] = (
            entries if len(entries) <= 8 else frozenset(entries)
        )
        self._hashes: set[bytes] = set()
        self._hashed = 0

    def __contains__(self, ref: bytes) -> bool:
        if ref in self._raw or ref in self._hashes:
            return True
        if len(ref) != _SHA256_SIZE:
            return False
        entries, hashes = self._entries, self._hashes
        while self._hashed < len(entries):
            digest = hashlib.sha256(entries[self._hashed]).digest()
            self._hashed += 1
            hashes.add(digest)
            if digest == ref:
                return True
        return False


def _entry_count(var: EfiVariable) -> int:
    if not isinstance(var.value, SignatureDatabase):
        return 0
    return sum(lst.count for lst in var.value.lists)


# -- the rules -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecureBootRule(_Collects):
    """The SecureBoot variable measured into PCR 7 (PFP §3.3.4.8) has the expected value."""

    expected: bool
    id: str = "secure_boot"
    claim: str = CONFIGURATION

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        good, failures = _variables(evidence, "SecureBoot", self)
        want = "enabled" if self.expected else "disabled"
        for e, var in good:
            on = isinstance(var.value, EfiBoolean) and var.value.enabled
            if on != self.expected:
                failures.append(
                    _fail(
                        self,
                        "secure boot state",
                        want,
                        "enabled" if on else f"disabled (value {var.data.hex() or 'empty'})",
                        EventRef.of(e),
                    )
                )
        if not good and not failures:
            failures.append(_fail(self, "no SecureBoot variable was measured", want, "absent"))
        return failures


@dataclass(frozen=True, slots=True)
class BootApplicationsRule(_Collects):
    """Every EV_EFI_BOOT_SERVICES_APPLICATION in PCR 4 has an allowed Authenticode digest."""

    allowed: tuple[BootApplication, ...]
    id: str = "boot_applications"
    claim: str = EXECUTABLES

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        failures: list[Failure] = []
        seen = 0
        allowed = self.allowed
        for e in evidence.of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION):
            seen += 1
            banks = evidence.banks_covering(e.pcr)
            if not banks:
                failures.append(
                    _not_quoted(self, "boot application in a PCR the quote does not cover", e)
                )
                continue
            digests = e.digests
            expired: list[BootApplication] = []
            for app in allowed:
                if self._allowed(app, digests, banks):
                    if not app.expired(evidence.now):
                        break
                    expired.append(app)
            else:
                if expired:
                    failures.append(_expired(self, evidence.now, expired, EventRef.of(e)))
                    continue
                bank = "sha256" if "sha256" in digests else banks[0]
                path = getattr(e.untrusted_decoded, "path_text", None)
                names = ", ".join(a.name or "?" for a in allowed) or "none"
                failures.append(
                    _fail(
                        self,
                        "boot application digest not allowed",
                        f"one of {len(allowed)} allowed digests ({names})",
                        f"{bank}:{digests[bank].hex()}" + (f" ({path})" if path else ""),
                        EventRef.of(e),
                    )
                )
        if not seen:
            failures.append(
                _fail(
                    self,
                    "no boot application was measured",
                    "at least one allowed boot application",
                    "none",
                )
            )
        return failures

    @staticmethod
    def _allowed(
        app: BootApplication, digests: Mapping[str, bytes], banks: tuple[str, ...]
    ) -> bool:
        # compare only in banks the quote proved for this PCR
        hit = False
        for bank, want in app.digests.items():
            if bank not in banks or bank not in digests:
                continue
            if not hmac.compare_digest(digests[bank], want):
                return False
            hit = True
        return hit


_CMDLINE_UNTRUSTED = (
    "kernel command line in a PCR the quote does not cover",
    "kernel command line does not match its digest",
)
_SCRTM_UNTRUSTED = (
    "S-CRTM version in a PCR the quote does not cover",
    "S-CRTM version does not match its digest",
)


def _never_cmdline(data: bytes) -> bool:
    """True for EV_IPL data whose kind is neither kernel_cmdline nor load_options, on
    sight: ASCII (a non-zero second byte; UTF-16 load options have a zero one) that
    starts with no command line label (GRUB's commands, file names)."""
    return len(data) >= 2 and data[1] != 0 and not data.startswith(_CMDLINE_LABELS)


def _cmdline_candidates(rows: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The EV_IPL rows (index, PCR, data) in PCR 8/9/12 that are not :func:`_never_cmdline`
    (the same test written out: it runs on every GRUB command of a boot)."""
    pcrs, labels = _CMDLINE_PCRS, _CMDLINE_LABELS
    return [
        (index, pcr, data)
        for index, pcr, data in rows
        if pcr in pcrs and (len(data) < 2 or data[1] == 0 or data.startswith(labels))
    ]


@dataclass(frozen=True, slots=True)
class KernelCmdlineRule(_Collects):
    """Every measured kernel command line (EV_IPL in PCR 8/9/12) matches an allowed one,
    and at least one was measured."""

    allowed: tuple[CmdlinePattern, ...]
    id: str = "kernel_cmdline"
    claim: str = CONFIGURATION

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        failures: list[Failure] = []
        good = 0
        rows = evidence.unverified_of_type(EventType.EV_IPL)
        for index, _, data in _cmdline_candidates(rows):
            if ipl_kind(data) not in _CMDLINE_KINDS:
                continue  # (not decoded at all)
            e = evidence.event(index)
            ipl = e.untrusted_decoded
            if not isinstance(ipl, IplString) or ipl.kind not in _CMDLINE_KINDS:
                continue
            trusted = _trusted(self, evidence, e, IplString, _CMDLINE_UNTRUSTED, failures)
            if trusted is None:
                continue
            good += 1
            text = trusted.value.rstrip("\x00")
            matching = [c for c in self.allowed if c.matches(text)]
            if matching and all(c.expired(evidence.now) for c in matching):
                failures.append(_expired(self, evidence.now, matching, EventRef.of(e)))
            elif not matching:
                failures.append(
                    _fail(
                        self,
                        "kernel command line not allowed",
                        self._expected(),
                        repr(text),
                        EventRef.of(e),
                    )
                )
        if not good and not failures:
            failures.append(
                _fail(self, "no kernel command line was measured", self._expected(), "none")
            )
        return failures

    def _expected(self) -> str:
        return " or ".join(c.describe() for c in self.allowed)


@dataclass(frozen=True, slots=True)
class ScrtmVersionRule(_Collects):
    """EV_S_CRTM_VERSION in PCR 0 (PFP §10.4.1) names an allowed firmware version."""

    allowed: tuple[str, ...]
    id: str = "firmware.scrtm_version"
    claim: str = EXECUTABLES

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        failures: list[Failure] = []
        good = 0
        for e in evidence.of_type(EventType.EV_S_CRTM_VERSION):
            text = _trusted(self, evidence, e, TextEvent, _SCRTM_UNTRUSTED, failures)
            if text is None:
                continue
            good += 1
            version = text.text.rstrip("\x00")
            if version not in self.allowed:
                failures.append(
                    _fail(
                        self,
                        "S-CRTM version not allowed",
                        self._expected(),
                        repr(version),
                        EventRef.of(e),
                    )
                )
        if not good and not failures:
            failures.append(_fail(self, "no S-CRTM version was measured", self._expected(), "none"))
        return failures

    def _expected(self) -> str:
        return " or ".join(repr(v) for v in self.allowed)


@dataclass(frozen=True, slots=True)
class PcrValueRule(_Collects):
    """A quoted PCR value is one of the allowed literals, and (issue 20) a value with a
    window is accepted only until its ``valid_until``."""

    bank: str
    index: int
    allowed: tuple[bytes, ...]
    id: str
    claim: str = CONFIGURATION
    windows: Mapping[bytes, PcrWindow] = field(default_factory=lambda: MappingProxyType({}))

    def failures(self, evidence: BootEvidence) -> tuple[Failure, ...]:
        values = evidence.pcrs.get(self.bank)
        value = None if values is None else values.get(self.index)
        if value is None:
            return (
                _fail(
                    self,
                    f"{self.bank} PCR {self.index} was not quoted",
                    self._expected(),
                    "not quoted",
                ),
            )
        expired: list[tuple[bytes, PcrWindow]] = []
        for allowed in self.allowed:
            if hmac.compare_digest(value, allowed):
                window = self.windows.get(allowed)
                if window is None or not window.expired(evidence.now):
                    return ()
                expired.append((allowed, window))
        if expired:
            last = max(w.valid_until for _, w in expired if w.valid_until is not None)
            names = ", ".join(
                f"{self.bank} PCR {self.index} {v.hex()}"
                + (f" ({w.note})" if w.note else "")
                + f" (valid until {format_time(w.valid_until)})"
                for v, w in expired
                if w.valid_until is not None
            )
            return (
                Failure(
                    f"{self.id}.valid_until",
                    self.claim,
                    f"the allowed value expired: {names}",
                    f"a value valid at {format_time(evidence.now)}",
                    f"expired at {format_time(last)}",
                ),
            )
        return (_fail(self, f"{self.bank} PCR {self.index} value", self._expected(), value.hex()),)

    def _expected(self) -> str:
        return " or ".join(v.hex() for v in self.allowed)


@dataclass(frozen=True, slots=True)
class DbRule(_Collects):
    """The measured db (PCR 7) holds every required entry."""

    policy: DbPolicy
    id: str = "db.require"
    claim: str = CONFIGURATION

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        good, failures = _variables(evidence, "db", self)
        if not good and not failures:
            failures.append(_fail(self, "db was not measured", "db", "absent"))
        if good:
            e, var = good[-1]
            refs = _References(var)
            for want in self.policy.require:
                if want not in refs:
                    failures.append(
                        _fail(
                            self,
                            "required db entry missing",
                            want.hex(),
                            f"{refs.count} entries without it",
                            EventRef.of(e),
                        )
                    )
        return failures


@dataclass(frozen=True, slots=True)
class DbxRule(_Collects):
    """The measured dbx (PCR 7) holds none of the ``forbid`` entries (e.g. the hash of a
    known-good shim you want to stay bootable), at least ``min_entries`` revocations and
    every ``require`` entry (dbx currency: the entries a dbx update added)."""

    policy: DbxPolicy
    id: str = "dbx"
    claim: str = CONFIGURATION

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        good, failures = _variables(evidence, "dbx", self)
        if not good and not failures:
            failures.append(_fail(self, "dbx was not measured", "dbx", "absent"))
        if good:
            e, var = good[-1]
            if self.policy.forbid:
                refs = _References(var)
                count = refs.count
                for bad in self.policy.forbid:
                    if bad in refs:
                        failures.append(
                            Failure(
                                f"{self.id}.forbid",
                                self.claim,
                                "forbidden entry present in dbx",
                                f"dbx without {bad.hex()}",
                                "present",
                                EventRef.of(e),
                            )
                        )
            else:
                count = _entry_count(var)
            if self.policy.require:
                # dbx currency (issue 20): every entry of the update is in the measured dbx
                have = _References(var)
                missing = [ref for ref in self.policy.require if ref not in have]
                if missing:
                    failures.append(
                        Failure(
                            f"{self.id}.require",
                            self.claim,
                            f"dbx lacks {len(missing)} of the {len(self.policy.require)} "
                            "entries the policy requires (an older dbx)",
                            f"dbx with {missing[0].hex()}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                            "absent",
                            EventRef.of(e),
                        )
                    )
            if self.policy.min_entries is not None and count < self.policy.min_entries:
                failures.append(
                    Failure(
                        f"{self.id}.min_entries",
                        self.claim,
                        "dbx has too few entries",
                        f">= {self.policy.min_entries}",
                        str(count),
                        EventRef.of(e),
                    )
                )
        return failures


_SBAT_UNTRUSTED = (
    "SbatLevel is in a PCR the quote does not cover",
    "SbatLevel event data does not match its digest (forged?)",
)


@dataclass(frozen=True, slots=True)
class SbatRule(_Collects):
    """SBAT currency (issue 20): the SbatLevel shim measured into PCR 7
    (EV_EFI_VARIABLE_AUTHORITY "SbatLevel", rhboot/shim SBAT.md) holds at least every
    generation of ``min_level``; a machine whose level is behind still lets binaries an
    SBAT revocation names boot. No SbatLevel measured (no shim) fails too."""

    policy: SbatPolicy
    id: str = "sbat.min_level"
    claim: str = EXECUTABLES

    def failures(self, evidence: BootEvidence) -> list[Failure]:
        failures: list[Failure] = []
        want = ", ".join(f"{c} {g}" for c, g in self.policy.min_level.items())
        expected = f"an SbatLevel with {want}"
        found = 0
        for e in evidence.of_type(EventType.EV_EFI_VARIABLE_AUTHORITY):
            var = e.untrusted_decoded
            if not isinstance(var, EfiVariable) or var.name != "SbatLevel":
                continue
            trusted = _trusted(self, evidence, e, EfiVariable, _SBAT_UNTRUSTED, failures)
            if trusted is None:
                continue
            found += 1
            try:
                level = SbatLevel.parse(trusted.data, f"event {e.index}")
            except ParseError as exc:
                where = EventRef.of(e)
                failures.append(_fail(self, "unreadable SbatLevel", expected, str(exc), where))
                continue
            behind = [
                f"{c} {level.generations.get(c, 0)} < {g}"
                for c, g in self.policy.min_level.items()
                if level.generations.get(c, 0) < g
            ]
            if behind:
                failures.append(
                    _fail(
                        self,
                        f"the measured SbatLevel {level.datestamp} is behind (an older SBAT level)",
                        expected,
                        ", ".join(behind),
                        EventRef.of(e),
                    )
                )
        if not found and not failures:
            failures.append(_fail(self, "no SbatLevel was measured", expected, "absent"))
        return failures


def rules_for(policy: Policy) -> AllOf:
    """The policy as one all-of rule. Raises ConfigError for a policy with no rules."""
    rules: list[Rule] = []
    if policy.secure_boot is not None:
        rules.append(SecureBootRule(policy.secure_boot))
    if policy.firmware is not None:
        if policy.firmware.scrtm_versions is not None:
            rules.append(ScrtmVersionRule(policy.firmware.scrtm_versions))
        if policy.firmware.pcr0 is not None:
            for bank, values in policy.firmware.pcr0.items():
                rules.append(PcrValueRule(bank, 0, values, "firmware.pcr0", EXECUTABLES))
    if policy.boot_applications is not None:
        rules.append(BootApplicationsRule(policy.boot_applications))
    if policy.kernel_cmdlines is not None:
        rules.append(KernelCmdlineRule(policy.kernel_cmdlines))
    if policy.db is not None:
        rules.append(DbRule(policy.db))
    if policy.dbx is not None:
        rules.append(DbxRule(policy.dbx))
    if policy.sbat is not None:
        rules.append(SbatRule(policy.sbat))
    if policy.pcrs is not None:
        for bank, pcrs in policy.pcrs.items():
            for index, values in pcrs.items():
                claim = EXECUTABLES if index in (0, 2, 4, 11) else CONFIGURATION
                windows = {
                    v: policy.pcr_windows[(bank, index, v)]
                    for v in values
                    if (bank, index, v) in policy.pcr_windows
                }
                rule_id = f"pcrs.{bank}.{index}"
                rules.append(
                    PcrValueRule(bank, index, values, rule_id, claim, MappingProxyType(windows))
                )
    return AllOf(tuple(rules), "policy")
