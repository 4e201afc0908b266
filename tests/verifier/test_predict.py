"""`vtpm policy predict` (issue 20): from kernel A's simulated boot log and kernel B's
binary, a policy revision under which B's boot (log replayed into a real swtpm, quoted
by tpm2-tools) is affirming before anything was learned from B, while an unpredicted
kernel C is contraindicated, and A stops being accepted when the window ends."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.verifier.appraisal_lab import Lab, build_lab
from tests.vtpm_core.test_authenticode import make_pe
from verifier.appraisal import AppraisalResult, Evidence, appraise
from verifier.eventlog import EventLog
from verifier.policy import Policy, learn_policy
from verifier.policy.predict import Artefact, predict_policy
from vtpm_cli.main import cli
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import ConfigError
from vtpm_core.measured_boot import BootApplication, BootDescription, build_boot_log

pytestmark = pytest.mark.swtpm

SDBOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
KERNEL_A = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
CMDLINE = "console=ttyS0 root=/dev/vda2 ro"
UNTIL = datetime(2027, 1, 31, tzinfo=UTC)
PCRS = "sha256:0,1,2,3,4,5,6,7,9,12"  # (12: systemd-boot's command line)
NOW = UNTIL - timedelta(days=7)


def _log(kernel: bytes, cmdline: str = CMDLINE) -> bytes:
    desc = BootDescription(
        boot_applications=(
            BootApplication("\\EFI\\BOOT\\BOOTX64.EFI", pe=SDBOOT.read_bytes()),
            BootApplication("\\EFI\\Linux\\vmlinuz.efi", pe=kernel),
        ),
        kernel_cmdline=cmdline,
    )
    return build_boot_log(desc, ("sha256",)).to_bytes()


@pytest.fixture(scope="module")
def kernels() -> dict[str, bytes]:
    return {
        "A": KERNEL_A.read_bytes(),
        "B": make_pe(sections=(b"kernel-B" * 512, b"data" * 64)),
        "C": make_pe(sections=(b"kernel-C" * 512, b"data" * 64)),
    }


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory, kernels: dict[str, bytes]) -> dict[str, Lab]:
    out = {}
    for name, cmdline in (("A", CMDLINE), ("B", CMDLINE + " quiet"), ("C", CMDLINE + " quiet")):
        base = tmp_path_factory.mktemp(f"kernel-{name}")
        (base / "boot.log").write_bytes(_log(kernels[name], cmdline))
        out[name] = build_lab(base / "state", base, base / "boot.log", pcrs=PCRS)
    return out


def _appraise(lab: Lab, policy: Policy, now: datetime = NOW) -> AppraisalResult:
    q = lab.quotes["rsa"]
    ev = Evidence(q.attest, q.signature, q.pcrs, lab.log)
    return appraise(ev, policy, nonce=lab.nonce, ak=q.ak, now=now)


def _predicted(labs: dict[str, Lab], kernels: dict[str, bytes]) -> tuple[Policy, tuple[str, ...]]:
    log = EventLog.parse(labs["A"].log)
    policy, predictions = predict_policy(
        log.verify(log.replay()),
        [Artefact("kernel", "vmlinuz-B.efi", kernels["B"])],
        cmdline=CMDLINE + " quiet",
        valid_until=UNTIL,
        name="fleet",
    )
    return policy, tuple(map(str, predictions))


def test_predicted_kernel_b_affirms_unpredicted_c_does_not(
    labs: dict[str, Lab], kernels: dict[str, bytes]
) -> None:
    policy, predictions = _predicted(labs, kernels)
    b_digest = authenticode_digest(kernels["B"]).hex()
    assert predictions[0].startswith(f"boot application vmlinuz-B.efi sha256:{b_digest}")
    assert "replaces event" in predictions[0] and "vmlinuz.efi" in predictions[0]
    assert "kernel command line" in predictions[1]
    a = _appraise(labs["A"], policy)
    b = _appraise(labs["B"], policy)
    c = _appraise(labs["C"], policy)
    assert a.status == "affirming", [str(f) for f in a.failures]
    assert b.status == "affirming", [str(f) for f in b.failures]
    assert c.status == "contraindicated"
    assert [f.rule for f in c.failures] == ["boot_applications"]
    assert authenticode_digest(kernels["C"]).hex() in c.failures[0].actual
    # nothing was learned from B: the policy learned from A alone refuses it
    log_a = EventLog.parse(labs["A"].log)
    assert _appraise(labs["B"], learn_policy(log_a.verify(log_a.replay()))).status != "affirming"


def test_after_the_window_only_the_new_kernel_is_accepted(
    labs: dict[str, Lab], kernels: dict[str, bytes]
) -> None:
    policy, _ = _predicted(labs, kernels)
    a = _appraise(labs["A"], policy, now=UNTIL)
    assert a.status == "contraindicated"
    assert sorted(f.rule for f in a.failures) == [
        "boot_applications.valid_until",
        "kernel_cmdline.valid_until",
    ]
    assert _appraise(labs["B"], policy, now=UNTIL + timedelta(days=365)).status == "affirming"


def test_cli_predict_from_a_log(tmp_path: Path, labs: dict[str, Lab]) -> None:
    out = tmp_path / "revised.yaml"
    (tmp_path / "vmlinuz-B.efi").write_bytes(make_pe(sections=(b"kernel-B" * 512, b"data" * 64)))
    result = CliRunner().invoke(
        cli,
        [
            "policy", "predict", "--eventlog", str(labs["A"].log_path),
            "--kernel", str(tmp_path / "vmlinuz-B.efi"), "--cmdline", CMDLINE + " quiet",
            "--valid-until", "2027-01-31T00:00:00Z", "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "predicted boot application vmlinuz-B.efi" in result.output
    revised = Policy.load(out)
    assert _appraise(labs["B"], revised).status == "affirming"
    check = CliRunner().invoke(
        cli, ["policy", "check", "--policy", str(out), "--eventlog", str(labs["B"].log_path)]
    )
    assert check.exit_code == 0, check.output
    # from the learned policy instead of the log: the same values
    learned = tmp_path / "learned.yaml"
    assert (
        CliRunner()
        .invoke(cli, ["policy", "learn", str(labs["A"].log_path), "-o", str(learned)])
        .exit_code
        == 0
    )
    again = CliRunner().invoke(
        cli,
        [
            "policy", "predict", "--policy", str(learned),
            "--kernel", str(tmp_path / "vmlinuz-B.efi"),
            "--valid-until", "2027-01-31T00:00:00Z", "-o", str(tmp_path / "p2.yaml"),
        ],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    apps = json.loads(json.dumps(Policy.load(tmp_path / "p2.yaml").to_dict()))["boot_applications"]
    assert apps[-1]["sha256"] == revised.to_dict()["boot_applications"][-1]["sha256"]
    assert apps[-2]["valid_until"] == "2027-01-31T00:00:00Z"  # the replaced kernel entry


def test_bad_input_is_named(labs: dict[str, Lab]) -> None:
    log = EventLog.parse(labs["A"].log).verify(EventLog.parse(labs["A"].log).replay())
    with pytest.raises(ConfigError, match="nothing to predict"):
        predict_policy(log, [], cmdline=None, valid_until=UNTIL)
    with pytest.raises(ConfigError, match="time zone"):
        predict_policy(log, [], cmdline="x", valid_until=datetime(2027, 1, 1))
    with pytest.raises(ConfigError, match="unknown role"):
        Artefact("initrd", "x", b"")
    result = CliRunner().invoke(
        cli, ["policy", "predict", "--valid-until", "2027-01-31T00:00:00Z", "-o", "/dev/null"]
    )
    assert result.exit_code == 2 and "exactly one of --eventlog or --policy" in result.output


def _uki(tmp_path: Path, kernel: bytes) -> bytes:
    """systemd-stub + .linux, made with objcopy (as tests/vm/test_predict_vm.py boots it)."""
    (tmp_path / "linux").write_bytes(kernel)
    subprocess.run(
        [
            "objcopy", "--add-section", f".linux={tmp_path / 'linux'}",
            "--change-section-vma", ".linux=0x2000000", str(KERNEL_A), str(tmp_path / "uki.efi"),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return (tmp_path / "uki.efi").read_bytes()


def test_uki_predicts_its_kernel_too(
    tmp_path: Path, labs: dict[str, Lab], kernels: dict[str, bytes]
) -> None:
    # systemd-stub starts .linux with LoadImage: the firmware logs it as a second PCR 4
    # event (seen on the real VM), so the revision allows that digest too, with no end
    uki = _uki(tmp_path, kernels["B"])
    log = EventLog.parse(labs["A"].log)
    policy, predictions = predict_policy(
        log.verify(log.replay()), [Artefact("uki", "uki-B.efi", uki)], cmdline=None,
        valid_until=UNTIL,
    )  # fmt: skip
    inner = authenticode_digest(kernels["B"]).hex()
    assert [str(p).split(" sha256:")[0] for p in predictions][:2] == [
        "boot application uki-B.efi",
        "boot application uki-B.efi:.linux",
    ]
    assert inner in str(predictions[1])
    apps = policy.to_dict()["boot_applications"]
    assert {k: v for k, v in apps[-1].items() if k != "note"} == {
        "name": "uki-B.efi:.linux",
        "sha256": inner,
    }
    assert "LoadImage" in apps[-1]["note"]
    # the kernel inside equals the replaced one (a UKI of kernel A): still added, unwindowed
    same = predict_policy(
        log.verify(log.replay()), [Artefact("uki", "uki-A.efi", _uki(tmp_path, kernels["A"]))],
        cmdline=None, valid_until=UNTIL,
    )[0].to_dict()["boot_applications"]  # fmt: skip
    a_digest = authenticode_digest(kernels["A"]).hex()
    assert [a for a in same if a["sha256"] == a_digest] == [same[1], same[-1]]
    assert "valid_until" in same[1] and "valid_until" not in same[-1]
    with pytest.raises(ConfigError, match=r"uki-X\.efi: a UKI needs a \.linux section"):
        predict_policy(
            log.verify(log.replay()), [Artefact("uki", "uki-X.efi", kernels["C"])],
            cmdline=None, valid_until=UNTIL,
        )  # fmt: skip
