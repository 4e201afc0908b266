"""`vtpm policy learn|check` and `vtpm result keygen|verify`: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from tests.conftest import CORPUS as CORPUS_ROOT
from verifier.ear import EarSigner, TrustVector
from vtpm_cli.main import cli

CORPUS = CORPUS_ROOT / "eventlogs"
RHEL8 = CORPUS / "gce_rhel8_uefi_secureboot.bin"
UBUNTU = CORPUS / "gce_ubuntu1804_amdsev_secureboot.bin"
NONCE = bytes(range(16))


def _run(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(argv))
    return result.exit_code, result.stdout, result.stderr


def test_learn_then_check(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    code, out, _ = _run("policy", "learn", str(RHEL8), "-o", str(policy), "--name", "rhel8")
    assert code == 0 and "policy:rhel8@sha256:" in out
    assert "secure_boot: true" in policy.read_text()
    code, out, _ = _run("policy", "check", "--policy", str(policy), "--eventlog", str(RHEL8))
    assert code == 0 and out.startswith("affirming")


def test_learn_with_a_runtime_part(tmp_path: Path) -> None:
    """A real VM's boot log and the runtime policy learned from its IMA list, in one policy."""
    from verifier.ima.policy import RuntimePolicy
    from verifier.policy import Policy

    vm = Path(__file__).resolve().parents[1] / "data" / "ima" / "vtpm-guest"
    runtime = tmp_path / "runtime.json"
    assert _run("ima", "learn", "--list", str(vm / "ima.bin"), "-o", str(runtime))[0] == 0
    policy = tmp_path / "p.yaml"
    code, out, err = _run(
        "policy", "learn", str(vm / "eventlog.bin"), "--runtime", str(runtime), "-o", str(policy)
    )
    assert code == 0, err
    learned = Policy.load(policy)
    assert learned.runtime == RuntimePolicy.load(runtime)
    assert learned.boot_applications and f"({learned.id})" in out
    code, _, err = _run(
        "policy", "learn", str(vm / "eventlog.bin"), "--runtime", str(vm / "ima.bin"),
        "-o", str(tmp_path / "never.yaml"),
    )  # fmt: skip
    assert code == 2 and "runtime_policy" in err and not (tmp_path / "never.yaml").exists()


def test_check_lists_every_failure(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    _run("policy", "learn", str(RHEL8), "-o", str(policy))
    code, out, _ = _run("policy", "check", "--policy", str(policy), "--eventlog", str(UBUNTU))
    assert code == 1 and out.startswith("contraindicated")
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert len(fails) >= 4
    assert any("secure_boot: event 3 (EV_EFI_VARIABLE_DRIVER_CONFIG, PCR 7)" in f for f in fails)
    code, out, _ = _run(
        "policy", "check", "--policy", str(policy), "--eventlog", str(UBUNTU), "--json"
    )
    doc = json.loads(out)
    assert code == 1 and doc["status"] == "contraindicated"
    assert {"rule", "claim", "message", "expected", "actual", "event"} <= set(doc["failures"][0])
    assert doc["trust_vector"]["configuration"] == 96


def test_bad_policy_is_exit_2_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nboot_applications:\n  - {sha256: nothex}\n")
    code, _, err = _run("policy", "check", "--policy", str(policy), "--eventlog", str(RHEL8))
    assert code == 2
    assert err.strip() == "error: policy.boot_applications[0].sha256: not a hex string"


def test_bad_log_is_exit_2(tmp_path: Path) -> None:
    policy, log = tmp_path / "p.yaml", tmp_path / "x.bin"
    policy.write_text("version: 1\nsecure_boot: true\n")
    log.write_bytes(RHEL8.read_bytes()[:50])
    code, _, err = _run("policy", "check", "--policy", str(policy), "--eventlog", str(log))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


class _R:
    def __init__(self, vector: TrustVector) -> None:
        self.trust_vector = vector
        self.status = vector.status
        self.failure_summaries: tuple[dict[str, str], ...] = ()


def test_result_keygen_and_verify(tmp_path: Path) -> None:
    key, jwks = tmp_path / "ear.pem", tmp_path / "jwks.json"
    code, _, _ = _run("result", "keygen", "--key", str(key), "--jwks", str(jwks))
    assert code == 0 and key.stat().st_mode & 0o777 == 0o600
    signer = EarSigner.load(key.read_bytes())
    good = signer.sign(_R(TrustVector(2, 2, 3)), NONCE, "vm-1", "p")
    bad = signer.sign(_R(TrustVector(2, 96, 3)), NONCE, "vm-1", "p")
    code, out, _ = _run("result", "verify", good, "--jwks", str(jwks), "--nonce", NONCE.hex())
    assert code == 0 and out.startswith("affirming")
    token_file = tmp_path / "t.jwt"
    token_file.write_text(bad + "\n")
    code, out, _ = _run("result", "verify", str(token_file), "--jwks", str(jwks))
    assert code == 1 and out.startswith("contraindicated")
    code, _, _ = _run("result", "verify", bad, "--jwks", str(jwks), "--any-status")
    assert code == 0
    code, out, _ = _run("result", "verify", good, "--jwks", str(jwks), "--json")
    assert json.loads(out)["eat_profile"] == "tag:github.com,2023:veraison/ear"
    # a flipped signature byte, and the wrong nonce: exit 1 naming the check
    head, body, sig = good.split(".")
    tampered = f"{head}.{body}.{sig[:5]}{'A' if sig[5] != 'A' else 'B'}{sig[6:]}"
    code, _, err = _run("result", "verify", tampered, "--jwks", str(jwks))
    assert code == 1 and "signature" in err
    code, _, err = _run("result", "verify", good, "--jwks", str(jwks), "--nonce", "00" * 16)
    assert code == 1 and "nonce mismatch" in err


SDBOOT_LOG = Path(__file__).parents[1] / "data" / "eventlog" / "qemu_ovmf_swtpm_sdboot.bin"
SDBOOT_EFI = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def test_add_boot_app_from_the_real_binary(tmp_path: Path) -> None:
    """The VM in the sdboot log booted Debian's systemd-bootx64.efi: its Authenticode
    digest, computed from the file, is the digest the firmware logged."""
    learned = tmp_path / "learned.yaml"
    _run("policy", "learn", str(SDBOOT_LOG), "-o", str(learned))
    doc = yaml.safe_load(learned.read_text())
    kernel = [a for a in doc["boot_applications"] if a["name"] != "BOOTX64.EFI"]
    doc["boot_applications"] = kernel
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump(doc))
    code, out, _ = _run("policy", "check", "--policy", str(policy), "--eventlog", str(SDBOOT_LOG))
    assert code == 1 and "boot application digest not allowed" in out
    code, out, _ = _run("policy", "add-boot-app", str(policy), str(SDBOOT_EFI))
    assert code == 0 and "systemd-bootx64.efi: allowed sha256:7843e376" in out
    code, out, _ = _run("policy", "check", "--policy", str(policy), "--eventlog", str(SDBOOT_LOG))
    assert code == 0, out
    code, out, _ = _run("policy", "add-boot-app", str(policy), str(SDBOOT_EFI))
    assert "already allowed" in out


def test_add_boot_app_refuses_a_non_pe(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nsecure_boot: false\n")
    code, _, err = _run("policy", "add-boot-app", str(policy), str(policy))
    assert code == 2 and err.startswith("error: ")
