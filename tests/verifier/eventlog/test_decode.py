"""Decoding of real events from the corpus (and a few built ones no corpus log has)."""

from __future__ import annotations

import itertools

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from tests.verifier.eventlog import _build
from verifier.eventlog import (
    BootOrder,
    EfiBoolean,
    EfiVariable,
    EventLog,
    EventType,
    ImageLoad,
    IplString,
    LoadOption,
    ReplayedLog,
    Separator,
    SignatureData,
    SignatureDatabase,
    TaggedEvent,
    Text,
    type_name,
)
from verifier.eventlog.quirks import summarize_applied


def _verified(log: EventLog) -> ReplayedLog:
    # The corpus logs replay to their recorded PCRs (test_corpus); verifying a
    # log against its own replay gives the trusted view these tests inspect.
    return log.verify(log.replay())


@pytest.fixture(scope="module")
def rhel8(load_log) -> ReplayedLog:  # type: ignore[no-untyped-def]
    return _verified(load_log("gce_rhel8_uefi_secureboot.bin"))


def test_secure_boot_variable(rhel8: ReplayedLog) -> None:
    event = rhel8.events[3]
    assert event.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG" and event.pcr == 7
    assert event.data_verified is True
    var = event.decoded
    assert isinstance(var, EfiVariable)
    assert var.name == "SecureBoot" and var.vendor == "EFI_GLOBAL_VARIABLE"
    assert isinstance(var.value, EfiBoolean) and var.value.enabled


def test_pk_and_db_signature_lists_hold_x509_certs(rhel8: ReplayedLog) -> None:
    for index, name, count in ((4, "PK", 1), (6, "db", 2)):
        var = rhel8.events[index].decoded
        assert isinstance(var, EfiVariable) and var.name == name
        assert isinstance(var.value, SignatureDatabase)
        sigs = [s for sl in var.value.lists for s in sl.signatures]
        assert len(sigs) == count
        assert {sl.type_name for sl in var.value.lists} == {"EFI_CERT_X509_GUID"}
        for sig in sigs:
            cert = x509.load_der_x509_certificate(sig.data)
            assert cert.subject.rfc4514_string()


def test_dbx_lists_sha256_hashes(rhel8: ReplayedLog) -> None:
    var = rhel8.events[7].decoded
    assert isinstance(var, EfiVariable) and var.name == "dbx"
    assert isinstance(var.value, SignatureDatabase)
    hashes = [
        s.data
        for sl in var.value.lists
        if sl.type_name == "EFI_CERT_SHA256_GUID"
        for s in sl.signatures
    ]
    assert len(hashes) >= 180 and all(len(h) == 32 for h in hashes)


def test_boot_order_and_boot_entries(rhel8: ReplayedLog) -> None:
    order = rhel8.events[9].decoded
    assert isinstance(order, EfiVariable) and isinstance(order.value, BootOrder)
    assert order.value.names == ("Boot0002", "Boot0000", "Boot0001")
    # PFP §10.4.4: only VariableData is hashed for EV_EFI_VARIABLE_BOOT
    assert rhel8.events[10].digest_covers is not None
    assert rhel8.events[10].digest_covers.startswith("VariableData only")
    boot = rhel8.events[10].decoded
    assert isinstance(boot, EfiVariable) and boot.name == "Boot0002"
    assert isinstance(boot.value, LoadOption) and boot.value.active
    assert boot.value.description == "Red Hat Enterprise Linux"
    assert boot.value.device_path.file_path == "\\EFI\\redhat\\shimx64.efi"
    assert boot.value.device_path.text.startswith(
        "HD(1,GPT,ef72374c-2630-46a1-88d6-082693781140,0x800,0x64000)/"
    )


def test_boot_services_applications_with_device_paths(rhel8: ReplayedLog) -> None:
    apps = rhel8.events_of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
    paths = []
    for app in apps:
        assert app.data_verified is None  # digest is the Authenticode hash of the image
        assert isinstance(app.decoded, ImageLoad)
        paths.append(app.decoded.path_text)
    assert paths[0] is not None and paths[0].startswith(
        "PciRoot(0x0)/Pci(0x3,0x0)/Scsi(0x1,0x0)/HD(1,GPT,"
    )
    assert paths[0].endswith("\\EFI\\redhat\\shimx64.efi")
    assert "\\EFI\\redhat\\grubx64.efi" in paths


def test_grub_commands_and_kernel_command_line(rhel8: ReplayedLog) -> None:
    cmd = rhel8.events[28]
    assert isinstance(cmd.decoded, IplString)
    assert (cmd.decoded.kind, cmd.decoded.value) == ("grub_cmd", "set pager=1")
    assert cmd.data_verified is True
    assert [q.quirk_id for q in cmd.quirks] == ["grub-command-string"]
    cmdline = rhel8.events[78]
    assert isinstance(cmdline.decoded, IplString) and cmdline.decoded.kind == "kernel_cmdline"
    assert cmdline.decoded.value.startswith(
        "(hd0,gpt2)/boot/vmlinuz-4.18.0-240.22.1.el8_3.x86_64 root=UUID="
    )
    assert cmdline.data_verified is True
    assert [q.quirk_id for q in cmdline.quirks] == ["grub-kernel-cmdline-string"]
    # quirks are reported, once per quirk, in the log's warnings
    assert any(w.startswith("quirk grub-command-string applied to") for w in rhel8.warnings)


def test_shim_mok_and_grub_file_events_are_descriptions(rhel8: ReplayedLog) -> None:
    mok = rhel8.events[24]
    assert mok.pcr == 14 and isinstance(mok.decoded, IplString) and mok.decoded.text == "MokList"
    assert mok.data_verified is None
    assert [q.quirk_id for q in mok.quirks] == ["ipl-description-only"]


def test_systemd_boot_pcr12_options_and_initrd_tag(load_log) -> None:  # type: ignore[no-untyped-def]
    log = _verified(load_log("vm_fedora37_sdboot_qemu.bin"))
    options = log.events_in_pcr(12)
    assert options and all(isinstance(e.decoded, IplString) for e in options)
    first = options[0].decoded
    assert isinstance(first, IplString)
    assert first.kind == "load_options" and first.encoding == "utf-16-le"
    assert first.text == " console=ttyS0 console=tty0 efi=debug "  # whitespace kept as measured
    assert options[0].data_verified is True
    tag = log.events[25]
    assert tag.type_name == "EV_EVENT_TAG" and tag.data_verified is None
    assert isinstance(tag.decoded, TaggedEvent) and tag.decoded.tag_name == "Linux initrd"


def test_separators_and_actions(rhel8: ReplayedLog) -> None:
    seps = rhel8.events_of_type(EventType.EV_SEPARATOR)
    assert {e.pcr for e in seps} >= set(range(8))
    for sep in seps:
        assert isinstance(sep.decoded, Separator) and not sep.decoded.is_error
        assert sep.data_verified is True
    action = rhel8.events[13]
    assert action.decoded == Text("Calling EFI Application from Boot Option", "utf-8")
    assert action.data_verified is True


def test_ffffffff_separator_is_the_other_normal_value() -> None:
    """0xFFFFFFFF is a normal separator (tcglog-parser's alternative normal value, FAPI's
    second valid one); the error value is 1."""
    data = _build.log(
        _build.event2(0, EventType.EV_SEPARATOR, b"\xff\xff\xff\xff"),
    )
    log = EventLog.parse(data)
    replayed = log.verify(log.replay())
    sep = replayed.events[1]
    assert isinstance(sep.decoded, Separator) and not sep.decoded.is_error
    assert sep.decoded.is_normal and sep.data_verified is True
    assert replayed.warnings == ()


ERROR_INFO = b"TPM self test failed\x00"


@pytest.mark.parametrize("banks", [("sha256",), ("sha1", "sha256")], ids=["one-bank", "two"])
@pytest.mark.parametrize(
    ("data", "measured", "verified", "note"),
    [
        # edk2 (MeasureSeparatorEventWithError): logs and measures UINT32 1
        pytest.param(b"\x01\x00\x00\x00", None, True, "", id="edk2-value-1"),
        # the data is error information; the digest is of UINT32 1 (tcglog-parser's ErrorInfo)
        pytest.param(
            ERROR_INFO,
            b"\x01\x00\x00\x00",
            None,
            f"; the {len(ERROR_INFO)} bytes logged with it are error information, not proven",
            id="error-information",
        ),
        # the digest decides: data claiming a normal separator, digest of the error value
        pytest.param(
            bytes(4),
            b"\x01\x00\x00\x00",
            None,
            "; the 4 bytes logged with it are error information, not proven",
            id="normal-data-error-digest",
        ),
    ],
)
def test_error_separator(
    banks: tuple[str, ...], data: bytes, measured: bytes | None, verified: bool | None, note: str
) -> None:
    log = EventLog.parse(
        _build.log(
            _build.event2(4, EventType.EV_SEPARATOR, data, banks=banks, digest_of=measured),
            banks=banks,
        )
    )
    replayed = log.verify(log.replay())
    sep = replayed.events[1]
    assert isinstance(sep.decoded, Separator) and sep.decoded.is_error
    assert sep.data_verified is verified and replayed.data_mismatches == ()
    assert replayed.warnings == (
        "event 1 (EV_SEPARATOR, PCR 4): error separator (its digest is of the error value "
        "0x00000001): the firmware reports an error before this PCR's pre-OS to OS "
        "transition" + note,
    )
    assert sep.warnings == replayed.warnings


def test_separator_proven_neither_way_is_a_mismatch() -> None:
    log = EventLog.parse(
        _build.log(_build.event2(4, EventType.EV_SEPARATOR, bytes(4), digest_of=b"other"))
    )
    replayed = log.verify(log.replay())
    assert replayed.events[1].data_verified is False
    assert [e.index for e in replayed.data_mismatches] == [1]


@pytest.mark.parametrize(
    ("name", "index", "text", "encoding"),
    [
        pytest.param(
            "gce_rhel8_uefi_secureboot.bin", 1, "GCE Virtual Firmware v1", "utf-16-le", id="gce"
        ),
        pytest.param(
            "vm_rhel9_qemu_ovmf_secureboot_keylime.bin",
            1,
            "edk2-20240524-7.el9",
            "utf-16-le",
            id="ovmf",
        ),
        pytest.param(
            "laptop_lenovo_thinkpad_keylime.bin", 3, "N40ET41W ", "utf-16-le", id="lenovo"
        ),
        pytest.param(
            "intel_nuc_legacy_sha1_format.bin",
            0,
            "546bfb1e-1d0c-4055-a4ad-4ef4bf17b83a",
            "guid",
            id="nuc-guid",
        ),
    ],
)
def test_s_crtm_version(name: str, index: int, text: str, encoding: str, load_log) -> None:  # type: ignore[no-untyped-def]
    event = _verified(load_log(name)).events[index]
    assert event.type_name == "EV_S_CRTM_VERSION" and event.pcr == 0
    assert event.decoded == Text(text, encoding)
    assert event.data_verified is True


def test_variable_authority_shim_cert(load_log) -> None:  # type: ignore[no-untyped-def]
    log = _verified(load_log("gce_debian10_legacy_sha1_format.bin"))
    auth = log.events_of_type(EventType.EV_EFI_VARIABLE_AUTHORITY)[-1]
    assert isinstance(auth.decoded, EfiVariable) and auth.decoded.name == "Shim"
    assert isinstance(auth.decoded.value, SignatureData)
    assert x509.load_der_x509_certificate(auth.decoded.value.data).issuer.rfc4514_string()
    # old shim logs one byte it did not hash: a named quirk, reported, data proven
    assert auth.data_verified is True
    assert [q.quirk_id for q in auth.quirks] == ["shim-authority-extra-trailing-byte"]
    # the VariableDataLength shim wrote is 6 bytes short of the data it logged
    assert len(auth.decoded.trailing) == 6


def test_unknown_event_type_is_carried() -> None:
    data = _build.log(
        _build.event2(3, 0x7FFF0001, b"vendor specific"),
        _build.event2(3, EventType.EV_SEPARATOR, bytes(4)),
    )
    log = EventLog.parse(data)
    event = log.events[1]
    assert event.type_name == "UNKNOWN(0x7fff0001)" == type_name(0x7FFF0001)
    replayed = log.verify(log.replay())
    assert replayed.events[1].decoded is None and replayed.events[1].data_verified is None
    assert 3 in replayed.pcrs["sha256"]


@given(st.lists(st.integers(0, 200), max_size=60))
def test_quirk_summaries_name_every_event_in_maximal_runs(indices: list[int]) -> None:
    """ "quirk X applied to N event(s): events 3-5, 8": the runs cover exactly the
    events, in order, each as long as it can be."""
    indices = sorted(set(indices))
    lines = summarize_applied((), {"q": indices} if indices else {})
    if not indices:
        assert lines == ()
        return
    (line,) = lines
    prefix = f"quirk q applied to {len(indices)} event(s): events "
    assert line.startswith(prefix)
    runs = [tuple(map(int, r.split("-"))) for r in line[len(prefix) :].split(", ")]
    covered = [i for run in runs for i in range(run[0], run[-1] + 1)]
    assert covered == indices
    assert all(b[0] > a[-1] + 1 for a, b in itertools.pairwise(runs))
