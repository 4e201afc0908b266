"""verify(): replay against quoted PCRs, precise mismatch messages, forged event data."""

from __future__ import annotations

import hashlib

import pytest

from tests.verifier.eventlog import _build
from tests.verifier.eventlog.conftest import load_pcrs
from verifier.eventlog import EfiVariable, EventLog, EventType, IplString
from vtpm_core.errors import VerificationError


def test_verify_returns_trusted_log_and_coverage(load_log, eventlogs) -> None:  # type: ignore[no-untyped-def]
    log = load_log("gce_rhel8_uefi_secureboot.bin")
    quoted = load_pcrs(eventlogs / "gce_rhel8_uefi_secureboot.bin.expected_pcrs.json")
    quoted["sha256"][10] = bytes(32)  # IMA PCR: not in the firmware log, not checked
    replayed = log.verify(quoted)
    assert replayed.verified["sha256"] == frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14})
    assert "sha384" not in replayed.verified  # the quote had no sha384 values
    assert len(replayed.events) == len(log.events)


@pytest.mark.parametrize(
    ("pcr", "bank"),
    [
        pytest.param(4, "sha256", id="fail/replay/pcr4-sha256"),
        pytest.param(0, "sha1", id="fail/replay/pcr0-sha1"),
        pytest.param(14, "sha256", id="fail/replay/pcr14-sha256"),
    ],
)
def test_tampered_pcr_value_is_named(pcr: int, bank: str, load_log, eventlogs) -> None:  # type: ignore[no-untyped-def]
    log = load_log("gce_rhel8_uefi_secureboot.bin")
    quoted = load_pcrs(eventlogs / "gce_rhel8_uefi_secureboot.bin.expected_pcrs.json")
    good = quoted[bank][pcr]
    quoted[bank][pcr] = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(
        VerificationError,
        match=(
            rf"^eventlog.replay: PCR {pcr} {bank}: "
            rf"log replays to {good.hex()}, quote has [0-9a-f]+$"
        ),
    ) as info:
        log.verify(quoted)
    assert info.value.check == "eventlog.replay"


def test_every_mismatch_is_reported(load_log, eventlogs) -> None:  # type: ignore[no-untyped-def]
    log = load_log("gce_rhel8_uefi_secureboot.bin")
    quoted = load_pcrs(eventlogs / "gce_rhel8_uefi_secureboot.bin.expected_pcrs.json")
    quoted["sha256"][4] = bytes(32)
    quoted["sha1"][7] = bytes(19)  # wrong length too
    with pytest.raises(
        VerificationError, match=r"PCR 7 sha1: .*; PCR 4 sha256: .*quote has 0{64}$"
    ):
        log.verify(quoted)


def test_no_common_pcr_fails_closed(load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log("vm_fedora37_sdboot_qemu.bin")
    with pytest.raises(VerificationError, match="share no PCR"):
        log.verify({"sha1": {0: bytes(20)}})
    with pytest.raises(VerificationError, match="share no PCR"):
        log.verify({})


def test_truncated_log_does_not_verify(load_log, eventlogs) -> None:  # type: ignore[no-untyped-def]
    """Dropping the last events (a log cut short) changes the replay: caught."""
    log = load_log("gce_rhel8_uefi_secureboot.bin")
    quoted = load_pcrs(eventlogs / "gce_rhel8_uefi_secureboot.bin.expected_pcrs.json")
    cut = log.events[-3].offset
    short = EventLog.parse(log.raw[:cut])
    with pytest.raises(VerificationError, match=r"PCR (8|9) sha1"):
        short.verify(quoted)


def test_forged_variable_data_keeps_digest_but_is_not_trusted(load_log) -> None:  # type: ignore[no-untyped-def]
    """Change SecureBoot=1 to 0 in the data, keep the digests: replay still
    matches (digests unchanged) but the data is flagged and hidden."""
    log = load_log("gce_rhel8_uefi_secureboot.bin")
    event = log.events[3]
    assert event.untrusted_data.endswith(b"\x01")
    data_at = event.data_offset + len(event.untrusted_data) - 1
    forged_raw = log.raw[:data_at] + b"\x00" + log.raw[data_at + 1 :]
    forged = EventLog.parse(forged_raw)
    replayed = forged.verify(log.replay())  # the quote of the real machine still matches
    fake = replayed.events[3]
    assert fake.data_verified is False
    assert fake.decoded is None and fake.verified_data is None
    assert isinstance(fake.untrusted_decoded, EfiVariable)
    assert fake.untrusted_decoded.name == "SecureBoot"  # shown only as untrusted
    assert any(
        "event 3 (EV_EFI_VARIABLE_DRIVER_CONFIG, PCR 7): data does not hash" in w
        for w in replayed.warnings
    )
    # the genuine log proves the same event
    assert log.verify(log.replay()).events[3].data_verified is True


def test_forged_kernel_command_line_is_not_trusted() -> None:
    real = b"kernel_cmdline: /vmlinuz root=/dev/sda1 ro\x00"
    forged = b"kernel_cmdline: /vmlinuz root=/dev/sda1 ro init=/bin/sh\x00"
    measured = b"/vmlinuz root=/dev/sda1 ro"
    genuine = EventLog.parse(
        _build.log(_build.event2(8, EventType.EV_IPL, real, digest_of=measured))
    )
    fake = EventLog.parse(
        _build.log(_build.event2(8, EventType.EV_IPL, forged, digest_of=measured))
    )
    good = genuine.verify(genuine.replay()).events[1]
    assert good.data_verified is True and isinstance(good.decoded, IplString)
    assert good.decoded.value == "/vmlinuz root=/dev/sda1 ro"
    bad = fake.verify(genuine.replay()).events[1]  # same digests, same PCRs
    assert bad.data_verified is False and bad.decoded is None


def test_digest_matching_one_bank_only_is_a_mismatch() -> None:
    """A forger who fixes SHA-1 but not SHA-256 does not get the data trusted."""
    data = b"Calling EFI Application from Boot Option"
    raw = bytearray(_build.log(_build.event2(4, EventType.EV_EFI_ACTION, data)))
    sha256_at = raw.rindex(hashlib.sha256(data).digest())
    raw[sha256_at] ^= 1
    log = EventLog.parse(bytes(raw))
    assert log.verify(log.replay()).events[1].data_verified is False


@pytest.mark.parametrize(
    ("name", "index", "type_name"),
    [
        # systemd-boot (old) measured the UTF-16 options into PCR 8 with a digest
        # that is not of the logged bytes; tpm2_eventlog warns about it too.
        pytest.param("workstation_archlinux_sdboot.bin", 24, "EV_IPL", id="arch-event-24"),
        # GDC firmware's S-CRTM version "2.3.5": the digest is not of the logged string
        # (tpm2_eventlog: "Event 3's digest does not match its payload").
        pytest.param("gdc_host_physical_server.bin", 3, "EV_S_CRTM_VERSION", id="gdc-event-3"),
    ],
)
def test_real_digest_data_mismatches_are_flagged(
    name: str, index: int, type_name: str, load_log, eventlogs
) -> None:  # type: ignore[no-untyped-def]
    log = load_log(name)
    replayed = log.verify(load_pcrs(eventlogs / f"{name}.expected_pcrs.json"))
    event = replayed.events[index]
    assert event.type_name == type_name
    assert event.data_verified is False and event.decoded is None
    assert event.untrusted_decoded is not None
    assert any(f"event {index} ({type_name}" in w for w in replayed.warnings)
    flagged = [e.index for e in replayed.events if e.data_verified is False]
    assert flagged == [index]  # and nothing else in these logs


def test_startup_locality_4_hcrtm() -> None:
    """H-CRTM platforms log StartupLocality 4: PCR 0 starts at 00..04."""
    locality = b"StartupLocality\x00\x04"
    data = _build.log(
        _build.event2(0, EventType.EV_NO_ACTION, locality, digest_of=b"")
        .replace(hashlib.sha1(b"").digest(), bytes(20))
        .replace(hashlib.sha256(b"").digest(), bytes(32)),
        _build.event2(0, EventType.EV_S_CRTM_VERSION, b"v\x00\x00\x00"),
    )
    log = EventLog.parse(data)
    assert log.startup_locality is not None and log.startup_locality.locality == 4
    start = bytes(31) + b"\x04"
    digest = hashlib.sha256(b"v\x00\x00\x00").digest()
    assert log.replay()["sha256"][0] == hashlib.sha256(start + digest).digest()


def test_unlogged_exit_boot_services_is_explained(load_log) -> None:  # type: ignore[no-untyped-def]
    """Firmware that measured Exit Boot Services into PCR 5 without logging it:
    replay disagrees with the quote by design; the error says exactly why."""
    log = load_log("vm_fedora37_sdboot_qemu.bin")
    # drop the two logged Exit Boot Services events (the last two records)
    unlogged = EventLog.parse(log.raw[: log.events[26].offset])
    assert [e.type_name for e in log.events[26:]] == ["EV_EFI_ACTION", "EV_EFI_ACTION"]
    with pytest.raises(
        VerificationError,
        match=(
            r"^eventlog.replay: PCR 5 sha256: log replays to [0-9a-f]{64}, quote has [0-9a-f]{64} "
            r"\(the quote matches if the firmware extended 'Exit Boot Services Invocation' and "
            r"'Exit Boot Services Returned with Success' without logging it\)$"
        ),
    ):
        unlogged.verify(log.replay())


@pytest.mark.parametrize(
    ("actions", "said"),
    [
        pytest.param(
            (b"Exit Boot Services Invocation", b"Exit Boot Services Returned with Failure"),
            "'Exit Boot Services Invocation' and 'Exit Boot Services Returned with Failure'",
            id="invocation-failure",
        ),
        pytest.param(
            (
                b"Exit Boot Services Invocation",
                b"Exit Boot Services Returned with Failure",
                b"Exit Boot Services Returned with Success",
            ),
            "'Exit Boot Services Invocation', 'Exit Boot Services Returned with Failure' and "
            "'Exit Boot Services Returned with Success'",
            id="invocation-failure-success",
        ),
    ],
)
def test_unlogged_failed_exit_boot_services_is_explained(
    actions: tuple[bytes, ...], said: str
) -> None:
    """The sequences with a failed ExitBootServices() that go-attestation's workarounds try
    are named too; the log is still refused (the events are not in it)."""
    logged = _build.log(_build.event2(5, EventType.EV_SEPARATOR, bytes(4)))
    value = EventLog.parse(logged).replay()["sha256"][5]
    for action in actions:
        value = hashlib.sha256(value + hashlib.sha256(action).digest()).digest()
    with pytest.raises(
        VerificationError,
        match=rf"\(the quote matches if the firmware extended {said} without logging it\)$",
    ):
        EventLog.parse(logged).verify({"sha256": {5: value}})


def test_duplicate_separators_replay_as_logged() -> None:
    """Firmware that logs PCR 7's separator twice (go-attestation and tcglog-parser replay
    them like any event): both are extended and proven, nothing is dropped or merged."""
    sep = _build.event2(7, EventType.EV_SEPARATOR, bytes(4))
    log = EventLog.parse(_build.log(sep, sep))
    d = hashlib.sha256(bytes(4)).digest()
    once = hashlib.sha256(bytes(32) + d).digest()
    assert log.replay()["sha256"][7] == hashlib.sha256(once + d).digest()
    replayed = log.verify(log.replay())
    assert [e.data_verified for e in replayed.events_in_pcr(7)] == [True, True]
    with pytest.raises(VerificationError, match=r"^eventlog.replay: PCR 7 sha256"):
        log.verify({"sha256": {7: once}})  # a quote with one separator is not this log
