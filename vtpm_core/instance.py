"""Run one vTPM: swtpm on its encrypted state, the data key handed over a pipe.

swtpm 0.7.1 ``--key fd=N,mode=aes-256-cbc,format=binary,remove=false``
reads the 32-byte AES key from descriptor N; swtpm then encrypts
``tpm2-00.permall`` (AES-256-CBC plus an HMAC, see swtpm(8) ``--key``). We
write the unwrapped data key into a pipe and pass its read end: the plaintext
key never touches the file system and lives in our memory only as long as the
call.

Two ways to run:

- :func:`start_swtpm` gives a :class:`~vtpm_core.swtpm.SwtpmProcess` owned
  by the caller (tests, the VM runner, provisioning);
- :func:`start_detached` starts swtpm as a daemon that outlives the CLI
  (``vtpm start``), with a PID file in the vTPM's run directory, and
  :func:`stop_detached` stops it by that PID after checking the process is
  the swtpm of this state directory.

A wrong data key never touches the state: swtpm refuses to initialise and
exits (its HMAC check fails first); we turn that into a StateError naming the
vTPM and the key id.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vtpm_core._process import stop_child, stop_pid
from vtpm_core.errors import ConflictError, StateError, TpmError
from vtpm_core.swtpm import SwtpmProcess, free_tcp_port_pair, swtpm_available

if TYPE_CHECKING:
    from vtpm_core.tpm_client import RawTpm

__all__ = [
    "DetachedSwtpm",
    "KeyContext",
    "key_args",
    "preflight",
    "provisioning_tpm",
    "reencrypt_state",
    "running_pid",
    "start_detached",
    "start_swtpm",
    "stop_detached",
]

Transport = Literal["tcp", "unix", "qemu"]
STATE_FILE = "tpm2-00.permall"
_PID_FILE = "swtpm.pid"
_LOG_FILE = "swtpm.log"
_STOP_GRACE_S = 3.0
# a provisioning command answers in well under a second (RSA key generation included);
# a swtpm that stops answering must not hang `vtpm create`
_PROVISION_TIMEOUT_S = 30.0
# what swtpm 0.7.1 logs when the key does not decrypt the state
_BAD_KEY_MARKERS = (
    "Verification of HMAC failed",
    "Could not find plain data",
    "GetDecryptedData",
)
_LOCKED_MARKER = "Could not lock access to lockfile"


@dataclass(frozen=True, slots=True)
class KeyContext:
    """Names used in error messages: which vTPM, which key."""

    vtpm: str
    key_id: str

    def bad_key(self) -> StateError:
        return StateError(
            f"vTPM {self.vtpm!r}: swtpm cannot decrypt its state with the data key "
            f"wrapped under key id {self.key_id!r} (wrong key, or the state file was "
            "replaced); the state was not modified"
        )

    def busy(self) -> ConflictError:
        return ConflictError(f"vTPM {self.vtpm!r} is already running (its state is locked)")


def key_args(fd: int) -> list[str]:
    """swtpm arguments that read the binary AES-256 key from descriptor ``fd``."""
    return ["--key", f"fd={fd},mode=aes-256-cbc,format=binary,remove=false"]


def _key_pipe(data_key: bytes) -> int:
    """A pipe holding exactly the key; returns the read end (the caller closes it)."""
    r, w = os.pipe()
    try:
        os.write(w, data_key)  # 32 bytes < PIPE_BUF: one atomic write, never blocks
    finally:
        os.close(w)
    return r


def _log_tail(path: Path, since: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _diagnose(log: str, ctx: KeyContext) -> Exception | None:
    if _LOCKED_MARKER in log:
        return ctx.busy()
    if any(m in log for m in _BAD_KEY_MARKERS):
        return ctx.bad_key()
    return None


def preflight(state_dir: Path, data_key: bytes, run_dir: Path, ctx: KeyContext) -> None:
    """Check that ``data_key`` opens the state, without a TPM2_Startup and without writes.

    ``--flags not-need-init --daemon`` makes swtpm initialise libtpms (which
    reads and authenticates the state) before the daemon parent exits, so the
    exit status answers synchronously. Used before handing a vTPM to QEMU,
    where swtpm would otherwise wait for QEMU's CMD_INIT to find a bad key.
    """
    if not (state_dir / STATE_FILE).exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    ctrl = run_dir / "preflight.ctrl"
    pid_file = run_dir / "preflight.pid"
    log = run_dir / _LOG_FILE
    for p in (ctrl, pid_file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    since = _size(log)
    args = ["--ctrl", f"type=unixio,path={ctrl}", "--flags", "not-need-init"]
    rc = _run_daemon(state_dir, args, pid_file, data_key, log)
    if rc != 0:
        raise _diagnose(_log_tail(log, since), ctx) or TpmError(
            f"vTPM {ctx.vtpm!r}: swtpm failed to open its state (exit {rc}); see {log}"
        )
    pid = _read_pid(pid_file)
    if pid is not None:
        stop_pid(pid, _STOP_GRACE_S)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()


def start_swtpm(
    state_dir: Path,
    data_key: bytes,
    ctx: KeyContext,
    *,
    transport: Transport = "unix",
    socket_dir: Path | None = None,
    log_file: Path | None = None,
) -> SwtpmProcess:
    """A started SwtpmProcess on ``state_dir`` decrypting with ``data_key``; the caller stops it.

    Raises StateError (naming the vTPM and key id) when the key does not open
    the state, ConflictError when the vTPM is already running.
    """
    run_dir = Path(socket_dir) if socket_dir is not None else state_dir.parent / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Path(log_file) if log_file is not None else run_dir / _LOG_FILE
    if transport == "qemu":
        preflight(state_dir, data_key, run_dir, ctx)
    last: Exception | None = None
    # each attempt needs a fresh pipe: swtpm consumed the previous one
    for _attempt in range(3 if transport == "tcp" else 1):
        since = _size(log)
        r = _key_pipe(data_key)
        proc = SwtpmProcess(
            state_dir,
            transport=transport,
            socket_dir=run_dir,
            extra_args=key_args(r),
            pass_fds=(r,),
            log_file=log,
        )
        try:
            proc.start()
            return proc
        except TpmError as exc:
            diagnosed = _diagnose(_log_tail(log, since), ctx)
            if diagnosed is not None:
                raise diagnosed from None
            last = exc
        finally:
            os.close(r)
    assert last is not None
    raise last


@contextlib.contextmanager
def provisioning_tpm(
    state_dir: Path, data_key: bytes, ctx: KeyContext, *, log_file: Path
) -> Iterator[RawTpm]:
    """A swtpm child for one provisioning session, with no polling and no socket file.

    We bind and listen on an abstract unix socket (Linux; no file system
    entry), hand the listening descriptor to swtpm (``--server
    type=unixio,fd=N``) and connect at once: the kernel queues the connection
    and our first command until swtpm is up, so nothing waits in a sleep
    loop. swtpm starts the TPM itself (``startup-clear``). The commands are
    :class:`vtpm_core.tpm_client.RawTpm`'s (why: its docstring). On exit the
    socket is closed and swtpm is stopped by PID; if swtpm died, the error
    says why from its log.
    """
    from vtpm_core.tpm_client import RawTpm

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    r = -1

    def io_error(exc: OSError) -> Exception:  # swtpm died or hung up: say why
        return _diagnose(_log_tail(log_file, 0), ctx) or TpmError(
            f"vTPM {ctx.vtpm!r}: swtpm did not answer ({exc}); see {log_file}"
        )

    try:
        listener.bind(f"\0vtpm-trust-{os.getpid()}-{secrets.token_hex(8)}")
        listener.listen(1)
        r = _key_pipe(data_key)
        with open(log_file, "ab") as logf:
            proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
                 "--server", f"type=unixio,fd={listener.fileno()}",
                 "--flags", "not-need-init,startup-clear", *key_args(r)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                pass_fds=(listener.fileno(), r),
            )  # fmt: skip
        os.close(r)
        r = -1
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(_PROVISION_TIMEOUT_S)
        client.connect(listener.getsockname())
        listener.close()
        yield RawTpm(client, on_io_error=io_error)
    finally:
        if client is not None:
            client.close()
        listener.close()
        if r >= 0:
            os.close(r)
        if proc is not None:
            stop_child(proc, _STOP_GRACE_S)


# -- detached (daemon) swtpm for `vtpm start` / `vtpm stop` ----------------------------


@dataclass(frozen=True, slots=True)
class DetachedSwtpm:
    """A swtpm daemon serving one vTPM."""

    pid: int
    transport: Literal["tcp", "qemu"]
    ctrl_path: Path | None = None
    port: int | None = None

    def qemu_args(self) -> list[str]:
        if self.ctrl_path is None:
            raise TpmError(
                "this vTPM was started on TCP for tools; start it with --socket for QEMU"
            )
        return [
            "-chardev", f"socket,id=chrtpm,path={self.ctrl_path}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0",
        ]  # fmt: skip

    @property
    def tcti(self) -> str:
        if self.port is None:
            raise TpmError("this vTPM was started for QEMU; start it with --port for tools")
        return f"swtpm:host=127.0.0.1,port={self.port}"


def start_detached(
    state_dir: Path,
    data_key: bytes,
    run_dir: Path,
    ctx: KeyContext,
    *,
    socket_path: Path | None = None,
    port: int | None = None,
) -> DetachedSwtpm:
    """Start swtpm as a daemon; QEMU control socket (default) or TCP on ``port``/``port+1``.

    With a socket the vTPM waits for QEMU (which sends CMD_INIT and the
    firmware TPM2_Startup); with a port swtpm starts the TPM itself
    (``startup-clear``) so tpm2-tools can talk at once.
    """
    if not swtpm_available():
        raise TpmError("swtpm not found on PATH (install the Debian package 'swtpm')")
    if running_pid(run_dir, state_dir) is not None:
        raise ctx.busy()
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = run_dir / _PID_FILE
    log = run_dir / _LOG_FILE
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    args: list[str]
    if port is None:
        ctrl = Path(socket_path) if socket_path is not None else run_dir / "swtpm.ctrl"
        ctrl.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            ctrl.unlink()
        preflight(state_dir, data_key, run_dir, ctx)
        args = ["--ctrl", f"type=unixio,path={ctrl}"]
        result = DetachedSwtpm(0, "qemu", ctrl_path=ctrl)
    else:
        args = [
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1,disconnect",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
        ]  # fmt: skip
        result = DetachedSwtpm(0, "tcp", port=port)
    since = _size(log)
    rc = _run_daemon(state_dir, args, pid_file, data_key, log)
    if rc != 0:
        tail = _log_tail(log, since)
        diagnosed = _diagnose(tail, ctx)
        if diagnosed is not None:
            raise diagnosed
        last = tail.strip().splitlines()[-1] if tail.strip() else f"exit {rc}"
        raise TpmError(f"vTPM {ctx.vtpm!r}: swtpm did not start: {last} (see {log})")
    pid = _read_pid(pid_file)
    if pid is None:
        raise TpmError(f"vTPM {ctx.vtpm!r}: swtpm started but wrote no PID file ({pid_file})")
    return DetachedSwtpm(pid, result.transport, result.ctrl_path, result.port)


def _run_daemon(
    state_dir: Path,
    args: list[str],
    pid_file: Path,
    data_key: bytes,
    log: Path,
    *,
    migration_key: bytes | None = None,
) -> int:
    """``swtpm socket --daemon`` on ``state_dir`` with ``args``, the key through a pipe;
    output appended to ``log``. The exit status of the daemon's parent.

    ``migration_key`` (through a second pipe) makes swtpm encrypt the state
    blobs it hands out or takes over the control channel (swtpm(8)
    ``--migration-key``), so a blob is never plaintext TPM state."""
    fds = [_key_pipe(data_key)]
    extra: list[str] = []
    try:
        if migration_key is not None:
            fds.append(_key_pipe(migration_key))
            extra = ["--migration-key", f"fd={fds[1]},mode=aes-256-cbc,format=binary"]
        with open(log, "ab") as logf:
            return subprocess.run(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}", *args,
                 "--daemon", "--pid", f"file={pid_file}", *key_args(fds[0]), *extra],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=tuple(fds),
                timeout=30, check=False,
            ).returncode  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)


def reencrypt_state(
    src: Path,
    src_key: bytes,
    dst: Path,
    dst_key: bytes,
    run_dir: Path,
    ctx: KeyContext,
    *,
    migration_key: bytes,
) -> None:
    """Write the permanent TPM state of ``src`` (opened with ``src_key``) into the empty
    ``dst``, encrypted by swtpm with ``dst_key`` (``vtpm rekey --data``).

    1. swtpm on ``src`` (``not-need-init``: libtpms reads and authenticates the
       state, no TPM2_Startup, no write) hands the permanent state blob out
       over its control channel (CMD_GET_STATEBLOB), encrypted with the
       one-time ``migration_key``; 2. a second swtpm on ``dst`` takes it
       (CMD_SET_STATEBLOB) and CMD_INIT makes it write ``tpm2-00.permall``
       under ``dst_key``. The blob file lives in ``run_dir`` only between
       the two steps. ``src`` is never written. Only the permanent state is
       carried: the caller refuses a vTPM with volatile or saved state.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    src, dst, run_dir = src.resolve(), dst.resolve(), run_dir.resolve()
    blob = run_dir / "state.blob"
    try:
        _ioctl_session(src, src_key, run_dir, ctx, migration_key, ["--flags", "not-need-init"],
                       [["--save", "permanent", str(blob)]])  # fmt: skip
        if not blob.is_file() or blob.stat().st_size == 0:
            raise TpmError(f"vTPM {ctx.vtpm!r}: swtpm handed out no permanent state")
        _ioctl_session(dst, dst_key, run_dir, ctx, migration_key, [],
                       [["--load", "permanent", str(blob)], ["-i"]])  # fmt: skip
    finally:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()
    if not (dst / STATE_FILE).is_file():
        raise TpmError(f"vTPM {ctx.vtpm!r}: swtpm wrote no {STATE_FILE} under the new key")


def _ioctl_session(
    state_dir: Path,
    data_key: bytes,
    run_dir: Path,
    ctx: KeyContext,
    migration_key: bytes,
    flags: list[str],
    commands: list[list[str]],
) -> None:
    """One swtpm daemon on ``state_dir`` driven by ``swtpm_ioctl`` ``commands``, then stopped."""
    ctrl, pid_file, log = run_dir / "rekey.ctrl", run_dir / "rekey.pid", run_dir / _LOG_FILE
    for p in (ctrl, pid_file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    since = _size(log)
    args = ["--ctrl", f"type=unixio,path={ctrl}", *flags]
    rc = _run_daemon(state_dir, args, pid_file, data_key, log, migration_key=migration_key)
    if rc != 0:
        raise _diagnose(_log_tail(log, since), ctx) or TpmError(
            f"vTPM {ctx.vtpm!r}: swtpm failed to open its state (exit {rc}); see {log}"
        )
    pid = _read_pid(pid_file)
    try:
        for command in commands:
            done = subprocess.run(
                ["swtpm_ioctl", "--unix", str(ctrl), *command],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                said = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
                raise TpmError(f"vTPM {ctx.vtpm!r}: swtpm_ioctl {command[0]} failed: {said}")
    finally:
        if pid is not None:
            stop_pid(pid, _STOP_GRACE_S)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _is_our_swtpm(pid: int, state_dir: Path) -> bool:
    """True when ``pid`` is a swtpm serving ``state_dir`` (so we never signal a stranger)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv) and os.path.basename(argv[0]) == b"swtpm" and f"dir={state_dir}".encode() in argv
    )


def running_pid(run_dir: Path, state_dir: Path) -> int | None:
    """PID of the detached swtpm of this vTPM, or None when it is not running."""
    pid = _read_pid(run_dir / _PID_FILE)
    if pid is None or not _is_our_swtpm(pid, state_dir):
        return None
    return pid


def stop_detached(run_dir: Path, state_dir: Path) -> bool:
    """Stop the detached swtpm of this vTPM (SIGTERM, SIGKILL after 3 s). False if not running."""
    pid = running_pid(run_dir, state_dir)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / _PID_FILE).unlink()
        return False
    stop_pid(pid, _STOP_GRACE_S)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / _PID_FILE).unlink()
    return True


def pick_port() -> int:
    """A free loopback port P with P+1 free too (data and control channel)."""
    return free_tcp_port_pair()
