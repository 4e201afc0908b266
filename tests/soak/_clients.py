"""The soak's clients: threads that attest with real swtpm TPMs, and bad clients.

Every request any client makes becomes one :class:`Answer` (written to the
client's JSONL log when the run ends): what was sent, to which verifier, when,
and what came back: an HTTP status with its problem type, ``Retry-After`` and
whether the body held a traceback, or the connection failure (``refused``,
``dropped``, ``timeout``). The checks (``_checks.py``) judge these.

- :class:`GoodClient`: one attester, one swtpm; challenge and evidence each on a
  verifier picked at random (as a load balancer without health checks would
  send them), as fast as it can. A 503 waits its ``Retry-After``; a refused or
  dropped connection tries again at once. Each accepted
  evidence body is offered to the replay pool.
- :class:`RegistrarClient`, :class:`ReaderClient`, :class:`PolicyFlipper`: the ORM's
  paths beside the hot ones: a newcomer registering and activating again and
  again, a relying party reading, an operator flipping one attester's policy so
  its state (and history) changes every second.
- :class:`MalformedClient`: broken JSON, deeply nested JSON, non-UTF-8, bad
  base64, unknown fields, bad PCRs, unknown nonces, an unparseable quote
  against a fresh nonce, missing and wrong tokens.
- :class:`OversizedClient`: evidence bodies past ``max_body_bytes``, with a
  Content-Length and chunked.
- :class:`ReplayClient`: accepted evidence sent again, with its owner's token,
  to either verifier.

Bad clients send at a fixed rate (``interval_s`` between requests) and expect
a 4xx problem body for everything but the challenges they take themselves.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from verifier.attester import AttesterState, TpmAttester

__all__ = [
    "Answer",
    "BadClient",
    "Client",
    "GoodClient",
    "MalformedClient",
    "OversizedClient",
    "PolicyFlipper",
    "ReaderClient",
    "RegistrarClient",
    "ReplayClient",
    "ReplayPool",
]

TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Answer:
    """One request and what came back. ``expect``: ``success`` or ``4xx``."""

    client: str
    kind: str  # good | malformed | oversized | replayed
    case: str
    expect: str
    verifier: int
    t0: float
    t1: float
    outcome: str  # the HTTP status, or refused | dropped | timeout | error
    problem: str | None = None  # the problem type's last part (unavailable, malformed, ...)
    retry_after: str | None = None
    content_type: str | None = None
    traceback: bool = False
    detail: str | None = None
    nonce: str | None = None
    result_id: int | None = None
    attester_id: str | None = None

    @property
    def status(self) -> int | None:
        return int(self.outcome) if self.outcome.isdigit() else None


def _failure(exc: requests.RequestException) -> str:
    text = repr(exc)
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if "Connection refused" in text or "Errno 111" in text:
        return "refused"
    if isinstance(exc, requests.ConnectionError):
        return "dropped"  # reset, aborted, remote end closed while the request was out
    return "error"


class Client(threading.Thread):
    """A client thread: ``answers`` grows until :meth:`stop`; ``urls`` are the verifiers."""

    kind = "client"

    def __init__(self, name: str, urls: list[str], clock: Callable[[], float]) -> None:
        super().__init__(name=name, daemon=True)
        self.urls = urls
        self.clock = clock
        self.answers: list[Answer] = []
        self.crashed: str | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def sleep(self, seconds: float) -> None:
        self._stop_event.wait(seconds)

    def next_verifier(self) -> int:
        """A verifier at random, as a load balancer spreads requests (a strict round robin
        would send every challenge of a client to one and every evidence to the other)."""
        return random.randrange(len(self.urls))

    def run(self) -> None:
        try:
            self.loop()
        except Exception as exc:  # a client bug must fail the run, not vanish with the thread
            self.crashed = f"{type(exc).__name__}: {exc}"

    def loop(self) -> None:
        raise NotImplementedError

    def send(
        self,
        http: requests.Session,
        verifier: int,
        path: str,
        *,
        case: str,
        expect: str,
        token: str | None = None,
        body: dict[str, Any] | None = None,
        data: bytes | Iterator[bytes] | None = None,
        nonce: str | None = None,
        attester_id: str | None = None,
        method: str = "POST",
    ) -> tuple[Answer, dict[str, Any] | None]:
        """``method`` ``path`` on verifier ``verifier``; the answer and its JSON object."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        t0 = self.clock()
        fields: dict[str, Any] = {}
        doc: dict[str, Any] | None = None
        try:
            resp = http.request(
                method,
                self.urls[verifier] + path,
                json=body,
                data=data,
                headers=headers,
                timeout=TIMEOUT_S,
            )
        except requests.RequestException as exc:
            outcome = _failure(exc)
            fields["detail"] = repr(exc)[:300]
        else:
            outcome = str(resp.status_code)
            ctype = resp.headers.get("Content-Type")
            text = resp.text
            try:
                parsed = resp.json()
                doc = parsed if isinstance(parsed, dict) else None
            except ValueError:
                doc = None
            problem = None
            if ctype == "application/problem+json" and doc is not None:
                problem = str(doc.get("type", "")).rsplit(":", 1)[-1]
                fields["detail"] = str(doc.get("detail", ""))[:300]
            fields.update(
                problem=problem,
                retry_after=resp.headers.get("Retry-After"),
                content_type=ctype,
                traceback="Traceback" in text or 'File "' in text,
            )
            if resp.status_code == 200 and case == "evidence" and doc is not None:
                fields["result_id"] = int(doc["id"])
        answer = Answer(
            client=self.name,
            kind=self.kind,
            case=case,
            expect=expect,
            verifier=verifier,
            t0=t0,
            t1=self.clock(),
            outcome=outcome,
            nonce=nonce,
            attester_id=attester_id,
            **fields,
        )
        self.answers.append(answer)
        return answer, doc

    def backoff(self, answer: Answer) -> None:
        """What a well-behaved client does after a failed request."""
        if answer.outcome == "503":
            self.sleep(float(answer.retry_after or 1))
        elif answer.outcome in ("refused", "dropped"):
            self.sleep(0.05)  # and the next request goes to the next verifier
        else:
            self.sleep(0.5)

    def write_log(self, directory: Path) -> Path:
        path = directory / f"{self.name}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for a in self.answers:
                out.write(json.dumps(asdict(a), sort_keys=True) + "\n")
        return path


class ReplayPool:
    """Recently accepted evidence (attester id, token, body), shared by good and replay
    clients; bounded."""

    def __init__(self, size: int = 256) -> None:
        self._items: collections.deque[tuple[str, str, dict[str, Any]]] = collections.deque(
            maxlen=size
        )

    def offer(self, attester_id: str, token: str, body: dict[str, Any]) -> None:
        self._items.append((attester_id, token, body))

    def pick(self) -> tuple[str, str, dict[str, Any]] | None:
        items = list(self._items)
        return random.choice(items) if items else None


class GoodClient(Client):
    """One attester attesting as fast as it can (see the module docstring)."""

    kind = "good"

    def __init__(
        self,
        name: str,
        urls: list[str],
        clock: Callable[[], float],
        state: AttesterState,
        tcti: str,
        pool: ReplayPool,
    ) -> None:
        super().__init__(name, urls, clock)
        self.state = state
        self.tcti = tcti
        self.pool = pool

    def loop(self) -> None:
        with requests.Session() as http, TpmAttester.open(self.tcti) as tpm:
            _, ak_public = tpm.ak()
            while not self.stopped:
                self.attest(http, tpm, ak_public)

    def attest(self, http: requests.Session, tpm: TpmAttester, ak_public: bytes) -> None:
        aid, token = self.state.attester_id, self.state.token
        base = f"/v1/attesters/{aid}"
        ch, doc = self.send(
            http,
            self.next_verifier(),
            f"{base}/challenges",
            case="challenge",
            expect="success",
            token=token,
            attester_id=aid,
        )
        if ch.outcome != "201" or doc is None:
            self.backoff(ch)
            return
        nonce = base64.b64decode(doc["nonce"])
        quote = tpm.quote(nonce, {b: list(p) for b, p in doc["pcr_selection"].items()})
        body = {
            "nonce": doc["nonce"],
            "quote": base64.b64encode(quote.attest).decode(),
            "signature": base64.b64encode(quote.signature).decode(),
            "pcrs": quote.pcrs,
            "ak_public": base64.b64encode(ak_public).decode(),
        }
        ev, _ = self.send(
            http,
            self.next_verifier(),
            f"{base}/evidence",
            case="evidence",
            expect="success",
            token=token,
            body=body,
            nonce=nonce.hex(),
            attester_id=aid,
        )
        if ev.outcome == "200":
            self.pool.offer(aid, token, body)
        else:
            self.backoff(ev)


class RegistrarClient(Client):
    """A newcomer, again and again: registration and activation (the ORM's write
    transactions) with a real TPM2_ActivateCredential, same EK and VM id each time."""

    kind = "good"
    interval_s = 0.25

    def __init__(
        self, name: str, urls: list[str], clock: Callable[[], float], tcti: str, vm_id: str
    ) -> None:
        super().__init__(name, urls, clock)
        self.tcti = tcti
        self.vm_id = vm_id

    def loop(self) -> None:
        with requests.Session() as http, TpmAttester.open(self.tcti) as tpm:
            _, ek_public = tpm.ek()
            _, ak_public = tpm.ak()
            body = {
                "ek_certificate": _b64(tpm.ek_certificate()),
                "ek_public": _b64(ek_public),
                "ak_public": _b64(ak_public),
                "vm_id": self.vm_id,
            }
            while not self.stopped:
                t0 = time.monotonic()
                self.register(http, tpm, body)
                self.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def register(self, http: requests.Session, tpm: TpmAttester, body: dict[str, Any]) -> None:
        v = self.next_verifier()
        reg, doc = self.send(http, v, "/v1/attesters", case="register", expect="success", body=body)
        if reg.outcome != "201" or doc is None:
            self.backoff(reg)
            return
        secret = tpm.activate(
            base64.b64decode(doc["credential_blob"]), base64.b64decode(doc["encrypted_secret"])
        )
        aid = str(doc["attester_id"])
        act, _ = self.send(
            http,
            v,
            f"/v1/attesters/{aid}/activation",
            case="activate",
            expect="success",
            body={"secret": _b64(secret)},
            attester_id=aid,
        )
        if act.outcome != "200":
            self.backoff(act)


class ReaderClient(Client):
    """A relying party: the ORM's read paths (an attester, its history and results, the
    fleet's first page) with the reader token."""

    kind = "good"
    interval_s = 0.1

    def __init__(
        self,
        name: str,
        urls: list[str],
        clock: Callable[[], float],
        token: str,
        attester_ids: list[str],
    ) -> None:
        super().__init__(name, urls, clock)
        self.token = token
        self.attester_ids = attester_ids

    def loop(self) -> None:
        paths = itertools.cycle(["", "/history", "/results?limit=5", None])
        with requests.Session() as http:
            while not self.stopped:
                t0 = time.monotonic()
                suffix = next(paths)
                aid = random.choice(self.attester_ids)
                path = "/v1/attesters" if suffix is None else f"/v1/attesters/{aid}{suffix}"
                case = "read-list" if suffix is None else f"read{suffix.split('?')[0] or '-one'}"
                answer, _ = self.send(
                    http, self.next_verifier(), path, case=case, expect="success",
                    token=self.token, method="GET",
                )  # fmt: skip
                if answer.status != 200:
                    self.backoff(answer)
                self.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))


class PolicyFlipper(Client):
    """An operator: assigns one attester a policy it fails, then none, again and again, so
    its state flips trusted <-> failed, each change one transition in its history (and the
    assignment itself is an ORM write under the faults)."""

    kind = "good"
    interval_s = 1.0

    def __init__(
        self,
        name: str,
        urls: list[str],
        clock: Callable[[], float],
        admin: str,
        attester_id: str,
        policy: str,
    ) -> None:
        super().__init__(name, urls, clock)
        self.admin = admin
        self.attester_id = attester_id
        self.policy = policy

    def loop(self) -> None:
        choices = itertools.cycle([self.policy, None])
        with requests.Session() as http:
            while not self.stopped:
                t0 = time.monotonic()
                answer, _ = self.send(
                    http, self.next_verifier(), f"/v1/attesters/{self.attester_id}/policy",
                    case="assign-policy", expect="success", token=self.admin,
                    body={"policy": next(choices)}, attester_id=self.attester_id, method="PUT",
                )  # fmt: skip
                if answer.status != 200:
                    self.backoff(answer)
                self.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))


class BadClient(Client):
    """Sends bad requests at a fixed rate with its own attester's token."""

    interval_s = 0.05

    def __init__(
        self, name: str, urls: list[str], clock: Callable[[], float], state: AttesterState
    ) -> None:
        super().__init__(name, urls, clock)
        self.state = state

    def loop(self) -> None:
        with requests.Session() as http:
            cases = itertools.cycle(self.cases())
            while not self.stopped:
                t0 = time.monotonic()
                next(cases)(http)
                self.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def cases(self) -> list[Callable[[requests.Session], object]]:
        raise NotImplementedError

    def evidence(self, http: requests.Session, case: str, **kwargs: Any) -> Answer:
        aid = self.state.attester_id
        kwargs.setdefault("token", self.state.token)
        answer, _ = self.send(
            http,
            self.next_verifier(),
            f"/v1/attesters/{aid}/evidence",
            case=case,
            expect="4xx",
            attester_id=aid,
            **kwargs,
        )
        return answer


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _wellformed(nonce: bytes) -> dict[str, Any]:
    """An evidence body every field of which parses, bound to ``nonce``; its quote does not."""
    return {
        "nonce": _b64(nonce),
        "quote": _b64(secrets.token_bytes(90)),
        "signature": _b64(secrets.token_bytes(70)),
        "pcrs": {"sha256": {str(i): "00" * 32 for i in range(8)}},
    }


class MalformedClient(BadClient):
    kind = "malformed"
    interval_s = 0.05

    def cases(self) -> list[Callable[[requests.Session], object]]:
        def raw(case: str, data: bytes) -> Callable[[requests.Session], object]:
            return lambda http: self.evidence(http, case, data=data)

        def doc(case: str, body: dict[str, Any]) -> Callable[[requests.Session], object]:
            return lambda http: self.evidence(http, case, body=body)

        good_shape = _wellformed(secrets.token_bytes(32))
        return [
            raw("json-truncated", b'{"nonce": "AAAA", "quote'),
            raw("json-array", b"[1, 2, 3]"),
            raw("json-deep", b"[" * 100_000),
            raw("not-utf8", b'{"nonce": "\xff\xfe"}'),
            doc("base64-bad", {**good_shape, "quote": "not base64 ***"}),
            doc("field-unknown", {**good_shape, "extra": 1}),
            doc("pcrs-bad", {**good_shape, "pcrs": {"sha256": {"0": "zz"}}}),
            doc("pcrs-index", {**good_shape, "pcrs": {"sha256": {"99": "00" * 32}}}),
            doc("nonce-unknown", _wellformed(secrets.token_bytes(32))),
            self.quote_garbage,
            lambda http: self.evidence(http, "token-missing", body=good_shape, token=""),
            lambda http: self.evidence(http, "token-wrong", body=good_shape, token="x" * 43),
        ]

    def quote_garbage(self, http: requests.Session) -> None:
        """A fresh nonce answered with a quote that does not parse: 400, nonce unspent."""
        aid = self.state.attester_id
        ch, doc = self.send(
            http,
            self.next_verifier(),
            f"/v1/attesters/{aid}/challenges",
            case="quote-garbage/challenge",
            expect="success",
            token=self.state.token,
            attester_id=aid,
        )
        if ch.outcome == "201" and doc is not None:
            nonce = base64.b64decode(doc["nonce"])
            self.evidence(http, "quote-garbage", body=_wellformed(nonce), nonce=nonce.hex())


class OversizedClient(BadClient):
    kind = "oversized"
    interval_s = 0.25

    def __init__(
        self,
        name: str,
        urls: list[str],
        clock: Callable[[], float],
        state: AttesterState,
        max_body_bytes: int,
    ) -> None:
        super().__init__(name, urls, clock, state)
        self.size = max_body_bytes + 1024

    def cases(self) -> list[Callable[[requests.Session], object]]:
        body = b'{"nonce": "' + b"A" * self.size + b'"}'

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        return [
            lambda http: self.evidence(http, "content-length", data=body),
            lambda http: self.evidence(http, "chunked", data=chunks()),
        ]


class ReplayClient(Client):
    """Accepted evidence again, with the owner's token: never a second result."""

    kind = "replayed"
    interval_s = 0.1

    def __init__(
        self, name: str, urls: list[str], clock: Callable[[], float], pool: ReplayPool
    ) -> None:
        super().__init__(name, urls, clock)
        self.pool = pool

    def loop(self) -> None:
        with requests.Session() as http:
            while not self.stopped:
                t0 = time.monotonic()
                picked = self.pool.pick()
                if picked is not None:
                    aid, token, body = picked
                    self.send(
                        http,
                        self.next_verifier(),
                        f"/v1/attesters/{aid}/evidence",
                        case="accepted-again",
                        expect="4xx",
                        token=token,
                        body=body,
                        nonce=base64.b64decode(body["nonce"]).hex(),
                        attester_id=aid,
                    )
                self.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))
