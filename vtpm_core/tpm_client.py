"""The TPM 2.0 commands EK provisioning sends, marshalled here: the fast path of `vtpm create`.

Why this exists beside tpm2-pytss: ``vtpm create`` is run once per VM, as a
whole process, by a person or a hypervisor hook, and its start-up is what
they wait for (issue 19). tpm2-pytss costs about 25 ms of that process to
import and adds a round trip per NV index (``tr_from_tpmpublic`` reads the
public area to learn a name that password authorization does not need); and
its calls block, so the RSA key generation in the TPM (20-60 ms) cannot
overlap the opening of the CA. Here the CreatePrimary commands are sent and
their answers read later (:meth:`RawTpm.send_create_primary`), and
``vtpm create`` opens the CA in between. bench/provision.py measures the
whole process against swtpm_setup; the numbers are in docs/vtpm.md.

The plain version is :class:`vtpm_core.provision.EsapiTpm` (tpm2-pytss);
tests/vtpm_core/test_provision.py runs every provisioning test on both and
checks that they give the same EK public areas, NV attributes and contents.

Only what provisioning needs: GetCapability(TPM_PROPERTIES), CreatePrimary,
FlushContext, NV_DefineSpace, NV_Write, NV_WriteLock, each with an empty
password (TPM_RS_PW) where Part 3 asks for an authorization. Byte layouts:
TPM 2.0 Library Part 1, 18 (command and response structure), Part 3 (each
command's table), Part 2 (the structures).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vtpm_core.errors import TpmError

__all__ = ["PendingPublic", "RawTpm", "TpmRc"]

_ST_NO_SESSIONS = 0x8001
_ST_SESSIONS = 0x8002
_RS_PW = 0x40000009
_RH_ENDORSEMENT = 0x4000000B
_RH_PLATFORM = 0x4000000C
_ALG_SHA256 = 0x000B
_CAP_TPM_PROPERTIES = 0x00000006

_CC_NV_DEFINE_SPACE = 0x0000012A
_CC_CREATE_PRIMARY = 0x00000131
_CC_NV_WRITE = 0x00000137
_CC_NV_WRITE_LOCK = 0x00000138
_CC_FLUSH_CONTEXT = 0x00000165
_CC_GET_CAPABILITY = 0x0000017A

# TPMS_AUTH_COMMAND for an empty password: sessionHandle, nonce (empty),
# sessionAttributes (continueSession), hmac (empty password).
_PASSWORD = struct.pack(">IHBH", _RS_PW, 0, 0x01, 0)
_AUTH_AREA = struct.pack(">I", len(_PASSWORD)) + _PASSWORD
_MAX_RESPONSE = 1 << 16

# The response codes provisioning meets, for readable errors (Part 2, 6.6). Format-one
# codes (bit 7) carry the handle, parameter or session number in bits 8-11.
_RC_NAMES = {
    0x100: "TPM_RC_INITIALIZE (TPM2_Startup not run)",
    0x101: "TPM_RC_FAILURE",
    0x146: "TPM_RC_NV_RANGE",
    0x148: "TPM_RC_NV_LOCKED (the index is write-locked)",
    0x149: "TPM_RC_NV_AUTHORIZATION",
    0x14B: "TPM_RC_NV_SPACE (no room in NV)",
    0x14C: "TPM_RC_NV_DEFINED (the index already exists)",
    0x902: "TPM_RC_OBJECT_MEMORY (no free transient slot)",
    0x922: "TPM_RC_RETRY",
}
_RC_FMT1_NAMES = {
    0x082: "TPM_RC_ATTRIBUTES",
    0x084: "TPM_RC_VALUE",
    0x08B: "TPM_RC_HANDLE (no such index or object)",
    0x08E: "TPM_RC_AUTH_FAIL",
    0x095: "TPM_RC_SIZE",
}


@dataclass(frozen=True, slots=True)
class TpmRc:
    """A TPM response code, formatted the way operators search for it."""

    code: int

    def __str__(self) -> str:
        if self.code & 0x080:
            name = _RC_FMT1_NAMES.get(self.code & 0x0BF)
            n, kind = (self.code >> 8) & 0xF, "parameter" if self.code & 0x040 else "handle"
            where = f", {kind} {n & 0x7 if kind == 'handle' else n}" if n else ""
            if kind == "handle" and n & 0x8:
                where = f", session {n & 0x7}"
            return f"0x{self.code:03x}" + (f" {name}{where}" if name else "")
        name = _RC_NAMES.get(self.code)
        return f"0x{self.code:03x}" + (f" {name}" if name else "")


class PendingPublic:
    """A CreatePrimary whose answer is still to be read; :meth:`result` reads it.

    Answers arrive in the order the commands were sent, so results must be
    read in that order (:class:`RawTpm` checks).
    """

    def __init__(self, tpm: RawTpm, what: str, seq: int) -> None:
        self._tpm, self._what, self._seq = tpm, what, seq

    def result(self) -> bytes:
        """The created key's TPM2B_PUBLIC; the transient handle is flushed first."""
        body = self._tpm._answer(self._what, self._seq)
        try:
            (handle,) = struct.unpack_from(">I", body, 0)
            # parameterSize, then outPublic (TPM2B_PUBLIC)
            (size,) = struct.unpack_from(">H", body, 8)
            public = body[8 : 10 + size]
        except struct.error:
            raise TpmError(f"{self._what}: short answer ({len(body)} bytes)") from None
        if len(public) != 2 + size or size == 0:
            raise TpmError(f"{self._what}: outPublic runs past the answer")
        self._tpm.flush_context(handle)
        return public


class RawTpm:
    """TPM 2.0 commands over a connected swtpm data socket (raw command/response framing).

    The caller owns the socket and closes it (or calls :meth:`close`). Errors are
    TpmError naming the command and the response code, or the socket failure.
    """

    def __init__(self, sock: socket.socket, *, on_io_error: Callable[[OSError], Exception]) -> None:
        self._sock = sock
        self._on_io_error = on_io_error
        self._sent = 0
        self._read = 0

    def close(self) -> None:
        """Close the socket (swtpm then serves its next connection)."""
        self._sock.close()

    # -- framing ----------------------------------------------------------------------

    def _send(self, what: str, cc: int, handles: bytes, params: bytes, *, auth: bool) -> int:
        tag = _ST_SESSIONS if auth else _ST_NO_SESSIONS
        body = handles + (_AUTH_AREA if auth else b"") + params
        try:
            self._sock.sendall(struct.pack(">HII", tag, 10 + len(body), cc) + body)
        except OSError as exc:
            raise self._on_io_error(exc) from None
        self._sent += 1
        return self._sent

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise OSError("connection closed by swtpm")
            buf += chunk
        return bytes(buf)

    def _answer(self, what: str, seq: int) -> bytes:
        """The response body after the header (handles, parameterSize, ...), rc checked."""
        if seq != self._read + 1:
            raise TpmError(f"{what}: answers read out of order ({seq} after {self._read})")
        try:
            header = self._recv_exact(10)
            _tag, size, rc = struct.unpack(">HII", header)
            if not 10 <= size <= _MAX_RESPONSE:
                raise OSError(f"implausible TPM response size {size}")
            body = self._recv_exact(size - 10)
        except OSError as exc:
            raise self._on_io_error(exc) from None
        self._read = seq
        if rc != 0:
            raise TpmError(f"{what}: the TPM answered {TpmRc(rc)}")
        return body

    def _call(self, what: str, cc: int, handles: bytes, params: bytes, *, auth: bool) -> bytes:
        return self._answer(what, self._send(what, cc, handles, params, auth=auth))

    # -- commands -----------------------------------------------------------------------

    def properties(self, first: int, count: int) -> dict[int, int]:
        """TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, first, count) as {property: value}."""
        what = f"GetCapability(TPM_PROPERTIES, 0x{first:x})"
        body = self._call(
            what, _CC_GET_CAPABILITY, b"",
            struct.pack(">III", _CAP_TPM_PROPERTIES, first, count), auth=False,
        )  # fmt: skip
        try:
            _more, cap, n = struct.unpack_from(">BII", body, 0)
            if cap != _CAP_TPM_PROPERTIES or len(body) != 9 + 8 * n:
                raise struct.error
            return dict(struct.iter_unpack(">II", body[9:]))
        except struct.error:
            raise TpmError(f"{what}: malformed TPMS_CAPABILITY_DATA") from None

    def send_create_primary(self, tpm2b_public: bytes, what: str) -> PendingPublic:
        """Send TPM2_CreatePrimary(TPM_RH_ENDORSEMENT, template); read it with ``.result()``.

        inSensitive is empty (no userAuth, no data), outsideInfo empty, no
        creation PCRs: what the TCG EK templates ask for.
        """
        params = (
            struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE
            + tpm2b_public
            + struct.pack(">HI", 0, 0)  # outsideInfo, creationPCR (count 0)
        )
        seq = self._send(
            what, _CC_CREATE_PRIMARY, struct.pack(">I", _RH_ENDORSEMENT), params, auth=True
        )
        return PendingPublic(self, what, seq)

    def flush_context(self, handle: int) -> None:
        what = f"FlushContext(0x{handle:08x})"
        self._call(what, _CC_FLUSH_CONTEXT, b"", struct.pack(">I", handle), auth=False)

    def nv_define_space(self, nv_index: int, attributes: int, size: int) -> None:
        """NV_DefineSpace(TPM_RH_PLATFORM): empty auth value and policy, nameAlg SHA-256."""
        nv_public = struct.pack(">IHIHH", nv_index, _ALG_SHA256, attributes, 0, size)
        params = struct.pack(">H", 0) + struct.pack(">H", len(nv_public)) + nv_public
        self._call(
            f"NV_DefineSpace(0x{nv_index:08x}, {size} bytes)", _CC_NV_DEFINE_SPACE,
            struct.pack(">I", _RH_PLATFORM), params, auth=True,
        )  # fmt: skip

    def nv_write(self, nv_index: int, data: bytes, offset: int) -> None:
        """NV_Write with platform authorization."""
        self._call(
            f"NV_Write(0x{nv_index:08x}, offset {offset})", _CC_NV_WRITE,
            struct.pack(">II", _RH_PLATFORM, nv_index),
            struct.pack(">H", len(data)) + data + struct.pack(">H", offset), auth=True,
        )  # fmt: skip

    def nv_write_lock(self, nv_index: int) -> None:
        """NV_WriteLock with platform authorization."""
        self._call(
            f"NV_WriteLock(0x{nv_index:08x})", _CC_NV_WRITE_LOCK,
            struct.pack(">II", _RH_PLATFORM, nv_index), b"", auth=True,
        )  # fmt: skip
