"""The relying-party client of the attestation service (what `vtpm check` runs).

``check(...)`` reads an attester's latest result and decides: pass only when
the verdict is affirming, younger than ``max_age``, and (if named) under the
given policy. Every reason it fails is listed; the EAR token comes along so a
caller can verify it offline against ``/.well-known/jwks.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.etree import ElementTree as ET

import requests

from vtpm_core.errors import ConfigError, VtpmTrustError

__all__ = ["CheckOutcome", "VerifierClient", "junit_xml", "parse_duration"]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"duration {text!r}: expected a number and s/m/h/d, like 10m")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


class ClientError(VtpmTrustError):
    """The verifier could not be asked, or answered with a problem."""


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
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            resp = requests.get(f"{self.url}{path}", headers=headers, timeout=self._timeout)
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach the verifier at {self.url}: {exc}") from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code >= 400:
            detail = doc.get("detail") if isinstance(doc, dict) else resp.reason
            raise ClientError(f"verifier answered {resp.status_code} for {path}: {detail}")
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
