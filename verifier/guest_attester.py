"""Attest a real VM's guest against the running verifier service (issue 7, "A real VM").

The guest does all TPM work with tpm2-tools (``vtpm_core.vm.GuestChannel``);
this module is the host-side relay between it and the service's HTTP API
(docs/service.md):

1. ``POST /v1/attesters`` with the EK certificate our CA put in NV
   0x01C00002, the EK public and the guest's AK public; the service answers
   with TPM2_MakeCredential's outputs (TPM 2.0 Part 3, 12.6);
2. those are converted to the file ``tpm2_makecredential -o`` writes
   (:meth:`verifier.credential.Credential.to_tpm2_tools`) and the guest runs
   TPM2_ActivateCredential (Part 3, 12.5); the recovered secret goes to
   ``POST /v1/attesters/{id}/activation``, which returns the attester token;
3. ``POST .../challenges`` gives a nonce and the PCR selection the policy
   needs; the guest quotes with exactly those (TPM2_Quote, Part 3, 18.4);
4. ``POST .../evidence`` with the quote, signature, the (untrusted) PCR
   values and the firmware's own event log; the answer is the verdict.

Nothing from the guest is trusted here: the verifier checks it all. The
host only talks plain HTTP to a verifier on the loopback interface.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from verifier.attester import AttesterState, VerifierError
from verifier.credential import Credential
from vtpm_core.errors import ConfigError, StateError, TpmError
from vtpm_core.vm.channel import GuestChannel, validate_selection

__all__ = [
    "GuestAttestation",
    "GuestAttestationError",
    "GuestBackend",
    "GuestImaList",
    "assign_policy",
    "attest_guest",
    "check_loopback_url",
    "check_verifier",
    "guest_attest_once",
    "guest_attest_steps",
    "guest_enroll",
]

_TIMEOUT = 30.0


class GuestAttestationError(VerifierError):
    """A step of the guest's attestation failed: the verifier refused it or could not be asked.

    A :class:`~verifier.attester.VerifierError`, so :class:`verifier.agent.Agent` treats
    it like the swtpm attester's (status 0 or 5xx: an outage, retried with backoff).
    """

    def __init__(self, step: str, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.step = step
        where = f"verifier answered {status}" if status else "verifier unreachable"
        self.args = (f"{step}: {where}: {detail}",)


@dataclass
class GuestAttestation:
    """What :func:`attest_guest` did: the state to reuse, the verdict and step timings."""

    state: AttesterState
    result: dict[str, Any]
    registered: bool
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "attester_id": self.state.attester_id,
            "registered": self.registered,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **self.result,
        }


def check_loopback_url(url: str) -> str:
    """``http://127.0.0.1:PORT`` (or ``[::1]``/``localhost``): the only verifiers we talk to."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host or parts.path not in ("", "/"):
        raise ConfigError(f"verifier URL {url!r}: expected http://127.0.0.1:PORT")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"verifier URL {url!r}: only a loopback verifier is allowed")
    return url.rstrip("/")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(step: str, doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key)
    try:
        if not isinstance(value, str):
            raise ValueError("missing")
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise GuestAttestationError(step, 200, f"answer has no base64 {key!r}") from None


def _tpm2b_content(key: str, data: bytes) -> bytes:
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise GuestAttestationError("register", 201, f"{key} is not a TPM2B ({len(data)} bytes)")
    return data[2:]


def _why(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectionError) and "refused" in str(exc):
        return "connection refused"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {_TIMEOUT:.0f} s"
    return type(exc).__name__


def check_verifier(verifier_url: str) -> str:
    """``GET /healthz`` before booting, so a verifier that is down fails in a second, not later."""
    url = check_loopback_url(verifier_url)
    with requests.Session() as http:
        _call(http, "health", f"{url}/healthz", method="GET")
    return url


def _call(
    http: requests.Session,
    step: str,
    url: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    method: str = "POST",
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = http.request(method, url, json=body, headers=headers, timeout=_TIMEOUT)
    except requests.RequestException as exc:
        raise GuestAttestationError(step, 0, f"cannot reach {url}: {_why(exc)}") from None
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if resp.status_code >= 400:
        detail = doc.get("detail") if isinstance(doc, dict) else None
        raise GuestAttestationError(step, resp.status_code, str(detail or resp.reason))
    if not isinstance(doc, dict):
        raise GuestAttestationError(step, resp.status_code, "the answer is not a JSON object")
    return doc


def _guest(step: str, fn: Callable[[], Any]) -> Any:
    """Run a guest command; its TpmError names the step."""
    try:
        return fn()
    except TpmError as exc:
        raise TpmError(f"{step}: the guest failed: {exc}") from exc


def _selection_text(step: str, selection: Any) -> str:
    """The challenge's ``{bank: [pcr, ...]}`` as a tpm2-tools selection."""
    if not isinstance(selection, dict) or not selection:
        raise GuestAttestationError(step, 201, "challenge has no pcr_selection")
    parts = []
    for bank, pcrs in selection.items():
        if not isinstance(pcrs, list) or not all(isinstance(p, int) for p in pcrs) or not pcrs:
            raise GuestAttestationError(step, 201, f"bad PCR list for bank {bank!r}")
        parts.append(f"{bank}:{','.join(str(p) for p in sorted(pcrs))}")
    return validate_selection("+".join(parts))


def guest_enroll(
    channel: GuestChannel,
    http: requests.Session,
    url: str,
    *,
    admin_token: str | None = None,
    timings: dict[str, float] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AttesterState:
    """Steps 1-2 (module docstring): register the guest's EK and AK, activate; the state.

    ``url`` must already be checked (:func:`check_loopback_url`).
    """
    timings = {} if timings is None else timings
    t = clock()
    ident = _guest("hello", channel.hello)
    if ident.ek_cert_der is None:
        raise StateError(
            "register: the guest's TPM has no EK certificate in NV 0x01C00002 "
            "(create the vTPM with `vtpm create`, which has our CA issue it)"
        )
    body = {
        "ek_certificate": _b64(ident.ek_cert_der),
        "ek_public": _b64(ident.ek_public_tpm2b),
        "ak_public": _b64(ident.ak_public_tpm2b),
    }
    reg = _call(http, "register", f"{url}/v1/attesters", token=admin_token, body=body)
    attester_id = reg.get("attester_id")
    if not isinstance(attester_id, str):
        raise GuestAttestationError("register", 201, "answer has no attester_id")
    # the service sends TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET (size-prefixed)
    cred = Credential(
        _tpm2b_content("credential_blob", _unb64("register", reg, "credential_blob")),
        _tpm2b_content("encrypted_secret", _unb64("register", reg, "encrypted_secret")),
    )
    timings["register"] = clock() - t
    t = clock()
    secret = _guest("activate", lambda: channel.activate_credential(cred.to_tpm2_tools()))
    act = _call(
        http,
        "activate",
        f"{url}/v1/attesters/{attester_id}/activation",
        body={"secret": _b64(secret)},
    )
    token = act.get("token")
    if not isinstance(token, str):
        raise GuestAttestationError("activate", 200, "answer has no token")
    timings["activate"] = clock() - t
    return AttesterState(url, attester_id, token)


class GuestImaList:
    """The guest's IMA measurement list as fetched so far, to send the verifier deltas.

    Keeps the bytes read from the guest and where each entry ends, so "the
    entries from index N" (the challenge's ``ima.next_index``) is a byte
    offset; each :meth:`delta` first reads only the bytes added since. The
    entries are parsed here (template hashes checked) only to find their
    boundaries: the verifier parses and proves them again.
    """

    def __init__(self, channel: GuestChannel) -> None:
        self._channel = channel
        self._data = bytearray()
        self._ends: list[int] = []

    @property
    def count(self) -> int:
        return len(self._ends)

    def refresh(self) -> int:
        """Read the bytes the guest listed since the last call; the entry count."""
        from verifier.ima.parse import parse_list

        new = _guest("ima", lambda: self._channel.ima_list(len(self._data)))
        end = len(self._data)
        for entry in parse_list(new, offset_index=self.count):
            end += len(entry.to_bytes())
            self._ends.append(end)
        self._data += new
        return self.count

    def delta(self, start_index: int) -> bytes:
        """The binary entries from ``start_index`` to the end of the list as it is now."""
        self.refresh()
        if not 0 <= start_index <= self.count:
            raise GuestAttestationError(
                "evidence", 201,
                f"the verifier asks for IMA entries from {start_index}; "
                f"the guest's list has {self.count}",
            )  # fmt: skip
        offset = self._ends[start_index - 1] if start_index else 0
        return bytes(self._data[offset:])


def _ima_start(hint: Any, quote_message: bytes) -> int:
    """The entry to send from: the challenge's ``next_index`` when the quote is of the
    boot that index belongs to (same resetCount and restartCount), else 0 (a new list)."""
    from vtpm_core.tpm import Attest

    if not isinstance(hint, dict) or not isinstance(hint.get("next_index"), int):
        raise GuestAttestationError("challenge", 201, "the challenge's ima has no next_index")
    clock_info = Attest.parse(quote_message).clock_info  # untrusted: it only picks the index
    same_boot = (hint.get("reset_count"), hint.get("restart_count")) == (
        clock_info.reset_count,
        clock_info.restart_count,
    )
    return int(hint["next_index"]) if same_boot else 0


def guest_attest_once(
    channel: GuestChannel,
    http: requests.Session,
    state: AttesterState,
    *,
    timings: dict[str, float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    ima: GuestImaList | None = None,
) -> dict[str, Any]:
    """Steps 3-4 (module docstring): challenge, the guest's quote, evidence; the verdict.

    With ``ima`` and a challenge that asks for it (its policy has a runtime
    part), the evidence carries the guest's IMA entries from the challenge's
    ``ima.next_index``, read after the quote (so the list covers it).
    """
    timings = {} if timings is None else timings
    base = f"{state.verifier}/v1/attesters/{state.attester_id}"
    t = clock()
    ch = _call(http, "challenge", f"{base}/challenges", token=state.token)
    nonce = _unb64("challenge", ch, "nonce")
    selection = _selection_text("challenge", ch.get("pcr_selection"))
    quote = _guest("quote", lambda: channel.quote(nonce, selection))
    timings["quote"] = clock() - t
    t = clock()
    pcrs = {
        bank: {str(i): v.hex() for i, v in sorted(values.items())}
        for bank, values in quote.untrusted_pcr_values().items()
    }
    evidence: dict[str, Any] = {
        "nonce": _b64(nonce),
        "quote": _b64(quote.message),
        "signature": _b64(quote.signature),
        "pcrs": pcrs,
    }
    if quote.eventlog:
        evidence["event_log"] = _b64(quote.eventlog)
    if ima is not None and "ima" in ch:
        start = _ima_start(ch["ima"], quote.message)
        evidence["ima"] = {"start_index": start, "entries": _b64(ima.delta(start))}
    result = _call(http, "evidence", f"{base}/evidence", token=state.token, body=evidence)
    timings["evidence"] = clock() - t
    return result


def guest_attest_steps(
    channel: GuestChannel,
    verifier_url: str,
    *,
    admin_token: str | None = None,
    state: AttesterState | None = None,
    on_registered: Callable[[AttesterState], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    ima: GuestImaList | None = None,
) -> GuestAttestation:
    """:func:`attest_guest` with the details: the attester state to reuse and step timings.

    With ``state`` (from an earlier call in the same boot) registration and
    activation are skipped: only a new challenge, quote and evidence.
    ``admin_token`` is sent with the registration (needed only when the
    verifier must accept an EK without a certificate). ``on_registered`` runs
    after a new activation, before the challenge (e.g. to assign a policy).
    ``ima`` (one per boot, reused across calls): send the IMA delta the challenge asks for.
    """
    url = check_loopback_url(verifier_url)
    timings: dict[str, float] = {}
    registered = False
    with requests.Session() as http:
        if state is None or state.verifier != url:
            state = guest_enroll(
                channel, http, url, admin_token=admin_token, timings=timings, clock=clock
            )
            registered = True
            if on_registered is not None:
                on_registered(state)
        result = guest_attest_once(channel, http, state, timings=timings, clock=clock, ima=ima)
    return GuestAttestation(state, result, registered, timings)


class GuestBackend:
    """The attester backend of :class:`verifier.agent.Agent` for a booted VM: every TPM
    command goes to the guest over ``channel`` (tpm2-tools in the guest), so the agent's
    loop (cadence, backoff, fault reports) is the same code as for a swtpm.

    The guest creates a new AK each boot (``tpm2 createak``): the attester state is
    kept by the agent for this boot only. ``on_registered`` runs after each new
    activation (e.g. :func:`assign_policy`); ``registrations`` counts them.
    """

    def __init__(
        self,
        channel: GuestChannel,
        *,
        admin_token: str | None = None,
        on_registered: Callable[[AttesterState], None] | None = None,
        ima: GuestImaList | None = None,
    ) -> None:
        self._channel = channel
        self._admin_token = admin_token
        self._on_registered = on_registered
        self._ima = ima
        self.registrations = 0

    @contextmanager
    def open(self) -> Iterator[GuestBackend]:
        yield self  # the channel stays open across rounds; its owner closes it

    def enroll(
        self, http: requests.Session, verifier: str, *, vm_id: str | None = None
    ) -> AttesterState:
        if vm_id is not None:
            raise ConfigError("a VM guest registers with its EK certificate's VM id, not vm_id")
        url = check_loopback_url(verifier)
        state = guest_enroll(self._channel, http, url, admin_token=self._admin_token)
        self.registrations += 1
        if self._on_registered is not None:
            self._on_registered(state)
        return state

    def attest(self, http: requests.Session, state: AttesterState) -> dict[str, Any]:
        return guest_attest_once(self._channel, http, state, ima=self._ima)


def assign_policy(verifier_url: str, admin_token: str, attester_id: str, policy: str) -> None:
    """``PUT /v1/attesters/{id}/policy`` with the admin token (the policy must exist)."""
    url = check_loopback_url(verifier_url)
    with requests.Session() as http:
        _call(
            http,
            "assign policy",
            f"{url}/v1/attesters/{attester_id}/policy",
            token=admin_token,
            body={"policy": policy},
            method="PUT",
        )


def attest_guest(
    channel: GuestChannel,
    verifier_url: str,
    *,
    admin_token: str | None = None,
    state: AttesterState | None = None,
) -> dict[str, Any]:
    """Register (unless ``state``), activate, challenge, quote, evidence; return the verdict.

    The returned dict is the service's result (``status``, ``report`` with
    every failing rule, ``ear``, ``nonce``, ...) plus ``attester_id``.
    """
    done = guest_attest_steps(channel, verifier_url, admin_token=admin_token, state=state)
    return {"attester_id": done.state.attester_id, **done.result}
