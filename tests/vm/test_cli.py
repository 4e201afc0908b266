"""`vtpm vm boot`: one real boot through the CLI, and its argument checks (exit 2, no boot)."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.vm.conftest import (
    GuestImages,
    VmVerifier,
    files_policy,
    provision_vtpm,
    upload_policy,
)
from vtpm_cli.main import cli
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.vm import DEFAULT_CMDLINE, measured_load_options

pytestmark = pytest.mark.vm


def test_vm_boot_writes_verifiable_evidence(
    tmp_path: Path, guest_images: GuestImages, vm_verifier: VmVerifier
) -> None:
    prov = provision_vtpm(tmp_path / "vtpm", name="cli-test", ca_dir=vm_verifier.ca)
    out = tmp_path / "out"
    # the policy made from the boot files, uploaded before the boot; --policy assigns it
    esp = guest_images.esp()
    upload_policy(
        vm_verifier,
        "vm-cli",
        files_policy("vm-cli", esp, secure_boot=False, cmdline=DEFAULT_CMDLINE),
    )
    token = tmp_path / "admin.token"
    token.write_text(vm_verifier.admin + "\n")
    result = CliRunner().invoke(
        cli,
        [
            "vm", "boot", "cli-test", "--store", str(prov.store.root), "--out", str(out),
            "--kernel", str(guest_images.kernel.vmlinuz),
            "--initrd", str(guest_images.initramfs.path), "--pcrs", "sha256:0,4,7,9",
            "--verifier", vm_verifier.url, "--token-file", str(token), "--policy", "vm-cli",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "EK certificate (NV 0x01C00002):" in result.output
    assert "none" not in result.output.splitlines()[1]
    assert "verdict: affirming (policy vm-cli)" in result.output
    verdict = json.loads((out / "result.json").read_text())
    assert verdict["status"] == "affirming" and verdict["registered"] is True
    assert verdict["report"]["failures"] == []
    nonce = (out / "nonce.bin").read_bytes()
    check = "tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q"
    done = subprocess.run(
        [*check.split(" "), nonce.hex()],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "VTPM-GUEST: POWEROFF" in (out / "run" / "console.log").read_text(errors="replace")
    assert (out / "ek_cert.der").stat().st_size > 300
    pcrs = json.loads((out / "pcrs.json").read_text())
    assert sorted(pcrs["sha256"], key=int) == ["0", "4", "7", "9"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "boot", "../x"], "bad VM name"),
        (["vm", "boot", "ok", "--pcrs", "sha256:99"], "PCR 99 out of range"),
        (["vm", "boot", "ok", "--pcrs", "sha256:0;poweroff"], "bad PCR selection"),
        (["vm", "boot", "ok", "--cmdline", "a\nb"], "one non-empty line"),
        (["vm", "boot", "ok", "--verifier", "http://192.0.2.1:80"], "only a loopback verifier"),
        (["vm", "boot", "ok", "--verifier", "https://127.0.0.1:1"], "expected http://127.0.0.1"),
        (["vm", "boot", "ok", "--policy", "p"], "need --verifier URL"),
        (["vm", "boot", "ok", "--ima", "--pcrs", "sha256:0,9"], "--ima needs PCR 10"),
        (["vm", "boot", "ok", "--rounds", "2"], "--rounds needs --verifier URL"),
        (["vm", "boot", "ok", "--rounds", "0"], "0 is not in the range"),
        (
            ["vm", "boot", "ok", "--verifier", "http://127.0.0.1:1", "--policy", "p"],
            "--policy needs the admin token",
        ),
    ],
    ids=[
        "fail/name",
        "fail/pcrs/range",
        "fail/pcrs/syntax",
        "fail/cmdline/newline",
        "fail/verifier/not-loopback",
        "fail/verifier/https",
        "fail/policy/without-verifier",
        "fail/ima/no-pcr10",
        "fail/rounds/without-verifier",
        "fail/rounds/zero",
        "fail/policy/without-token",
    ],
)
def test_vm_boot_rejects_bad_arguments(args: list[str], message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = CliRunner().invoke(cli, [*args[:3], "--out", tmp, *args[3:]])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_vm_build_prints_the_digests_the_firmware_will_log(guest_images: GuestImages) -> None:
    result = CliRunner().invoke(cli, ["vm", "build", "--secure-boot", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    esp = guest_images.esp(secure_boot=True)
    assert info["esp"] == str(esp.path)
    expected = info["expected"]
    assert expected["pcr4_kernel_sha256"] == authenticode_digest(esp.kernel.read_bytes()).hex()
    assert expected["pcr4_bootloader_sha256"] == (
        authenticode_digest(esp.bootloader.read_bytes()).hex()
    )
    options = (measured_load_options(DEFAULT_CMDLINE) + "\0").encode("utf-16-le")
    assert expected["pcr9_pcr12_load_options_sha256"] == hashlib.sha256(options).hexdigest()


def test_vm_boot_refuses_a_verifier_that_is_down_before_booting(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    result = CliRunner().invoke(
        cli,
        ["vm", "boot", "ok", "--out", str(tmp_path), "--verifier", f"http://127.0.0.1:{port}"],
    )
    assert result.exit_code == 1, result.output
    assert "health: verifier unreachable: " in result.output
    assert "connection refused" in result.output
    assert time.monotonic() - t0 < 10  # no VM was started
    assert not (tmp_path / "run").exists()


def _runtime_from_initramfs(initrd: Path, work: Path) -> dict[str, object]:
    """A runtime policy made from the files, no boot: the initramfs unpacked (GNU cpio),
    then `vtpm ima learn --tree` on it (every regular file under its guest path)."""
    tree = work / "initrd-tree"
    tree.mkdir()
    archive = gzip.decompress(initrd.read_bytes())
    done = subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive, cwd=tree, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = work / "runtime.json"
    learned = CliRunner().invoke(
        cli, ["ima", "learn", "--tree", str(tree), "--name", "initrd", "-o", str(out)]
    )
    assert learned.exit_code == 0, learned.output
    doc: dict[str, object] = json.loads(out.read_text())
    return doc


def test_vm_boot_ima_through_the_verifier(
    tmp_path: Path, guest_images: GuestImages, vm_verifier: VmVerifier
) -> None:
    """`vtpm vm boot --ima --verifier --policy`: a policy made from the files (the ESP's
    Authenticode digests and options, the initramfs' files for the runtime part) is
    affirming with the guest's whole IMA list; ima.bin replays (`vtpm ima replay`) to
    the PCR 10 values tpm2_checkquote finds in the local quote, in both banks."""
    prov = provision_vtpm(tmp_path / "vtpm", name="cli-ima", ca_dir=vm_verifier.ca)
    out = tmp_path / "out"
    esp = guest_images.esp(cmdline=f"{DEFAULT_CMDLINE} vtpm.ima=1")
    doc = yaml.safe_load(files_policy("vm-cli-ima", esp, secure_boot=False, cmdline=esp.cmdline))
    doc["runtime"] = _runtime_from_initramfs(guest_images.initramfs.path, tmp_path)
    upload_policy(vm_verifier, "vm-cli-ima", yaml.safe_dump(doc, sort_keys=False))
    token = tmp_path / "admin.token"
    token.write_text(vm_verifier.admin + "\n")
    result = CliRunner().invoke(
        cli,
        [
            "vm", "boot", "cli-ima", "--store", str(prov.store.root), "--out", str(out),
            "--kernel", str(guest_images.kernel.vmlinuz),
            "--initrd", str(guest_images.initramfs.path), "--ima", "--json",
            "--verifier", vm_verifier.url, "--token-file", str(token), "--policy", "vm-cli-ima",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["cmdline"] == f"{DEFAULT_CMDLINE} vtpm.ima=1"
    assert summary["pcrs"] == "sha1:10+sha256:0,1,2,3,4,5,6,7,8,9,10"
    assert summary["ima"]["bytes"] == (out / "ima.bin").stat().st_size
    entries = summary["ima"]["entries"]
    assert entries > 10
    verdict = json.loads((out / "result.json").read_text())
    assert verdict["status"] == "affirming", verdict["report"]["failures"]
    ima = verdict["report"]["ima"]
    assert (ima["start_index"], ima["verified_count"]) == (0, entries)
    assert ima["by_digest"] == entries  # boot_aggregate: its digest from the quoted PCRs 0-9

    nonce = (out / "nonce.bin").read_bytes()
    check = "tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q"
    done = subprocess.run(
        [*check.split(" "), nonce.hex()], cwd=out, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    quoted = yaml.safe_load(done.stdout)["pcrs"]
    replayed = CliRunner().invoke(cli, ["ima", "replay", str(out / "ima.bin"), "--json"])
    assert replayed.exit_code == 0, replayed.output
    pcr10 = json.loads(replayed.output)
    size = {"sha1": 20, "sha256": 32}
    for bank in ("sha1", "sha256"):
        assert pcr10[bank]["10"] == int(quoted[bank][10]).to_bytes(size[bank], "big").hex()
    assert json.loads((out / "pcrs.json").read_text())["sha1"] == {"10": pcr10["sha1"]["10"]}
    console = (out / "run" / "console.log").read_text(errors="replace")
    assert "VTPM-GUEST: init ima=on" in console
