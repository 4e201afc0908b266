"""`vtpm demo`: CA + verifier + vTPM + measured boot + attestation, end to end (issue 7).

The one place (with the rest of ``vtpm_cli``) that wires ``ca``, ``verifier``
and ``vtpm_core`` together. Steps:

1. a CA home (ECDSA P-256; the key passphrase is generated into a 0600 file -
   demo only) and a verifier home (SQLite) trusting the CA's root;
2. both served by gunicorn on free 127.0.0.1 ports (child processes, stopped
   by PID on exit, failure or Ctrl-C);
3. a vTPM store and one vTPM whose EK certificates come from the CA over HTTP
   (``ca.client.HttpCaIssuer``) and sit in NV;
4. a simulated measured boot (``vtpm_core.measured_boot``, TCG PC Client
   Platform Firmware Profile event log) with systemd-boot and a stand-in
   kernel; a policy learned from its log (``verifier.policy.learn_policy``);
   the PCR reference values uploaded to the verifier and assigned;
5. register, activate (TPM2_ActivateCredential), challenge, quote, evidence:
   affirming;
6. the vTPM restarted (PCRs reset), a tampered kernel booted: contraindicated,
   the failing rule explained.

The home is recreated on every run (a previous demo's leftover processes,
found in ``HOME/demo.pids``, are stopped first).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from vtpm_core._process import pid_exists, stop_child, stop_pid
from vtpm_core.errors import ConfigError, StateError, VerificationError, VtpmTrustError

__all__ = ["BOOTLOADER", "KERNEL", "DemoResult", "run_demo", "tamper_pe"]

BOOTLOADER = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
KERNEL = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
MARKER = ".vtpm-demo"
PIDFILE = "demo.pids"
VTPM_NAME = "demo-vm"
POLICY_NAME = "demo-good-boot"
_CMDLINE = "console=ttyS0 root=/dev/vda1 ro quiet"

Echo = Callable[[str], None]


@dataclass(slots=True)
class DemoResult:
    """What a run produced (for the CLI and tests)."""

    ca_url: str = ""
    verifier_url: str = ""
    attester_id: str = ""
    good_status: str = ""
    tampered_status: str = ""
    tampered_failures: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def tamper_pe(pe: bytes) -> bytes:
    """A copy of PE image ``pe`` with 4 bytes changed inside its first non-empty section.

    PE/COFF spec: e_lfanew at 0x3C, then "PE\\0\\0", the COFF header
    (NumberOfSections at +2, SizeOfOptionalHeader at +16), the optional
    header, the section table (40 bytes each: SizeOfRawData at +16,
    PointerToRawData at +20). Section bytes are hashed by Authenticode, so
    the digest changes while the file stays a valid PE.
    """
    if len(pe) < 0x40 or pe[:2] != b"MZ":
        raise VerificationError("demo.kernel", "not a PE image (no MZ header)")
    (lfanew,) = struct.unpack_from("<I", pe, 0x3C)
    if pe[lfanew : lfanew + 4] != b"PE\0\0":
        raise VerificationError("demo.kernel", f"no PE signature at {lfanew:#x}")
    nsect, opt_size = (
        struct.unpack_from("<H", pe, lfanew + 6)[0],
        struct.unpack_from("<H", pe, lfanew + 20)[0],
    )
    table = lfanew + 24 + opt_size
    for i in range(nsect):
        raw_size, raw_ptr = struct.unpack_from("<II", pe, table + 40 * i + 16)
        if raw_size >= 64 and raw_ptr + raw_size <= len(pe):
            at = raw_ptr + raw_size // 2
            out = bytearray(pe)
            out[at : at + 4] = bytes(b ^ 0xFF for b in out[at : at + 4])
            return bytes(out)
    raise VerificationError("demo.kernel", "no section with raw data to change")


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (proc(5) stat field 22), or ""."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _prepare_home(home: Path, echo: Echo) -> None:
    """Recreate the demo home; stop what a previous run left (same PID and start time)."""
    if home.exists():
        if not (home / MARKER).exists() and any(home.iterdir()):
            raise ConfigError(f"{home} exists and is not a demo home (no {MARKER}); pick --home")
        pidfile = home / PIDFILE
        if pidfile.exists():
            for line in pidfile.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1].isdigit():
                    pid = int(parts[1])
                    if pid_exists(pid) and _start_time(pid) == parts[2]:
                        echo(f"  stopping leftover {parts[0]} (pid {pid}) of a previous run")
                        stop_pid(pid, 10.0, poll=0.05)
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / MARKER).write_text("created by `vtpm demo`; deleted and recreated by the next run\n")


class _Server:
    """A gunicorn server we started (``python -m vtpm_cli.main ... serve``), stopped by PID."""

    def __init__(self, name: str, args: list[str], log: Path, health: str) -> None:
        self.name = name
        self.log = log
        self.health = health
        self._log_fh = log.open("wb")
        self.proc = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "vtpm_cli.main", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with requests.Session() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                    raise StateError(
                        f"{self.name} exited with {self.proc.returncode}: "
                        f"{tail[0] if tail else '(no output)'} (log {self.log})"
                    )
                with contextlib.suppress(requests.RequestException):
                    if http.get(self.health, timeout=2).status_code == 200:
                        return
                time.sleep(0.1)
        raise StateError(f"{self.name} did not answer {self.health} within {timeout:.0f} s")

    def stop(self) -> None:
        stop_child(self.proc, 15)
        self._log_fh.close()


class _Steps:
    """Prints each step with its timing."""

    def __init__(self, echo: Echo, result: DemoResult) -> None:
        self.echo = echo
        self.result = result
        self.n = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        t0 = time.monotonic()
        self.echo(f"[{self.n:2d}] {title} ...")
        try:
            yield
        except (VtpmTrustError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one line naming the step, never a traceback
            raise StateError(
                f"step {self.n} ({title}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        dt = time.monotonic() - t0
        self.result.timings[title] = dt
        self.echo(f"     done in {dt:.2f} s")


def _record_pids(home: Path, pids: dict[str, int]) -> None:
    """HOME/demo.pids: ``name pid start-time`` lines (start time: a reused PID is not ours)."""
    (home / PIDFILE).write_text("".join(f"{k} {v} {_start_time(v)}\n" for k, v in pids.items()))


def _admin(http: requests.Session, method: str, url: str, token: str, body: Any) -> Any:
    resp = http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    if resp.status_code >= 400:
        raise StateError(f"{method} {url}: HTTP {resp.status_code}: {resp.text.strip()[:300]}")
    return resp.json()


def _explain(failure: dict[str, Any]) -> str:
    """One failed rule as a line: rule, event, message, expected vs actual."""
    event = failure.get("event")
    where = ""
    if isinstance(event, dict):
        where = " ".join(f"{k}={v}" for k, v in event.items() if v not in (None, "")) + ": "
    text = f"{failure.get('rule')}: {where}{failure.get('message')}"
    if failure.get("expected") is not None or failure.get("actual") is not None:
        pad = "\n          "
        text += f"{pad}expected {failure.get('expected')}{pad}actual   {failure.get('actual')}"
    return text


# -- the demo ------------------------------------------------------------------------------


def _boot_files(home: Path) -> tuple[Path, Path]:
    """The good and the tampered boot description directories (real PE files)."""
    for f in (BOOTLOADER, KERNEL):
        if not f.is_file():
            raise ConfigError(f"{f} is missing (install the Debian package systemd-boot-efi)")
    boot = home / "boot"
    boot.mkdir()
    shutil.copyfile(BOOTLOADER, boot / "systemd-bootx64.efi")
    shutil.copyfile(KERNEL, boot / "vmlinuz.efi")
    (boot / "vmlinuz-tampered.efi").write_bytes(tamper_pe(KERNEL.read_bytes()))
    (boot / "firmware.bin").write_bytes(b"vtpm-trust demo firmware volume\0" * 2048)
    (boot / "initrd.img").write_bytes(b"070701" + b"demo initrd\0" * 512)
    return boot, boot / "vmlinuz-tampered.efi"


def _description(boot: Path, kernel_file: str) -> Any:
    from vtpm_core.measured_boot import BootDescription

    return BootDescription.from_mapping(
        {
            "firmware": {
                "version": "vtpm-trust demo OVMF 1.0",
                "blobs": [{"file": "firmware.bin"}],
            },
            "secure_boot": {"enabled": False},
            "boot_applications": [
                {"path": "\\EFI\\BOOT\\BOOTX64.EFI", "file": "systemd-bootx64.efi"},
                {"path": "\\EFI\\Linux\\vmlinuz.efi", "file": kernel_file},
            ],
            "kernel_cmdline": _CMDLINE,
            "initrd": {"file": "initrd.img"},
        },
        boot,
    )


def _attest(
    tpm: Any, boot_desc: Any, verifier_url: str, state: Any, home: Path, label: str
) -> tuple[Any, dict[str, Any], bytes]:
    """Simulate the boot on the freshly started vTPM, then enrol (if needed) and attest."""
    from verifier.attester import TpmAttester, attest_once, enroll
    from vtpm_core.measured_boot import simulate_boot

    esapi = tpm.esapi()
    boot = simulate_boot(boot_desc, esapi)
    (home / f"eventlog-{label}.bin").write_bytes(boot.eventlog)
    att = TpmAttester(esapi)
    try:
        with requests.Session() as http:
            if state is None:
                state = enroll(http, verifier_url, att)
            return state, attest_once(http, state, att, boot.eventlog), boot.eventlog
    finally:
        att.flush()


def run_demo(
    home: Path, *, once: bool, echo: Echo, wait_forever: Callable[[], object]
) -> DemoResult:
    """Run the whole demo; raises a VtpmTrustError naming the step that failed."""
    from ca.client import HttpCaIssuer
    from ca.home import CaHome
    from verifier.eventlog import EventLog
    from verifier.policy import learn_policy
    from verifier.service.config import init_home
    from verifier.service.db import Database, upgrade
    from vtpm_core.store import VtpmStore

    os.environ.setdefault("TSS2_LOG", "all+NONE")  # tpm2-tss logs expected NV misses
    result = DemoResult()
    steps = _Steps(echo, result)
    home = home.absolute()
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        with steps.step(f"prepare {home} (recreated on every run)"):
            _prepare_home(home, echo)
            boot_dir, _ = _boot_files(home)

        with steps.step("CA: init (ECDSA P-256)"):
            passfile = home / "ca-passphrase"
            _write_private(passfile, secrets.token_urlsafe(24).encode() + b"\n")
            ca = CaHome(home / "ca")
            ca.init(
                key_type="ecdsa-p256",
                subject="CN=vtpm-trust demo EK CA,O=vtpm-trust demo",
                passphrase=passfile.read_bytes().splitlines()[0],
            )
            ca_token = ca.add_token("demo-provisioner", "provisioner")
            echo(f"     CA key passphrase generated into {passfile} (mode 0600; demo only)")

        with steps.step("verifier: init (SQLite) trusting the CA root"):
            vhome = home / "verifier"
            admin_token = init_home(vhome, verifier_id="vtpm-trust-demo")
            shutil.copyfile(home / "ca" / "ca.pem", vhome / "roots" / "demo-ca.pem")
            from verifier.service.config import load_config

            db = Database(load_config(vhome).database_url)
            try:
                upgrade(db.engine)
            finally:
                db.dispose()

        with steps.step("start CA and verifier (gunicorn, 127.0.0.1)"):
            ca_port, v_port = _free_port(), _free_port()
            result.ca_url = f"http://127.0.0.1:{ca_port}"
            result.verifier_url = f"http://127.0.0.1:{v_port}"
            logs = home / "logs"
            logs.mkdir()
            ca_srv = _Server(
                "CA",
                ["ca", "serve", "--home", str(home / "ca"), "--bind", f"127.0.0.1:{ca_port}",
                 "--workers", "1", "--passphrase-file", str(passfile)],
                logs / "ca.log",
                f"{result.ca_url}/v1/ca/chain",
            )  # fmt: skip
            stack.callback(ca_srv.stop)
            v_srv = _Server(
                "verifier",
                ["verifier", "serve", "--home", str(vhome), "--bind", f"127.0.0.1:{v_port}",
                 "--workers", "1"],
                logs / "verifier.log",
                f"{result.verifier_url}/healthz",
            )  # fmt: skip
            stack.callback(v_srv.stop)
            result.pids.update({"ca": ca_srv.pid, "verifier": v_srv.pid})
            _record_pids(home, result.pids)
            ca_srv.wait_ready()
            v_srv.wait_ready()
            echo(f"     CA       {result.ca_url}  (pid {ca_srv.pid})")
            echo(f"     verifier {result.verifier_url}  (pid {v_srv.pid})")

        with steps.step(f"vTPM store: create {VTPM_NAME} (EK certificates from the CA over HTTP)"):
            store = VtpmStore.init(home / "store")
            issuer = HttpCaIssuer(result.ca_url, ca_token)
            try:
                record = store.create(VTPM_NAME, issuer=issuer)
            finally:
                with contextlib.suppress(Exception):
                    issuer.close()
            echo(f"     vTPM {record.vtpm_id}, VM id {record.vm_id}; EK certs in NV")

        t_attest = time.monotonic()
        tpm = store.start(VTPM_NAME)
        stack.callback(tpm.stop)
        result.pids["vtpm"] = tpm.pid or 0
        _record_pids(home, result.pids)

        with steps.step("good boot (measured-boot simulator), register, activate, attest"):
            good = _description(boot_dir, "vmlinuz.efi")
            state, res_good, good_log = _attest(tpm, good, result.verifier_url, None, home, "good")
            result.attester_id = state.attester_id
            echo(f"     attester {state.attester_id} registered and activated")
            echo(f"     (no policy yet) verdict: {res_good['status']}")

        with steps.step("learn a policy from the good log; upload and assign it"):
            parsed = EventLog.parse(good_log)
            learned = learn_policy(parsed.verify(parsed.replay()), name=POLICY_NAME)
            (home / "policy.yaml").write_text(learned.to_yaml())
            with requests.Session() as http:
                _admin(
                    http, "POST", f"{result.verifier_url}/v1/policies", admin_token,
                    {"name": POLICY_NAME, "policy": learned.to_yaml()},
                )  # fmt: skip
                _admin(
                    http, "PUT",
                    f"{result.verifier_url}/v1/attesters/{state.attester_id}/policy",
                    admin_token, {"policy": POLICY_NAME},
                )  # fmt: skip
            echo(f"     learned {home / 'policy.yaml'} ({learned.id})")
            echo(f"     uploaded as {POLICY_NAME!r} and assigned to {state.attester_id}")

        with steps.step("attest the good boot"):
            with requests.Session() as http:
                from verifier.attester import TpmAttester, attest_once

                att = TpmAttester(tpm.esapi())
                try:
                    res = attest_once(http, state, att, good_log)
                finally:
                    att.flush()
            result.good_status = str(res["status"])
            echo(f"     verdict: {result.good_status}  (result {res.get('id', '?')})")
            if result.good_status != "affirming":
                raise VerificationError(
                    "demo.good-boot", f"expected affirming, got {result.good_status}: "
                    f"{res.get('report', {}).get('failures')}",
                )  # fmt: skip

        with steps.step("restart the vTPM (PCRs reset), boot a tampered kernel, attest"):
            tpm.stop()
            tpm = store.start(VTPM_NAME)
            stack.callback(tpm.stop)
            result.pids["vtpm"] = tpm.pid or 0
            _record_pids(home, result.pids)
            bad = _description(boot_dir, "vmlinuz-tampered.efi")
            _, res_bad, _ = _attest(tpm, bad, result.verifier_url, state, home, "tampered")
            result.tampered_status = str(res_bad["status"])
            echo(f"     verdict: {result.tampered_status}  (result {res_bad.get('id', '?')})")
            for f in res_bad.get("report", {}).get("failures", []):
                line = _explain(f)
                result.tampered_failures.append(line)
                echo(f"     FAIL {line}")
            if result.tampered_status != "contraindicated":
                raise VerificationError(
                    "demo.tampered-boot", f"expected contraindicated, got {result.tampered_status}"
                )
        result.timings["attested part"] = time.monotonic() - t_attest
        result.timings["total"] = time.monotonic() - t_start
        tpm.stop()

        echo("")
        echo(f"attested part: {result.timings['attested part']:.1f} s; "
             f"total: {result.timings['total']:.1f} s")  # fmt: skip
        echo(f"CA API:       {result.ca_url}/v1/ca/chain")
        echo(f"verifier API: {result.verifier_url}/openapi.json")
        echo(f"results:      {result.verifier_url}/v1/attesters/{state.attester_id}/results "
             f"(admin token in {vhome / 'admin.token'})")  # fmt: skip
        echo(
            "pids: " + " ".join(f"{k}={v}" for k, v in result.pids.items()) + f" ({home / PIDFILE})"
        )
        if not once:
            echo("services running; Ctrl-C to stop")
            wait_forever()
    echo("stopped: " + " ".join(f"{k}={v}" for k, v in result.pids.items()))
    return result
