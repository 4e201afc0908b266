"""Real VMs: QEMU + OVMF + systemd-boot + Debian's kernel + our vTPM, attested from the host.

Each case boots once (about 20-30 s with TCG on 2 cores) and then checks,
host-side and with independent tools, everything a verifier will rely on:
the EK certificate in NV matches the EK, the AK name is its public's name,
credential activation returns our secret, the quote carries our nonce and
verifies (tpm2_checkquote), the firmware event log replays to the quoted
PCRs, and PCR4 holds the project-computed Authenticode digests of the exact
systemd-boot and kernel files on the ESP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT

from tests.vm.conftest import (
    GuestImages,
    ProvisionedVtpm,
    VmVerifier,
    files_policy,
    upload_and_assign,
)
from verifier.credential import make_credential
from verifier.ekcert import TrustStore, validate_ek_certificate
from verifier.eventlog import EventLog, EventType
from verifier.guest_attester import guest_attest_steps
from verifier.policy import learn_policy
from verifier.quote import PcrValues, Public, verify_quote
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import DEFAULT_CMDLINE, EspImage, GuestChannel, QemuVm, measured_load_options

pytestmark = pytest.mark.vm

SELECTION = "sha256:0,1,2,3,4,5,6,7,8,9"
OTHER_CMDLINE = "console=ttyS0 panic=-1 loglevel=4 vtpm.test=other"


@dataclass
class Attested:
    esp: EspImage
    work: Path
    quote_pcrs: dict[int, bytes]  # sha256 bank, from tpm2_checkquote
    events: list[dict[str, Any]]  # tpm2_eventlog's view of the firmware log
    log_pcrs: dict[int, bytes]  # tpm2_eventlog's replay, sha256 bank
    eventlog: bytes
    timings: dict[str, float]
    service: Any = None  # what the `service` step returned (verdicts from the running verifier)


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{args[0]} failed: {done.stderr}{done.stdout}"
    return done.stdout


def _extra_data(attest: bytes) -> bytes:
    """TPMS_ATTEST.extraData (TPM 2.0 Part 2, 10.12.12): magic, type, qualifiedSigner, extraData."""
    magic, typ = struct.unpack_from(">IH", attest)
    assert (magic, typ) == (0xFF544347, 0x8018)
    (signer_len,) = struct.unpack_from(">H", attest, 6)
    off = 8 + signer_len
    (n,) = struct.unpack_from(">H", attest, off)
    return attest[off + 2 : off + 2 + n]


def _digests(event: dict[str, Any], alg: str = "sha256") -> bytes:
    for d in event.get("Digests", []):
        if d["AlgorithmId"] == alg:
            return bytes.fromhex(d["Digest"])
    raise AssertionError(f"event {event.get('EventNum')} has no {alg} digest")


def boot_and_attest(
    work: Path,
    esp: EspImage,
    prov: ProvisionedVtpm,
    tpm: SwtpmProcess,
    service: Callable[[GuestChannel, bytes], Any] | None = None,
) -> Attested:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with QemuVm(work / "vm", esp=esp, tpm=tpm, timeout_s=170) as vm:
        with vm.connect(boot_timeout=150) as chan:
            t_ready = time.monotonic()
            ident = chan.hello()

            # 1. the EK certificate our CA put in NV (vtpm store + ca) is for this EK
            assert ident.ek_cert_der is not None, "no EK certificate in NV 0x01C00002"
            cert = x509.load_der_x509_certificate(ident.ek_cert_der)
            ek_pub, _ = TPM2B_PUBLIC.unmarshal(ident.ek_public_tpm2b)
            cert_key = cert.public_key()
            assert isinstance(cert_key, rsa.RSAPublicKey)
            modulus = bytes(ek_pub.publicArea.unique.rsa)
            assert cert_key.public_numbers().n == int.from_bytes(modulus, "big")
            (work / "ekcert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
            _run(
                "openssl", "verify", "-CAfile", str(prov.ca_chain), "ekcert.pem", cwd=work,
            )  # fmt: skip

            ek_key = rsa.RSAPublicNumbers(65537, int.from_bytes(modulus, "big")).public_key()
            trust = TrustStore.load([prov.ca_chain])
            validate_ek_certificate(
                ident.ek_cert_der, trust, ek_public=ek_key
            )  # the verifier's view

            # 2. the AK name is nameAlg || H(TPMT_PUBLIC), and the AK is a restricted signer
            tpmt = ident.ak_public_tpm2b[2:]
            assert ident.ak_name == b"\x00\x0b" + hashlib.sha256(tpmt).digest()
            ak_pub, _ = TPM2B_PUBLIC.unmarshal(ident.ak_public_tpm2b)
            attrs = ak_pub.publicArea.objectAttributes
            for bit in (TPMA_OBJECT.RESTRICTED, TPMA_OBJECT.SIGN_ENCRYPT, TPMA_OBJECT.FIXEDTPM):
                assert attrs & bit, f"AK lacks {bit}"
            assert not attrs & TPMA_OBJECT.DECRYPT

            # 3. credential activation: the secret comes back only from the EK's TPM
            #    (tpm2_makecredential as the independent oracle)
            secret = os.urandom(32)
            (work / "ek.pub").write_bytes(ident.ek_public_tpm2b)
            (work / "secret.bin").write_bytes(secret)
            _run(
                "tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-s", "secret.bin",
                "-n", ident.ak_name.hex(), "-o", "cred.blob", cwd=work,
            )  # fmt: skip
            t_act = time.monotonic()
            got = chan.activate_credential((work / "cred.blob").read_bytes())
            t_quote = time.monotonic()
            assert hmac.compare_digest(got, secret)
            # ... and with the verifier's own MakeCredential
            secret2 = os.urandom(32)
            cred = make_credential(ident.ek_public_tpm2b, ident.ak_name, secret2)
            assert hmac.compare_digest(chan.activate_credential(cred.to_tpm2_tools()), secret2)
            t_quote = time.monotonic()

            # 4. a quote with our nonce
            nonce = os.urandom(32)
            quote = chan.quote(nonce, SELECTION)
            t_done = time.monotonic()

            # 5. the same guest attests against the running verifier service
            served = service(chan, quote.eventlog) if service is not None else None
            t_service = time.monotonic()
        artifacts = vm.wait(30)
    assert artifacts.returncode == 0, f"QEMU ended with {artifacts.returncode}"
    assert "VTPM-GUEST: POWEROFF" in artifacts.console_text()
    assert hmac.compare_digest(_extra_data(quote.message), nonce)

    for name, data in (
        ("ak.pub", ident.ak_public_tpm2b),
        ("quote.msg", quote.message),
        ("quote.sig", quote.signature),
        ("quote.pcrs", quote.pcrs_tpm2_tools),
        ("eventlog.bin", quote.eventlog),
    ):
        (work / name).write_bytes(data)
    check = "tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q"
    checked = yaml.safe_load(_run(*check.split(), nonce.hex(), cwd=work))
    quote_pcrs = {int(k): int(v).to_bytes(32, "big") for k, v in checked["pcrs"]["sha256"].items()}
    assert quote.untrusted_pcr_values() == {"sha256": quote_pcrs}
    # the project's quote verifier: AK attributes, signature, nonce, pcrSelect, pcrDigest
    verified = verify_quote(
        Public.load(ident.ak_public_tpm2b),
        quote.message,
        quote.signature,
        PcrValues.load(quote.pcrs_tpm2_tools),
        nonce,
    )
    assert verified.pcrs.as_mapping() == {"sha256": quote_pcrs}
    with pytest.raises(VerificationError, match=r"^quote\.nonce: "):
        verify_quote(
            Public.load(ident.ak_public_tpm2b),
            quote.message,
            quote.signature,
            PcrValues.load(quote.pcrs_tpm2_tools),
            os.urandom(32),
        )
    log = yaml.safe_load(_run("tpm2_eventlog", "eventlog.bin", cwd=work))
    log_pcrs = {int(k): int(v).to_bytes(32, "big") for k, v in log["pcrs"]["sha256"].items()}
    return Attested(
        esp=esp,
        work=work,
        quote_pcrs=quote_pcrs,
        events=log["events"],
        log_pcrs=log_pcrs,
        eventlog=quote.eventlog,
        service=served,
        timings={
            "boot_to_ready": t_ready - t0,
            "hello": t_act - t_ready,
            "activate_x2": t_quote - t_act,
            "quote": t_done - t_quote,
            "service": t_service - t_done,
            "vm_wall": artifacts.wall_seconds,
        },
    )


def check_measurements(att: Attested) -> None:
    """The firmware log replays to the quoted PCRs and names exactly our boot files."""
    # replay: every quoted PCR equals the log's replay (PCR8 has no events: zero)
    assert sorted(att.quote_pcrs) == list(range(10))
    for pcr, value in att.quote_pcrs.items():
        assert value == att.log_pcrs.get(pcr, bytes(32)), f"PCR{pcr}: log replay != quote"

    # the project's verifier agrees, and refuses a quote whose PCR4 differs
    replayed = EventLog.parse(att.eventlog).verify({"sha256": att.quote_pcrs})
    assert replayed.verified["sha256"] >= {0, 1, 2, 3, 4, 5, 6, 7, 9}
    boot_apps = replayed.events_of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
    tampered = {**att.quote_pcrs, 4: bytes(32)}
    with pytest.raises(VerificationError, match=r"eventlog\.replay: PCR 4 sha256: log replays to"):
        EventLog.parse(att.eventlog).verify({"sha256": tampered})

    # PCR4: OVMF measured systemd-boot, then the kernel, with our Authenticode digests
    apps = [e for e in att.events if e["EventType"] == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    assert [e["PCRIndex"] for e in apps] == [4, 4]
    for bank in ("sha256", "sha1"):
        expected = [
            authenticode_digest(att.esp.bootloader.read_bytes(), bank),
            authenticode_digest(att.esp.kernel.read_bytes(), bank),
        ]
        assert [_digests(e, bank) for e in apps] == expected
        assert [e.digests[bank] for e in boot_apps] == expected

    # PCR12 (systemd-boot) and PCR9 (EFI stub): the load options; PCR9: the initrd file
    options = (measured_load_options(att.esp.cmdline) + "\0").encode("utf-16-le")
    options_digest = hashlib.sha256(options).digest()
    pcr12 = [_digests(e) for e in att.events if e["PCRIndex"] == 12]
    assert pcr12 == [options_digest]
    pcr9 = [_digests(e) for e in att.events if e["PCRIndex"] == 9]
    initrd_digest = hashlib.sha256(att.esp.initrd.read_bytes()).digest()
    assert options_digest in pcr9 and initrd_digest in pcr9


def _secure_boot_var(att: Attested) -> str:
    for e in att.events:
        ev = e.get("Event")
        if e["EventType"] != "EV_EFI_VARIABLE_DRIVER_CONFIG" or not isinstance(ev, dict):
            continue
        if ev.get("UnicodeName") == "SecureBoot":
            return str(ev.get("VariableData"))
    raise AssertionError("no SecureBoot variable event in PCR7")


def _failures(result: dict[str, Any]) -> list[dict[str, Any]]:
    return list((result.get("report") or {}).get("failures") or [])


def test_esp_boot_attests(
    tmp_path: Path,
    guest_images: GuestImages,
    vm_vtpm: tuple[ProvisionedVtpm, SwtpmProcess],
    vm_verifier: VmVerifier,
) -> None:
    prov, tpm = vm_vtpm
    esp = guest_images.esp()

    def through_service(chan: GuestChannel, eventlog: bytes) -> dict[str, Any]:
        # registration (EK cert from our CA in NV), activation, challenge, quote, evidence
        first = guest_attest_steps(chan, vm_verifier.url)
        # a policy learned from the firmware's own log, uploaded and assigned ...
        log = EventLog.parse(eventlog)
        learned = learn_policy(log.verify(log.replay()), name="vm-learned")
        upload_and_assign(vm_verifier, first.state.attester_id, "vm-learned", learned.to_yaml())
        # ... and a new challenge in the same boot is appraised under it
        second = guest_attest_steps(chan, vm_verifier.url, state=first.state)
        # the policy made from the boot files (no boot) accepts this boot too
        body = files_policy("vm-files", esp, secure_boot=False, cmdline=DEFAULT_CMDLINE)
        upload_and_assign(vm_verifier, first.state.attester_id, "vm-files", body)
        third = guest_attest_steps(chan, vm_verifier.url, state=first.state)
        return {"first": first, "learned": learned, "second": second, "third": third}

    att = boot_and_attest(tmp_path / "run", esp, prov, tpm, through_service)
    check_measurements(att)
    assert _secure_boot_var(att) == "00"
    assert not [e for e in att.events if e["EventType"] == "EV_EFI_VARIABLE_AUTHORITY"]

    first, second, third = att.service["first"], att.service["second"], att.service["third"]
    assert first.registered and not second.registered and not third.registered
    # without a policy the quote and the log replay pass, but the verdict is only a warning
    assert first.result["status"] == "warning", first.result
    assert first.result["policy"] is None and not _failures(first.result)
    assert second.result["status"] == "affirming", _failures(second.result)
    assert second.result["policy"] == "vm-learned"
    assert second.result["nonce"] != first.result["nonce"]
    learned = att.service["learned"]
    assert learned.secure_boot is False and learned.kernel_cmdlines
    assert third.result["status"] == "affirming", _failures(third.result)
    assert third.result["policy"] == "vm-files"
    print(f"\nesp/plain timings: {att.timings}; service steps: {second.timings}")


def test_secure_boot_attests(
    tmp_path: Path,
    guest_images: GuestImages,
    vm_vtpm: tuple[ProvisionedVtpm, SwtpmProcess],
    vm_verifier: VmVerifier,
) -> None:
    prov, tpm = vm_vtpm
    esp = guest_images.esp(secure_boot=True)

    def through_service(chan: GuestChannel, eventlog: bytes) -> dict[str, Any]:
        first = guest_attest_steps(chan, vm_verifier.url)
        body = files_policy("vm-files-sb", esp, secure_boot=True, cmdline=DEFAULT_CMDLINE)
        upload_and_assign(vm_verifier, first.state.attester_id, "vm-files-sb", body)
        second = guest_attest_steps(chan, vm_verifier.url, state=first.state)
        return {"first": first, "second": second}

    att = boot_and_attest(tmp_path / "run", esp, prov, tpm, through_service)
    check_measurements(att)
    assert _secure_boot_var(att) == "01"
    authority = [e for e in att.events if e["EventType"] == "EV_EFI_VARIABLE_AUTHORITY"]
    assert authority and all(e["PCRIndex"] == 7 for e in authority)
    second = att.service["second"]
    assert second.result["status"] == "affirming", _failures(second.result)
    assert second.result["policy"] == "vm-files-sb"
    print(f"\nesp/secure-boot timings: {att.timings}")


def test_other_cmdline_changes_pcr9_and_pcr12(
    tmp_path: Path,
    guest_images: GuestImages,
    vm_vtpm: tuple[ProvisionedVtpm, SwtpmProcess],
    vm_verifier: VmVerifier,
) -> None:
    prov, tpm = vm_vtpm
    esp = guest_images.esp(cmdline=OTHER_CMDLINE)
    # the policy of the plain boot: same files, the default command line
    plain = files_policy("vm-files", esp, secure_boot=False, cmdline=DEFAULT_CMDLINE)

    def through_service(chan: GuestChannel, eventlog: bytes) -> dict[str, Any]:
        first = guest_attest_steps(chan, vm_verifier.url)
        upload_and_assign(vm_verifier, first.state.attester_id, "vm-files", plain)
        return {"second": guest_attest_steps(chan, vm_verifier.url, state=first.state)}

    att = boot_and_attest(tmp_path / "run", esp, prov, tpm, through_service)
    check_measurements(att)  # the measured options are OTHER_CMDLINE's
    default = (measured_load_options(DEFAULT_CMDLINE) + "\0").encode("utf-16-le")
    default_digest = hashlib.sha256(default).digest()
    assert all(_digests(e) != default_digest for e in att.events if e["PCRIndex"] in (9, 12))

    # the running verifier says why: the kernel command line rule, with event and values
    result = att.service["second"].result
    assert result["status"] == "contraindicated", result
    failures = _failures(result)
    assert {f["rule"] for f in failures} == {"kernel_cmdline"}, failures
    fail = failures[0]
    assert fail["event"]["type"] == "EV_IPL" and fail["event"]["pcr"] in (8, 9, 12)
    # expected: the allowed lines; actual: the measured line (Python reprs)
    assert repr(measured_load_options(DEFAULT_CMDLINE)) in str(fail["expected"])
    assert repr(measured_load_options(OTHER_CMDLINE)) in str(fail["actual"])
    print(f"\nesp/other-cmdline timings: {att.timings}; failure: {fail}")
