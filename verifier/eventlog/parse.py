"""Framing of the TCG PC Client firmware event log: TCG_PCR_EVENT, the Spec ID
event and TCG_PCR_EVENT2.

Spec: TCG PC Client Platform Firmware Profile Specification (PFP), v1.05 rev 23,
§10.2.1 (TCG_PCR_EVENT, the SHA-1 "legacy" format), §10.2.2 (TCG_PCR_EVENT2,
the crypto-agile format), §10.4.5.1 (TCG_EfiSpecIDEvent, "Spec ID Event03"),
§10.4.5.3 (TCG_EfiStartupLocalityEvent), §10.4.1 (EV_EFI_HCRTM_EVENT).

A crypto-agile log starts with one TCG_PCR_EVENT (PCR 0, EV_NO_ACTION, 20
zero bytes of digest) whose data is the Spec ID event listing every bank and
its digest size; every later record is a TCG_PCR_EVENT2. A log whose first
record is anything else is a SHA-1 legacy log of TCG_PCR_EVENTs.

What this module guarantees: the framing is well formed, within
:class:`Limits`, each event carries exactly the banks the Spec ID event lists (an
EV_NO_ACTION record may carry none: quirk ``no-action-empty-digest-list``), PCR
indices are 0..23, at most one well-formed StartupLocality event, and that event
agrees with an H-CRTM event (see :func:`pcr0_locality`). What it does not check: any
digest. :class:`EventLog` is unverified; call
:meth:`EventLog.verify` with quoted PCR values to get a
:class:`~verifier.eventlog.replay.ReplayedLog`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from verifier.eventlog._frozen import Immutable
from verifier.eventlog._native import MAX_BANKS, walk_records
from verifier.eventlog._reader import Reader
from verifier.eventlog.algorithms import HashAlgorithm, algorithm_by_id
from verifier.eventlog.events import EventType, type_name
from verifier.eventlog.limits import DEFAULT_LIMITS, Limits
from verifier.eventlog.quirks import AppliedQuirk
from vtpm_core.errors import ParseError

if TYPE_CHECKING:
    from verifier.eventlog.replay import PcrBanks, ReplayedLog

__all__ = [
    "Event",
    "EventLog",
    "LogFormat",
    "Records",
    "SpecIdEvent",
    "StartupLocality",
    "first_pcr0_hcrtm",
    "pcr0_locality",
]

LogFormat = Literal["sha1-legacy", "crypto-agile"]

SPEC_ID_03 = b"Spec ID Event03\x00"
STARTUP_LOCALITY = b"StartupLocality\x00"
# PFP §10.2: PCR[0]..PCR[23] are the PC Client PCRs a firmware log may extend.
MAX_PCR = 23
_SHA1 = algorithm_by_id(0x0004, 20)
_LEGACY_HEADER = 32  # pcrIndex, eventType, digest[20], eventDataSize


@dataclass(frozen=True, slots=True)
class SpecIdEvent:
    """TCG_EfiSpecIDEvent (PFP §10.4.5.1), the header of a crypto-agile log."""

    signature: str
    platform_class: int
    spec_version_major: int
    spec_version_minor: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[HashAlgorithm, ...]
    vendor_info: bytes
    raw: bytes

    @classmethod
    def parse(cls, data: bytes, *, base: int = 0, limits: Limits = DEFAULT_LIMITS) -> SpecIdEvent:
        r = Reader(data, "TCG_EfiSpecIDEvent", base=base)
        signature = r.take(16, "signature")
        if signature != SPEC_ID_03:
            raise r.error("signature", f"expected 'Spec ID Event03\\0', got {signature!r}", at=base)
        platform_class = r.u32("platformClass")
        minor = r.u8("specVersionMinor")
        major = r.u8("specVersionMajor")
        errata = r.u8("specErrata")
        uintn_size = r.u8("uintnSize")
        if uintn_size not in (1, 2):
            raise r.error("uintnSize", f"must be 1 (32-bit) or 2 (64-bit), got {uintn_size}")
        count_at = r.offset
        count = r.u32("numberOfAlgorithms")
        if not 1 <= count <= limits.max_digests_per_event:
            raise r.error(
                "numberOfAlgorithms",
                f"{count} algorithms (must be 1..{limits.max_digests_per_event})",
                at=count_at,
            )
        algorithms: list[HashAlgorithm] = []
        for i in range(count):
            alg_at = r.offset
            alg_id = r.u16(f"digestSizes[{i}].algorithmId")
            size = r.u16(f"digestSizes[{i}].digestSize")
            alg = algorithm_by_id(alg_id, size)
            if alg.digest_size != size:
                raise r.error(
                    f"digestSizes[{i}].digestSize",
                    f"{alg.name} digests are {alg.digest_size} bytes, Spec ID says {size}",
                    at=alg_at,
                )
            if not 1 <= size <= 128:
                raise r.error(f"digestSizes[{i}].digestSize", f"implausible size {size}")
            if any(a.alg_id == alg_id for a in algorithms):
                raise r.error(
                    f"digestSizes[{i}].algorithmId", f"{alg.name} listed twice", at=alg_at
                )
            algorithms.append(alg)
        vendor_size = r.u8("vendorInfoSize")
        vendor_info = r.take(vendor_size, "vendorInfo")
        r.expect_end("vendorInfo")
        return cls(
            signature=signature.rstrip(b"\x00").decode("ascii"),
            platform_class=platform_class,
            spec_version_major=major,
            spec_version_minor=minor,
            spec_errata=errata,
            uintn_size=uintn_size,
            algorithms=tuple(algorithms),
            vendor_info=vendor_info,
            raw=data,
        )


@dataclass(frozen=True, slots=True)
class StartupLocality:
    """TCG_EfiStartupLocalityEvent (PFP §10.4.5.3): the locality of TPM2_Startup.

    PCR 0 starts at 00..00 || locality (3 for a locality-3 startup, 4 when an
    H-CRTM measured before startup); locality 0 changes nothing.
    """

    locality: int

    @classmethod
    def parse(cls, data: bytes, *, base: int = 0) -> StartupLocality:
        r = Reader(data, "TCG_EfiStartupLocalityEvent", base=base)
        r.take(16, "signature")
        locality = r.u8("StartupLocality")
        r.expect_end("StartupLocality")
        if locality not in (0, 3, 4):
            raise r.error("StartupLocality", f"locality {locality} is not 0, 3 or 4", at=base + 16)
        return cls(locality)


@dataclass(frozen=True, slots=True)  # slots: one GC-counted object, not two
class Event:
    """One log record, as read: nothing about it has been checked yet.

    ``digests`` maps bank name to the digest the event says was extended;
    ``untrusted_data`` is the raw event data, which nobody has verified
    against those digests; ``raw`` is the whole record as it appears in the log.
    """

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    untrusted_data: bytes
    raw: bytes

    @property
    def type_name(self) -> str:
        return type_name(self.event_type)

    @property
    def data_offset(self) -> int:
        """Byte offset of the event data within the log."""
        return self.offset + len(self.raw) - len(self.untrusted_data)

    @property
    def is_startup_locality(self) -> bool:
        return (
            self.event_type == EventType.EV_NO_ACTION
            and self.pcr == 0
            and self.untrusted_data.startswith(STARTUP_LOCALITY)
        )


class Records:
    """A parsed log's records, column by column: position ``i`` of each list is event
    ``i`` (the header record being 0). :meth:`event` builds its :class:`Event` when first
    asked; the records the general parsers read are kept as they built them.

    ``data_starts[i]:ends[i]`` is event ``i``'s data within ``data`` (the log);
    ``digests[k][i]`` its digest in bank ``names[k]`` (the Spec ID event's order).
    """

    __slots__ = (
        "built",
        "data",
        "data_starts",
        "digests",
        "ends",
        "names",
        "offsets",
        "pcrs",
        "types",
    )

    def __init__(self, data: bytes, names: tuple[str, ...]) -> None:
        self.data = data
        self.names = names
        self.offsets: list[int] = []
        self.ends: list[int] = []
        self.data_starts: list[int] = []
        self.pcrs: list[int] = []
        self.types: list[int] = []
        self.digests: list[list[bytes]] = [[] for _ in names]
        self.built: dict[int, Event] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, event: Event) -> None:
        """Append a record a general parser built (kept: its digests in record order)."""
        self.built[len(self.offsets)] = event
        end = event.offset + len(event.raw)
        self.offsets.append(event.offset)
        self.ends.append(end)
        self.data_starts.append(end - len(event.untrusted_data))
        self.pcrs.append(event.pcr)
        self.types.append(event.event_type)
        digests = event.digests
        for name, column in zip(self.names, self.digests, strict=True):
            # (an EV_NO_ACTION record with no digests: quirk no-action-empty-digest-list;
            # never extended, so its column entry is never read)
            column.append(digests.get(name, b""))

    def event(self, index: int) -> Event:
        built = self.built.get(index)
        if built is None:
            names, digests = self.names, self.digests
            end = self.ends[index]
            built = self.built[index] = Event(
                index,
                self.offsets[index],
                self.pcrs[index],
                self.types[index],
                MappingProxyType(
                    {names[0]: digests[0][index]}
                    if len(names) == 1
                    else {name: column[index] for name, column in zip(names, digests, strict=True)}
                ),
                self.data[self.data_starts[index] : end],
                self.data[self.offsets[index] : end],
            )
        return built


class EventLog(Immutable):
    """A parsed, UNVERIFIED event log. Policy code never sees this type.

    ``events`` includes the header record (index 0: the Spec ID event in a
    crypto-agile log), so indices match tpm2_eventlog's EventNum. Immutable; its
    Event objects are built when ``events`` (or :meth:`event`) is first read:
    ``records`` holds the same records column by column, for replay and checks.

    ``hcrtm_event``: the index of the EV_EFI_HCRTM_EVENT that is PCR 0's first
    extend, when there is one (PCR 0 then starts at locality 4: see
    :func:`pcr0_locality`); ``pcr0_locality``: the locality PCR 0 starts at, or
    None when the log says nothing about it (PCR 0 starts at zero).
    """

    __slots__ = (
        "_events",
        "algorithms",
        "banks",
        "format",
        "hcrtm_event",
        "quirks",
        "raw",
        "records",
        "spec_id",
        "startup_locality",
    )

    format: LogFormat
    banks: tuple[str, ...]
    algorithms: tuple[HashAlgorithm, ...]
    spec_id: SpecIdEvent | None
    records: Records
    startup_locality: StartupLocality | None
    hcrtm_event: int | None
    quirks: tuple[AppliedQuirk, ...]
    raw: bytes
    _events: tuple[Event, ...] | None

    def __init__(
        self,
        *,
        format: LogFormat,
        algorithms: tuple[HashAlgorithm, ...],
        spec_id: SpecIdEvent | None,
        records: Records,
        startup_locality: StartupLocality | None,
        quirks: tuple[AppliedQuirk, ...],
        raw: bytes,
        hcrtm_event: int | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "format", format)
        setattr_(self, "banks", tuple(a.name for a in algorithms))
        setattr_(self, "algorithms", algorithms)
        setattr_(self, "spec_id", spec_id)
        setattr_(self, "records", records)
        setattr_(self, "startup_locality", startup_locality)
        setattr_(self, "hcrtm_event", hcrtm_event)
        setattr_(self, "quirks", quirks)
        setattr_(self, "raw", raw)
        setattr_(self, "_events", None)

    def __repr__(self) -> str:
        return (
            f"EventLog(format={self.format!r}, banks={self.banks!r}, "
            f"events={len(self.records)}, bytes={len(self.raw)})"
        )

    @property
    def events(self) -> tuple[Event, ...]:
        events = self._events
        if events is None:
            event = self.records.event
            events = tuple(event(i) for i in range(len(self.records)))
            object.__setattr__(self, "_events", events)
        return events

    def event(self, index: int) -> Event:
        """Event ``index`` (the header record being 0)."""
        return self.records.event(index)

    @classmethod
    def parse(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> EventLog:
        """Parse a binary log (as in /sys/kernel/security/tpm0/binary_bios_measurements).

        Raises ParseError (structure, field, byte offset) for every malformed
        or over-limit input; never any other exception.
        """
        data = bytes(data)
        if len(data) > limits.max_log_bytes:
            raise ParseError(
                "TCG_PCR_EVENT",
                "log",
                limits.max_log_bytes,
                f"log is {len(data)} bytes, limit is {limits.max_log_bytes}",
            )
        if not data:
            raise ParseError("TCG_PCR_EVENT", "pcrIndex", 0, "empty log")
        first = _parse_legacy(data, 0, 0, limits)
        quirks: list[AppliedQuirk] = []
        spec_id: SpecIdEvent | None = None
        if first.untrusted_data.startswith(SPEC_ID_03):
            if first.pcr != 0 or first.event_type != EventType.EV_NO_ACTION:
                raise ParseError(
                    "TCG_PCR_EVENT",
                    "eventType",
                    0,
                    f"Spec ID event must be EV_NO_ACTION in PCR 0, got {first.type_name} "
                    f"in PCR {first.pcr}",
                )
            if any(first.digests["sha1"]):
                raise ParseError("TCG_PCR_EVENT", "digest", 8, "Spec ID event digest is not zero")
            spec_id = SpecIdEvent.parse(first.untrusted_data, base=_LEGACY_HEADER, limits=limits)
            algorithms = spec_id.algorithms
            fmt: LogFormat = "crypto-agile"
        else:
            algorithms = (_SHA1,)
            fmt = "sha1-legacy"
        records = Records(data, tuple(a.name for a in algorithms))
        # the header record keeps its Event (one SHA-1 digest); the bank columns hold that
        # digest for it in every bank: never read, an EV_NO_ACTION record is not extended
        records.built[0] = first
        records.offsets.append(0)
        records.ends.append(len(first.raw))
        records.data_starts.append(_LEGACY_HEADER)
        records.pcrs.append(first.pcr)
        records.types.append(first.event_type)
        for column in records.digests:
            column.append(first.digests["sha1"])
        offset = len(first.raw)
        if spec_id is not None:
            if _agile_records(data, offset, records, algorithms, limits, quirks):
                startup = _startup_locality(records, True)
            else:
                startup = None  # (no StartupLocality event: nothing to check)
        else:
            _legacy_records(data, offset, records, limits, quirks)
            startup = _startup_locality(records, False)
        hcrtm = first_pcr0_hcrtm(records.pcrs, records.types)
        if hcrtm is not None and startup is not None and startup.locality != 4:
            raise ParseError(
                "TCG_PCR_EVENT2" if spec_id is not None else "TCG_PCR_EVENT",
                "event",
                records.offsets[hcrtm],
                f"EV_EFI_HCRTM_EVENT starts PCR 0 at locality 4, but the StartupLocality "
                f"event says {startup.locality}",
            )
        return cls(
            format=fmt,
            algorithms=algorithms,
            spec_id=spec_id,
            records=records,
            startup_locality=startup,
            quirks=tuple(quirks),
            raw=data,
            hcrtm_event=hcrtm,
        )

    @property
    def pcr0_locality(self) -> int | None:
        """The locality PCR 0 starts at (see :func:`pcr0_locality`), or None for zero."""
        return pcr0_locality(self.startup_locality, self.hcrtm_event)

    def to_bytes(self) -> bytes:
        """The exact bytes parsed (the records concatenated, plus any padding)."""
        return self.raw

    def replay(self) -> PcrBanks:
        """Computed PCR values ``{bank: {pcr: value}}`` (see replay.replay_events)."""
        from verifier.eventlog.replay import replay_log

        return replay_log(self)

    def verify(self, pcrs: Mapping[str, Mapping[int, bytes]]) -> ReplayedLog:
        """Prove the log against quoted PCR values; see replay.verify_log."""
        from verifier.eventlog.replay import verify_log

        return verify_log(self, pcrs)


# Zero fill must be at least this long: a shorter run of zeros at the end may be a
# record cut short at PCR 0 (pcrIndex 0, then eventType 0x0000000X...), which stays a
# "truncated" ParseError. 0xFF fill needs no minimum: no record starts with 0xFF (the
# first byte is pcrIndex's low byte, and pcrIndex is 0..23).
MIN_PADDING = 16


def _padding_starts(data: bytes) -> dict[int, int]:
    """For 0x00 and 0xFF: where the run of that byte ending the log starts.

    Computed once per log so that checking each record for padding is O(1).
    """
    return {b: len(data.rstrip(bytes([b]))) for b in (0x00, 0xFF)}


def _is_padding(data: bytes, offset: int, starts: dict[int, int]) -> bool:
    """Whether ``data[offset:]`` (a record boundary) is nothing but fill: the quirk
    ``log-trailing-padding``. 0xFF of any length, 0x00 of at least MIN_PADDING bytes;
    fill followed by anything else is not padding (it is parsed, and refused)."""
    fill = data[offset]
    start = starts.get(fill)
    if start is None or offset < start:
        return False
    return fill == 0xFF or len(data) - offset >= MIN_PADDING


def _padding_quirk(data: bytes, offset: int) -> AppliedQuirk:
    return AppliedQuirk(
        "log-trailing-padding",
        None,
        f"{len(data) - offset} bytes of 0x{data[offset]:02x} after the last "
        f"event at byte {offset} ignored",
    )


def _too_many(structure: str, offset: int, limits: Limits) -> ParseError:
    return ParseError(structure, "pcrIndex", offset, f"more than {limits.max_events} events")


def _legacy_records(
    data: bytes, offset: int, records: Records, limits: Limits, quirks: list[AppliedQuirk]
) -> None:
    """The TCG_PCR_EVENTs after the first, up to the end of ``data`` or its padding."""
    padding = _padding_starts(data)
    while offset < len(data):
        if _is_padding(data, offset, padding):
            quirks.append(_padding_quirk(data, offset))
            break
        if len(records) >= limits.max_events:
            raise _too_many("TCG_PCR_EVENT", offset, limits)
        event = _parse_legacy(data, offset, len(records), limits)
        records.add(event)
        offset += len(event.raw)


def _agile_records(
    data: bytes,
    offset: int,
    records: Records,
    algorithms: tuple[HashAlgorithm, ...],
    limits: Limits,
    quirks: list[AppliedQuirk],
) -> bool:
    """The TCG_PCR_EVENT2s after the Spec ID event, up to the end of ``data`` or its
    padding, into ``records``. Returns whether any is a StartupLocality event (for
    _startup_locality).

    The usual records (every bank once, in the Spec ID event's order, within the
    limits) are walked in C (``_native.walk_records``), straight into the columns, up
    to the first record it does not take or where padding may start; that record goes
    to _parse_agile_fast, then to _parse_agile, which reports what is wrong with it.
    """
    end = len(data)
    padding = _padding_starts(data)
    pad_from = min(padding.values())  # _is_padding is False before both runs start
    by_id = {a.alg_id: a for a in algorithms}
    walk = len(algorithms) <= min(limits.max_digests_per_event, MAX_BANKS)
    alg_ids = tuple(a.alg_id for a in algorithms)
    sizes = tuple(a.digest_size for a in algorithms)
    max_events, no_action = limits.max_events, EventType.EV_NO_ACTION
    columns = (
        records.offsets, records.ends, records.data_starts, records.pcrs, records.types,
        records.digests,
    )  # fmt: skip
    startup = False
    while offset < end:
        if offset >= pad_from and _is_padding(data, offset, padding):
            quirks.append(_padding_quirk(data, offset))
            break
        if len(records) >= max_events:
            raise _too_many("TCG_PCR_EVENT2", offset, limits)
        if walk:
            walked, found = walk_records(
                data, offset, pad_from, alg_ids, sizes, max_events, limits.max_event_data,
                MAX_PCR, no_action, STARTUP_LOCALITY, *columns,
            )  # fmt: skip
            startup = startup or found
            if walked > offset:
                offset = walked
                continue
        index = len(records)
        event = _parse_agile_fast(data, offset, index, by_id, limits) or _parse_agile(
            data, offset, index, algorithms, limits
        )
        if event.event_type == no_action:
            if not startup:
                startup = event.is_startup_locality
            if not event.digests:
                quirks.append(
                    AppliedQuirk(
                        "no-action-empty-digest-list",
                        index,
                        f"EV_NO_ACTION record at byte {offset} lists no digests "
                        "(digests.count 0); it is never extended",
                    )
                )
        records.add(event)
        offset += len(event.raw)
    return startup


def _check_pcr(pcr: int, structure: str, offset: int) -> None:
    if pcr > MAX_PCR:
        raise ParseError(structure, "pcrIndex", offset, f"PCR {pcr} is not a PC Client PCR (0..23)")


def _parse_legacy(data: bytes, offset: int, index: int, limits: Limits) -> Event:
    """TCG_PCR_EVENT (PFP §10.2.1)."""
    r = Reader(data, "TCG_PCR_EVENT", start=offset)
    pcr = r.u32("pcrIndex")
    _check_pcr(pcr, "TCG_PCR_EVENT", offset)
    event_type = r.u32("eventType")
    digest = r.take(20, "digest")
    event_data = _event_data(r, "TCG_PCR_EVENT", "eventDataSize", limits)
    return Event(
        index=index,
        offset=offset,
        pcr=pcr,
        event_type=event_type,
        digests=MappingProxyType({"sha1": digest}),
        untrusted_data=event_data,
        raw=data[offset : r.offset],
    )


_U32X3 = struct.Struct("<III")
_U32 = struct.Struct("<I")


def _parse_agile_fast(
    data: bytes, offset: int, index: int, by_id: dict[int, HashAlgorithm], limits: Limits
) -> Event | None:
    """:func:`_parse_agile` for a well-formed record, without per-field bookkeeping.

    Returns None at the first thing it does not like (short data, a PCR out of
    range, a digest count other than the bank count, an unknown or repeated
    bank, a size over the limit); the caller then runs :func:`_parse_agile`,
    which reports that problem with its field and offset. It accepts exactly
    what :func:`_parse_agile` accepts and builds the same Event.
    """
    end = len(data)
    pos = offset + 12
    if pos > end:
        return None
    pcr, event_type, count = _U32X3.unpack_from(data, offset)
    if pcr > MAX_PCR or count != len(by_id) or count > limits.max_digests_per_event:
        return None
    digests: dict[str, bytes] = {}
    for _ in range(count):
        if pos + 2 > end:
            return None
        alg = by_id.get(data[pos] | data[pos + 1] << 8)
        if alg is None or alg.name in digests:
            return None
        stop = pos + 2 + alg.digest_size
        if stop > end:
            return None
        digests[alg.name] = data[pos + 2 : stop]
        pos = stop
    if pos + 4 > end:
        return None
    (size,) = _U32.unpack_from(data, pos)
    stop = pos + 4 + size
    if size > limits.max_event_data or stop > end:
        return None
    return Event(
        index,
        offset,
        pcr,
        event_type,
        MappingProxyType(digests),
        data[pos + 4 : stop],
        data[offset:stop],
    )


def _parse_agile(
    data: bytes, offset: int, index: int, algorithms: tuple[HashAlgorithm, ...], limits: Limits
) -> Event:
    """TCG_PCR_EVENT2 (PFP §10.2.2) with TPML_DIGEST_VALUES sized by the Spec ID event."""
    r = Reader(data, "TCG_PCR_EVENT2", start=offset)
    pcr = r.u32("pcrIndex")
    _check_pcr(pcr, "TCG_PCR_EVENT2", offset)
    event_type = r.u32("eventType")
    count_at = r.offset
    count = r.u32("digests.count")
    if count > limits.max_digests_per_event:
        raise ParseError(
            "TCG_PCR_EVENT2",
            "digests.count",
            count_at,
            f"{count} digests exceeds the limit of {limits.max_digests_per_event}",
        )
    by_id = {a.alg_id: a for a in algorithms}
    digests: dict[str, bytes] = {}
    for i in range(count):
        alg_at = r.offset
        alg_id = r.u16(f"digests[{i}].hashAlg")
        alg = by_id.get(alg_id)
        if alg is None:
            raise ParseError(
                "TCG_PCR_EVENT2",
                f"digests[{i}].hashAlg",
                alg_at,
                f"algorithm 0x{alg_id:04x} is not listed in the Spec ID event",
            )
        if alg.name in digests:
            raise ParseError(
                "TCG_PCR_EVENT2", f"digests[{i}].hashAlg", alg_at, f"{alg.name} digest repeated"
            )
        digests[alg.name] = r.take(alg.digest_size, f"digests[{i}].digest")
    if count == 0 and event_type == EventType.EV_NO_ACTION:
        # quirk no-action-empty-digest-list: PFP §10.4.1 never extends EV_NO_ACTION, so
        # no bank can miss its digest. An extending event must list every bank: one that
        # lists none (or some) would be shown as replayed while no quoted bank proves it.
        pass
    elif len(digests) != len(algorithms):
        missing = [a.name for a in algorithms if a.name not in digests]
        raise ParseError(
            "TCG_PCR_EVENT2",
            "digests",
            count_at,
            f"event lacks the {', '.join(missing)} digest the Spec ID event lists",
        )
    event_data = _event_data(r, "TCG_PCR_EVENT2", "eventSize", limits)
    return Event(
        index=index,
        offset=offset,
        pcr=pcr,
        event_type=event_type,
        digests=MappingProxyType(digests),
        untrusted_data=event_data,
        raw=data[offset : r.offset],
    )


def first_pcr0_hcrtm(pcrs: Sequence[int], types: Sequence[int]) -> int | None:
    """The index of PCR 0's first extend when it is an EV_EFI_HCRTM_EVENT, else None.

    EV_NO_ACTION events are skipped (never extended, PFP §10.4.1). A loop over the two
    columns: PCR 0's events open a firmware log, so it stops within a few records.
    """
    no_action, hcrtm = EventType.EV_NO_ACTION, EventType.EV_EFI_HCRTM_EVENT
    for i, (pcr, event_type) in enumerate(zip(pcrs, types, strict=True)):
        if pcr == 0 and event_type != no_action:
            return i if event_type == hcrtm else None
    return None


def pcr0_locality(startup: StartupLocality | None, hcrtm_event: int | None) -> int | None:
    """The locality PCR 0 starts at before the log's first PCR 0 extend, or None (zero).

    1. An H-CRTM (hardware CRTM: the platform's measurement sent as _TPM_Hash_Start /
       _TPM_Hash_Data / _TPM_Hash_End at locality 4 before TPM2_Startup) makes the TPM
       reset PCR 0 to 00..04 and extend the H-CRTM digest into it (TPM 2.0 Library
       Part 3, _TPM_Hash_End; the TCG reference code: "reset the H-CRTM register
       (PCR[0]) to 0...04, and then extend the H-CRTM data"). The firmware logs that
       extend as PCR 0's first event, EV_EFI_HCRTM_EVENT with the data "HCRTM" (PFP
       §10.4.1), so PCR 0 starts at 4 whether or not a StartupLocality event says so.
       tpm2-tss's FAPI test vector (test/data/fapi/eventlog/binary_measurements_hcrtm,
       SHA-1 PCR 0 15f4e6ca...) is this rule applied to a real H-CRTM log.
    2. Otherwise the StartupLocality event (PFP §10.4.5.3), if any: 0, 3 (TPM2_Startup
       from locality 3), or 4 (the platform's H-CRTM indication).
    3. Otherwise nothing: PCR 0 starts at zero.

    :meth:`EventLog.parse` refuses a log whose StartupLocality event disagrees with
    its H-CRTM event (any value but 4), so 1 and 2 never conflict.
    """
    if hcrtm_event is not None:
        return 4
    return None if startup is None else startup.locality


def _startup_locality(records: Records, agile: bool) -> StartupLocality | None:
    """Find and check the StartupLocality event (PFP §10.4.5.3).

    It must precede every PCR 0 extend (it states PCR 0's initial value), and
    there is at most one.
    """
    found: StartupLocality | None = None
    pcr0_extended = False
    structure = "TCG_PCR_EVENT2" if agile else "TCG_PCR_EVENT"
    for event in (records.event(i) for i in range(len(records))):
        if event.is_startup_locality:
            if found is not None:
                raise ParseError(structure, "event", event.offset, "second StartupLocality event")
            if pcr0_extended:
                raise ParseError(
                    structure,
                    "event",
                    event.offset,
                    "StartupLocality event after PCR 0 was already extended",
                )
            found = StartupLocality.parse(event.untrusted_data, base=event.data_offset)
        elif event.pcr == 0 and event.event_type != EventType.EV_NO_ACTION:
            pcr0_extended = True
    return found


def _event_data(r: Reader, structure: str, size_field: str, limits: Limits) -> bytes:
    """The size-prefixed event data that ends both record formats, within the size limit."""
    size_at = r.offset
    size = r.u32(size_field)
    if size > limits.max_event_data:
        raise ParseError(
            structure,
            size_field,
            size_at,
            f"{size} bytes exceeds the limit of {limits.max_event_data}",
        )
    return r.take(size, "event")
