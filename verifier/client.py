"""The relying-party client of the attestation service (what `vtpm check` runs).

``check(...)`` reads an attester's latest result and decides: pass only when
the verdict is affirming, younger than ``max_age``, and (if named) under the
given policy. Every reason it fails is listed; the EAR token comes along so a
caller can verify it offline against ``/.well-known/jwks.json``.

``wait_trusted(...)`` (issue 16, ``vtpm check --wait-trusted``) polls the
attester's state until it is ``trusted``, fresh failing evidence arrives, or
the time runs out.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.etree import ElementTree as ET

import requests

from vtpm_core.errors import ConfigError, VtpmTrustError

__all__ = [
    "CheckOutcome",
    "VerifierClient",
    "WaitOutcome",
    "junit_xml",
    "parse_duration",
]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"duration {text!r}: expected a number and s/m/h/d, like 10m")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


class ClientError(VtpmTrustError):
    """The verifier could not be asked, or answered with a problem.

    ``retriable``: no answer, or a 5xx/429 one (the verifier restarting, its
    database reconnecting): asking again later may succeed.
    """

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """How :meth:`VerifierClient.wait_trusted` ended: ``ok`` only when trusted."""

    attester_id: str
    ok: bool
    reason: str
    state: str | None
    state_since: str | None
    waited_s: float
    cause: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "attester_id": self.attester_id,
            "ok": self.ok,
            "reason": self.reason,
            "state": self.state,
            "state_since": self.state_since,
            "waited_s": round(self.waited_s, 3),
            "cause": self.cause,
        }


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    attester_id: str
    ok: bool
    reasons: tuple[str, ...]
    status: str | None
    policy: str | None
    result_at: str | None
    age_s: float | None
    failures: tuple[dict[str, Any], ...] = ()
    flags: tuple[dict[str, Any], ...] = ()
    ear: str | None = None
    attester: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "attester_id": self.attester_id,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "status": self.status,
            "policy": self.policy,
            "result_at": self.result_at,
            "age_s": self.age_s,
            "failures": list(self.failures),
            "flags": list(self.flags),
            "ear": self.ear,
        }


class VerifierClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def get(self, path: str) -> dict[str, Any]:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, body)

    def post_bytes(self, path: str, data: bytes) -> dict[str, Any]:
        return self._call("POST", path, None, data)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, data: bytes | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        try:
            resp = requests.request(
                method,
                f"{self.url}{path}",
                headers=headers,
                json=body,
                data=data,
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise ClientError(
                f"cannot reach the verifier at {self.url}: {exc}", retriable=True
            ) from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code >= 400:
            detail = doc.get("detail") if isinstance(doc, dict) else resp.reason
            raise ClientError(
                f"verifier answered {resp.status_code} for {path}: {detail}",
                retriable=resp.status_code >= 500 or resp.status_code == 429,
            )
        if not isinstance(doc, dict):
            raise ClientError(f"verifier answered a non-object for {path}")
        return doc

    def check(
        self,
        attester_id: str,
        *,
        max_age: timedelta,
        policy: str | None,
        now: datetime | None = None,
    ) -> CheckOutcome:
        """Decide on the latest result; every failed condition becomes a reason."""
        now = now or datetime.now(UTC)
        doc = self.get(f"/v1/attesters/{attester_id}")
        latest = doc.get("latest_result")
        reasons: list[str] = []
        flags = tuple(doc.get("flags") or ())
        for f in flags:
            reasons.append(f"attester flagged {f.get('flag')}: {f.get('detail')}")
        if not latest:
            reasons.append("no attestation result yet")
            return CheckOutcome(
                attester_id,
                False,
                tuple(reasons),
                None,
                None,
                None,
                None,
                flags=flags,
                attester=doc,
            )
        status = str(latest.get("status"))
        report = latest.get("report") or {}
        failures = tuple(report.get("failures") or ())
        if status != "affirming":
            reasons.append(f"latest verdict is {status}, not affirming")
        for fail in failures:
            reasons.append(_failure_text(fail))
        created = datetime.fromisoformat(str(latest["created_at"]).replace("Z", "+00:00"))
        age = (now - created).total_seconds()
        if age > max_age.total_seconds():
            reasons.append(
                f"latest result is {age:.0f} s old, more than {max_age.total_seconds():.0f} s"
            )
        if policy is not None and latest.get("policy") != policy:
            reasons.append(f"appraised under policy {latest.get('policy')!r}, not {policy!r}")
        return CheckOutcome(
            attester_id=attester_id,
            ok=not reasons,
            reasons=tuple(reasons),
            status=status,
            policy=latest.get("policy"),
            result_at=latest.get("created_at"),
            age_s=round(age, 3),
            failures=failures,
            flags=flags,
            ear=latest.get("ear"),
            attester=doc,
        )

    def wait_trusted(
        self,
        attester_id: str,
        *,
        timeout_s: float,
        poll_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> WaitOutcome:
        """Poll ``GET /v1/attesters/{id}`` every ``poll_s`` until its state is ``trusted``
        (ok), or it is ``failed`` by evidence newer than the first poll saw (not ok: a
        failure from before the wait is waited out, the VM may be booting its fix), or
        ``timeout_s`` passed (not ok). ``unknown`` and ``stale`` are waited on. A
        retriable error (no connection, 5xx, 429) is waited through; any other (401,
        403, 404) raises :class:`ClientError` at once."""
        start = monotonic()
        first_evidence: str | None = None
        doc: dict[str, Any] | None = None
        polls = 0
        last_error = ""
        while True:
            try:
                doc = self.get(f"/v1/attesters/{attester_id}")
            except ClientError as exc:
                if not exc.retriable:
                    raise
                last_error = str(exc)
            else:
                state = doc.get("state")
                if polls == 0:
                    first_evidence = doc.get("last_evidence_at")
                polls += 1
                waited = monotonic() - start
                if state == "trusted":
                    return self._waited(attester_id, True, "trusted", doc, waited)
                if state == "failed" and doc.get("last_evidence_at") != first_evidence:
                    return self._waited(attester_id, False, "failed", doc, waited)
            waited = monotonic() - start
            if waited >= timeout_s:
                if doc is None:
                    why = f"timed out after {timeout_s:g} s: {last_error}"
                else:
                    why = (
                        f"timed out after {timeout_s:g} s; attester is {doc.get('state')}"
                        f" since {doc.get('state_since') or 'registration'}"
                    )
                return self._waited(attester_id, False, why, doc, waited)
            sleep(min(poll_s, timeout_s - waited))

    def _waited(
        self, attester_id: str, ok: bool, reason: str, doc: dict[str, Any] | None, waited: float
    ) -> WaitOutcome:
        """The outcome, with the cause of the latest transition (why it is in its state)."""
        cause = None
        if doc is not None and doc.get("state") not in (None, "unknown"):
            try:
                hist = self.get(f"/v1/attesters/{attester_id}/history?limit=1")
                last = (hist.get("transitions") or [None])[0]
                cause = last.get("cause") if isinstance(last, dict) else None
            except ClientError:
                cause = None  # the verdict stands without its cause
        if reason == "failed" and cause:
            rules = ", ".join(map(str, cause.get("failures") or [])) or "none"
            flags = ", ".join(map(str, cause.get("flags") or [])) or "none"
            reason = (
                f"failed: verdict {cause.get('verdict')}; failing rules: {rules}; flags: {flags}"
            )
        return WaitOutcome(
            attester_id,
            ok,
            reason,
            None if doc is None else doc.get("state"),
            None if doc is None else doc.get("state_since"),
            waited,
            cause,
        )


def junit_xml(outcome: CheckOutcome, verifier: str) -> bytes:
    """A JUnit XML report: one testsuite, one testcase per attester, failures as text."""
    suite = ET.Element(
        "testsuite",
        name="vtpm-attestation",
        tests="1",
        failures="0" if outcome.ok else "1",
        errors="0",
    )
    case = ET.SubElement(
        suite, "testcase", classname=f"vtpm.verifier.{verifier}", name=outcome.attester_id
    )
    if not outcome.ok:
        fail = ET.SubElement(case, "failure", message=outcome.reasons[0], type="attestation")
        fail.text = "\n".join(outcome.reasons)
    out = ET.SubElement(case, "system-out")
    out.text = f"status={outcome.status} policy={outcome.policy} result_at={outcome.result_at}"
    return bytes(ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def _failure_text(fail: dict[str, Any]) -> str:
    """One failing rule: ``rule R: event N (TYPE, PCR P): message (expected E, got A)``."""
    text = f"rule {fail.get('rule')}: "
    event = fail.get("event")
    if isinstance(event, dict):
        text += f"event {event.get('index')} ({event.get('type')}, PCR {event.get('pcr')}): "
    text += str(fail.get("message"))
    if fail.get("expected") is not None or fail.get("actual") is not None:
        text += f" (expected {fail.get('expected')}, got {fail.get('actual')})"
    return text
