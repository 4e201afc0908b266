"""The appraisal fast path (issue 5) gives what the straightforward path gives.

verify() decodes strings and 4-byte separators on first read and tries a hinted
GRUB form first; parse reads the usual record header with one struct. Each test
compares with the plain functions (decode_event, check_event, the dataclass
constructors) on the corpus and on built logs.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.verifier.eventlog import _build
from verifier.appraisal import appraise_log
from verifier.eventlog import (
    AppliedQuirk,
    DevicePath,
    Event,
    EventLog,
    EventType,
    ImageLoad,
    IplString,
    ReplayedEvent,
    check_event,
    decode_event,
)
from verifier.eventlog.decode import _ipl, ipl_kind
from verifier.eventlog.jsonview import to_jsonable
from verifier.policy import learn_policy
from verifier.policy.rules import _never_cmdline
from vtpm_core.errors import ParseError

T = EventType


def _corpus_logs(eventlogs: Path) -> list[EventLog]:
    logs = []
    for path in sorted(eventlogs.glob("*.bin")):
        try:
            logs.append(EventLog.parse(path.read_bytes()))
        except ParseError:
            continue  # (a deliberately broken sample)
    return logs


def _decode(event: Event, uintn: int) -> object:
    try:
        return decode_event(event, uintn_size=uintn)
    except ParseError:
        return None


def test_replayed_events_equal_the_plain_check_on_every_corpus_log(eventlogs: Path) -> None:
    """Every field, the lazily decoded value included, is what check_event says."""
    logs = _corpus_logs(eventlogs)
    assert len(logs) >= 15
    for log in logs:
        uintn = log.spec_id.uintn_size if log.spec_id is not None else 2
        replayed = log.verify(log.replay())
        for event, got in zip(log.events, replayed.events, strict=True):
            want = check_event(event, log.algorithms, uintn_size=uintn)
            assert got.untrusted_decoded == want.decoded == _decode(event, uintn)
            assert (got.data_verified, got.quirks, got.digest_covers) == (
                want.data_verified,
                want.quirks,
                want.digest_covers,
            ), f"{log.format} event {event.index}"
            assert got.warnings == (*want.problems, *(str(q) for q in want.quirks))
            assert (got.index, got.pcr, got.event_type, got.untrusted_data) == (
                event.index,
                event.pcr,
                event.event_type,
                event.untrusted_data,
            )


def test_fast_built_objects_equal_constructed_ones(load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log("vm_rhel9_qemu_ovmf_secureboot_keylime.bin")
    for event in log.events:
        assert event == Event(**{f.name: getattr(event, f.name) for f in dataclasses.fields(Event)})
    replayed = log.verify(log.replay())
    for e in replayed.events:
        fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(ReplayedEvent)}
        rebuilt = ReplayedEvent(**fields)
        assert rebuilt == e
        assert rebuilt.untrusted_decoded == e.untrusted_decoded
        assert repr(rebuilt) == repr(e)
        for q in e.quirks:
            assert q == AppliedQuirk(q.quirk_id, q.event_index, q.detail)
    with pytest.raises(dataclasses.FrozenInstanceError):
        replayed.events[40].pcr = 1  # type: ignore[misc]
    # slotted: one GC-counted object each, so an appraisal stays under the
    # collector's first threshold (the slot setters must fill every field)
    assert not hasattr(log.events[0], "__dict__")
    assert not hasattr(replayed.events[0], "__dict__")
    assert not hasattr(replayed.quirks[0], "__dict__")
    # exactly the frozen classes, still frozen
    assert type(log.events[0]) is Event and type(replayed.events[0]) is ReplayedEvent
    assert type(replayed.quirks[0]) is AppliedQuirk
    for obj, name in ((log.events[3], "pcr"), (replayed.quirks[0], "detail")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)


BANKS = pytest.mark.parametrize(
    "banks", [("sha1", "sha256"), ("sha256",)], ids=["two banks", "one bank (inlined)"]
)


@BANKS
def test_malformed_event_whose_digest_matches_still_warns(banks: tuple[str, ...]) -> None:
    """Deferred decoding must never hide a decode failure: these types are decoded
    during verify, and their problem is in the event's and the result's warnings."""
    bad_variable = b"\x01" * 16 + struct.pack("<QQ", 50, 0)  # name runs past the data
    raw = _build.log(
        _build.event2(7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, bad_variable, banks),
        _build.event2(7, T.EV_SEPARATOR, b"\x00" * 5, banks),  # a separator is 4 bytes
        _build.event2(4, T.EV_EFI_BOOT_SERVICES_APPLICATION, b"\x00" * 7, banks),  # short image
        _build.event2(
            8, T.EV_IPL, b"grub_cmd: linux /vmlinuz\x00", banks, digest_of=b"linux /vmlinuz"
        ),
        banks=banks,
    )
    log = EventLog.parse(raw)
    replayed = log.verify(log.replay())
    variable, separator, image, ipl = replayed.events[1:]
    assert variable.data_verified is True and variable.decoded is None
    assert separator.data_verified is True and separator.decoded is None
    assert image.data_verified is None and image.decoded is None
    for e, structure in (
        (variable, "UEFI_VARIABLE_DATA.UnicodeNameLength"),
        (separator, "EV_SEPARATOR.event"),
        (image, "UEFI_IMAGE_LOAD_EVENT.ImageLocationInMemory"),
    ):
        assert len(e.problems) == 1
        assert e.problems[0].startswith(f"event data does not decode: {structure} at byte ")
        assert e.problems[0] in replayed.warnings
    assert ipl.problems == () and isinstance(ipl.decoded, IplString)
    policy = learn_policy(replayed, name="t")
    result = appraise_log(raw, policy)
    for e in (variable, separator, image):
        assert e.problems[0] in result.warnings


@BANKS
def test_hinted_grub_form_names_the_same_quirk_as_the_in_order_search(
    banks: tuple[str, ...],
) -> None:
    """One log mixing both GRUB conventions (with and without the NUL measured),
    kernel command lines, file names and a forged command: each event gets exactly
    what check_event (no hint, no inlined path) gives it."""
    ipl = T.EV_IPL
    events = [
        _build.event2(8, ipl, b"grub_cmd: set a=1\x00", banks, digest_of=b"set a=1"),
        _build.event2(8, ipl, b"grub_cmd: set b=2\x00", banks, digest_of=b"set b=2"),
        _build.event2(8, ipl, b"grub_cmd: set c=3\x00", banks, digest_of=b"set c=3\x00"),
        _build.event2(9, ipl, b"/boot/grub2/grub.cfg\x00", banks, digest_of=b"file contents"),
        _build.event2(8, ipl, b"grub_cmd: set d=4\x00", banks, digest_of=b"set d=4"),
        _build.event2(8, ipl, b"kernel_cmdline: ro quiet\x00", banks, digest_of=b"ro quiet"),
        _build.event2(8, ipl, b"grub_cmd: set e=5\x00", banks, digest_of=b"set e=5"),
        _build.event2(8, ipl, b"grub_cmd: set f=6\x00", banks, digest_of=b"set f=6 forged"),
        _build.event2(8, ipl, b"grub_cmd: set g=7\x00", banks),  # the whole data, per the spec
    ]
    log = EventLog.parse(_build.log(*events, banks=banks))
    replayed = log.verify(log.replay())
    got = [(e.data_verified, e.quirks, e.digest_covers, e.problems) for e in replayed.events]
    want = [
        (c.data_verified, c.quirks, c.digest_covers, c.problems)
        for c in (check_event(e, log.algorithms) for e in log.events)
    ]
    assert got == want
    ids = [tuple(q.quirk_id for q in e.quirks) for e in replayed.events[1:]]
    assert ids == [
        ("grub-command-string",),
        ("grub-command-string",),
        ("grub-command-string",),
        ("ipl-description-only",),
        ("grub-command-string",),
        ("grub-kernel-cmdline-string",),
        ("grub-command-string",),
        (),
        (),
    ]
    assert replayed.events[8].data_verified is False
    assert replayed.events[9].data_verified is True


@given(st.binary(max_size=40))
def test_ipl_kind_is_the_decoded_kind(data: bytes) -> None:
    assert ipl_kind(data) == _ipl(data).kind


@given(
    st.sampled_from([b"", b"kernel_cmdline: ", b"grub_kernel_cmdline ", b"grub_cmd: ", b"k"]),
    st.binary(max_size=40),
)
def test_the_cmdline_rule_skips_only_what_is_no_command_line(label: bytes, body: bytes) -> None:
    for data in (label + body, (label.decode() + body.hex()).encode("utf-16-le")):
        if _never_cmdline(data):
            assert _ipl(data).kind not in ("kernel_cmdline", "load_options")


@pytest.mark.parametrize(
    "data",
    [
        b"grub_cmd: x\x00",
        b"grub_cmd x",
        b"kernel_cmdline: ro\x00",
        b"grub_kernel_cmdline ro",
        b"grub_cmd: \x01\x02\x03\x04\x05",  # 16 bytes, not printable: a GUID
        "kernel_cmdline: x".encode("utf-16-le"),
        "ro quiet\x00".encode("utf-16-le"),
        b"kernel_cmdline: \xff\xfe",
        b"",
        b"g",
    ],
)
def test_ipl_kind_on_the_edges(data: bytes) -> None:
    assert ipl_kind(data) == _ipl(data).kind


def test_agile_records_with_banks_out_of_spec_id_order_still_parse() -> None:
    """The one-struct header read expects the Spec ID order; any other order goes
    through the field-by-field parser and gives the same events."""
    data = b"hello\x00"
    in_order = _build.event2(1, T.EV_EFI_ACTION, data)
    # swap the two TPMT_HA entries: sha256 first, then sha1
    head, rest = in_order[:12], in_order[12:]
    sha1, sha256 = rest[: 2 + 20], rest[2 + 20 : 2 + 20 + 2 + 32]
    swapped = head + sha256 + sha1 + rest[2 + 20 + 2 + 32 :]
    a = EventLog.parse(_build.log(in_order)).events[1]
    b = EventLog.parse(_build.log(swapped)).events[1]
    assert dict(a.digests) == dict(b.digests)
    assert list(b.digests) == ["sha256", "sha1"]  # as the record lists them
    assert (a.untrusted_data, a.pcr, a.event_type) == (b.untrusted_data, b.pcr, b.event_type)


def test_device_path_node_text_is_rendered_on_read(load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log("vm_rhel9_qemu_ovmf_secureboot_keylime.bin")
    replayed = log.verify(log.replay())
    paths = [
        e.decoded.device_path
        for e in replayed.events
        if e.event_type == T.EV_EFI_BOOT_SERVICES_APPLICATION
        and isinstance(e.decoded, ImageLoad)
        and e.decoded.device_path is not None
    ]
    assert len(paths) >= 2 and all(isinstance(p, DevicePath) for p in paths)
    for path in paths:
        view = to_jsonable(path)
        assert view["text"] == "/".join(n["text"] for n in view["nodes"])
        for node, shown in zip(path.nodes, view["nodes"], strict=True):
            assert list(shown) == ["structure", "type", "subtype", "data", "text"]
            assert shown["text"] == node.text and f"text={node.text!r}" in repr(node)


@BANKS
def test_every_inlined_type_and_its_failure_gives_what_check_event_gives(
    banks: tuple[str, ...],
) -> None:
    """Each type check_all inlines for one bank, matching and forged, plus the kinds it
    leaves to the checker; and the replayed log built lazily from it."""
    var = b"\x61\xdf\xe4\x8b\xca\x93\xd2\x11\xaa\x0d\x00\xe0\x98\x03\x2b\x8c"
    secure_boot = var + struct.pack("<QQ", 10, 1) + "SecureBoot".encode("utf-16-le") + b"\x01"
    boot_var = var + struct.pack("<QQ", 9, 2) + "BootOrder".encode("utf-16-le") + b"\x01\x00"
    image = struct.pack("<QQQQ", 0, 0, 0, 0)
    cases = [
        (0, T.EV_S_CRTM_VERSION, b"1.0\x00", None),
        (0, T.EV_S_CRTM_VERSION, b"1.0\x00", b"2.0\x00"),
        (1, T.EV_PLATFORM_CONFIG_FLAGS, b"flags", b"other"),
        (5, T.EV_EFI_ACTION, b"Calling EFI Application from Boot Option", None),
        (5, T.EV_EFI_ACTION, b"Calling EFI Application from Boot Option", b"forged"),
        (7, T.EV_SEPARATOR, b"\x00" * 4, None),
        (7, T.EV_SEPARATOR, b"\xff" * 4, b"\x00" * 4),
        (7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot, None),
        (7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, secure_boot, secure_boot[:-1] + b"\x00"),
        (1, T.EV_EFI_VARIABLE_BOOT, boot_var, boot_var[-2:]),
        (1, T.EV_EFI_VARIABLE_BOOT, boot_var, None),  # the quirk form: the whole structure
        (1, T.EV_EFI_VARIABLE_BOOT, boot_var, b"forged"),
        (7, T.EV_EFI_VARIABLE_AUTHORITY, secure_boot + b"\x00", secure_boot),
        (4, T.EV_EFI_BOOT_SERVICES_APPLICATION, image, b"authenticode hash"),
        (4, T.EV_EFI_BOOT_SERVICES_APPLICATION, image[:-1], b"short"),
        (8, T.EV_IPL, b"/vmlinuz", b"file"),  # no label, not a description PCR: a mismatch
        (14, T.EV_IPL, b"MokList\x00", b"the list"),
        (8, T.EV_IPL, b"grub_cmd: x\x00", b"y"),
        (0x1234, 0x1234, b"unknown", None),
    ]
    events = [_build.event2(pcr % 24, t, data, banks, digest_of=of) for pcr, t, data, of in cases]
    log = EventLog.parse(_build.log(*events, banks=banks))
    replayed = log.verify(log.replay())
    for event, got in zip(log.events, replayed.events, strict=True):
        want = check_event(event, log.algorithms)
        assert got.untrusted_decoded == want.decoded, event.index
        assert (got.data_verified, got.quirks, got.digest_covers, got.problems) == (
            want.data_verified,
            want.quirks,
            want.digest_covers,
            want.problems,
        ), event.index
    verdicts = [e.data_verified for e in replayed.events[1:]]
    assert (verdicts.count(True), verdicts.count(False), verdicts.count(None)) == (7, 7, 5)
    assert replayed.data_mismatches == tuple(e for e in replayed.events if e.data_verified is False)
    problems = [p for e in replayed.events for p in e.problems]
    assert replayed.warnings[-len(problems) :] == tuple(problems)


def test_replayed_log_builds_each_event_once_and_stays_immutable(load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log("vm_rhel9_qemu_ovmf_secureboot_keylime.bin")
    assert log.event(40) is log.events[40] and type(log.events[40]) is Event
    with pytest.raises(AttributeError, match="immutable"):
        log.raw = b""  # type: ignore[misc]
    replayed = log.verify(log.replay())
    ipl = replayed.events_of_type(T.EV_IPL)
    assert ipl == tuple(e for e in replayed.events if e.event_type == T.EV_IPL)
    assert all(a is b for a, b in zip(ipl, replayed.events_of_type(T.EV_IPL), strict=True))
    assert (
        replayed.event(40)
        is replayed.events[40]
        is replayed.events_in_pcr(8)[[e.index for e in replayed.events_in_pcr(8)].index(40)]
    )
    raw = replayed.unverified_events(T.EV_IPL)
    assert raw == [(e.index, e.pcr, e.untrusted_data) for e in ipl]
    assert len(replayed) == len(log.events) == 99
    assert replayed.quirks == tuple(q for e in replayed.events for q in e.quirks)
    with pytest.raises(AttributeError, match="immutable"):
        replayed.warnings = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        replayed.extra = 1  # type: ignore[attr-defined]
