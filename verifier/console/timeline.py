"""The event-log timeline of an attester's latest evidence: the boot by phase and PCR.

Built from what the service stored with the latest result (``latest_evidence``,
migration 0007) by the project's own parser and replay (``verifier.eventlog``):

1. The log is parsed again and replayed against the stored PCR values, and
   those count only when the quote verified at the time (``quote_verified``).
   If either fails, every event is *unproven*: shown, with its data only as
   an untrusted claim.
2. Each event of a proven log has one trust level (``ReplayedEvent.data_verified``):
   ``verified`` (the digest is a hash of the data: the decoded data is shown as
   what was measured), ``described`` (the digest is of something the log does
   not carry, an image or a firmware volume: the data is a description the digest
   does not prove) or ``forged`` (the data does not hash to its digest: it is shown
   only as an untrusted claim, never as decoded data).
3. The failing rules of the result (its report's ``failures``) are attached to
   the events they name, expected and actual values with them; the others
   (quote, PCR selection, lineage) are listed for the whole log.

Phases follow the PC Client PFP's PCR usage (v1.06 §3.3.4): PCRs 0-3 and 6
firmware, 7 secure-boot variables, 4-5 boot applications (and the boot
manager's GPT and ExitBootServices events), 8-9 and 11-14 kernel and command
line (GRUB, systemd-boot, the EFI stub), 10 IMA; the rest "other".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from verifier.eventlog import EventLog, ReplayedLog, check_event
from verifier.eventlog.jsonview import decoded_summary, to_jsonable
from verifier.service.db import Database
from verifier.service.models import LatestEvidence, Result
from vtpm_core.errors import ParseError, VerificationError

__all__ = ["PHASES", "StoredEvidence", "build_timeline", "load_evidence", "phase_of"]

PHASES = (
    ("firmware", "Firmware"),
    ("secure-boot", "Secure-boot variables"),
    ("boot-applications", "Boot applications"),
    ("kernel", "Kernel and command line"),
    ("ima", "IMA"),
    ("other", "Other PCRs"),
)
_PHASE_OF_PCR = {
    **dict.fromkeys((0, 1, 2, 3, 6), "firmware"),
    7: "secure-boot",
    **dict.fromkeys((4, 5), "boot-applications"),
    **dict.fromkeys((8, 9, 11, 12, 13, 14), "kernel"),
    10: "ima",
}
_SUMMARY_CHARS = 300


def phase_of(pcr: int) -> str:
    return _PHASE_OF_PCR.get(pcr, "other")


@dataclass(frozen=True, slots=True)
class StoredEvidence:
    """The latest evidence as stored, with the report of the result it produced."""

    attester_id: str
    result_id: int
    received_at: datetime
    quote_verified: bool
    pcrs: dict[str, dict[int, bytes]]
    event_log: bytes | None
    status: str | None
    report: dict[str, Any]


def load_evidence(db: Database, attester_id: str) -> StoredEvidence | None:
    """The attester's stored latest evidence (None: no evidence accepted yet)."""
    stmt = (
        select(LatestEvidence, Result.status, Result.report)
        .outerjoin(Result, Result.id == LatestEvidence.result_id)
        .where(LatestEvidence.attester_id == attester_id)
    )
    with db.read() as session:
        row = session.execute(stmt).one_or_none()
        if row is None:
            return None
        ev, status, report = row
        pcrs = {
            str(bank): {int(i): bytes.fromhex(v) for i, v in values.items()}
            for bank, values in ev.pcrs.items()
        }
        return StoredEvidence(
            ev.attester_id,
            ev.result_id,
            ev.received_at,
            ev.quote_verified,
            pcrs,
            ev.event_log,
            status,
            report if isinstance(report, dict) else {},
        )


def _failures_by_event(report: dict[str, Any]) -> tuple[dict[int, list[Any]], list[Any]]:
    by_event: dict[int, list[Any]] = {}
    general: list[Any] = []
    for failure in report.get("failures") or []:
        if not isinstance(failure, dict):
            continue
        event = failure.get("event")
        index = event.get("index") if isinstance(event, dict) else None
        if isinstance(index, int):
            by_event.setdefault(index, []).append(failure)
        else:
            general.append(failure)
    return by_event, general


def _summary(decoded: Any) -> str:
    return decoded_summary(decoded, limit=_SUMMARY_CHARS)


def build_timeline(evidence: StoredEvidence | None) -> dict[str, Any]:
    """The timeline as JSON values (what the page renders); see the module docstring."""
    if evidence is None:
        return {"evidence": None, "phases": [], "failures": [], "log_error": None}
    by_event, general = _failures_by_event(evidence.report)
    out: dict[str, Any] = {
        "evidence": {
            "result_id": evidence.result_id,
            "received_at": evidence.received_at.isoformat(),
            "status": evidence.status,
            "quote_verified": evidence.quote_verified,
        },
        "failures": general,
        "log_error": None,
        "proven": False,
        "phases": [],
    }
    if evidence.event_log is None:
        out["log_error"] = "the evidence carried no event log"
        return out
    try:
        log = EventLog.parse(evidence.event_log)
    except ParseError as exc:  # accepted once: only a changed parser could get here
        out["log_error"] = f"the stored log does not parse: {exc}"
        return out
    replayed: ReplayedLog | None = None
    if not evidence.quote_verified:  # step 1
        out["log_error"] = "the quote did not verify: no event is proven"
    else:
        try:
            replayed = log.verify(evidence.pcrs)
        except VerificationError as exc:
            out["log_error"] = f"the log does not replay to the quoted PCRs: {exc.message}"
    out["proven"] = replayed is not None
    if replayed is not None:
        out["warnings"] = list(replayed.warnings)
        out["verified_pcrs"] = {b: sorted(p) for b, p in replayed.verified.items()}
    events: dict[str, dict[int, list[dict[str, Any]]]] = {}
    uintn = log.spec_id.uintn_size if log.spec_id is not None else 2
    for index in range(len(log.records)):
        event = log.event(index)
        if replayed is not None:  # step 2
            r = replayed.event(index)
            decoded, data_verified = r.untrusted_decoded, r.data_verified
            problems, covers = r.warnings, r.digest_covers
            trust = {True: "verified", None: "described", False: "forged"}[data_verified]
        else:
            check = check_event(event, log.algorithms, uintn_size=uintn)
            decoded, problems, covers = check.decoded, check.problems, check.digest_covers
            trust = "unproven"
        trusted = trust in ("verified", "described")
        row = {
            "index": index,
            "pcr": event.pcr,
            "type": event.type_name,
            "digests": {bank: d.hex() for bank, d in event.digests.items()},
            "trust": trust,
            "digest_covers": covers,
            # what the data says: as measured only when trusted, else a claim
            "data": _summary(decoded) if trusted else None,
            "decoded": to_jsonable(decoded) if trusted else None,
            "untrusted_claim": None if trusted else _summary(decoded),
            "data_size": len(event.untrusted_data),
            "problems": list(problems),
            "failures": by_event.get(index, []),  # step 3
        }
        events.setdefault(phase_of(event.pcr), {}).setdefault(event.pcr, []).append(row)
    for key, title in PHASES:
        pcrs = events.get(key)
        if pcrs:
            out["phases"].append(
                {
                    "phase": key,
                    "title": title,
                    "pcrs": [{"pcr": p, "events": pcrs[p]} for p in sorted(pcrs)],
                }
            )
    return out
