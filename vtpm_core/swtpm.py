"""Run real swtpm (TPM 2.0) processes and connect to them with tpm2-pytss.

An :class:`SwtpmProcess` owns one ``swtpm socket --tpm2`` process: its state
directory, its transport (TCP on 127.0.0.1 or unix sockets) and its PID. It
waits until the TPM answers, hands out a connected ESAPI, and stops the
process by PID when the context exits, also when the body raised.

Guarantees: the process only listens on loopback or on unix sockets inside a
directory the caller chose; ``stop()`` is idempotent and never leaves the
child running (SIGTERM, then SIGKILL after a grace period).
Not checked: that the state directory holds a TPM the caller expects.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from vtpm_core._process import stop_child
from vtpm_core.errors import TpmError

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

    from vtpm_core.tpm_client import RawTpm

__all__ = ["SwtpmEndpoint", "SwtpmProcess", "free_tcp_port_pair", "swtpm_available"]

_START_TIMEOUT_S = 10.0
_STOP_GRACE_S = 3.0
# TPM2_Startup is done by swtpm itself ("startup-clear") so a fresh client can
# talk at once; not-need-init skips the ctrl channel's CMD_INIT.
_DEFAULT_FLAGS = "not-need-init,startup-clear"


def swtpm_available() -> bool:
    """True when the swtpm binary is on PATH."""
    return shutil.which("swtpm") is not None


@dataclass(frozen=True, slots=True)
class SwtpmEndpoint:
    """Where a running swtpm listens.

    For TCP, ``port`` carries TPM commands and ``ctrl_port`` the control
    channel; for unix sockets the two paths play those roles. For QEMU only
    the control socket exists: QEMU hands swtpm the data channel over it.
    """

    transport: Literal["tcp", "unix", "qemu"]
    host: str = "127.0.0.1"
    port: int = 0
    ctrl_port: int = 0
    socket_path: Path | None = None
    ctrl_path: Path | None = None

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-tools (``-T`` / TPM2TOOLS_TCTI); TCP only.

        tpm2-tss 3.2's swtpm TCTI cannot reach unix sockets; for those use
        :meth:`SwtpmProcess.esapi`, which brings its own transport.
        """
        if self.transport != "tcp":
            raise TpmError("tpm2-tools (tss 3.2) can only reach swtpm over TCP")
        return f"swtpm:host={self.host},port={self.port}"


def free_tcp_port_pair() -> int:
    """Return a port P such that P and P+1 were both free on 127.0.0.1 just now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise TpmError("no free pair of TCP ports on 127.0.0.1")


class SwtpmProcess:
    """One swtpm TPM 2.0 process with its own state directory.

    Use as a context manager::

        with SwtpmProcess(tmp_path / "state") as tpm:
            esapi = tpm.esapi()
            ...

    ``extra_args`` are appended to the swtpm command line (for example the
    ``--key fd=N,...`` option; pass the descriptor in ``pass_fds``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        transport: Literal["tcp", "unix", "qemu"] = "tcp",
        socket_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        flags: str = _DEFAULT_FLAGS,
        log_file: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._transport: Literal["tcp", "unix", "qemu"] = transport
        self._socket_dir = Path(socket_dir) if socket_dir is not None else self.state_dir
        self._extra_args = tuple(extra_args)
        self._pass_fds = tuple(pass_fds)
        # under QEMU the firmware sends TPM2_Startup itself
        self._flags = "" if transport == "qemu" and flags == _DEFAULT_FLAGS else flags
        self._log_file = log_file or (self.state_dir / "swtpm.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoint: SwtpmEndpoint | None = None
        self._esapis: list[ESAPI] = []
        self._sockets: list[socket.socket] = []

    # -- lifecycle -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def endpoint(self) -> SwtpmEndpoint:
        if self._endpoint is None:
            raise TpmError("swtpm is not running")
        return self._endpoint

    def start(self) -> SwtpmEndpoint:
        """Start swtpm and block until it answers a TPM command."""
        if self._proc is not None:
            raise TpmError("swtpm already started")
        if not swtpm_available():
            raise TpmError("swtpm not found on PATH (install the Debian package 'swtpm')")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(5):  # a TCP port can be taken between probe and bind
            endpoint = self._new_endpoint()
            cmd = self._command(endpoint)
            log = open(self._log_file, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=self._pass_fds,
                    close_fds=True,
                )
            finally:
                log.close()
            try:
                self._wait_ready(endpoint)
            except TpmError as exc:
                last_error = str(exc)
                self._kill()
                continue
            self._endpoint = endpoint
            return endpoint
        raise TpmError(f"swtpm did not start: {last_error}; see {self._log_file}")

    def stop(self) -> None:
        """Close ESAPI contexts and stop the process (by PID). Idempotent."""
        for esapi in self._esapis:
            with contextlib.suppress(Exception):
                esapi.close()
        self._esapis.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._kill()
        self._endpoint = None

    def __enter__(self) -> SwtpmProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------

    def esapi(self) -> ESAPI:
        """A new ESAPI context connected to this TPM; closed by :meth:`stop`."""
        from tpm2_pytss import ESAPI, TCTILdr

        ep = self.endpoint
        if ep.transport == "qemu":
            raise TpmError("a swtpm started for QEMU has no data channel for ESAPI")
        if ep.transport == "tcp":
            tcti = TCTILdr("swtpm", f"host={ep.host},port={ep.port}")
        else:
            assert ep.socket_path is not None
            sock = _connect(ep)
            sock.settimeout(None)
            self._sockets.append(sock)
            tcti = UnixSocketTcti(sock)
        esapi = ESAPI(tcti)
        self._esapis.append(esapi)
        return esapi

    def raw_tpm(self) -> RawTpm:
        """A :class:`vtpm_core.tpm_client.RawTpm` on a new data connection; closed by
        :meth:`stop` (close it before opening another client: a TCP swtpm serves one
        connection at a time)."""
        from vtpm_core.tpm_client import RawTpm

        ep = self.endpoint
        if ep.transport != "unix":
            raise TpmError(
                "RawTpm needs a swtpm on a unix socket (transport='unix'): over TCP this "
                "swtpm closes the connection after each command"
            )
        sock = _connect(ep)
        sock.settimeout(30.0)  # RSA key generation on a loaded machine
        self._sockets.append(sock)

        def io_error(exc: OSError) -> Exception:
            return TpmError(f"swtpm at {ep.socket_path}: {exc}")

        return RawTpm(sock, on_io_error=io_error)

    @property
    def tool_env(self) -> dict[str, str]:
        """Environment for tpm2-tools subprocesses talking to this TPM."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.endpoint.tcti
        return env

    # -- internals -----------------------------------------------------------------

    def _new_endpoint(self) -> SwtpmEndpoint:
        if self._transport == "tcp":
            port = free_tcp_port_pair()
            return SwtpmEndpoint("tcp", port=port, ctrl_port=port + 1)
        self._socket_dir.mkdir(parents=True, exist_ok=True)
        sock = self._socket_dir / "swtpm.sock"
        ctrl = self._socket_dir / "swtpm.ctrl"
        for p in (sock, ctrl):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self._transport == "qemu":
            return SwtpmEndpoint("qemu", ctrl_path=ctrl)
        return SwtpmEndpoint("unix", socket_path=sock, ctrl_path=ctrl)

    def _command(self, ep: SwtpmEndpoint) -> list[str]:
        if ep.transport == "tcp":
            server = f"type=tcp,port={ep.port},bindaddr=127.0.0.1,disconnect"
            ctrl = f"type=tcp,port={ep.ctrl_port},bindaddr=127.0.0.1"
        elif ep.transport == "unix":
            server = f"type=unixio,path={ep.socket_path}"
            ctrl = f"type=unixio,path={ep.ctrl_path}"
        else:
            server = ""
            ctrl = f"type=unixio,path={ep.ctrl_path}"
        cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}"]
        if server:
            cmd += ["--server", server]
        cmd += ["--ctrl", ctrl]
        if self._flags:
            cmd += ["--flags", self._flags]
        return [*cmd, *self._extra_args]

    def qemu_args(self) -> list[str]:
        """The QEMU arguments that attach this swtpm as a CRB TPM 2.0 device."""
        ep = self.endpoint
        if ep.transport != "qemu":
            raise TpmError("start swtpm with transport='qemu' to attach it to QEMU")
        return [
            "-chardev",
            f"socket,id=chrtpm,path={ep.ctrl_path}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-crb,tpmdev=tpm0",
        ]

    def _wait_ready(self, ep: SwtpmEndpoint) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise TpmError(f"swtpm exited with status {self._proc.returncode}")
            try:
                if ep.transport == "qemu":
                    if _ctrl_socket_accepts(ep):
                        return
                elif _get_random_probe(ep):
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise TpmError(f"swtpm did not answer within {_START_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_child(proc, _STOP_GRACE_S)


# TPM2_GetRandom(8): the smallest command that proves the TPM is up and started.
_GET_RANDOM = struct.pack(">HII", 0x8001, 12, 0x0000017B) + struct.pack(">H", 8)


def _connect(ep: SwtpmEndpoint) -> socket.socket:
    if ep.transport == "tcp":
        return socket.create_connection((ep.host, ep.port), timeout=2.0)
    assert ep.socket_path is not None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(ep.socket_path))
    except OSError:
        s.close()
        raise
    return s


def _ctrl_socket_accepts(ep: SwtpmEndpoint) -> bool:
    # QEMU connects once to the control socket; probing it would take that
    # connection, so only check that swtpm has created the socket.
    return ep.ctrl_path is not None and ep.ctrl_path.exists()


def _get_random_probe(ep: SwtpmEndpoint) -> bool:
    with _connect(ep) as s:
        s.sendall(_GET_RANDOM)
        header = _recv_exact(s, 10)
        _tag, size, rc = struct.unpack(">HII", header)
        _recv_exact(s, size - 10)
        return bool(rc == 0)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed by swtpm")
        buf.extend(chunk)
    return bytes(buf)


def _read_response(s: socket.socket) -> bytes:
    header = _recv_exact(s, 10)
    (size,) = struct.unpack_from(">I", header, 2)
    if size < 10 or size > 1 << 20:
        raise OSError(f"implausible TPM response size {size}")
    return header + _recv_exact(s, size - 10)


def _make_unix_tcti_class() -> type:
    from tpm2_pytss.TCTI import PyTCTI

    class _UnixSocketTcti(PyTCTI):  # type: ignore[misc]
        """TPM commands over swtpm's unix data socket (raw command/response)."""

        def __init__(self, sock: socket.socket) -> None:
            super().__init__(max_size=4096)
            self._sock = sock
            self._response = b""

        def do_transmit(self, command: bytes) -> None:
            self._sock.sendall(command)
            self._response = _read_response(self._sock)

        def do_receive(self, timeout: int) -> bytes:
            response, self._response = self._response, b""
            return response

    return _UnixSocketTcti


def UnixSocketTcti(sock: socket.socket) -> object:  # noqa: N802 - a class-like factory
    """A tpm2-pytss TCTI over a connected swtpm unix data socket (the caller closes it)."""
    return _make_unix_tcti_class()(sock)


@contextlib.contextmanager
def running_swtpm(state_dir: Path, **kwargs: object) -> Iterator[SwtpmProcess]:
    """Context manager shorthand for ``with SwtpmProcess(...) as tpm``."""
    proc = SwtpmProcess(state_dir, **kwargs)  # type: ignore[arg-type]
    with proc:
        yield proc
