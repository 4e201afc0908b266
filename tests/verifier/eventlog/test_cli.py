"""`vtpm eventlog show` and `vtpm eventlog replay` (click runner, and the installed script once)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from tests.verifier.eventlog.conftest import load_pcrs
from vtpm_cli.main import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_replay_json_prints_every_bank(runner: CliRunner, eventlogs: Path) -> None:
    log = eventlogs / "gce_rhel8_uefi_secureboot.bin"
    result = runner.invoke(cli, ["eventlog", "replay", str(log), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert list(out) == ["sha1", "sha256", "sha384"]
    assert list(out["sha256"]) == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "14"]
    expected = load_pcrs(eventlogs / "gce_rhel8_uefi_secureboot.bin.expected_pcrs.json")
    for bank, values in expected.items():
        assert out[bank] == {str(i): v.hex() for i, v in values.items()}
    assert all(v == v.lower() for bank in out.values() for v in bank.values())


def test_replay_json_includes_pcr0_set_by_locality(runner: CliRunner, eventlogs: Path) -> None:
    result = runner.invoke(
        cli, ["eventlog", "replay", "--json", str(eventlogs / "short_no_action_truncated.bin")]
    )
    assert result.exit_code == 0
    assert json.loads(result.output) == {"sha1": {"0": "00" * 19 + "03"}}


def test_show_json(runner: CliRunner, eventlogs: Path) -> None:
    result = runner.invoke(
        cli, ["eventlog", "show", "--json", str(eventlogs / "workstation_archlinux_sdboot.bin")]
    )
    assert result.exit_code == 0
    events = json.loads(result.output)
    assert len(events) == 25
    secure_boot = events[3]
    assert secure_boot["type"] == "EV_EFI_VARIABLE_DRIVER_CONFIG" and secure_boot["pcr"] == 7
    assert set(secure_boot["digests"]) == {"sha1", "sha256"}
    assert secure_boot["decoded"]["structure"] == "EfiVariable"
    assert secure_boot["decoded"]["name"] == "SecureBoot"
    assert secure_boot["data_matches_digest"] is True
    assert events[24]["data_matches_digest"] is False  # the known mismatch, flagged
    assert events[24]["warnings"]
    app = next(e for e in events if e["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION")
    assert app["data_matches_digest"] is None
    assert app["decoded"]["device_path"]["text"].startswith("PciRoot(0x0)/")
    options = events[24]["decoded"]
    assert (options["structure"], options["kind"]) == ("IplString", "load_options")


def test_show_timeline(runner: CliRunner, eventlogs: Path) -> None:
    result = runner.invoke(
        cli, ["eventlog", "show", str(eventlogs / "gce_rhel8_uefi_secureboot.bin")]
    )
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].endswith("crypto-agile log, banks sha1, sha256, sha384, 83 events")
    assert any("SecureBoot = 1" in line for line in lines)
    assert any("grub_cmd: 'set pager=1'" in line for line in lines)


@pytest.mark.parametrize("command", ["show", "replay"])
def test_parse_error_exits_2_with_one_line(
    runner: CliRunner, eventlogs: Path, tmp_path: Path, command: str
) -> None:
    bad = tmp_path / "cut.bin"
    bad.write_bytes((eventlogs / "gdc_host_physical_server.bin").read_bytes()[:100])
    result = runner.invoke(cli, ["eventlog", command, str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: TCG_PCR_EVENT2.digests[0].digest at byte 79: truncated: need 32 bytes, only 21 left"
    ]


def test_installed_script(eventlogs: Path, tmp_path: Path) -> None:
    vtpm = REPO / ".venv" / "bin" / "vtpm"
    ok = subprocess.run(
        [
            str(vtpm),
            "eventlog",
            "replay",
            "--json",
            str(eventlogs / "gdc_host_physical_server.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    # the recorded TPM value of PCR 0 (StartupLocality 3), which tpm2_eventlog gets wrong
    assert json.loads(ok.stdout)["sha256"]["0"] == (
        "dab77c454bd12c27ff6b6ce1f9adca90b7a330c1cef0b5cd01cb89fb3bd0dffa"
    )
    bad = tmp_path / "empty.bin"
    bad.write_bytes(b"")
    failed = subprocess.run(
        [str(vtpm), "eventlog", "replay", "--json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert failed.stderr == "error: TCG_PCR_EVENT.pcrIndex at byte 0: empty log\n"
