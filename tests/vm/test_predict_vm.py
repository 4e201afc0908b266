"""`vtpm policy predict` on a real VM (issue 20): one vTPM, three boots, like one VM rebooted.

1. Boot kernel A (Debian's kernel, what every other VM test boots): attest through the
   running verifier, quote locally, verify that quote and replay the firmware log to it.
2. From A's verified log and kernel B's file alone, `vtpm policy predict --uki B`
   writes the policy revision; it is uploaded and assigned; A is still affirming.
3. Reboot into B (a UKI: systemd's linuxx64.efi.stub around a kernel that differs
   from A's) on the same vTPM: **affirming** under the predicted policy, though nothing
   was learned from B; the policy learned from A alone refuses it.
4. Reboot into kernel C, not predicted: **contraindicated**, the failing rule
   ``boot_applications`` naming C's Authenticode digest.

Kernels B and C are Debian's kernel with another COFF TimeDateStamp (PE/COFF 3.3): a
field no loader reads but the Authenticode digest covers, so each boots like A and
measures as a different kernel. B's UKI is made with objcopy, as systemd 252's
documentation does it. After the window, B's evidence stays affirming and A's does
not (in-process re-appraisal of the same quotes at a later ``now``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tests.vm.conftest import (
    GuestImages,
    ProvisionedVtpm,
    VmVerifier,
    provision_vtpm,
    upload_and_assign,
)
from verifier.appraisal import AppraisalResult, Evidence, appraise
from verifier.attester import AttesterState
from verifier.eventlog import EventLog, EventType
from verifier.guest_attester import GuestAttestation, assign_policy, guest_attest_steps
from verifier.policy import Policy, learn_policy
from verifier.quote import PcrValues, Public, verify_quote
from vtpm_cli.main import cli
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.vm import EspImage, boot_guest, build_esp

pytestmark = pytest.mark.vm

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
LOCAL_SELECTION = "sha256:0,1,2,3,4,5,6,7,8,9,12"  # 12: systemd-boot's load options
POLICY = "fleet-r2"


def kernel_variant(kernel: bytes, stamp: int) -> bytes:
    """``kernel`` with COFF TimeDateStamp = ``stamp``: boots the same, digests differently."""
    pe = struct.unpack_from("<I", kernel, 0x3C)[0]
    assert kernel[pe : pe + 4] == b"PE\0\0"
    return kernel[: pe + 8] + struct.pack("<I", stamp) + kernel[pe + 12 :]


def build_uki(out: Path, kernel: Path, pretty_name: str) -> Path:
    """A UKI: systemd-stub + .osrel + .linux (no .initrd, no .cmdline: the entry's apply)."""
    osrel = out.with_suffix(".osrel")
    osrel.write_text(f'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="{pretty_name}"\n')
    subprocess.run(
        [
            "objcopy",
            "--add-section", f".osrel={osrel}", "--change-section-vma", ".osrel=0x20000",
            "--add-section", f".linux={kernel}", "--change-section-vma", ".linux=0x2000000",
            str(STUB), str(out),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return out


@dataclass
class Boot:
    """One boot's evidence: the service's verdict and a local quote, verified."""

    served: GuestAttestation
    ak: Public
    evidence: Evidence
    nonce: bytes
    log: bytes
    verified_pcrs: dict[str, dict[int, bytes]]
    boot_apps: list[bytes]  # PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION sha256 digests, in order
    wall_s: float


def _boot(
    work: Path,
    prov: ProvisionedVtpm,
    esp: EspImage,
    vmv: VmVerifier,
    *,
    policy: str | None,
) -> Boot:
    """Start the store's vTPM (same state every time: same EK, PCRs reset), boot, attest."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-swtpm-"))
    try:
        with (
            prov.store.running(prov.name, transport="qemu", socket_dir=sock_dir) as tpm,
            boot_guest(tpm, work, esp=esp, timeout_s=400, boot_timeout_s=330) as session,
        ):
            chan = session.channel

            def assign(state: AttesterState) -> None:
                if policy is not None:
                    assign_policy(vmv.url, vmv.admin, state.attester_id, policy)

            served = guest_attest_steps(chan, vmv.url, on_registered=assign)
            ident = chan.hello()
            nonce = os.urandom(32)
            quote = chan.quote(nonce, LOCAL_SELECTION)
        assert session.artifacts is not None and session.artifacts.returncode == 0
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    ak = Public.load(ident.ak_public_tpm2b)
    pcrs = PcrValues.load(quote.pcrs_tpm2_tools)
    verified = verify_quote(ak, quote.message, quote.signature, pcrs, nonce)
    mapping = verified.pcrs.as_mapping()
    replayed = EventLog.parse(quote.eventlog).verify(mapping)
    apps = replayed.events_of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
    return Boot(
        served,
        ak,
        Evidence(quote.message, quote.signature, pcrs, quote.eventlog),
        nonce,
        quote.eventlog,
        mapping,
        [e.digests["sha256"] for e in apps],
        session.artifacts.wall_seconds,
    )


def _appraise(boot: Boot, policy: Policy, now: datetime) -> AppraisalResult:
    return appraise(boot.evidence, policy, nonce=boot.nonce, ak=boot.ak, now=now)


def _failures(result: dict[str, Any]) -> list[dict[str, Any]]:
    return list((result.get("report") or {}).get("failures") or [])


def test_predicted_kernel_affirms_after_reboot_unpredicted_does_not(
    tmp_path: Path, guest_images: GuestImages, vm_verifier: VmVerifier
) -> None:
    prov = provision_vtpm(tmp_path / "vtpm", name="rebooted", ca_dir=vm_verifier.ca)
    kernel_a = guest_images.kernel.vmlinuz
    initrd = guest_images.initramfs.path
    vmlinuz_b, vmlinuz_c = tmp_path / "vmlinuz-B", tmp_path / "vmlinuz-C"
    vmlinuz_b.write_bytes(kernel_variant(kernel_a.read_bytes(), 0xB))
    vmlinuz_c.write_bytes(kernel_variant(kernel_a.read_bytes(), 0xC))
    uki_b = build_uki(tmp_path / "uki-B.efi", vmlinuz_b, "vtpm-trust kernel B (UKI)")
    esps = {
        name: build_esp(tmp_path / "esp", kernel=k, initrd=initrd)
        for name, k in (("A", kernel_a), ("B", uki_b), ("C", vmlinuz_c))
    }
    digest = {
        "A": authenticode_digest(kernel_a.read_bytes()),
        "B": authenticode_digest(uki_b.read_bytes()),
        "B.linux": authenticode_digest(vmlinuz_b.read_bytes()),
        "C": authenticode_digest(vmlinuz_c.read_bytes()),
    }
    assert len(set(digest.values())) == 4
    now = datetime.now(UTC)
    until = (now + timedelta(days=30)).replace(microsecond=0)

    # 1. kernel A: no policy yet (warning); A's log, verified against A's quote, is the base
    a = _boot(tmp_path / "boot-A", prov, esps["A"], vm_verifier, policy=None)
    assert a.served.result["status"] == "warning", a.served.result
    attester = a.served.state.attester_id
    sdboot = authenticode_digest(esps["A"].bootloader.read_bytes())
    assert a.boot_apps == [sdboot, digest["A"]]
    (tmp_path / "A.log").write_bytes(a.log)

    # 2. predict from A's log and B's file (the CLI), upload, assign
    out = tmp_path / f"{POLICY}.yaml"
    run = CliRunner().invoke(
        cli,
        [
            "policy", "predict", "--eventlog", str(tmp_path / "A.log"), "--uki", str(uki_b),
            "--valid-until", until.isoformat().replace("+00:00", "Z"), "-o", str(out),
            "--name", POLICY,
        ],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert f"uki-B.efi sha256:{digest['B'].hex()}" in run.output
    assert f"uki-B.efi:.linux sha256:{digest['B.linux'].hex()}" in run.output
    predicted_text = out.read_text()
    predicted = Policy.from_dict(yaml.safe_load(predicted_text))
    upload_and_assign(vm_verifier, attester, POLICY, predicted_text)
    # machines still on A stay affirming under the revision (A's own quote, in-process)
    assert _appraise(a, predicted, now).status == "affirming"

    # 3. reboot into B on the same vTPM: affirming through the service, before anything
    #    was learned from B
    b = _boot(tmp_path / "boot-B", prov, esps["B"], vm_verifier, policy=POLICY)
    assert b.served.state.attester_id == attester  # same EK, same attester
    assert b.served.result["status"] == "affirming", _failures(b.served.result)
    assert b.served.result["policy"] == POLICY
    # PCR 4: systemd-boot, the UKI, then the UKI's kernel (systemd-stub's LoadImage)
    assert b.boot_apps == [sdboot, digest["B"], digest["B.linux"]]
    log_a = EventLog.parse(a.log)
    learned_a = learn_policy(log_a.verify(a.verified_pcrs), name="learned-from-A")
    refused = _appraise(b, learned_a, now)
    assert refused.status == "contraindicated"
    assert {f.rule for f in refused.failures} == {"boot_applications"}
    # after the window: B is still affirming, A is not (same quotes, later appraisal time)
    later = until + timedelta(days=1)
    assert _appraise(b, predicted, later).status == "affirming"
    expired = _appraise(a, predicted, later)
    assert expired.status == "contraindicated"
    assert {f.rule for f in expired.failures} == {"boot_applications.valid_until"}

    # 4. reboot into C, which nobody predicted: contraindicated, naming C's digest
    c = _boot(tmp_path / "boot-C", prov, esps["C"], vm_verifier, policy=POLICY)
    assert c.served.state.attester_id == attester
    result = c.served.result
    assert result["status"] == "contraindicated", result
    failures = _failures(result)
    assert [f["rule"] for f in failures] == ["boot_applications"], failures
    assert f"sha256:{digest['C'].hex()}" in str(failures[0]["actual"])
    assert "vmlinuz" in str(failures[0]["actual"])
    assert failures[0]["event"]["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"
    print(
        f"\nboots (QEMU wall s): A {a.wall_s:.1f}, B {b.wall_s:.1f}, C {c.wall_s:.1f};"
        f" service steps B {b.served.timings}"
    )
