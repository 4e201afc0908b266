"""The measured-boot simulator extends a real swtpm exactly as its log says.

Independent readers: the TPM's own PCR_Read and tpm2-tools' tpm2_eventlog.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

from vtpm_core.errors import ConfigError
from vtpm_core.measured_boot import (
    BootApplication,
    BootDescription,
    FirmwareBlob,
    Measured,
    build_boot_log,
    simulate_boot,
)
from vtpm_core.swtpm import SwtpmProcess

BANKS = ("sha1", "sha256", "sha384", "sha512")


def _digests(content: bytes) -> dict[str, bytes]:
    return {b: hashlib.new(b, content).digest() for b in BANKS}


def _description(kernel: bytes = b"kernel-1", secure_boot: bool = True) -> BootDescription:
    return BootDescription(
        firmware_blobs=(FirmwareBlob(0xFFC00000, Measured(content=b"\x90" * 4096)),),
        secure_boot=secure_boot,
        boot_applications=(
            BootApplication("\\EFI\\BOOT\\BOOTX64.EFI", digests=_digests(b"systemd-boot")),
            BootApplication("\\vmlinuz", digests=_digests(kernel)),
        ),
        kernel_cmdline="console=ttyS0 root=/dev/vda1 ro",
        initrd=Measured(content=b"initrd" * 512),
    )


def _tpm_pcrs(tpm: SwtpmProcess, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    from tpm2_pytss.types import TPML_PCR_SELECTION

    out = {}
    esapi = tpm.esapi()
    for pcr in pcrs:
        _, _, values = esapi.pcr_read(TPML_PCR_SELECTION.parse(f"{bank}:{pcr}"))
        out[pcr] = bytes(values.digests[0])
    return out


def test_tpm_pcrs_equal_the_log_in_every_bank(swtpm: SwtpmProcess) -> None:
    boot = simulate_boot(_description(), swtpm.esapi())
    assert set(boot.pcrs) == set(BANKS)
    for bank in BANKS:
        extended = sorted(boot.pcrs[bank])
        assert extended == [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]
        assert _tpm_pcrs(swtpm, bank, extended) == boot.pcrs[bank]


def test_tpm2_eventlog_replays_the_log_to_the_same_values(tmp_path: Path) -> None:
    log = build_boot_log(_description(), BANKS)
    path = tmp_path / "boot.log"
    path.write_bytes(log.to_bytes())
    out = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    replayed = yaml.safe_load(out.stdout)["pcrs"]
    expected = log.pcrs()
    for bank in BANKS:
        got = {
            int(i): int(str(v), 16) if isinstance(v, str) else v for i, v in replayed[bank].items()
        }
        assert got == {i: int.from_bytes(v, "big") for i, v in expected[bank].items()}


def test_another_kernel_changes_only_pcr4() -> None:
    good = build_boot_log(_description(b"kernel-1"), BANKS).pcrs()["sha256"]
    bad = build_boot_log(_description(b"kernel-2"), BANKS).pcrs()["sha256"]
    assert {i for i in good if good[i] != bad[i]} == {4}


def test_secure_boot_state_changes_only_pcr7() -> None:
    on = build_boot_log(_description(secure_boot=True), BANKS).pcrs()["sha256"]
    off = build_boot_log(_description(secure_boot=False), BANKS).pcrs()["sha256"]
    assert {i for i in on if on[i] != off[i]} == {7}


def test_description_from_mapping_reads_files(tmp_path: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(b"initrd-bytes")
    desc = BootDescription.from_mapping(
        {
            "firmware": {"version": "OVMF 2022.11"},
            "secure_boot": {"enabled": False},
            "boot_applications": [
                {"path": "\\vmlinuz", "digests": {b: v.hex() for b, v in _digests(b"k").items()}}
            ],
            "kernel_cmdline": "quiet",
            "initrd": {"file": "initrd.img"},
        },
        base_dir=tmp_path,
    )
    assert desc.firmware_version == "OVMF 2022.11"
    assert desc.initrd is not None
    assert desc.initrd.digest("sha256") == hashlib.sha256(b"initrd-bytes").digest()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param({"kernel": "x"}, "unknown keys", id="fail/unknown-key"),
        pytest.param({"initrd": {"file": "missing.img"}}, "cannot read", id="fail/missing-file"),
        pytest.param(
            {"boot_applications": [{"path": "a", "digests": {"sha256": "zz"}}]},
            "not hex",
            id="fail/bad-hex",
        ),
        pytest.param(
            {"boot_applications": [{"path": "a", "digests": {"sha256": "00"}}]},
            "wrong length",
            id="fail/short-digest",
        ),
        pytest.param({"boot_applications": [{"file": "a"}]}, "needs a 'path'", id="fail/no-path"),
    ],
)
def test_bad_descriptions_name_the_key(
    tmp_path: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        BootDescription.from_mapping(doc, base_dir=tmp_path)


def test_digest_only_application_needs_every_bank() -> None:
    desc = BootDescription(
        boot_applications=(BootApplication("\\a.efi", digests={"sha256": bytes(32)}),)
    )
    with pytest.raises(ConfigError, match="no sha1 digest"):
        build_boot_log(desc, ("sha1", "sha256"))


SDBOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def test_pe_application_is_measured_by_its_authenticode_digest(tmp_path: Path) -> None:
    from vtpm_core.authenticode import authenticode_digest

    pe = SDBOOT.read_bytes()
    (tmp_path / "BOOTX64.EFI").write_bytes(pe)
    desc = BootDescription.from_mapping(
        {"boot_applications": [{"path": "\\EFI\\BOOT\\BOOTX64.EFI", "file": "BOOTX64.EFI"}]},
        base_dir=tmp_path,
    )
    log = build_boot_log(desc, ("sha256",))
    # the PCR4 extends: the action, the separator, then the application
    pcr4 = [d["sha256"] for pcr, d in log.extends() if pcr == 4]
    assert pcr4[-1] == authenticode_digest(pe, "sha256")
    assert pcr4[-1] != hashlib.sha256(pe).digest()
