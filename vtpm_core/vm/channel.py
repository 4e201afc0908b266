"""Host side of the guest attestation channel (protocol version 1).

The guest (``guest_init.sh``) does all TPM work with tpm2-tools against its
own vTPM: EK and AK creation, TPM2_ActivateCredential, TPM2_Quote with the
verifier's nonce. The host only relays: :class:`GuestChannel` speaks a line
protocol over the VM's second serial port (a QEMU unix-socket chardev).

Wire format: one message per ``\\n``-terminated ASCII line, fields separated
by single spaces, binary fields base64 (RFC 4648 section 4, no line breaks),
``-`` for an absent field. The guest announces ``VTPM-GUEST 1 READY`` (the
protocol version) until the host sends its first command; each command gets
exactly one answer, ``OK <COMMAND> <fields...>`` or ``ERR <COMMAND>
<message>``. The full grammar is in the header of ``guest_init.sh``.

Guarantees: every read has a deadline (:class:`GuestTimeoutError` when it
passes); a guest ``ERR`` line becomes a :class:`TpmError` carrying the
guest's message; a malformed answer becomes a :class:`ParseError`; lines are
bounded (``MAX_LINE``). Not checked here: anything about the TPM structures
beyond their TPM2B framing -- that is the verifier's job (the guest is not
trusted; the host here only relays).
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vtpm_core.errors import ParseError, TpmError
from vtpm_core.tpm.pcr import PcrValues

__all__ = [
    "IMA_CHUNK",
    "IMA_CMDLINE_FLAG",
    "MAX_IMA_LIST",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "GuestChannel",
    "GuestIdentity",
    "GuestQuote",
    "GuestTimeoutError",
]

PROTOCOL_VERSION = 1
READY_LINE = f"VTPM-GUEST {PROTOCOL_VERSION} READY"
MAX_LINE = 4 << 20  # an event log of a few MiB still fits
MAX_NONCE = 64  # TPM2B_DATA holds at most sizeof(TPMU_HA)
IMA_CMDLINE_FLAG = "vtpm.ima=1"  # on the kernel command line: the guest loads its IMA policy
IMA_CHUNK = 1 << 20  # list bytes per IMA answer: 1.4 MB of base64, well inside MAX_LINE
MAX_IMA_LIST = 64 << 20  # default bound on one fetch (~300,000 entries)
_EXEC_NAME_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_BANK_RE = re.compile(r"^(sha1|sha256|sha384|sha512):(\d{1,2}(?:,\d{1,2})*)$")
_STRUCT = "GuestChannel"


class GuestTimeoutError(TpmError):
    """The guest did not answer (or the VM did not boot) within the deadline."""


@dataclass(frozen=True, slots=True)
class GuestIdentity:
    """What the guest's TPM says about itself (untrusted until a verifier checks it)."""

    ek_cert_der: bytes | None  # NV 0x01C00002 (RSA EK cert), raw, padding included
    ek_ecc_cert_der: bytes | None  # NV 0x01C0000A (ECC EK cert)
    ek_public_tpm2b: bytes  # TPM2B_PUBLIC of the RSA EK (TCG default template)
    ak_public_tpm2b: bytes  # TPM2B_PUBLIC of the AK
    ak_name: bytes  # TPM2B-less name: nameAlg || H(TPMT_PUBLIC)


@dataclass(frozen=True, slots=True)
class GuestQuote:
    """A quote as tpm2-tools writes it (``tpm2_quote -m/-s/-o``) plus the firmware event log."""

    message: bytes  # TPMS_ATTEST, marshalled
    signature: bytes  # TPMT_SIGNATURE
    pcrs_tpm2_tools: bytes  # tpm2-tools' PCR file (TPML_PCR_SELECTION + values)
    eventlog: bytes  # binary_bios_measurements, empty if the guest has none
    nonce: bytes
    selection: str

    def untrusted_pcr_values(self) -> dict[str, dict[int, bytes]]:
        """``{bank: {pcr: value}}`` parsed from ``pcrs_tpm2_tools`` (``PcrValues.from_tpm2_tools``).

        Untrusted until a verifier has checked them against the quote's
        pcrDigest and the signature.
        """
        return PcrValues.from_tpm2_tools(self.pcrs_tpm2_tools).as_mapping()


def validate_selection(selection: str) -> str:
    """Check a tpm2-tools PCR selection (``sha256:0,1,2+sha1:0``); return it unchanged."""
    banks = selection.split("+")
    seen: set[str] = set()
    for bank in banks:
        m = _BANK_RE.match(bank)
        if not m:
            raise ParseError(_STRUCT, "selection", 0, f"bad PCR selection {selection!r}")
        if m.group(1) in seen:
            raise ParseError(_STRUCT, "selection", 0, f"bank {m.group(1)} selected twice")
        seen.add(m.group(1))
        for pcr in m.group(2).split(","):
            if int(pcr) > 23:
                raise ParseError(_STRUCT, "selection", 0, f"PCR {pcr} out of range 0-23")
    return selection


def _b64(field: str, value: str, offset: int, *, optional: bool = False) -> bytes | None:
    if value == "-":
        if optional:
            return None
        raise ParseError(_STRUCT, field, offset, "required field is absent ('-')")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ParseError(_STRUCT, field, offset, f"not base64: {exc}") from exc


def _tpm2b(field: str, data: bytes, offset: int) -> bytes:
    if len(data) < 2 or struct.unpack_from(">H", data)[0] != len(data) - 2:
        raise ParseError(_STRUCT, field, offset, f"not a TPM2B ({len(data)} bytes)")
    return data


class GuestChannel:
    """A connected channel to one guest. Use :meth:`open`; close with :meth:`close`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        command_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        self._timeout = command_timeout
        self._clock = clock
        self._buf = bytearray()
        self._closed = False
        self.ready_after_s: float | None = None

    # -- connecting -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        boot_timeout: float = 180.0,
        command_timeout: float = 60.0,
        is_alive: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> GuestChannel:
        """Connect to the chardev socket at ``path`` and wait for the guest's READY line.

        ``is_alive`` (e.g. "QEMU still runs") is polled so a VM that died is
        reported at once instead of at the deadline.
        """
        start = clock()
        deadline = start + boot_timeout
        sock: socket.socket | None = None
        while sock is None:
            if is_alive is not None and not is_alive():
                raise TpmError("the VM exited before its channel socket accepted a connection")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                sock = s
            except OSError:
                s.close()
                if clock() > deadline:
                    raise GuestTimeoutError(
                        f"channel socket {path} not connectable within {boot_timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
        chan = cls(sock, command_timeout=command_timeout, clock=clock)
        try:
            while True:
                line = chan._read_line(deadline, "READY", is_alive=is_alive)
                if line == READY_LINE:
                    break
                if line.startswith("VTPM-GUEST "):
                    raise ParseError(
                        _STRUCT, "version", 0, f"guest speaks {line!r}, host speaks {READY_LINE!r}"
                    )
                # anything else before READY is noise from an earlier boot stage
        except BaseException:
            chan._sock.close()
            chan._closed = True
            raise
        chan.ready_after_s = clock() - start
        return chan

    # -- commands -------------------------------------------------------------------

    def hello(self) -> GuestIdentity:
        """EK certificates (if provisioned), EK and AK publics and the AK name."""
        f = self._command("HELLO", [], 5)
        ek_cert = _b64("ek_cert", f[0], 1, optional=True)
        ek_ecc_cert = _b64("ek_ecc_cert", f[1], 2, optional=True)
        ek_pub = _tpm2b("ek_public", _b64("ek_public", f[2], 3) or b"", 3)
        ak_pub = _tpm2b("ak_public", _b64("ak_public", f[3], 4) or b"", 4)
        ak_name = _b64("ak_name", f[4], 5) or b""
        if len(ak_name) < 2 + 20:
            raise ParseError(_STRUCT, "ak_name", 5, f"{len(ak_name)} bytes is too short for a name")
        return GuestIdentity(ek_cert, ek_ecc_cert, ek_pub, ak_pub, ak_name)

    def activate_credential(self, credential_blob_tpm2_tools_format: bytes) -> bytes:
        """Have the guest's TPM activate a credential; return the secret it recovered.

        The blob is what ``tpm2_makecredential -o`` writes (or the verifier's
        equivalent); the guest runs TPM2_ActivateCredential with its AK and EK.
        """
        if not credential_blob_tpm2_tools_format:
            raise ParseError(_STRUCT, "credential", 0, "empty credential blob")
        blob = base64.b64encode(credential_blob_tpm2_tools_format).decode()
        f = self._command("ACTIVATE", [blob], 1)
        return _b64("secret", f[0], 1) or b""

    def quote(self, nonce: bytes, selection: str) -> GuestQuote:
        """TPM2_Quote by the guest's AK over ``selection`` with ``nonce`` as qualifying data."""
        if not 1 <= len(nonce) <= MAX_NONCE:
            raise ParseError(
                _STRUCT, "nonce", 0, f"nonce must be 1-{MAX_NONCE} bytes, got {len(nonce)}"
            )
        validate_selection(selection)
        f = self._command("QUOTE", [base64.b64encode(nonce).decode(), selection], 4)
        msg = _b64("quote_message", f[0], 1) or b""
        sig = _b64("quote_signature", f[1], 2) or b""
        pcrs = _b64("quote_pcrs", f[2], 3) or b""
        log = _b64("eventlog", f[3], 4, optional=True) or b""
        return GuestQuote(msg, sig, pcrs, log, bytes(nonce), selection)

    def ima_list(self, start: int = 0, *, max_bytes: int = MAX_IMA_LIST) -> bytes:
        """The guest's ``binary_runtime_measurements`` from byte ``start`` to its end.

        Read in chunks of :data:`IMA_CHUNK` bytes; the end is the list's size
        at the first answer (the list only grows, so later chunks continue
        the same bytes). ``start`` is the byte length of what the caller
        already has (an entry boundary), so the answer is the delta. Raises
        ParseError when an answer is malformed or the delta exceeds
        ``max_bytes``; TpmError when the guest runs without IMA. Not
        checked here: the entries themselves (``verifier.ima.parse``).
        """
        if start < 0 or max_bytes < 1:
            raise ParseError(_STRUCT, "ima_offset", 0, f"bad offset {start} or bound {max_bytes}")
        out = bytearray()
        end: int | None = None
        offset = start
        while end is None or offset < end:
            f = self._command("IMA", [str(offset), str(IMA_CHUNK)], 2)
            if not f[0].isdigit():
                raise ParseError(_STRUCT, "ima_size", 1, f"list size {f[0][:20]!r} not decimal")
            size = int(f[0])
            if end is None:
                if size < start:
                    raise ParseError(
                        _STRUCT, "ima_size", 1, f"list of {size} bytes is shorter than {start}"
                    )
                if size - start > max_bytes:
                    raise ParseError(
                        _STRUCT, "ima_size", 1,
                        f"{size - start} list bytes from offset {start} exceed {max_bytes}",
                    )  # fmt: skip
                end = size
            elif size < end:
                raise ParseError(_STRUCT, "ima_size", 1, f"the list shrank ({end} -> {size})")
            chunk = _b64("ima_list", f[1], 2, optional=True) or b""
            want = min(IMA_CHUNK, end - offset)
            if len(chunk) < want or len(chunk) > IMA_CHUNK:
                raise ParseError(
                    _STRUCT, "ima_list", 2,
                    f"{len(chunk)} bytes at offset {offset}, expected {want}",
                )  # fmt: skip
            out += chunk[:want]
            offset += want
        return bytes(out)

    def exec_copy(self, name: str) -> tuple[str, int]:
        """Have the guest run a program no policy knows; return its path and exit status.

        The guest writes ``/tmp/run/busybox-NAME`` (busybox's bytes followed
        by ``NAME\n``) and executes it; with IMA on, the kernel measures it.
        """
        if not _EXEC_NAME_RE.match(name):
            raise ParseError(_STRUCT, "name", 0, f"bad program name {name!r} ([a-z0-9-]{{1,32}})")
        f = self._command("EXECCOPY", [name], 2)
        if not f[0].startswith("/") or not f[1].isdigit():
            raise ParseError(_STRUCT, "EXECCOPY", 1, f"bad answer {' '.join(f)[:80]!r}")
        return f[0], int(f[1])

    def close(self) -> None:
        """Ask the guest to power off (best effort) and close the socket. Idempotent."""
        if self._closed:
            return
        try:
            self._command("POWEROFF", [], 0, timeout=10.0)
        except (TpmError, ParseError, OSError):
            pass  # the VM is stopped by PID by its owner anyway
        finally:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> GuestChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _command(
        self, name: str, args: list[str], nfields: int, *, timeout: float | None = None
    ) -> list[str]:
        if self._closed:
            raise TpmError("guest channel is closed")
        line = " ".join([name, *args]) + "\n"
        deadline = self._clock() + (timeout if timeout is not None else self._timeout)
        try:
            self._sock.sendall(line.encode("ascii"))
        except OSError as exc:
            raise TpmError(f"guest channel broken while sending {name}: {exc}") from exc
        while True:
            answer = self._read_line(deadline, name)
            if answer == READY_LINE:
                continue  # an announcement sent before the guest read our first command
            break
        kind, _, rest = answer.partition(" ")
        cmd, _, payload = rest.partition(" ")
        if kind == "ERR" and cmd == name:
            raise TpmError(f"guest {name} failed: {payload or '(no message)'}")
        if kind != "OK" or cmd != name:
            raise ParseError(_STRUCT, "answer", 0, f"expected 'OK {name}', got {answer[:80]!r}")
        fields = payload.split(" ") if payload else []
        if len(fields) != nfields:
            raise ParseError(_STRUCT, name, 0, f"expected {nfields} fields, got {len(fields)}")
        return fields

    def _read_line(
        self, deadline: float, waiting_for: str, *, is_alive: Callable[[], bool] | None = None
    ) -> str:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                try:
                    return raw.rstrip(b"\r").decode("ascii")
                except UnicodeDecodeError as exc:
                    raise ParseError(
                        _STRUCT, "line", exc.start, f"non-ASCII byte in answer to {waiting_for}"
                    ) from exc
            if len(self._buf) > MAX_LINE:
                raise ParseError(_STRUCT, "line", MAX_LINE, f"line longer than {MAX_LINE} bytes")
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise GuestTimeoutError(f"guest did not answer {waiting_for} in time")
            if is_alive is not None and not is_alive():
                raise TpmError(f"the VM exited while waiting for {waiting_for}")
            self._sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise TpmError(
                    f"guest channel broken while waiting for {waiting_for}: {exc}"
                ) from exc
            if not chunk:
                raise TpmError(f"guest channel closed while waiting for {waiting_for}")
            self._buf += chunk
