"""Decoding of event data and the digest-versus-data check.

Spec: TCG PC Client Platform Firmware Profile (PFP) v1.05 §10.4 (event data
by type): §10.4.1 EV_SEPARATOR (0x00000000, or 0xFFFFFFFF for an error),
EV_ACTION / EV_EFI_ACTION strings, EV_S_CRTM_VERSION, EV_POST_CODE;
§10.4.2 EV_EVENT_TAG (TCG_PCClientTaggedEvent); §10.4.3
UEFI_IMAGE_LOAD_EVENT (boot services applications and drivers); §10.4.4
UEFI_VARIABLE_DATA; UEFI_PLATFORM_FIRMWARE_BLOB(2), UEFI_HANDOFF_TABLE_POINTERS(2),
UEFI_GPT_DATA.

The check (step numbers are cited below):

1. Only where PFP defines the digest as the hash of (part of) the event data
   do we compare: separators, actions, S-CRTM version, variables, GPT, IPL
   strings. Elsewhere (images, firmware blobs, tables, tags) the digest is of
   something the log does not contain: ``data_verified`` is None.
2. The spec-defined form is tried first; then the quirk forms from
   :mod:`verifier.eventlog.quirks` for that type. A quirk that matches is
   recorded; nothing matches -> ``data_verified`` False. (Within one log,
   the GRUB label form that proved the previous event of a type is tried
   before the others: only a hash collision could make that name another
   form than the in-order search, see ``checker``.)
3. A candidate matches only if it hashes to the event's digest in EVERY bank
   this Python can compute (a forger must collide all of them).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from verifier.eventlog._reader import Reader
from verifier.eventlog.algorithms import Hash, HashAlgorithm
from verifier.eventlog.devicepath import DevicePath, device_path_ok
from verifier.eventlog.efivars import EfiVariable, variable_frame
from verifier.eventlog.events import EventType as T
from verifier.eventlog.guids import format_guid, guid_name
from verifier.eventlog.limits import DEFAULT_LIMITS, Limits
from verifier.eventlog.parse import (
    SPEC_ID_03,
    STARTUP_LOCALITY,
    Event,
    Records,
    SpecIdEvent,
    StartupLocality,
)
from verifier.eventlog.quirks import QUIRKS, AppliedQuirk
from vtpm_core.errors import ParseError

__all__ = [
    "FRAMED",
    "IPL_BYTE_PREFIXES",
    "PENDING",
    "CheckOutcome",
    "CheckedEvents",
    "DataCheck",
    "Decoded",
    "FirmwareBlob",
    "Framed",
    "GptEvent",
    "GptPartition",
    "HandoffTable",
    "HandoffTables",
    "ImageLoad",
    "IplString",
    "LazyDecode",
    "NoActionEvent",
    "Outcome",
    "Pending",
    "Separator",
    "TaggedEvent",
    "Text",
    "check_all",
    "check_event",
    "check_events_of",
    "checker",
    "decode_deferred",
    "decode_event",
    "ipl_kind",
]


@dataclass(frozen=True, slots=True)
class Text:
    """A string event (EV_ACTION, EV_EFI_ACTION, EV_S_CRTM_VERSION, EV_POST_CODE...)."""

    text: str
    encoding: str


@dataclass(frozen=True, slots=True)
class IplString:
    """An EV_IPL string: GRUB's ``grub_cmd: ...`` / ``kernel_cmdline: ...``,
    systemd-boot's UTF-16 load options, shim's variable names, file names.

    ``kind`` is the convention recognised ("grub_cmd", "kernel_cmdline",
    "load_options", "string"); ``value`` the text after GRUB's prefix.
    """

    text: str
    encoding: str
    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Separator:
    """EV_SEPARATOR (PFP §10.4.1): the UINT32 the firmware measured at a PCR's pre-OS to
    OS transition.

    0 is the normal value; 0xFFFFFFFF is the other normal value readers accept (the
    older TCG EFI platform logs; tcglog-parser's "alternative normal" value, FAPI's
    second valid separator). 1 is the error value (``is_error``): the firmware hit an
    error before the transition and measured UINT32 1 (the PC Client error-condition
    rule; edk2's MeasureSeparatorEventWithError). An error separator's logged data may
    be implementation-defined error information instead of the value, which the digest
    does not cover: then ``value`` is 1 because the digest is H(UINT32 1), and the
    event's data is that information, unproven.
    """

    value: int

    @property
    def is_error(self) -> bool:
        return self.value == SEPARATOR_ERROR

    @property
    def is_normal(self) -> bool:
        return self.value in (0, 0xFFFFFFFF)


SEPARATOR_ERROR = 1
ERROR_SEPARATOR_DATA = SEPARATOR_ERROR.to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class NoActionEvent:
    """An EV_NO_ACTION event other than Spec ID / StartupLocality (e.g. SP800-155)."""

    signature: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TaggedEvent:
    """TCG_PCClientTaggedEvent (EV_EVENT_TAG, PFP §10.4.2)."""

    tag_id: int
    tag_name: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class FirmwareBlob:
    """UEFI_PLATFORM_FIRMWARE_BLOB(2): where the measured blob was in memory."""

    base: int
    length: int
    description: str | None


@dataclass(frozen=True, slots=True)
class HandoffTable:
    vendor_guid: str
    vendor_name: str | None
    address: int


@dataclass(frozen=True, slots=True)
class HandoffTables:
    """UEFI_HANDOFF_TABLE_POINTERS(2): the configuration tables that were measured."""

    description: str | None
    tables: tuple[HandoffTable, ...]


@dataclass(frozen=True, slots=True)
class ImageLoad:
    """UEFI_IMAGE_LOAD_EVENT (PFP §10.4.3): an EFI image and the device path it came from.

    The digest is the image's Authenticode hash, which the log does not
    contain: this data is never proven by the digest.
    """

    location: int
    length: int
    link_time_address: int
    device_path: DevicePath | None

    @property
    def path_text(self) -> str | None:
        return self.device_path.text if self.device_path is not None else None


@dataclass(frozen=True, slots=True)
class GptPartition:
    type_guid: str
    unique_guid: str
    starting_lba: int
    ending_lba: int
    attributes: int
    name: str


@dataclass(frozen=True, slots=True)
class GptEvent:
    """UEFI_GPT_DATA: the GPT header's disk GUID and the partition entries."""

    disk_guid: str
    partitions: tuple[GptPartition, ...]


Decoded = (
    SpecIdEvent
    | StartupLocality
    | NoActionEvent
    | Text
    | IplString
    | Separator
    | TaggedEvent
    | FirmwareBlob
    | HandoffTables
    | ImageLoad
    | GptEvent
    | EfiVariable
)

_TEXT_TYPES = frozenset(
    {T.EV_ACTION, T.EV_EFI_ACTION, T.EV_S_CRTM_VERSION, T.EV_EFI_HCRTM_EVENT,
     T.EV_OMIT_BOOT_DEVICE_EVENTS, T.EV_S_CRTM_CONTENTS, T.EV_PLATFORM_CONFIG_FLAGS,
     T.EV_COMPACT_HASH, T.EV_NONHOST_INFO}
)  # fmt: skip
_VARIABLE_TYPES = frozenset(
    {T.EV_EFI_VARIABLE_DRIVER_CONFIG, T.EV_EFI_VARIABLE_BOOT, T.EV_EFI_VARIABLE_BOOT2,
     T.EV_EFI_VARIABLE_AUTHORITY}
)  # fmt: skip
_IMAGE_TYPES = frozenset(
    {T.EV_EFI_BOOT_SERVICES_APPLICATION, T.EV_EFI_BOOT_SERVICES_DRIVER,
     T.EV_EFI_RUNTIME_SERVICES_DRIVER}
)  # fmt: skip

# Linux EFI stub tags (include/linux/efi.h: INITRD_EVENT_TAG_ID, LOAD_OPTIONS_EVENT_TAG_ID)
_TAG_NAMES = {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "Linux load options"}


@dataclass(frozen=True, slots=True)
class DataCheck:
    """Outcome for one event: decoded data, whether its digest proves it, and why.

    ``decoded`` is what the data says, whether or not it was proven; the
    replayed event exposes it as trusted only when ``data_verified`` is not False.
    ``digest_covers`` says which part of the data the digest proved (e.g. for
    EV_EFI_VARIABLE_BOOT only VariableData: the variable's name is NOT proven).
    """

    decoded: Decoded | None
    data_verified: bool | None
    quirks: tuple[AppliedQuirk, ...]
    problems: tuple[str, ...]
    digest_covers: str | None = None


class Pending(enum.Enum):
    """Marks decoded data not worked out yet (see :func:`decode_deferred`)."""

    PENDING = "pending"


PENDING = Pending.PENDING

# Types whose decoder reads nothing but the data, never raises and whose digest
# check never reads the decoded value: a replayed log decodes them when asked
# (so are separators of the right size: only a wrong size fails to decode).
_DEFERRED = _TEXT_TYPES | {T.EV_POST_CODE, T.EV_IPL}


def decode_deferred(event_type: int, data: bytes) -> Decoded:
    """What :func:`decode_event` returns for an event of a type in ``_DEFERRED``, or
    a 4-byte EV_SEPARATOR; never raises."""
    if event_type == T.EV_IPL:
        return _ipl(data)
    if event_type == T.EV_SEPARATOR and len(data) == 4:
        return Separator(int.from_bytes(data, "little"))
    if (
        (event_type == T.EV_POST_CODE or event_type == T.EV_S_CRTM_CONTENTS)
        and len(data) == 16
        and not _printable(data)
    ):
        return FirmwareBlob(
            int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little"), None
        )
    return _text(data)


class LazyDecode:
    """Marks an event whose data was checked to decode (see ``_FRAMES``) but not decoded
    yet: :meth:`decode` gives what :func:`decode_event` gives, and cannot fail."""

    __slots__ = ("base", "limits", "uintn_size")

    def __init__(self, base: int, uintn_size: int, limits: Limits) -> None:
        self.base = base
        self.uintn_size = uintn_size
        self.limits = limits

    def decode(self, event_type: int, data: bytes) -> Decoded | None:
        return _decode_data(event_type, data, self.base, self.uintn_size, self.limits)


def decode_event(
    event: Event, *, uintn_size: int = 2, limits: Limits = DEFAULT_LIMITS
) -> Decoded | None:
    """Decode ``event.untrusted_data`` by type; None for types we do not decode.

    Raises ParseError (offsets within the whole log) on malformed data.
    """
    return _decode_data(
        event.event_type, event.untrusted_data, event.data_offset, uintn_size, limits
    )


def _decode_data(t: int, d: bytes, base: int, uintn_size: int, limits: Limits) -> Decoded | None:
    """:func:`decode_event` for data ``d`` of type ``t`` found at byte ``base`` of the log."""
    if t in _DEFERRED:
        return decode_deferred(t, d)
    if t == T.EV_NO_ACTION:
        if d.startswith(SPEC_ID_03):
            return SpecIdEvent.parse(d, base=base, limits=limits)
        if d.startswith(STARTUP_LOCALITY):
            return StartupLocality.parse(d, base=base)
        sig = d[:16].split(b"\x00", 1)[0]
        return NoActionEvent(sig.decode("ascii", errors="replace"), d[16:])
    if t == T.EV_SEPARATOR:
        if len(d) != 4:
            raise ParseError(
                "EV_SEPARATOR", "event", base, f"separator is {len(d)} bytes, expected 4"
            )
        return Separator(int.from_bytes(d, "little"))
    if t == T.EV_EVENT_TAG:
        r = Reader(d, "TCG_PCClientTaggedEvent", base=base)
        tag = r.u32("taggedEventID")
        size = r.u32("taggedEventDataSize")
        data = r.take(size, "taggedEventData")
        r.expect_end("taggedEventData")
        return TaggedEvent(tag, _TAG_NAMES.get(tag), data)
    if t in _VARIABLE_TYPES:
        return EfiVariable.parse(
            d,
            base=base,
            authority=t == T.EV_EFI_VARIABLE_AUTHORITY,
            max_nodes=limits.max_device_path_nodes,
        )
    if t in _IMAGE_TYPES:
        return _image_load(d, base, uintn_size, limits)
    if t in (T.EV_EFI_PLATFORM_FIRMWARE_BLOB, T.EV_EFI_PLATFORM_FIRMWARE_BLOB2):
        r = Reader(d, "UEFI_PLATFORM_FIRMWARE_BLOB", base=base)
        desc = _short_description(r) if t == T.EV_EFI_PLATFORM_FIRMWARE_BLOB2 else None
        blob_base = r.u64("BlobBase")
        length = r.u64("BlobLength")
        r.expect_end("BlobLength")
        return FirmwareBlob(blob_base, length, desc)
    if t in (T.EV_EFI_HANDOFF_TABLES, T.EV_EFI_HANDOFF_TABLES2):
        r = Reader(d, "UEFI_HANDOFF_TABLE_POINTERS", base=base)
        desc = _short_description(r) if t == T.EV_EFI_HANDOFF_TABLES2 else None
        count = r.u64("NumberOfTables")
        if count > r.remaining // 24:
            raise r.error("NumberOfTables", f"{count} tables run past the event data")
        tables = []
        for i in range(count):
            guid = format_guid(r.take(16, f"TableEntry[{i}].VendorGuid"))
            tables.append(
                HandoffTable(guid, guid_name(guid), r.u64(f"TableEntry[{i}].VendorTable"))
            )
        r.expect_end("TableEntry")
        return HandoffTables(desc, tuple(tables))
    if t == T.EV_EFI_GPT_EVENT:
        return _gpt(d, base)
    return None


def check_event(
    event: Event,
    algorithms: tuple[HashAlgorithm, ...],
    *,
    uintn_size: int = 2,
    limits: Limits = DEFAULT_LIMITS,
) -> DataCheck:
    """Decode an event and check its data against its digests (steps 1-3 above).

    Never raises for bad event data: a decode failure is reported in
    ``problems`` and leaves ``decoded`` None.
    """
    return check_events_of(algorithms, uintn_size=uintn_size, limits=limits)(event)


def check_events_of(
    algorithms: tuple[HashAlgorithm, ...],
    *,
    uintn_size: int = 2,
    limits: Limits = DEFAULT_LIMITS,
) -> Callable[[Event], DataCheck]:
    """:func:`check_event` for every event of one log: what depends only on the log
    (which banks this Python can compute) is worked out once."""
    check = checker(algorithms, uintn_size=uintn_size, limits=limits, defer=False)

    def check_one(event: Event) -> DataCheck:
        decoded, verified, quirks, problems, covers = check(event)
        # defer=False decodes every event
        assert decoded is not PENDING and not isinstance(decoded, LazyDecode)
        return DataCheck(decoded, verified, quirks, problems, covers)

    return check_one


_sha256 = hashlib.sha256
_Pairs = tuple[tuple[Callable[[bytes], Hash], bytes], ...]  # (hash constructor, digest)

CheckOutcome = tuple[
    "Decoded | Pending | LazyDecode | None",
    bool | None,
    tuple[AppliedQuirk, ...],
    tuple[str, ...],
    str | None,
]
"""(decoded, data_verified, quirks, problems, digest_covers): a DataCheck without the object."""


def checker(
    algorithms: tuple[HashAlgorithm, ...],
    *,
    uintn_size: int = 2,
    limits: Limits = DEFAULT_LIMITS,
    defer: bool = False,
) -> Callable[[Event], CheckOutcome]:
    """The check of steps 1-3 for the events of one log, as a plain tuple.

    ``defer``: leave ``decoded`` as PENDING for the types whose decoder never
    fails and whose check does not need it (strings, IPL, POST codes);
    :func:`decode_deferred` gives the value when someone reads it. The types in
    ``_FRAMES`` (variables, images, blobs, tags, GPT) are framed instead: a walk
    over their lengths that builds nothing says whether the decoder would
    succeed (and where VariableData lies, for the check). If so, ``decoded`` is
    a :class:`LazyDecode`; if not, the event is decoded here, so its decode
    failure is among the problems exactly as without ``defer``.
    """
    banks = tuple((a.name, a.new) for a in algorithms if a.computable)
    frames = _FRAMES if defer else {}
    max_nodes = limits.max_device_path_nodes
    one_bank = banks[0] if len(banks) == 1 else None
    compare = hmac.compare_digest
    no_quirks: tuple[AppliedQuirk, ...] = ()
    deferred, plans, whole, separator = _DEFERRED, _PLANS, _whole, T.EV_SEPARATOR
    error_data, error_separator = ERROR_SEPARATOR_DATA, Separator(SEPARATOR_ERROR)
    no_action, fixed_data = T.EV_NO_ACTION, _FIXED_DATA
    variable_types, trailing_quirk = _VARIABLE_TYPES, _TRAILING_QUIRK
    trailing_summary = QUIRKS[_TRAILING_QUIRK].summary
    whole_covers = _COVERS[_whole]
    # type -> the quirk form and candidate that proved its last event
    hints: dict[int, tuple[_Form, int, str, str, str]] = {}
    hintable, quirk = _HINTABLE, AppliedQuirk

    def proves(candidate: bytes, pairs: _Pairs) -> bool:
        # step 3: every bank must match (a loop: all() would cost a generator per call)
        for new, digest in pairs:  # noqa: SIM110
            if not compare(new(candidate).digest(), digest):
                return False
        return True

    def check(event: Event) -> CheckOutcome:
        t = event.event_type
        data = event.untrusted_data
        problems: tuple[str, ...] = ()
        decoded: Decoded | Pending | LazyDecode | None
        plain: Decoded | _Frame | None  # what the forms read
        if t in deferred or (t == separator and len(data) == 4):
            plain = None if defer else decode_deferred(t, data)
            decoded = PENDING if defer else plain
        else:
            frame = frames.get(t)
            plain = None if frame is None else frame(data, uintn_size, max_nodes)
            if plain is not None:
                decoded = LazyDecode(event.data_offset, uintn_size, limits)
            else:
                full: Decoded | None = None
                try:
                    full = decode_event(event, uintn_size=uintn_size, limits=limits)
                except ParseError as exc:
                    problems = (f"event data does not decode: {exc}",)
                decoded = plain = full
        fixed = fixed_data.get(t)
        if fixed is not None and data not in fixed:
            problems += (_not_fixed_data(event, fixed[0]),)
        plan = plans.get(t)
        if plan is None:  # step 1: the spec does not define digest = H(data)
            if t == no_action and any(d.strip(b"\x00") for d in event.digests.values()):
                problems += (
                    f"event {event.index} (EV_NO_ACTION, PCR {event.pcr}): its digests are "
                    "not all zero (PFP §10.4.1); EV_NO_ACTION is never extended, so they "
                    "prove nothing",
                )
            return decoded, None, no_quirks, problems, None
        digests = event.digests
        pairs: _Pairs
        if one_bank is not None:
            digest = digests.get(one_bank[0])
            pairs = () if digest is None else ((one_bank[1], digest),)
        else:
            pairs = tuple((new, digests[name]) for name, new in banks if name in digests)
        if not pairs:
            problems += ("no computable bank to check the data against",)
            return decoded, None, no_quirks, problems, None
        if t == separator:
            # PFP §10.4.1: the digest is of the UINT32 measured, 0 (or 0xFFFFFFFF) or the
            # error value 1; an error separator may log error information instead.
            if proves(data, pairs):
                if data == error_data:
                    problems += (_error_separator(event, None),)
                return decoded, True, no_quirks, problems, whole_covers
            if data != error_data and proves(error_data, pairs):
                # (a decode failure of the data is no problem: it is error information)
                return error_separator, None, no_quirks, (_error_separator(event, data),), None
        hint = hints.get(t)
        if hint is not None:
            # The candidate that proved the last event of this type, first: a log's
            # GRUB measures every command the same way. Only forms after nothing but
            # the whole data are hinted, and the candidate must differ from the data
            # and from the form's earlier candidates: it wins where the in-order
            # search below would not only if two different byte strings hash to the
            # same digests in every bank (a collision).
            hinted, j, hinted_quirk, hinted_covers, hinted_summary = hint
            candidates = hinted(data, plain)
            if j < len(candidates):
                candidate = candidates[j]
                if (
                    candidate != data
                    and candidate not in candidates[:j]
                    and (
                        compare(one_bank[1](candidate).digest(), pairs[0][1])  # proves(), inlined
                        if one_bank is not None
                        else proves(candidate, pairs)
                    )
                ):
                    applied = quirk(hinted_quirk, event.index, hinted_summary)
                    return decoded, True, (applied,), problems, hinted_covers
        for k, (quirk_id, form, covers, summary) in enumerate(plan):  # step 2
            if form is whole:
                if proves(data, pairs):
                    quirks = no_quirks
                    if quirk_id is not None:
                        quirks = (quirk(quirk_id, event.index, summary),)
                    elif t in variable_types and _variable_trailing(data, plain):
                        quirks = (quirk(trailing_quirk, event.index, trailing_summary),)
                    return decoded, True, quirks, problems, covers
            else:
                for j, candidate in enumerate(form(data, plain)):
                    if proves(candidate, pairs):
                        if quirk_id is not None and k in hintable[t]:
                            hints[t] = (form, j, quirk_id, covers, summary)
                        quirks = no_quirks
                        if quirk_id is not None:
                            quirks = (quirk(quirk_id, event.index, summary),)
                        elif t in variable_types and _variable_trailing(data, plain):
                            quirks = (quirk(trailing_quirk, event.index, trailing_summary),)
                        return decoded, True, quirks, problems, covers
        if t == T.EV_IPL and event.pcr in _IPL_DESCRIPTION_PCRS:
            # GRUB (PCR 9) and shim (PCR 14) name what they measured: no claim to prove.
            description = quirk("ipl-description-only", event.index, _IPL_DESCRIPTION_ONLY)
            return decoded, None, (description,), problems, None
        problems += (
            f"event {event.index} ({event.type_name}, PCR {event.pcr}): data does not hash "
            f"to its digest ({', '.join(name for name, _ in banks if name in digests)}); "
            "decoded data is untrusted",
        )
        return decoded, False, no_quirks, problems, None

    return check


_TRAILING_QUIRK = "variable-data-trailing-bytes"


def _variable_trailing(data: bytes, decoded: Decoded | _Frame | None) -> bool:
    """Whether a variable event's data goes on after UEFI_VARIABLE_DATA's VariableData."""
    if isinstance(decoded, EfiVariable):
        return bool(decoded.trailing)
    return isinstance(decoded, tuple) and decoded[1] < len(data)


# PFP §10.4.1: the event data of these types is a fixed string. FAPI accepts it with or
# without a terminating NUL (and refuses anything else), tcglog-parser reports anything
# else: a warning here (for EV_EFI_HCRTM_EVENT the data is not what was measured anyway).
_FIXED_DATA: dict[int, tuple[bytes, bytes]] = {
    T.EV_EFI_HCRTM_EVENT: (b"HCRTM", b"HCRTM\x00"),
    T.EV_OMIT_BOOT_DEVICE_EVENTS: (b"BOOT ATTEMPTS OMITTED", b"BOOT ATTEMPTS OMITTED\x00"),
}


def _not_fixed_data(event: Event, expected: bytes) -> str:
    shown = event.untrusted_data[:40]
    more = "..." if len(event.untrusted_data) > 40 else ""
    return (
        f"event {event.index} ({event.type_name}, PCR {event.pcr}): data is {shown!r}{more}, "
        f"PFP §10.4.1 defines it as {expected.decode()!r}"
    )


def _error_separator(event: Event, info: bytes | None) -> str:
    """The problem an error separator is reported as (it is not a quirk: the firmware
    says its own measurements went wrong before this PCR's transition to the OS)."""
    text = (
        f"event {event.index} (EV_SEPARATOR, PCR {event.pcr}): error separator (its digest "
        "is of the error value 0x00000001): the firmware reports an error before this "
        "PCR's pre-OS to OS transition"
    )
    if info is not None:
        text += f"; the {len(info)} bytes logged with it are error information, not proven"
    return text


# --- step 2: what the digest covers, per type -------------------------------------------

_Frame = tuple[int, int]
"""(start, end) of the part of the data a framed event's decoder reads as its payload
(VariableData for a variable): what the checker knows of a framed, undecoded event."""

_Form = Callable[[bytes, "Decoded | _Frame | None"], tuple[bytes, ...]]


def _whole(data: bytes, decoded: Decoded | _Frame | None) -> tuple[bytes, ...]:
    return (data,)


def _variable_data(data: bytes, decoded: Decoded | _Frame | None) -> tuple[bytes, ...]:
    if isinstance(decoded, EfiVariable):
        return (decoded.data,)
    if isinstance(decoded, tuple):  # framed: VariableData is data[start:end]
        return (data[decoded[0] : decoded[1]],)
    return ()


def _drop_last_byte(data: bytes, decoded: Decoded | _Frame | None) -> tuple[bytes, ...]:
    # only when the unhashed byte lies outside UEFI_VARIABLE_DATA: every
    # decoded field must stay inside the proven bytes
    if isinstance(decoded, EfiVariable):
        trailing = bool(decoded.trailing)
    else:  # framed: bytes after VariableData's end are EfiVariable.trailing
        trailing = isinstance(decoded, tuple) and decoded[1] < len(data)
    return (data[:-1],) if trailing else ()


def _after_label(labels: tuple[bytes, ...]) -> _Form:
    """The text after GRUB's label, with and without its terminating NUL (GRUB
    versions differ on whether the NUL is measured)."""

    def form(data: bytes, decoded: Decoded | _Frame | None) -> tuple[bytes, ...]:
        if not data.startswith(labels):
            return ()
        for label in labels:
            if data.startswith(label):
                body = data[len(label) :]
                return (body, body[:-1]) if body.endswith(b"\x00") else (body,)
        return ()

    return form


_IPL_DESCRIPTION_PCRS = frozenset({9, 14})
_GRUB_CMD_LABELS = (b"grub_cmd: ", b"grub_cmd ")
_GRUB_CMDLINE_LABELS = (b"kernel_cmdline: ", b"grub_kernel_cmdline ")
_GRUB_CMD = _after_label(_GRUB_CMD_LABELS)
_GRUB_CMDLINE = _after_label(_GRUB_CMDLINE_LABELS)
_FORM_LABELS = {_GRUB_CMD: _GRUB_CMD_LABELS, _GRUB_CMDLINE: _GRUB_CMDLINE_LABELS}

_COVERS: dict[_Form, str] = {
    _whole: "all of the event data",
    _variable_data: "VariableData only (the variable's name and GUID are not proven)",
    _drop_last_byte: "all of the event data but its last, unstructured byte",
    _GRUB_CMD: "the text after GRUB's label (the label itself is not measured)",
    _GRUB_CMDLINE: "the text after GRUB's label (the label itself is not measured)",
}

_CANDIDATES: dict[int, tuple[tuple[str | None, _Form], ...]] = {
    T.EV_SEPARATOR: ((None, _whole),),
    T.EV_ACTION: ((None, _whole),),
    T.EV_EFI_ACTION: ((None, _whole),),
    T.EV_S_CRTM_VERSION: ((None, _whole),),
    T.EV_OMIT_BOOT_DEVICE_EVENTS: ((None, _whole),),
    T.EV_EFI_GPT_EVENT: ((None, _whole),),
    T.EV_EFI_VARIABLE_DRIVER_CONFIG: (
        (None, _whole),
        ("variable-driver-config-digest-of-data-only", _variable_data),
    ),
    # PFP §10.4.4: for EV_EFI_VARIABLE_BOOT the digest is of VariableData only.
    T.EV_EFI_VARIABLE_BOOT: (
        (None, _variable_data),
        ("variable-boot-digest-of-whole-structure", _whole),
    ),
    T.EV_EFI_VARIABLE_BOOT2: ((None, _whole),),
    T.EV_EFI_VARIABLE_AUTHORITY: (
        (None, _whole),
        ("shim-authority-extra-trailing-byte", _drop_last_byte),
    ),
    T.EV_IPL: (
        (None, _whole),
        ("grub-command-string", _GRUB_CMD),
        ("grub-kernel-cmdline-string", _GRUB_CMDLINE),
    ),
}

# Per type: (quirk id, form, what a match proves, the quirk's summary), in order.
_PLANS: dict[int, tuple[tuple[str | None, _Form, str, str], ...]] = {
    t: tuple((q, f, _COVERS[f], "" if q is None else QUIRKS[q].summary) for q, f in forms)
    for t, forms in _CANDIDATES.items()
}
_IPL_DESCRIPTION_ONLY = QUIRKS["ipl-description-only"].summary
# Per type: the plan positions of quirk forms preceded only by whole-data forms
# (the only ones the checker tries first from a hint).
_HINTABLE: dict[int, frozenset[int]] = {
    t: frozenset(
        k
        for k, (q, f, _, _) in enumerate(plan)
        if q is not None and f is not _whole and all(g is _whole for _, g, _, _ in plan[:k])
    )
    for t, plan in _PLANS.items()
}


# --- decoders -----------------------------------------------------------------------------


_PRINTABLE = bytes(range(32, 127)) + b"\t\n\r"


def _printable(d: bytes) -> bool:
    body = d.rstrip(b"\x00")
    return bool(body) and not body.translate(None, _PRINTABLE)


def _looks_utf16(d: bytes) -> bool:
    """ASCII-range UTF-16LE; an odd final NUL byte is tolerated (old systemd-boot)."""
    if len(d) >= 2 and d[1]:
        return False  # the first high byte is not zero (the common ASCII case)
    if len(d) % 2:
        if d[-1] != 0:
            return False
        d = d[:-1]
    high = d[1::2]
    return len(d) >= 2 and high.count(0) == len(high)


def _text(d: bytes) -> Text:
    if _looks_utf16(d) and not _printable(d):
        even = d[: len(d) - len(d) % 2]
        return Text(even.decode("utf-16-le", errors="replace").rstrip("\x00"), "utf-16-le")
    if len(d) == 16 and not _printable(d):
        # Intel/AMI firmware logs a version GUID as EV_S_CRTM_VERSION
        return Text(format_guid(d), "guid")
    return Text(d.rstrip(b"\x00").decode("utf-8", errors="replace"), "utf-8")


_IPL_PREFIXES = (("grub_cmd: ", "grub_cmd"), ("grub_cmd ", "grub_cmd"),
                 ("kernel_cmdline: ", "kernel_cmdline"),
                 ("grub_kernel_cmdline ", "kernel_cmdline"))  # fmt: skip
IPL_BYTE_PREFIXES = tuple((p.encode(), k) for p, k in _IPL_PREFIXES)
"""(label, kind) for each GRUB label an EV_IPL string may start with."""
_IPL_LABELS = tuple(p for p, _ in IPL_BYTE_PREFIXES)


def _ipl(d: bytes) -> IplString:
    text = _text(d)
    kind, value = "string", text.text
    if text.encoding == "utf-16-le":
        kind = "load_options"
    else:
        for prefix, k in _IPL_PREFIXES:
            if text.text.startswith(prefix):
                kind, value = k, text.text[len(prefix) :]
                break
    return IplString(text.text, text.encoding, kind, value)


def ipl_kind(d: bytes) -> str:
    """``kind`` of the IplString that EV_IPL data ``d`` decodes to, without decoding it
    (for rules that only read some kinds).

    The labels are ASCII and a UTF-8 decode with replacement turns ASCII bytes,
    and only them, into the same ASCII characters: the decoded text starts with a
    label exactly when the bytes do.
    """
    if len(d) >= 2 and d[1] and not d.startswith(_IPL_LABELS):
        return "string"  # the usual case: ASCII, no label
    if not (len(d) >= 2 and d[1]) and _looks_utf16(d) and not _printable(d):
        return "load_options"  # (a non-zero second byte is never UTF-16 text)
    if not d.startswith(_IPL_LABELS) or (len(d) == 16 and not _printable(d)):
        return "string"  # a GUID's text form starts with a hex digit, never a label
    for prefix, kind in IPL_BYTE_PREFIXES:
        if d.startswith(prefix):
            return kind
    return "string"


def _short_description(r: Reader) -> str:
    size = r.u8("BlobDescriptionSize")
    return r.take(size, "BlobDescription").rstrip(b"\x00").decode("utf-8", errors="replace")


def _image_load(d: bytes, base: int, uintn_size: int, limits: Limits) -> ImageLoad:
    r = Reader(d, "UEFI_IMAGE_LOAD_EVENT", base=base)
    location = r.u64("ImageLocationInMemory")
    uintn = r.u64 if uintn_size == 2 else r.u32
    length = uintn("ImageLengthInMemory")
    link = uintn("ImageLinkTimeAddress")
    path_len = uintn("LengthOfDevicePath")
    path_at = r.offset
    path_bytes = r.take(path_len, "DevicePath")
    path = (
        DevicePath.parse(path_bytes, base=path_at, max_nodes=limits.max_device_path_nodes)
        if path_bytes
        else None
    )
    return ImageLoad(location, length, link, path)


def _gpt(d: bytes, base: int) -> GptEvent:
    r = Reader(d, "UEFI_GPT_DATA", base=base)
    header = r.take(92, "UEFIPartitionHeader")
    header_size = int.from_bytes(header[12:16], "little")
    if header_size > 92:
        r.take(header_size - 92, "UEFIPartitionHeader")
    disk_guid = format_guid(header[56:72])
    entry_size = int.from_bytes(header[84:88], "little")
    count = r.u64("NumberOfPartitions")
    if entry_size < 128 or count > r.remaining // entry_size:
        raise r.error("NumberOfPartitions", f"{count} entries of {entry_size} bytes do not fit")
    parts = []
    for i in range(count):
        e = r.take(entry_size, f"Partitions[{i}]")
        parts.append(
            GptPartition(
                type_guid=format_guid(e[0:16]),
                unique_guid=format_guid(e[16:32]),
                starting_lba=int.from_bytes(e[32:40], "little"),
                ending_lba=int.from_bytes(e[40:48], "little"),
                attributes=int.from_bytes(e[48:56], "little"),
                name=e[56:128].decode("utf-16-le", errors="replace").split("\x00", 1)[0],
            )
        )
    return GptEvent(disk_guid, tuple(parts))


# --- framing: would the decoder succeed? (checker(defer=True)) ---------------------------
# Each returns the _Frame when the decoder of its type, given the same data, uintn size and
# device path node limit, returns; None when it raises. tests/verifier/eventlog/
# test_fast_path.py compares each with its decoder on the corpus and on mutated data.


def _frame_variable(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    return variable_frame(d, max_nodes=max_nodes)


def _frame_authority(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    return variable_frame(d, authority=True, max_nodes=max_nodes)


def _frame_image(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    """_image_load: a u64 and three UINTNs, then LengthOfDevicePath bytes of device path
    (bytes after it are not read)."""
    width = 8 if uintn_size == 2 else 4
    at = 8 + 3 * width
    if len(d) < at:
        return None
    end = at + int.from_bytes(d[at - width : at], "little")
    if end > len(d) or (end > at and not device_path_ok(d[at:end], max_nodes)):
        return None
    return at, end


def _frame_blob(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    return (0, 16) if len(d) == 16 else None  # BlobBase, BlobLength, nothing after


def _frame_blob2(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    # BlobDescriptionSize u8, BlobDescription, BlobBase, BlobLength, nothing after
    return (0, len(d)) if d and len(d) == 1 + d[0] + 16 else None


def _frame_tag(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    # taggedEventID, taggedEventDataSize, that many bytes, nothing after
    return (8, len(d)) if len(d) >= 8 and len(d) == 8 + int.from_bytes(d[4:8], "little") else None


def _frame_gpt(d: bytes, uintn_size: int, max_nodes: int) -> _Frame | None:
    """_gpt: a 92-byte header (longer if HeaderSize says so), NumberOfPartitions, then
    that many entries of SizeOfPartitionEntry (>= 128) bytes that must fit."""
    if len(d) < 92:
        return None
    at = max(92, int.from_bytes(d[12:16], "little")) + 8
    if at > len(d):
        return None
    entry_size = int.from_bytes(d[84:88], "little")
    count = int.from_bytes(d[at - 8 : at], "little")
    if entry_size < 128 or count > (len(d) - at) // entry_size:
        return None
    return at, len(d)


_FRAMES: dict[int, Callable[[bytes, int, int], _Frame | None]] = {
    T.EV_EFI_VARIABLE_DRIVER_CONFIG: _frame_variable,
    T.EV_EFI_VARIABLE_BOOT: _frame_variable,
    T.EV_EFI_VARIABLE_BOOT2: _frame_variable,
    T.EV_EFI_VARIABLE_AUTHORITY: _frame_authority,
    T.EV_EFI_BOOT_SERVICES_APPLICATION: _frame_image,
    T.EV_EFI_BOOT_SERVICES_DRIVER: _frame_image,
    T.EV_EFI_RUNTIME_SERVICES_DRIVER: _frame_image,
    T.EV_EFI_PLATFORM_FIRMWARE_BLOB: _frame_blob,
    T.EV_EFI_PLATFORM_FIRMWARE_BLOB2: _frame_blob2,
    T.EV_EVENT_TAG: _frame_tag,
    T.EV_EFI_GPT_EVENT: _frame_gpt,
}

# --- every event of a log at once (what verify_log runs) ----------------------------------


class Framed(enum.Enum):
    """Marks, in :class:`CheckedEvents`, an event that frames (see ``_FRAMES``): it
    decodes, when read, to what ``LazyDecode(event.data_offset, ...)`` gives."""

    FRAMED = "framed"


FRAMED = Framed.FRAMED

Outcome = tuple[
    "Decoded | Pending | LazyDecode | Framed | None",
    bool | None,
    "tuple[AppliedQuirk, ...] | str",
    tuple[str, ...],
    str | None,
]
"""A :data:`CheckOutcome` as :class:`CheckedEvents` keeps it: ``decoded`` may be FRAMED,
and the quirks the id of the one quirk applied (its detail being the quirk's summary)."""


class CheckedEvents:
    """:func:`checker`'s outcome for every event of one log.

    ``outcomes[i]`` is event ``i``'s (``Event.index``): the inlined paths of
    :func:`check_all` share one tuple per kind of outcome, so a log's usual events cost
    no object each; :meth:`outcome` gives the checker's own form. ``by_type``: event
    type -> its events; ``applied``: quirk id -> the events it was applied to, in order
    of first application (what ``quirks.summarize`` groups); ``mismatched``: the events
    whose data is proven not to be what was measured; ``problems``: every problem, in
    event order.
    """

    __slots__ = (
        "applied",
        "by_type",
        "limits",
        "mismatched",
        "outcomes",
        "problems",
        "uintn_size",
    )

    def __init__(self, uintn_size: int, limits: Limits) -> None:
        self.outcomes: list[Outcome] = []
        self.by_type: dict[int, list[int]] = {}
        self.applied: dict[str, list[int]] = {}
        self.mismatched: list[int] = []
        self.problems: list[str] = []
        self.uintn_size = uintn_size
        self.limits = limits

    def outcome(self, event: Event) -> CheckOutcome:
        """``event``'s outcome as ``checker(..., defer=True)`` gives it."""
        decoded, verified, quirks, problems, covers = self.outcomes[event.index]
        if decoded is FRAMED:
            decoded = LazyDecode(event.data_offset, self.uintn_size, self.limits)
        if type(quirks) is str:
            quirks = (AppliedQuirk(quirks, event.index, QUIRKS[quirks].summary),)
        return decoded, verified, quirks, problems, covers  # type: ignore[return-value]


# One bank, the usual case: check_all inlines these paths, each giving exactly what
# checker's would; anything else (a mismatch, a frame that fails, several banks) goes to
# checker. Deferred types whose digest is not of their data, and the deferred types (and
# 4-byte separators) whose plan starts with the whole data:
_DEFERRED_UNCHECKED = _DEFERRED - _PLANS.keys()
_DEFERRED_WHOLE = frozenset(
    t for t in _DEFERRED if t in _PLANS and _PLANS[t][0][1] is _whole and t != T.EV_IPL
)
if any(plan[0][0] is not None for plan in _PLANS.values()):
    raise TypeError("a plan must start with the spec's own form (no quirk)")
_NO_QUIRKS: tuple[AppliedQuirk, ...] = ()
# The outcomes of the inlined paths, shared by every event that has them.
_UNCHECKED: Outcome = (PENDING, None, _NO_QUIRKS, (), None)
_WHOLE_PROVEN: Outcome = (PENDING, True, _NO_QUIRKS, (), _COVERS[_whole])
_DESCRIPTION_QUIRK = "ipl-description-only"
_DESCRIPTION: Outcome = (PENDING, None, _DESCRIPTION_QUIRK, (), None)
_FRAMED_UNCHECKED: Outcome = (FRAMED, None, _NO_QUIRKS, (), None)
# Framed types: the first form of their plan and the outcome when it proves the data.
_FRAMED_FIRST: dict[int, tuple[_Form, Outcome] | None] = {
    t: None
    if t not in _PLANS
    else (_PLANS[t][0][1], (FRAMED, True, _NO_QUIRKS, (), _PLANS[t][0][2]))
    for t in _FRAMES
}
# EV_IPL: GRUB's labels and the outcome when the text after one proves the data. The
# labels are those of _GRUB_CMD and _GRUB_CMDLINE, in their order; no data starts with two.
_GRUB_LABELS: tuple[tuple[bytes, int, Outcome, str], ...] = tuple(
    (label, len(label), (PENDING, True, quirk_id, (), covers), quirk_id)
    for quirk_id, form, covers, _ in _PLANS[T.EV_IPL][1:]
    if quirk_id is not None
    for label in _FORM_LABELS[form]
)


def check_all(
    records: Records,
    algorithms: tuple[HashAlgorithm, ...],
    *,
    uintn_size: int = 2,
    spec_id: SpecIdEvent | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> CheckedEvents:
    """``checker(algorithms, defer=True)`` over every event of a log (its ``records``),
    in order. ``spec_id``: the log's, already parsed from event 0's data.

    With one computable bank, the usual events take an inlined path that gives the
    checker's outcome without its generic search: a GRUB label's forms are tried before
    the whole data, the one (with or without the NUL) that proved the last GRUB string
    first (as the checker's hint does: only a hash collision could tell the orders
    apart), the other forms in the checker's order; event 0's Spec ID event is the one
    parse read (the same bytes, read by the same function with no tighter limit).
    """
    check = checker(algorithms, uintn_size=uintn_size, limits=limits, defer=True)
    computable = [a for a in algorithms if a.computable]
    one_bank = len(computable) == 1
    # (with several banks, or none, only the general path runs: column and new go unused)
    new = computable[0].new if computable else _sha256
    column = records.digests[records.names.index(computable[0].name)] if computable else []
    out = CheckedEvents(uintn_size, limits)
    outcomes, by_type, applied = out.outcomes, out.by_type, out.applied
    append = outcomes.append
    compare = hmac.compare_digest
    unchecked, whole_types = _DEFERRED_UNCHECKED, _DEFERRED_WHOLE
    framed, frames = _FRAMED_FIRST, _FRAMES
    ipl, separator, no_action = T.EV_IPL, T.EV_SEPARATOR, T.EV_NO_ACTION
    error_separator_data, fixed_data = ERROR_SEPARATOR_DATA, _FIXED_DATA
    variable_types = _VARIABLE_TYPES
    grub_labels, description_pcrs = _GRUB_LABELS, _IPL_DESCRIPTION_PCRS
    description_quirk = _DESCRIPTION_QUIRK
    unchecked_outcome, whole_proven, description = _UNCHECKED, _WHOLE_PROVEN, _DESCRIPTION
    framed_unchecked = _FRAMED_UNCHECKED
    max_nodes = limits.max_device_path_nodes
    spec_ok = spec_id is not None and len(spec_id.algorithms) <= limits.max_digests_per_event
    without_nul = False  # whether the last GRUB string was measured without its NUL
    log = records.data
    for index, (t, pcr, start, end) in enumerate(
        zip(records.types, records.pcrs, records.data_starts, records.ends, strict=True)
    ):
        if t in by_type:  # (setdefault would build a list per event)
            by_type[t].append(index)
        else:
            by_type[t] = [index]
        # One bank: each inlined path appends its outcome and goes on to the next event;
        # what none of them proves falls through to the checker's general path below.
        # Only EV_IPL outcomes name a quirk (a GRUB form, a description).
        if one_bank:
            if t == ipl:  # (first: the most common type, GRUB logs one per command)
                digest = column[index]
                outcome: Outcome | None = None
                quirk = description_quirk
                for label, size, proven, quirk_id in grub_labels:
                    if log.startswith(label, start, end):  # (the body: log[start + size:end])
                        body = start + size
                        if end == body or log[end - 1]:  # no NUL at the end
                            if compare(new(log[body:end]).digest(), digest):
                                outcome, quirk = proven, quirk_id
                        else:  # GRUB builds differ on the NUL: the last one's way first
                            first, second = (end - 1, end) if without_nul else (end, end - 1)
                            if compare(new(log[body:first]).digest(), digest):
                                outcome, quirk = proven, quirk_id
                            elif compare(new(log[body:second]).digest(), digest):
                                outcome, quirk = proven, quirk_id
                                without_nul = not without_nul
                        break
                if outcome is None:
                    if compare(new(log[start:end]).digest(), digest):
                        append(whole_proven)
                        continue
                    if pcr in description_pcrs:
                        outcome = description
                if outcome is not None:  # (its quirk: the GRUB form's, or the description's)
                    append(outcome)
                    if quirk in applied:
                        applied[quirk].append(index)
                    else:
                        applied[quirk] = [index]
                    continue
            elif t in fixed_data and log[start:end] not in fixed_data[t]:
                pass  # (reported by the general path)
            elif t in unchecked:
                append(unchecked_outcome)
                continue
            elif t in whole_types or (
                t == separator
                and end - start == 4
                and not log.startswith(error_separator_data, start)  # (reported: general path)
            ):
                if compare(new(log[start:end]).digest(), column[index]):
                    append(whole_proven)
                    continue
            elif t in framed:
                data = log[start:end]
                frame = frames[t](data, uintn_size, max_nodes)
                if frame is not None and not (
                    t in variable_types and frame[1] < end - start  # (the quirk: general path)
                ):
                    spec_form = framed[t]
                    if spec_form is None:
                        append(framed_unchecked)
                        continue
                    form, proven = spec_form
                    candidates = form(data, frame)
                    if candidates and compare(new(candidates[0]).digest(), column[index]):
                        append(proven)
                        continue
            elif (
                t == no_action
                and index == 0
                and spec_ok
                and spec_id is not None
                and log[start:end] == spec_id.raw
            ):
                append((spec_id, None, (), (), None))
                continue
        # the general path: checker's own search
        checked = check(records.event(index))
        append(checked)
        _, verified, quirks, problems, _ = checked
        for q in quirks:
            if q.quirk_id in applied:
                applied[q.quirk_id].append(index)
            else:
                applied[q.quirk_id] = [index]
        if problems:
            out.problems.extend(problems)
        if verified is False:
            out.mismatched.append(index)
    return out
