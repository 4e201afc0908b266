"""Replay of an event log to PCR values, and verification against quoted PCRs.

Spec: TCG PC Client Platform Firmware Profile (PFP) v1.05 §10.4.5.3
(StartupLocality: PCR 0 starts at the locality TPM2_Startup came from, 3,
or 4 after an H-CRTM), §10.4.1 (EV_NO_ACTION "is not extended into any
PCR"; EV_EFI_HCRTM_EVENT, the H-CRTM's extend, which also starts PCR 0 at
4: see :func:`~verifier.eventlog.parse.pcr0_locality`); TPM 2.0 Part 1
§17.3 (extend: PCR := H(PCR || digest)).

Trust: :func:`verify_log` is the only way to get a :class:`ReplayedLog`.
It proves every event's digests against the quoted PCR values it covers;
it does not prove event data — each :class:`ReplayedEvent` says whether its
data hashes to its digest (``data_verified``) and hides decoded data that
does not (``decoded`` is None then; ``untrusted_decoded`` keeps it).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from verifier.eventlog._frozen import Immutable
from verifier.eventlog._native import extend_bank
from verifier.eventlog.algorithms import HashAlgorithm
from verifier.eventlog.decode import (
    PENDING,
    CheckedEvents,
    Decoded,
    LazyDecode,
    Pending,
    check_all,
    decode_deferred,
)
from verifier.eventlog.events import EventType, type_name
from verifier.eventlog.parse import first_pcr0_hcrtm, pcr0_locality
from verifier.eventlog.quirks import AppliedQuirk, summarize_applied
from vtpm_core.errors import VerificationError

if TYPE_CHECKING:
    from verifier.eventlog.parse import Event, EventLog, SpecIdEvent, StartupLocality

__all__ = [
    "FORGED_EVENT",
    "INCOMPLETE",
    "PcrBanks",
    "ReplayMismatchError",
    "ReplayedEvent",
    "ReplayedLog",
    "replay_events",
    "replay_log",
    "verify_log",
]

INCOMPLETE = "eventlog.incomplete"
"""Finding: replay falls short of the quote and every event present is self-consistent."""
FORGED_EVENT = "eventlog.forged-event"
"""Finding: replay falls short of the quote and an event's data does not match its digest."""

PcrBanks = dict[str, dict[int, bytes]]
"""``{bank: {pcr_index: value}}``, e.g. ``{"sha256": {0: b"..."}}``."""


def replay_events(
    events: tuple[Event, ...],
    algorithms: tuple[HashAlgorithm, ...],
    startup_locality: StartupLocality | None,
) -> PcrBanks:
    """PCR values per computable bank.

    Included: every PCR with at least one extend, plus PCR 0 whenever the
    log has a StartupLocality event (it states PCR 0's value even if nothing
    is extended after it). PCR 0 starts at the locality
    :func:`~verifier.eventlog.parse.pcr0_locality` gives: 4 when its first
    extend is an EV_EFI_HCRTM_EVENT, else the StartupLocality event's, else
    zero. PCRs the log never touches are absent (their value is whatever the
    platform reset them to, which the log cannot tell).
    """
    pcrs = [e.pcr for e in events]
    types = [e.event_type for e in events]
    return _replay(
        pcrs,
        types,
        {a.name: [e.digests.get(a.name) for e in events] for a in algorithms},
        algorithms,
        pcr0_locality(startup_locality, first_pcr0_hcrtm(pcrs, types)),
    )


def replay_log(log: EventLog) -> PcrBanks:
    r = log.records
    return _replay(
        r.pcrs, r.types, dict(zip(r.names, r.digests, strict=True)), log.algorithms,
        log.pcr0_locality,
    )  # fmt: skip


def _replay(
    pcrs: list[int],
    types: list[int],
    digests: Mapping[str, Sequence[bytes | None]],
    algorithms: tuple[HashAlgorithm, ...],
    locality: int | None,
) -> PcrBanks:
    """:func:`replay_events` over the events' PCRs, types and, per bank, digests, PCR 0
    starting at 00..00 || ``locality`` when it is not None: in C (``_native.extend_bank``,
    OpenSSL's hashes), or with hashlib for an algorithm this OpenSSL cannot fetch by
    name."""
    out: PcrBanks = {}
    no_action = EventType.EV_NO_ACTION  # PFP §10.4.1: never extended
    for alg in algorithms:
        column = digests.get(alg.name)
        if not alg.computable or column is None:
            continue
        initial: dict[int, bytes] = {}
        if locality is not None:
            initial[0] = bytes(alg.digest_size - 1) + bytes([locality])
        try:
            out[alg.name] = extend_bank(
                alg.openssl_name, pcrs, types, list(column), no_action, initial
            )
        except LookupError:  # (no such digest in this OpenSSL: nothing was extended)
            out[alg.name] = extend_in_python(alg, pcrs, types, column, initial)
    return out


def extend_in_python(
    alg: HashAlgorithm,
    pcrs: Sequence[int],
    types: Sequence[int],
    column: Sequence[bytes | None],
    initial: Mapping[int, bytes],
) -> dict[int, bytes]:
    """``_native.extend_bank`` with hashlib: PCR := H(PCR || digest) per event that is
    not EV_NO_ACTION and has a digest, from ``initial``; by PCR index."""
    new = alg.new
    zero = bytes(alg.digest_size)
    values = dict(initial)
    get = values.get
    no_action = EventType.EV_NO_ACTION
    for pcr, event_type, digest in zip(pcrs, types, column, strict=True):
        if event_type == no_action or digest is None:
            continue
        values[pcr] = new(get(pcr, zero) + digest).digest()
    return dict(sorted(values.items()))


@dataclass(frozen=True, repr=False, slots=True)  # slots: one GC-counted object, not two
class ReplayedEvent:
    """An event whose digests are proven by the quote.

    ``data_verified``: True when the spec defines the digest as a hash of the
    data (or a named quirk form of it) and it matches; False when it does not
    match (``decoded`` is then None: use ``untrusted_decoded`` only to
    display); None when the digest is of something the log does not carry
    (an image, a firmware volume), so the data is only a description.
    ``digest_covers`` says what part of the data a True proves: for
    EV_EFI_VARIABLE_BOOT only VariableData (not the variable name), for GRUB
    strings only the text after the label. ``problems``: why the data is not
    trusted or does not decode; ``warnings`` adds the quirks applied.

    Strings (EV_IPL, EV_EFI_ACTION, ...), EV_POST_CODE and 4-byte separators
    are decoded when ``untrusted_decoded`` is first read: their decoder cannot
    fail and their digest check does not need it. Variables, images, firmware
    blobs, tags and GPT events were framed when the log was checked (their
    lengths walked, nothing built): those that frame are decoded on first read
    too (which cannot fail then), the others were decoded then, so a decode
    problem is always in ``problems``.
    """

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    untrusted_data: bytes
    data_verified: bool | None
    problems: tuple[str, ...]
    quirks: tuple[AppliedQuirk, ...]
    digest_covers: str | None = None
    _decoded: Decoded | Pending | LazyDecode | None = field(default=PENDING, compare=False)

    @property
    def untrusted_decoded(self) -> Decoded | None:
        """Decoded data, whether or not the digest proves it (display only, unless
        ``data_verified`` is True)."""
        decoded = self._decoded
        if decoded is PENDING:
            decoded = decode_deferred(self.event_type, self.untrusted_data)
            object.__setattr__(self, "_decoded", decoded)  # a pure function of the data
        elif type(decoded) is LazyDecode:
            decoded = decoded.decode(self.event_type, self.untrusted_data)
            object.__setattr__(self, "_decoded", decoded)
        return decoded  # type: ignore[return-value]

    @property
    def type_name(self) -> str:
        return type_name(self.event_type)

    @property
    def warnings(self) -> tuple[str, ...]:
        """``problems``, then each quirk applied."""
        if not self.quirks:
            return self.problems
        return self.problems + tuple(str(q) for q in self.quirks)

    @property
    def decoded(self) -> Decoded | None:
        """Decoded data, or None when the data is proven NOT to be what was measured."""
        return None if self.data_verified is False else self.untrusted_decoded

    @property
    def verified_data(self) -> bytes | None:
        """The raw event data when its digest proves it, else None."""
        return self.untrusted_data if self.data_verified else None

    def __repr__(self) -> str:
        return (
            f"ReplayedEvent(index={self.index!r}, offset={self.offset!r}, pcr={self.pcr!r}, "
            f"event_type={self.event_type!r}, digests={self.digests!r}, "
            f"untrusted_data={self.untrusted_data!r}, "
            f"untrusted_decoded={self.untrusted_decoded!r}, "
            f"data_verified={self.data_verified!r}, problems={self.problems!r}, "
            f"quirks={self.quirks!r}, digest_covers={self.digest_covers!r})"
        )


class ReplayedLog(Immutable):
    """A log whose replay matched the quoted PCRs. The only log type policy sees.

    ``pcrs``: replayed values; ``verified``: bank -> the PCR indices that were
    compared with the quote (policy must not rely on others); ``warnings``:
    quirks applied and events whose data does not match its digest.

    Immutable. Its :class:`ReplayedEvent` objects are built when first read
    (``events``, ``event``, ``events_of_type``, ...), each once: an appraisal
    reads a few of a log's events, and building the others would be most of
    its cost. Only :func:`verify_log` makes one.
    """

    __slots__ = (
        "_built",
        "_checked",
        "_log",
        "banks",
        "format",
        "pcrs",
        "spec_id",
        "startup_locality",
        "verified",
        "warnings",
    )

    format: str
    banks: tuple[str, ...]
    spec_id: SpecIdEvent | None
    pcrs: Mapping[str, Mapping[int, bytes]]
    verified: Mapping[str, frozenset[int]]
    warnings: tuple[str, ...]
    startup_locality: StartupLocality | None
    _log: EventLog
    _checked: CheckedEvents
    _built: list[ReplayedEvent | None]

    def __init__(
        self,
        log: EventLog,
        checked: CheckedEvents,
        pcrs: Mapping[str, Mapping[int, bytes]],
        verified: Mapping[str, frozenset[int]],
        warnings: tuple[str, ...],
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "format", log.format)
        setattr_(self, "banks", log.banks)
        setattr_(self, "spec_id", log.spec_id)
        setattr_(self, "pcrs", pcrs)
        setattr_(self, "verified", verified)
        setattr_(self, "warnings", warnings)
        setattr_(self, "startup_locality", log.startup_locality)
        setattr_(self, "_log", log)
        setattr_(self, "_checked", checked)
        setattr_(self, "_built", [None] * len(log.records))

    def __repr__(self) -> str:
        return (
            f"ReplayedLog(format={self.format!r}, banks={self.banks!r}, "
            f"events={len(self)}, verified={dict(self.verified)!r}, "
            f"warnings={self.warnings!r})"
        )

    def __len__(self) -> int:
        return len(self._log.records)

    def event(self, index: int) -> ReplayedEvent:
        """Event ``index`` (its position in the log, the header record being 0)."""
        built = self._built[index]
        if built is None:
            built = self._built[index] = _replayed_event(self._log.event(index), self._checked)
        return built

    @property
    def events(self) -> tuple[ReplayedEvent, ...]:
        event = self.event
        return tuple(event(i) for i in range(len(self)))

    @property
    def quirks(self) -> tuple[AppliedQuirk, ...]:
        """Every quirk applied: the log's own (e.g. padding), then each event's, in order."""
        return self._log.quirks + tuple(q for e in self.events for q in e.quirks)

    def events_of_type(self, event_type: int) -> tuple[ReplayedEvent, ...]:
        event = self.event
        return tuple(event(i) for i in self._checked.by_type.get(event_type, ()))

    def events_in_pcr(self, pcr: int) -> tuple[ReplayedEvent, ...]:
        event = self.event
        return tuple(event(i) for i, p in enumerate(self._log.records.pcrs) if p == pcr)

    def unverified_events(self, event_type: int) -> list[tuple[int, int, bytes]]:
        """(index, PCR, data) of the events of ``event_type`` as parsed, NOTHING about
        their data proven: for a rule to pass over events on sight of their raw data
        before reading the others through :meth:`event` (which says what is proven)."""
        r = self._log.records
        log, pcrs, starts, ends = r.data, r.pcrs, r.data_starts, r.ends
        return [
            (i, pcrs[i], log[starts[i] : ends[i]])
            for i in self._checked.by_type.get(event_type, ())
        ]

    @property
    def data_mismatches(self) -> tuple[ReplayedEvent, ...]:
        """The events whose data is proven NOT to be what was measured."""
        event = self.event
        return tuple(event(i) for i in self._checked.mismatched)


def _replayed_event(event: Event, checked: CheckedEvents) -> ReplayedEvent:
    """``ReplayedEvent`` from the parsed event and its check."""
    decoded, verified, quirks, problems, covers = checked.outcome(event)
    return ReplayedEvent(
        event.index, event.offset, event.pcr, event.event_type, event.digests,
        event.untrusted_data, verified, problems, quirks, covers, decoded,
    )  # fmt: skip


class ReplayMismatchError(VerificationError):
    """The log does not replay to the quote (check ``eventlog.replay``), classified.

    What tells the two findings apart (issue 20, "truncated is not tampered"):

    - ``eventlog.forged-event``: some event extended into a mismatching PCR carries
      data that is proven NOT to hash to its digest. Someone edited the log (or the
      firmware logged garbage): ``event`` is the first such event.
    - ``eventlog.incomplete``: every event present whose data can be checked matches
      its digest, so the log is a self-consistent sequence that replays *short* of
      the quoted value: the TPM saw extends the log does not hold. That is what a
      firmware whose log area overflowed produces (it keeps extending, stops
      logging), so the finding says "incomplete after event N" (N: the last event
      present, ``event``). It is NOT proof of truncation: an extend that was never
      logged in the middle, or a replaced digest of an event whose data the digest
      does not cover (a boot application's), look exactly the same from a quote and
      a log. Both findings fail closed.

    ``mismatched``: the (bank, PCR) pairs that disagree.
    """

    def __init__(
        self,
        message: str,
        finding: str,
        explanation: str,
        event: tuple[int, int, str] | None,
        mismatched: tuple[tuple[str, int], ...],
    ) -> None:
        super().__init__("eventlog.replay", message)
        self.finding = finding
        self.explanation = explanation
        self.event = event
        self.mismatched = mismatched


def _classify_mismatch(
    log: EventLog, checked: CheckedEvents, mismatched: tuple[tuple[str, int], ...], message: str
) -> ReplayMismatchError:
    """A :class:`ReplayMismatchError` naming a forged event, or where the log stops."""
    r = log.records
    bad_pcrs = {index for _, index in mismatched}
    forged = [i for i in checked.mismatched if r.pcrs[i] in bad_pcrs]
    pcr_list = ", ".join(f"{bank} PCR {index}" for bank, index in mismatched)
    if forged:
        first = forged[0]
        names = ", ".join(f"event {i} ({type_name(r.types[i])}, PCR {r.pcrs[i]})" for i in forged)
        return ReplayMismatchError(
            message,
            FORGED_EVENT,
            f"forged event: {names}: data does not match its digest ({pcr_list} "
            "do not replay to the quote)",
            (first, r.pcrs[first], type_name(r.types[first])),
            mismatched,
        )
    last = len(r.pcrs) - 1
    per_pcr = []
    for index in sorted(bad_pcrs):
        in_pcr = [i for i, p in enumerate(r.pcrs) if p == index]
        per_pcr.append(f"PCR {index}: last logged event {in_pcr[-1] if in_pcr else 'none'}")
    return ReplayMismatchError(
        message,
        INCOMPLETE,
        f"the log is incomplete after event {last}: every event present matches its "
        f"digest but {pcr_list} replay short of the quote ({'; '.join(per_pcr)}); "
        "extends were not logged (a truncated log, or an unlogged or replaced extend: "
        "a quote cannot tell which)",
        (last, r.pcrs[last], type_name(r.types[last])) if last >= 0 else None,
        mismatched,
    )


def verify_log(log: EventLog, pcrs: Mapping[str, Mapping[int, bytes]]) -> ReplayedLog:
    """Check that ``log`` replays to ``pcrs`` (quoted values) and return it as trusted.

    1. Replay every computable bank.
    2. Compare, in constant time, every (bank, PCR) present in both the
       replay and ``pcrs``; collect every mismatch.
    3. Any mismatch raises :class:`ReplayMismatchError` (check ``eventlog.replay``)
       naming each mismatch and classifying it (forged event or incomplete log);
       no (bank, PCR) in common at all raises VerificationError("eventlog.replay").
    4. Decode and data-check the events; collect quirks and data mismatches
       as warnings.

    Not checked: that the quote covers the PCRs a policy cares about (see
    ``ReplayedLog.verified``), or any PCR the log never extends.
    """
    replayed = replay_log(log)  # step 1
    mismatches: list[str] = []
    mismatched: list[tuple[str, int]] = []
    verified: dict[str, frozenset[int]] = {}
    for bank, quoted in pcrs.items():  # step 2
        ours = replayed.get(bank)
        if ours is None:
            continue
        compared = set()
        for index in sorted(set(quoted) & set(ours)):
            compared.add(index)
            got, want = ours[index], bytes(quoted[index])
            if len(want) != len(got) or not hmac.compare_digest(got, want):
                mismatched.append((bank, index))
                mismatches.append(
                    f"PCR {index} {bank}: log replays to {got.hex()}, quote has {want.hex()}"
                    + _unlogged_hint(log, bank, index, got, want)
                )
        if compared:
            verified[bank] = frozenset(compared)
    uintn = log.spec_id.uintn_size if log.spec_id is not None else 2
    if mismatches:  # step 3
        checked = check_all(log.records, log.algorithms, uintn_size=uintn, spec_id=log.spec_id)
        raise _classify_mismatch(log, checked, tuple(mismatched), "; ".join(mismatches))
    if not verified:
        covered = ", ".join(f"{b} PCRs {sorted(v)}" for b, v in replayed.items()) or "nothing"
        quoted_desc = ", ".join(f"{b} PCRs {sorted(v)}" for b, v in pcrs.items()) or "nothing"
        raise VerificationError(
            "eventlog.replay",
            f"the log and the quote share no PCR (log extends {covered}; quote has {quoted_desc})",
        )
    checked = check_all(log.records, log.algorithms, uintn_size=uintn, spec_id=log.spec_id)
    warnings = (*summarize_applied(log.quirks, checked.applied), *checked.problems)  # step 4
    return ReplayedLog(
        log,
        checked,
        MappingProxyType({b: MappingProxyType(v) for b, v in replayed.items()}),
        MappingProxyType(verified),
        warnings,
    )


# PFP §10.4.1 / §3.3.4.5: the firmware measures these EV_EFI_ACTION strings into
# PCR 5 at ExitBootServices(); some firmware extends them without logging them. The
# sequences with a failure are the ones go-attestation's replay workarounds also try (a
# first ExitBootServices() call that failed, then a retry that succeeded).
_EBS_INVOCATION = b"Exit Boot Services Invocation"
_EBS_FAILURE = b"Exit Boot Services Returned with Failure"
_EBS_SUCCESS = b"Exit Boot Services Returned with Success"
_EXIT_BOOT_SERVICES = (
    (_EBS_INVOCATION,),
    (_EBS_INVOCATION, _EBS_SUCCESS),
    (_EBS_INVOCATION, _EBS_FAILURE),
    (_EBS_INVOCATION, _EBS_FAILURE, _EBS_SUCCESS),
    (_EBS_INVOCATION, _EBS_FAILURE, _EBS_INVOCATION, _EBS_SUCCESS),
)


def _unlogged_hint(log: EventLog, bank: str, index: int, got: bytes, want: bytes) -> str:
    """Explain a PCR 5 mismatch that unlogged Exit Boot Services events account for."""
    alg = next((a for a in log.algorithms if a.name == bank), None)
    if index != 5 or alg is None or len(want) != len(got):
        return ""
    for actions in _EXIT_BOOT_SERVICES:
        value = got
        for action in actions:
            value = alg.extend(value, alg.hash(action))
        if hmac.compare_digest(value, want):
            names = ", ".join(repr(a.decode()) for a in actions[:-1])
            names = f"{names} and {actions[-1].decode()!r}" if names else repr(actions[0].decode())
            return f" (the quote matches if the firmware extended {names} without logging it)"
    return ""
