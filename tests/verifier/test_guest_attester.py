"""verifier.guest_attester failure paths: a scripted guest and the real verifier (gunicorn).

The success path needs a real VM and is in tests/vm/test_boot.py, tests/vm/test_cli.py
and tests/vm/test_agent_vm.py; here every step that can fail does, with our errors.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.verifier.service.conftest import Server
from verifier.agent import Agent, AgentConfig
from verifier.attester import AttesterState
from verifier.guest_attester import (
    GuestAttestationError,
    GuestBackend,
    GuestImaList,
    _ima_start,
    attest_guest,
    check_loopback_url,
)
from verifier.ima.parse import parse_list
from verifier.service.config import init_home
from vtpm_core.errors import ConfigError, StateError
from vtpm_core.tpm import Attest
from vtpm_core.vm import GuestChannel

VM_DATA = Path(__file__).resolve().parents[1] / "data" / "ima" / "vtpm-guest"


def B(data: bytes) -> str:
    return base64.b64encode(data).decode()


EK_PUB = b"\x00\x04ekpk"
AK_PUB = b"\x00\x03akp"
AK_NAME = b"\x00\x0b" + bytes(range(32))


@pytest.fixture(scope="module")
def verifier_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("guest-attester") / "verifier"
    init_home(home, verifier_id="guest-attester-test")
    server = Server(home, None, workers=1).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def guest() -> Iterator[tuple[GuestChannel, socket.socket]]:
    host, peer = socket.socketpair()
    chan = GuestChannel(host, command_timeout=2.0)
    try:
        yield chan, peer
    finally:
        chan._closed = True  # no POWEROFF round trip against a scripted peer
        host.close()
        peer.close()


def _answer(peer: socket.socket, line: str) -> None:
    peer.sendall(line.encode() + b"\n")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://192.0.2.7:8080", "only a loopback verifier"),
        ("http://verifier.example:8080", "only a loopback verifier"),
        ("https://127.0.0.1:8443", "expected http://127.0.0.1:PORT"),
        ("http://127.0.0.1:8080/v1", "expected http://127.0.0.1:PORT"),
        ("127.0.0.1:8080", "expected http://127.0.0.1:PORT"),
    ],
    ids=["fail/url/remote-ip", "fail/url/name", "fail/url/https", "fail/url/path", "fail/url/bare"],
)
def test_only_a_loopback_http_verifier(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_loopback_url(url)


def test_loopback_urls_accepted() -> None:
    assert check_loopback_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert check_loopback_url("http://[::1]:5000") == "http://[::1]:5000"
    assert check_loopback_url("http://localhost:5000") == "http://localhost:5000"


def test_fail_guest_without_ek_certificate(
    guest: tuple[GuestChannel, socket.socket], verifier_url: str
) -> None:
    chan, peer = guest
    _answer(peer, f"OK HELLO - - {B(EK_PUB)} {B(AK_PUB)} {B(AK_NAME)}")
    with pytest.raises(StateError, match=r"^register: the guest's TPM has no EK certificate"):
        attest_guest(chan, verifier_url)


def test_fail_register_refused_by_the_verifier(
    guest: tuple[GuestChannel, socket.socket], verifier_url: str
) -> None:
    chan, peer = guest
    _answer(peer, f"OK HELLO {B(b'not a certificate')} - {B(EK_PUB)} {B(AK_PUB)} {B(AK_NAME)}")
    with pytest.raises(GuestAttestationError, match=r"^register: verifier answered 4\d\d: ") as e:
        attest_guest(chan, verifier_url)
    assert e.value.step == "register" and 400 <= e.value.status < 500


def test_fail_verifier_unreachable(guest: tuple[GuestChannel, socket.socket]) -> None:
    chan, peer = guest
    _answer(peer, f"OK HELLO {B(b'cert')} - {B(EK_PUB)} {B(AK_PUB)} {B(AK_NAME)}")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        GuestAttestationError, match=r"^register: verifier unreachable: .*connection refused"
    ) as e:
        attest_guest(chan, f"http://127.0.0.1:{port}")
    assert e.value.status == 0


def test_fail_challenge_with_an_unknown_token(
    guest: tuple[GuestChannel, socket.socket], verifier_url: str
) -> None:
    chan, _peer = guest
    state = AttesterState(verifier_url, "00000000-0000-0000-0000-000000000000", "not-a-token")
    with pytest.raises(GuestAttestationError, match=r"^challenge: verifier answered 40[13]: "):
        attest_guest(chan, verifier_url, state=state)


def _guest_agent(chan: GuestChannel, url: str) -> Agent:
    backend = GuestBackend(chan)
    return Agent(AgentConfig(url=url, tcti="guest", state_file=None), backend=backend)


def test_agent_round_through_the_guest_a_guest_error_is_a_tpm_fault(
    guest: tuple[GuestChannel, socket.socket], verifier_url: str
) -> None:
    """`vtpm vm boot --rounds`: the agent's loop with the guest as its TPM; a guest ERR
    becomes a reportable TPM fault (not retried as an outage), nothing registered."""
    chan, peer = guest
    _answer(peer, "ERR HELLO no TPM: /dev/tpmrm0 missing")
    agent = _guest_agent(chan, verifier_url)
    try:
        outcome = agent.round()
    finally:
        agent.close()
    assert (outcome.status, outcome.fault, outcome.fault_kind) == (None, "tpm", "tpm")
    assert outcome.detail is not None and "no TPM: /dev/tpmrm0 missing" in outcome.detail
    assert agent.attester is None


def test_agent_round_through_the_guest_verifier_down_is_an_outage(
    guest: tuple[GuestChannel, socket.socket],
) -> None:
    chan, peer = guest
    _answer(peer, f"OK HELLO {B(b'cert')} - {B(EK_PUB)} {B(AK_PUB)} {B(AK_NAME)}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = _guest_agent(chan, f"http://127.0.0.1:{port}")
    try:
        outcome = agent.round()
    finally:
        agent.close()
    assert outcome.fault == "verifier"  # retried with backoff by Agent.run, state kept


def test_guest_ima_list_deltas_by_entry_index(guest: tuple[GuestChannel, socket.socket]) -> None:
    """The relay's IMA cursor over a real VM's list (tests/data/ima/vtpm-guest): the
    entries from index N are the bytes after entry N-1, and only new bytes are read."""
    data = (VM_DATA / "ima.bin").read_bytes()
    entries = parse_list(data)
    head = b"".join(e.to_bytes() for e in entries[:40])
    chan, peer = guest
    listed = GuestImaList(chan)
    _answer(peer, f"OK IMA {len(head)} {B(head)}")
    assert listed.delta(0) == head and listed.count == 40
    _answer(peer, f"OK IMA {len(data)} {B(data[len(head) :])}")  # the guest ran six more
    assert listed.delta(38) == b"".join(e.to_bytes() for e in entries[38:])
    assert listed.count == 46
    sent = peer.recv(4096).decode()
    assert sent == f"IMA 0 {1 << 20}\nIMA {len(head)} {1 << 20}\n"
    _answer(peer, f"OK IMA {len(data)} -")
    with pytest.raises(GuestAttestationError, match="from 47; the guest's list has 46"):
        listed.delta(47)

    quote = (VM_DATA / "quote.msg").read_bytes()
    clock = Attest.parse(quote).clock_info
    same = {"next_index": 46, "reset_count": clock.reset_count}
    same["restart_count"] = clock.restart_count
    assert _ima_start(same, quote) == 46
    assert _ima_start({**same, "reset_count": clock.reset_count - 1}, quote) == 0  # a new boot
    assert _ima_start({**same, "reset_count": None, "restart_count": None}, quote) == 0
    with pytest.raises(GuestAttestationError, match="no next_index"):
        _ima_start({"reset_count": 0}, quote)
