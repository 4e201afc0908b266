"""A log from a real boot on this machine (QEMU + OVMF + swtpm, systemd-boot),
proven against a TPM2_Quote of the same boot (tests/data/eventlog/README.md)."""

from __future__ import annotations

from tests.conftest import REPO
from tests.verifier.eventlog.conftest import load_pcrs
from verifier.eventlog import EfiVariable, EventLog, ImageLoad, IplString, TaggedEvent

DATA = REPO / "tests" / "data" / "eventlog"


def test_real_ovmf_boot_verifies_against_its_quote() -> None:
    log = EventLog.parse((DATA / "qemu_ovmf_swtpm_sdboot.bin").read_bytes())
    assert log.banks == ("sha1", "sha256", "sha384", "sha512")
    quoted = load_pcrs(DATA / "qemu_ovmf_swtpm_sdboot.quoted_pcrs.json")
    replayed = log.verify(quoted)
    # PCR 8 is quoted but never extended (not compared); PCR 12 not quoted
    assert replayed.verified == {"sha256": frozenset({0, 1, 2, 3, 4, 5, 6, 7, 9})}
    assert all(e.data_verified is not False for e in replayed.events)
    assert replayed.warnings == ()

    secure_boot = replayed.events[4].decoded
    assert isinstance(secure_boot, EfiVariable) and secure_boot.name == "SecureBoot"
    assert secure_boot.data == b"\x00"
    apps = [e.decoded for e in replayed.events if isinstance(e.decoded, ImageLoad)]
    assert [a.path_text for a in apps] == [
        "PciRoot(0x0)/Pci(0x1,0x0)/\\EFI\\BOOT\\BOOTX64.EFI",
        "PciRoot(0x0)/Pci(0x1,0x0)/\\vmlinuz",
    ]
    options = replayed.events[24]
    assert options.pcr == 12 and options.data_verified is True
    assert isinstance(options.decoded, IplString)
    assert options.decoded.text == "initrd=\\initrd.img console=ttyS0 panic=-1 loglevel=4"
    tags = [e.decoded for e in replayed.events if isinstance(e.decoded, TaggedEvent)]
    assert [t.tag_name for t in tags] == ["Linux load options", "Linux initrd"]
    # all four banks replay (sha384/sha512 were not quoted, still computed)
    assert set(replayed.pcrs) == {"sha1", "sha256", "sha384", "sha512"}
