"""Launch the attestation guest: QEMU q35 + OVMF + the project's vTPM.

QEMU runs with TCG (software emulation: this machine's KVM cannot run OVMF),
always under ``timeout`` and in its own process group, stopped by PID. The
vTPM is a running :class:`~vtpm_core.swtpm.SwtpmProcess` (transport
``"qemu"``) attached as a CRB device through its ``qemu_args()``. The VM has
no network device; it talks only through two serial ports: ttyS0, the kernel
console, captured to a file; ttyS1, the host channel, a unix-socket chardev
that :class:`~vtpm_core.vm.channel.GuestChannel` connects to.

Firmware (Debian package ovmf): ``OVMF_CODE_4M.fd`` + an empty variable
store for a plain boot; ``OVMF_CODE_4M.secboot.fd`` (SMM-protected
variables, so ``smm=on`` and a secure pflash) + ``OVMF_VARS_4M.snakeoil.fd``
(PK/KEK/db = Debian's test-only snakeoil certificate) for secure boot. Each
VM gets its own copy of the variable store.

Guarantees: :meth:`QemuVm.stop` (also on context exit) leaves no QEMU
process behind; the socket directory is private (0700) and removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vtpm_core._process import stop_child
from vtpm_core.errors import ConfigError, NotFoundError, TpmError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm.channel import GuestChannel
from vtpm_core.vm.esp import EspImage

__all__ = ["OvmfFirmware", "QemuVm", "VmArtifacts", "ovmf_firmware"]

_OVMF_DIR = Path("/usr/share/OVMF")
_STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class OvmfFirmware:
    """An OVMF code image and the variable store template that goes with it."""

    code: Path
    vars_template: Path
    secure_boot: bool


def ovmf_firmware(secure_boot: bool, ovmf_dir: Path = _OVMF_DIR) -> OvmfFirmware:
    """The Debian OVMF build for a plain or a secure (snakeoil-enrolled) boot."""
    if secure_boot:
        fw = OvmfFirmware(
            ovmf_dir / "OVMF_CODE_4M.secboot.fd", ovmf_dir / "OVMF_VARS_4M.snakeoil.fd", True
        )
    else:
        fw = OvmfFirmware(ovmf_dir / "OVMF_CODE_4M.fd", ovmf_dir / "OVMF_VARS_4M.fd", False)
    for p in (fw.code, fw.vars_template):
        if not p.is_file():
            raise NotFoundError(f"{p} missing (Debian package 'ovmf')")
    return fw


@dataclass(frozen=True, slots=True)
class VmArtifacts:
    """What a finished VM run leaves behind."""

    run_dir: Path
    console_log: Path  # ttyS0: firmware, kernel and guest-init messages
    qemu_log: Path  # QEMU's own stdout/stderr
    command: tuple[str, ...]
    returncode: int | None  # None if it had to be killed
    timed_out: bool
    wall_seconds: float
    ready_seconds: float | None  # QEMU start to the guest's READY line

    def console_text(self) -> str:
        return self.console_log.read_text(errors="replace") if self.console_log.exists() else ""


class QemuVm:
    """One QEMU VM booting ``esp`` with ``tpm`` attached. Use as a context manager."""

    def __init__(
        self,
        run_dir: Path,
        *,
        esp: EspImage,
        tpm: SwtpmProcess,
        memory_mib: int = 1024,
        smp: int = 2,
        timeout_s: float = 240.0,
        qemu_binary: str = "qemu-system-x86_64",
    ) -> None:
        if timeout_s <= 0 or memory_mib < 256 or smp < 1:
            raise ConfigError("VM needs timeout > 0, memory >= 256 MiB and smp >= 1")
        self.run_dir = Path(run_dir)
        self.esp = esp
        self._tpm = tpm
        self._memory = memory_mib
        self._smp = smp
        self._timeout = timeout_s
        self._qemu = qemu_binary
        self._firmware = ovmf_firmware(esp.secure_boot)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: Path | None = None
        self._started = 0.0
        self._command: tuple[str, ...] = ()
        self._ready_s: float | None = None
        self._result: VmArtifacts | None = None

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def channel_path(self) -> Path:
        if self._sock_dir is None:
            raise TpmError("VM not started")
        return self._sock_dir / "channel.sock"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The full command line (``timeout`` + QEMU) this VM runs."""
        if self._sock_dir is None:
            raise TpmError("VM not started")
        fw = self._firmware
        machine = f"q35,accel=tcg,smm={'on' if fw.secure_boot else 'off'}"
        cmd = [
            "timeout",
            "--kill-after=5",
            f"{self._timeout:.0f}",
            self._qemu,
            "-machine",
            machine,
        ]
        if fw.secure_boot:
            cmd += [
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
                "-global",
                "ICH9-LPC.disable_s3=1",
            ]
        cmd += [
            "-cpu", "max", "-m", str(self._memory), "-smp", str(self._smp),
            "-display", "none", "-no-reboot", "-nodefaults", "-nic", "none", "-monitor", "none",
            "-drive", f"if=pflash,format=raw,unit=0,file={fw.code},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.run_dir / 'vars.fd'}",
            *self._tpm.qemu_args(),
            "-drive", f"file={self.esp.path},format=raw,if=none,id=esp,readonly=on",
            "-device", "virtio-blk-pci,drive=esp,bootindex=1",
            "-chardev", f"file,id=console,path={self.console_log}",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=channel,path={self.channel_path},server=on,wait=off",
            "-serial", "chardev:channel",
        ]  # fmt: skip
        return cmd

    def start(self) -> None:
        """Start QEMU (non-blocking). The swtpm must already be running."""
        if self._proc is not None:
            raise TpmError("VM already started")
        if shutil.which(self._qemu) is None:
            raise NotFoundError(f"{self._qemu} not found (Debian package qemu-system-x86)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._firmware.vars_template, self.run_dir / "vars.fd")
        # unix socket paths are limited to 108 bytes: keep them short and private
        self._sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-vm-"))
        self._command = tuple(self.command())
        log = open(self.run_dir / "qemu.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            self._started = time.monotonic()
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() can end timeout + QEMU
                close_fds=True,
            )
        finally:
            log.close()

    def connect(
        self, *, boot_timeout: float = 180.0, command_timeout: float = 60.0
    ) -> GuestChannel:
        """Wait for the guest's READY on ttyS1 and return the connected channel."""
        try:
            chan = GuestChannel.open(
                self.channel_path,
                boot_timeout=boot_timeout,
                command_timeout=command_timeout,
                is_alive=self.is_running,
            )
        except TpmError as exc:
            raise type(exc)(
                f"{exc}; {self._exit_state()}; console: {self._console_tail()}"
            ) from exc
        self._ready_s = time.monotonic() - self._started
        return chan

    def wait(self, timeout: float = 60.0) -> VmArtifacts:
        """Wait for the VM to exit by itself (guest poweroff); stop it after ``timeout``."""
        if self._proc is None:
            raise TpmError("VM not started")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        return self.stop()

    def stop(self) -> VmArtifacts:
        """Stop QEMU by PID if it still runs (TERM, then KILL of its group). Idempotent."""
        if self._result is not None:
            return self._result
        proc = self._proc
        if proc is None:
            raise TpmError("VM not started")

        def kill_group() -> None:  # the group start() created
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        # SIGTERM goes to timeout(1), which passes it on to QEMU
        killed = stop_child(proc, _STOP_GRACE_S, kill=kill_group)
        wall = time.monotonic() - self._started
        rc = proc.returncode
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        self._result = VmArtifacts(
            run_dir=self.run_dir,
            console_log=self.console_log,
            qemu_log=self.run_dir / "qemu.log",
            command=self._command,
            returncode=None if killed else rc,
            # timeout(1): 124 after TERM, 137 after its --kill-after KILL
            timed_out=not killed and rc in (124, 137),
            wall_seconds=wall,
            ready_seconds=self._ready_s,
        )
        return self._result

    def _exit_state(self) -> str:
        if self._proc is None:
            return "QEMU not started"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(2.0)  # a closed channel usually means QEMU is going away
        rc = self._proc.poll()
        if rc is None:
            return "QEMU still running"
        why = " (its time limit)" if rc == 124 else ""
        return f"QEMU exited with status {rc}{why}, see {self.run_dir / 'qemu.log'}"

    def _console_tail(self, lines: int = 5) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) if tail else "(no console output)"

    def __enter__(self) -> QemuVm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
