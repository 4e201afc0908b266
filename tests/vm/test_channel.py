"""The host side of the guest protocol against a scripted peer on a unix socket.

The real guest (tpm2-tools in the VM) is exercised by test_boot.py; here a
peer sends exactly the lines under test so every error path is reached:
guest ERR lines, malformed answers, a wrong version, silence, a closed socket.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.errors import ParseError, TpmError
from vtpm_core.vm import GuestChannel, GuestTimeoutError, validate_selection
from vtpm_core.vm.channel import READY_LINE

pytestmark = pytest.mark.vm

B = lambda b: base64.b64encode(b).decode()  # noqa: E731
EK_PUB = b"\x00\x04" + b"ekpk"
AK_PUB = b"\x00\x03" + b"akp"
AK_NAME = b"\x00\x0b" + bytes(range(32))
HELLO_OK = f"OK HELLO {B(b'cert')} - {B(EK_PUB)} {B(AK_PUB)} {B(AK_NAME)}"


@pytest.fixture
def pair() -> Iterator[tuple[GuestChannel, socket.socket]]:
    host, guest = socket.socketpair()
    chan = GuestChannel(host, command_timeout=2.0)
    try:
        yield chan, guest
    finally:
        chan._closed = True  # no POWEROFF round trip against a silent peer
        host.close()
        guest.close()


def _send(sock: socket.socket, *lines: str) -> None:
    sock.sendall("".join(line + "\n" for line in lines).encode())


def _received(sock: socket.socket) -> str:
    sock.settimeout(1.0)
    return sock.recv(65536).decode()


def test_hello(pair: tuple[GuestChannel, socket.socket]) -> None:
    chan, guest = pair
    _send(guest, READY_LINE, HELLO_OK)  # a late READY before the answer is skipped
    ident = chan.hello()
    assert _received(guest) == "HELLO\n"
    assert ident.ek_cert_der == b"cert" and ident.ek_ecc_cert_der is None
    assert (ident.ek_public_tpm2b, ident.ak_public_tpm2b, ident.ak_name) == (
        EK_PUB,
        AK_PUB,
        AK_NAME,
    )


def test_activate_and_quote_send_base64(pair: tuple[GuestChannel, socket.socket]) -> None:
    chan, guest = pair
    _send(guest, f"OK ACTIVATE {B(b'secret')}")
    blob = b"\x01blob"
    assert chan.activate_credential(blob) == b"secret"
    assert _received(guest) == f"ACTIVATE {B(blob)}\n"
    _send(guest, f"OK QUOTE {B(b'msg')} {B(b'sig')} {B(b'pcrs')} -")
    q = chan.quote(b"n" * 32, "sha256:0,1+sha1:7")
    assert _received(guest) == f"QUOTE {B(b'n' * 32)} sha256:0,1+sha1:7\n"
    assert (q.message, q.signature, q.pcrs_tpm2_tools, q.eventlog) == (b"msg", b"sig", b"pcrs", b"")
    assert q.nonce == b"n" * 32


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (
            "ERR HELLO createek failed: WARNING:esys",
            TpmError,
            "guest HELLO failed: createek failed",
        ),
        ("ERR HELLO", TpmError, r"guest HELLO failed: \(no message\)"),
        ("OK QUOTE a b c d", ParseError, "expected 'OK HELLO'"),
        ("ERR QUOTE other", ParseError, "expected 'OK HELLO'"),
        ("OK HELLO - -", ParseError, "expected 5 fields, got 2"),
        (HELLO_OK.replace(B(EK_PUB), "%%%%"), ParseError, r"ek_public.*not base64"),
        (HELLO_OK.replace(B(AK_PUB), "-"), ParseError, r"ak_public.*absent"),
        (HELLO_OK.replace(B(AK_PUB), B(b"\x00\x09ab")), ParseError, "ak_public.*not a TPM2B"),
        (HELLO_OK.replace(B(AK_NAME), B(b"\x00\x0b")), ParseError, "ak_name.*too short"),
        ("OK HELLO caf\u00e9", ParseError, "non-ASCII"),
    ],
    ids=[
        "fail/guest/err",
        "fail/guest/err-empty",
        "fail/answer/other-command",
        "fail/answer/err-other-command",
        "fail/answer/field-count",
        "fail/answer/not-base64",
        "fail/answer/absent-required",
        "fail/answer/not-tpm2b",
        "fail/answer/short-name",
        "fail/answer/not-ascii",
    ],
)
def test_bad_answers(
    pair: tuple[GuestChannel, socket.socket], answer: str, error: type[Exception], match: str
) -> None:
    chan, guest = pair
    guest.sendall(answer.encode() + b"\n")
    with pytest.raises(error, match=match):
        chan.hello()


@pytest.mark.parametrize(
    ("nonce", "selection", "match"),
    [
        (b"", "sha256:0", "nonce must be 1-64 bytes, got 0"),
        (b"x" * 65, "sha256:0", "nonce must be 1-64 bytes, got 65"),
        (b"x", "sha256:", "bad PCR selection"),
        (b"x", "md5:0", "bad PCR selection"),
        (b"x", "sha256:0;reboot", "bad PCR selection"),
        (b"x", "sha256:24", "PCR 24 out of range"),
        (b"x", "sha256:0+sha256:1", "bank sha256 selected twice"),
    ],
    ids=[
        "fail/nonce/empty",
        "fail/nonce/too-long",
        "fail/selection/empty",
        "fail/selection/bank",
        "fail/selection/injection",
        "fail/selection/pcr-range",
        "fail/selection/duplicate-bank",
    ],
)
def test_quote_arguments_checked_before_sending(
    pair: tuple[GuestChannel, socket.socket], nonce: bytes, selection: str, match: str
) -> None:
    chan, guest = pair
    with pytest.raises(ParseError, match=match):
        chan.quote(nonce, selection)
    guest.setblocking(False)
    with pytest.raises(BlockingIOError):
        guest.recv(1)  # nothing went out


def test_silence_times_out(pair: tuple[GuestChannel, socket.socket]) -> None:
    chan, _guest = pair
    chan._timeout = 0.3
    start = time.monotonic()
    with pytest.raises(GuestTimeoutError, match="did not answer HELLO in time"):
        chan.hello()
    assert time.monotonic() - start < 2.0


def test_closed_peer(pair: tuple[GuestChannel, socket.socket]) -> None:
    chan, guest = pair
    guest.shutdown(socket.SHUT_RDWR)
    with pytest.raises(TpmError, match=r"channel (closed|broken)"):
        chan.hello()


def test_oversized_line(
    pair: tuple[GuestChannel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    chan, guest = pair
    monkeypatch.setattr("vtpm_core.vm.channel.MAX_LINE", 1000)
    guest.sendall(b"OK HELLO " + b"A" * 5000)
    with pytest.raises(ParseError, match="line longer than 1000 bytes"):
        chan.hello()


def _serve(path: Path, lines: list[bytes], got: list[bytes]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                for line in lines:
                    conn.sendall(line)
                conn.settimeout(2.0)
                with contextlib.suppress(OSError):
                    got.append(conn.recv(4096))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_open_waits_for_ready_and_close_powers_off(tmp_path: Path) -> None:
    got: list[bytes] = []
    t = _serve(
        tmp_path / "s", [b"early noise\n", READY_LINE.encode() + b"\n", b"OK POWEROFF\n"], got
    )
    chan = GuestChannel.open(tmp_path / "s", boot_timeout=5)
    assert chan.ready_after_s is not None
    chan.close()
    chan.close()  # idempotent
    t.join(5)
    assert got == [b"POWEROFF\n"]
    with pytest.raises(TpmError, match="closed"):
        chan.hello()


def test_open_rejects_another_protocol_version(tmp_path: Path) -> None:
    t = _serve(tmp_path / "s", [b"VTPM-GUEST 2 READY\n"], [])
    with pytest.raises(ParseError, match="guest speaks 'VTPM-GUEST 2 READY'"):
        GuestChannel.open(tmp_path / "s", boot_timeout=5)
    t.join(5)


def test_open_times_out_without_socket(tmp_path: Path) -> None:
    with pytest.raises(GuestTimeoutError, match="not connectable within 0 s"):
        GuestChannel.open(tmp_path / "missing", boot_timeout=0.2)


def test_open_reports_a_dead_vm_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TpmError, match="VM exited"):
        GuestChannel.open(tmp_path / "missing", boot_timeout=60, is_alive=lambda: False)
    assert time.monotonic() - start < 1.0


def test_selection_accepts_tpm2_tools_syntax() -> None:
    assert validate_selection("sha1:0,1,2+sha256:0,23") == "sha1:0,1,2+sha256:0,23"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_only_our_errors_escape(answer: bytes) -> None:
    host, guest = socket.socketpair()
    chan = GuestChannel(host, command_timeout=0.05)
    try:
        guest.sendall(answer + b"\n")
        with contextlib.suppress(ParseError, TpmError):
            chan.hello()
    finally:
        host.close()
        guest.close()


def test_ima_list_reads_in_chunks_up_to_the_first_size(
    pair: tuple[GuestChannel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vtpm_core.vm import channel

    chan, guest = pair
    monkeypatch.setattr(channel, "IMA_CHUNK", 4)
    # 10 bytes from offset 2: chunks at 2, 6 (then 2 bytes at 10); the list grew meanwhile
    _send(guest, f"OK IMA 12 {B(b'cdef')}", f"OK IMA 14 {B(b'ghij')}", f"OK IMA 14 {B(b'klmn')}")
    assert chan.ima_list(2) == b"cdefghijkl"
    assert _received(guest) == "IMA 2 4\nIMA 6 4\nIMA 10 4\n"
    _send(guest, "OK IMA 5 -")  # nothing new
    assert chan.ima_list(5) == b""


@pytest.mark.parametrize(
    ("answers", "start", "bound", "error", "match"),
    [
        (["ERR IMA measurement is off (boot with vtpm.ima=1)"], 0, 100, TpmError, "is off"),
        (["OK IMA x12 -"], 0, 100, ParseError, "not decimal"),
        (["OK IMA 3 -"], 5, 100, ParseError, "shorter than 5"),
        (["OK IMA 500 -"], 0, 100, ParseError, "500 list bytes from offset 0 exceed 100"),
        ([f"OK IMA 6 {B(b'ab')}"], 0, 100, ParseError, "2 bytes at offset 0, expected 4"),
        ([f"OK IMA 6 {B(b'abcd')}", "OK IMA 5 -"], 0, 100, ParseError, r"shrank \(6 -> 5\)"),
        (["OK IMA 6 %%"], 0, 100, ParseError, "not base64"),
        (["OK IMA 6"], 0, 100, ParseError, "expected 2 fields"),
    ],
    ids=[
        "fail/guest/ima-off",
        "fail/answer/size-not-decimal",
        "fail/answer/shorter-than-offset",
        "fail/answer/over-bound",
        "fail/answer/short-chunk",
        "fail/answer/list-shrank",
        "fail/answer/not-base64",
        "fail/answer/field-count",
    ],
)
def test_ima_list_bad_answers(
    pair: tuple[GuestChannel, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    answers: list[str],
    start: int,
    bound: int,
    error: type[Exception],
    match: str,
) -> None:
    from vtpm_core.vm import channel

    chan, guest = pair
    monkeypatch.setattr(channel, "IMA_CHUNK", 4)
    _send(guest, *answers)
    with pytest.raises(error, match=match):
        chan.ima_list(start, max_bytes=bound)


def test_exec_copy(pair: tuple[GuestChannel, socket.socket]) -> None:
    chan, guest = pair
    _send(guest, "OK EXECCOPY /tmp/run/busybox-x1 0")
    assert chan.exec_copy("x1") == ("/tmp/run/busybox-x1", 0)
    assert _received(guest) == "EXECCOPY x1\n"
    for bad in ("", "A", "a b", "a/b", "x" * 33):
        with pytest.raises(ParseError, match="bad program name"):
            chan.exec_copy(bad)
    _send(guest, "OK EXECCOPY tmp 0")
    with pytest.raises(ParseError, match="bad answer"):
        chan.exec_copy("x1")
    with pytest.raises(ParseError, match="bad offset"):
        chan.ima_list(-1)
