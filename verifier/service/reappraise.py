"""Re-appraise stored evidence against a policy, without a new quote (issue 20).

The verifier keeps each attester's latest evidence: PCR values and event log in
``latest_evidence`` (migration 0007), the TPMS_ATTEST and TPMT_SIGNATURE in the
report of the result it produced (``report.evidence``), the nonce in that
result. Re-appraisal runs the service's own appraiser over exactly those bytes
again, with the original nonce:

  1. read the stored evidence (attester, its AK, its lineage flags, the latest
     result and its verdict, the assigned policy);
  2. appraise it with the same ``Appraiser.appraise`` as fresh evidence: quote
     signature and nonce, log replay, every rule of the policy, held against
     the re-appraisal time (``valid_until`` windows end by the clock of now).
     The quote's PCR selection stands for the challenge's (the challenge was
     checked when the quote arrived; the policy's own rules name any PCR the
     new policy needs and the quote lacks);
  3. the attester's lineage flags still make the verdict contraindicated.

What a re-appraisal does NOT prove: that the attester still runs what it ran.
Its freshness is the original evidence's (``evidence_received_at``), said in
the result's report (``report.reappraisal``) and in the EAR
(``vtpm.reappraisal``); ``iat`` is the time of the re-appraisal. Recorded
re-appraisals therefore never move an attester's deadline past what the
original evidence earned: a trusted verdict on evidence older than the stale
deadline leaves the attester stale.

``dry_run`` writes nothing. ``apply`` assigns the policy and records each new
verdict as a result, with state and transitions as fresh evidence would
(``services.py`` evidence step 3, transitions and their webhook deliveries by
``transitions.record``), one transaction per attester; an attester
whose latest result changed while it was re-appraised is skipped, never
overwritten.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from verifier.dbx import DbxUpdate, scan
from verifier.eventlog import EventLog
from verifier.service.config import ServiceConfig
from verifier.service.db import Database
from verifier.service.messages import EvidenceRequest
from verifier.service.models import Attester, LatestEvidence, Policy, Result
from verifier.service.ports import Appraisal, Appraiser
from verifier.service.transitions import NewTransition, record
from vtpm_core.errors import NotFoundError, ParseError, VtpmTrustError
from vtpm_core.tpm import Attest, PcrValues, QuoteInfo

__all__ = [
    "REAPPRAISAL_FRESHNESS",
    "Reappraisal",
    "ReappraisalRequest",
    "ReappraisalService",
    "StoredEvidence",
    "reappraise",
]

Clock = Callable[[], datetime]

REAPPRAISAL_FRESHNESS = "original-evidence"
_TRUSTED_VERDICTS = frozenset({"affirming", "warning"})
_MAX_ATTESTERS = 10_000  # ids named in one request (the whole fleet: "fleet")
_BATCH = 500

# apply's writes, one transaction per attester (the evidence path's statements, services.py)
_LOCK_ATTESTER = "SELECT latest_result_id, state, flags, cadence_s FROM attesters WHERE id = :aid"
_ASSIGN_UPSERT = (
    "INSERT INTO assignments (attester_id, policy_name) VALUES (:aid, :p)"
    " ON CONFLICT (attester_id) DO UPDATE SET policy_name = excluded.policy_name"
)
_RESULT_INSERT = (
    "INSERT INTO results (attester_id, created_at, status, policy_name, nonce, report, ear)"
    " VALUES (:aid, :now, :status, :policy, :n, :report, :ear) RETURNING id"
)
# last_evidence_at stays: no new evidence arrived
_ATTESTER_AFTER = (
    "UPDATE attesters SET latest_result_id = :rid, state = :state,"
    " state_since = CASE WHEN :changed THEN :now ELSE state_since END, deadline = :deadline"
    " WHERE id = :aid"
)
_EVIDENCE_POINT = "UPDATE latest_evidence SET result_id = :rid WHERE attester_id = :aid"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ReappraisalRequest:
    """``POST /v1/policies/{name}/dry-run|apply``: ``{"against": "fleet" | [attester id, ...]}``.

    ``attesters`` None: every attester with stored evidence."""

    attesters: tuple[str, ...] | None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ReappraisalRequest:
        s = "ReappraisalRequest"
        unknown = sorted(set(obj) - {"against"})
        if unknown:
            raise ParseError(s, unknown[0], 0, "unknown field")
        against = obj.get("against")
        if against == "fleet":
            return cls(None)
        if not isinstance(against, list) or not against:
            raise ParseError(s, "against", 0, 'expected "fleet" or a non-empty list of ids')
        if len(against) > _MAX_ATTESTERS:
            raise ParseError(s, "against", 0, f"{len(against)} ids, at most {_MAX_ATTESTERS}")
        for i, value in enumerate(against):
            if not isinstance(value, str) or not 1 <= len(value) <= 36:
                raise ParseError(s, f"against[{i}]", 0, "expected an attester id")
        return cls(tuple(dict.fromkeys(against)))


@dataclass(frozen=True, slots=True)
class StoredEvidence:
    """One attester's latest evidence as the verifier stored it, and what it concluded.

    ``evidence`` None: the result predates stored quotes (nothing to appraise)."""

    attester_id: str
    vm_id: str | None
    result_id: int
    received_at: datetime
    nonce: bytes
    evidence: EvidenceRequest | None
    ak_public: bytes
    flags: tuple[dict[str, Any], ...]
    status: str  # the latest result's verdict
    result_policy: str | None  # the policy that result was appraised under
    failures: tuple[dict[str, Any], ...]  # the latest result's failing rules
    quote_b64: tuple[str, str] | None  # (quote, signature) as stored, carried on
    quote_verified: bool = False  # when stored: the PCRs are the TPM's


@dataclass(frozen=True, slots=True)
class Reappraisal:
    """The verdict stored evidence gets under a policy, beside the one it had."""

    stored: StoredEvidence
    appraisal: Appraisal
    status: str  # the appraisal's, contraindicated when the attester is flagged

    @property
    def changed(self) -> bool:
        return self.status != self.stored.status

    def view(self) -> dict[str, Any]:
        """Which verdict, which rules (expected and actual) and since which evidence."""
        return {
            "attester_id": self.stored.attester_id,
            "vm_id": self.stored.vm_id,
            "from": self.stored.status,
            "to": self.status,
            "from_policy": self.stored.result_policy,
            "evidence_received_at": _iso(self.stored.received_at),
            "failures": [_why(f) for f in self.appraisal.failures],
            "flags": [f.get("flag") for f in self.stored.flags],
            "resolved": sorted(
                {str(f.get("rule")) for f in self.stored.failures}
                - {str(f.get("rule")) for f in self.appraisal.failures}
            ),
        }


def _why(failure: dict[str, Any]) -> dict[str, Any]:
    out = {k: failure.get(k) for k in ("rule", "claim", "message", "expected", "actual")}
    event = failure.get("event")
    if isinstance(event, dict):
        out["event"] = {k: event.get(k) for k in ("index", "pcr", "type")}
    return out


def _pcrs_of(stored: dict[str, Any]) -> dict[str, dict[int, bytes]]:
    return {
        bank: {int(i): bytes.fromhex(v) for i, v in values.items()}
        for bank, values in stored.items()
    }


def _stored(attester: Attester, evidence: LatestEvidence, result: Result) -> StoredEvidence:
    """Step 1: one attester's stored rows as a StoredEvidence (ParseError on a bad row)."""
    report = result.report or {}
    kept = report.get("evidence")
    request: EvidenceRequest | None = None
    quote_b64: tuple[str, str] | None = None
    if isinstance(kept, dict) and "quote" in kept and "signature" in kept:
        try:
            quote_b64 = (str(kept["quote"]), str(kept["signature"]))
            request = EvidenceRequest(
                nonce=bytes.fromhex(result.nonce),
                quote=base64.b64decode(quote_b64[0], validate=True),
                signature=base64.b64decode(quote_b64[1], validate=True),
                pcrs=_pcrs_of(evidence.pcrs),
                event_log=evidence.event_log,
                ak_public=None,
            )
        except (ValueError, binascii.Error, AttributeError) as exc:
            raise ParseError(
                "results.report", "evidence", 0, f"result {result.id}: {exc}"
            ) from None
    return StoredEvidence(
        attester_id=attester.id,
        vm_id=attester.vm_id,
        result_id=result.id,
        received_at=evidence.received_at,
        nonce=bytes.fromhex(result.nonce),
        evidence=request,
        ak_public=attester.ak_public,
        flags=tuple(attester.flags or ()),
        status=result.status,
        result_policy=result.policy_name,
        failures=tuple(report.get("failures") or ()),
        quote_b64=quote_b64,
        quote_verified=bool(evidence.quote_verified),
    )


def reappraise(
    appraiser: Appraiser,
    stored: StoredEvidence,
    policy_body: str | None,
    *,
    now: datetime,
) -> Reappraisal:
    """Steps 2-3 for one stored evidence (``stored.evidence`` must be set)."""
    evidence = stored.evidence
    assert evidence is not None
    attested = Attest.parse(evidence.quote).attested
    selection: dict[str, tuple[int, ...]] = {}
    if isinstance(attested, QuoteInfo):
        selection = {b: tuple(sorted(p)) for b, p in attested.pcr_select.as_sets().items()}
    appraisal = appraiser.appraise(
        ak_public=stored.ak_public,
        nonce=stored.nonce,
        evidence=evidence,
        selection=selection,
        policy_body=policy_body,
        now=now,
    )
    status = "contraindicated" if stored.flags else appraisal.status
    return Reappraisal(stored, appraisal, status)


def _usable(page: list[StoredEvidence]) -> Iterator[StoredEvidence | tuple[str, str]]:
    for s in page:
        if s.evidence is None:
            yield (s.attester_id, "its latest result was stored without the quote")
        else:
            yield s


@dataclass
class ReappraisalService:
    db: Database
    config: ServiceConfig
    appraiser: Appraiser
    clock: Clock

    # -- step 1 ------------------------------------------------------------------------

    def _policy(self, session: Session, name: str) -> Policy:
        policy = session.get(Policy, name)
        if policy is None:
            raise NotFoundError(f"policy {name!r} does not exist")
        return policy

    def stored(
        self, attesters: tuple[str, ...] | None, *, batch: int = _BATCH
    ) -> Iterator[StoredEvidence | tuple[str, str]]:
        """Each named attester's (or, None, every attester's) stored evidence, in id order;
        ``(attester_id, reason)`` for one that has none to re-appraise. An id that is not
        registered is a NotFoundError before anything is yielded."""
        if attesters is not None:
            with self.db.read() as session:
                known = set(session.scalars(select(Attester.id).where(Attester.id.in_(attesters))))
            missing = [a for a in attesters if a not in known]
            if missing:
                raise NotFoundError(f"attester {missing[0]!r} is not registered")
        base = (
            select(Attester, LatestEvidence, Result)
            .join(LatestEvidence, LatestEvidence.attester_id == Attester.id)
            .join(Result, Result.id == LatestEvidence.result_id)
            .order_by(Attester.id)
        )
        if attesters is not None:
            ids = sorted(attesters)
            for i in range(0, len(ids), batch):
                chunk = ids[i : i + batch]
                page = self._page(base.where(Attester.id.in_(chunk)))
                have = {s.attester_id for s in page}
                for a in chunk:
                    if a not in have:
                        yield (a, "no stored evidence")
                yield from _usable(page)
            return
        after = ""
        while True:  # the fleet, by keyset pages of the primary key
            page = self._page(base.where(Attester.id > after).limit(batch))
            yield from _usable(page)
            if len(page) < batch:
                return
            after = page[-1].attester_id

    def _page(self, stmt: Any) -> list[StoredEvidence]:
        with self.db.read() as session:
            return [_stored(a, e, r) for a, e, r in session.execute(stmt).all()]

    # -- dry run -----------------------------------------------------------------------

    def _run(self, name: str, request: ReappraisalRequest, *, record: bool) -> dict[str, Any]:
        """Re-appraise one attester at a time (streamed: only the changed verdicts' views
        are kept, never the evidence), recording each when ``record``."""
        with self.db.read() as session:
            policy = self._policy(session, name)
            session.expunge(policy)
        now = self.clock()
        counts: dict[str, int] = {}
        changed: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        done = 0
        for item in self.stored(request.attesters):
            if isinstance(item, tuple):
                skipped.append({"attester_id": item[0], "reason": item[1]})
                continue
            try:
                r = reappraise(self.appraiser, item, policy.body, now=now)
            except VtpmTrustError as exc:  # stored bytes that no longer parse
                skipped.append({"attester_id": item.attester_id, "reason": str(exc)})
                continue
            result_id = self._record(policy, r, now) if record else None
            if record and result_id is None:
                skipped.append(
                    {
                        "attester_id": item.attester_id,
                        "reason": "new evidence arrived during the re-appraisal",
                    }
                )
                continue
            done += 1
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.changed:
                view = r.view()
                if result_id is not None:
                    view["result_id"] = result_id
                changed.append(view)
        return {
            "policy": policy.name,
            "policy_version": policy.version,
            "policy_sha256": policy.sha256,
            "against": "fleet" if request.attesters is None else list(request.attesters),
            "appraised_at": _iso(now),
            "freshness": REAPPRAISAL_FRESHNESS,
            "applied": record,
            "reappraised": done,
            "verdicts": dict(sorted(counts.items())),
            "changed": changed,
            "unchanged": done - len(changed),
            "skipped": skipped,
        }

    def dry_run(self, name: str, request: ReappraisalRequest) -> dict[str, Any]:
        """Which attesters would change verdict under policy ``name``, and why. Writes nothing."""
        return self._run(name, request, record=False)

    # -- dbx updates ---------------------------------------------------------------------

    def dbx_report(self, update: DbxUpdate) -> dict[str, Any]:
        """Which attesters' stored boots ``update`` revokes (by Authenticode hash,
        certificate or SBAT generation) and which measured a dbx without all of its hash
        entries, or (an SBAT revocation) an SbatLevel behind it. Reads only logs whose
        quote verified, replayed against the quoted PCRs (but PCR 11, which no scan reads
        and systemd-pcrphase extends unlogged). Writes nothing."""
        revoked: list[dict[str, Any]] = []
        stale_dbx: list[dict[str, Any]] = []
        stale_sbat: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        scanned = 0
        for item in self.stored(None):
            if isinstance(item, tuple):
                continue
            ev = item.evidence
            if ev is None or ev.event_log is None:
                skipped.append({"attester_id": item.attester_id, "reason": "no stored event log"})
                continue
            if not item.quote_verified:
                skipped.append({"attester_id": item.attester_id, "reason": "quote did not verify"})
                continue
            try:
                log = EventLog.parse(ev.event_log)
                quoted = PcrValues(ev.pcrs).values
                replayed = log.verify(
                    {b: {i: v for i, v in p.items() if i != 11} for b, p in quoted.items()}
                )
            except VtpmTrustError as exc:
                skipped.append({"attester_id": item.attester_id, "reason": str(exc)})
                continue
            scanned += 1
            found = scan(replayed, update)
            entry = {"attester_id": item.attester_id, "vm_id": item.vm_id, **found.to_json()}
            if found.revoked:
                revoked.append(entry)
            if update.sbat is None and not found.current:
                stale_dbx.append(entry)
            if not found.sbat_current:
                stale_sbat.append(entry)
        return {
            "update": update.summary(),
            "scanned": scanned,
            "revoked": revoked,
            "old_dbx": stale_dbx,
            "old_sbat": stale_sbat,
            "skipped": skipped,
        }

    # -- apply -------------------------------------------------------------------------

    def apply(self, name: str, request: ReappraisalRequest) -> dict[str, Any]:
        """Assign policy ``name`` to each attester re-appraised and record its new verdict
        as a re-appraisal result (state and transition as for evidence)."""
        return self._run(name, request, record=True)

    def _record(self, policy: Policy, r: Reappraisal, now: datetime) -> int | None:
        s = r.stored
        a = r.appraisal
        marker = {
            "of_result": s.result_id,
            "evidence_received_at": _iso(s.received_at),
            "appraised_at": _iso(now),
            "freshness": REAPPRAISAL_FRESHNESS,
            "policy": policy.name,
            "policy_version": policy.version,
        }
        with self.db.raw() as conn, conn.write():
            locked = conn.one(_LOCK_ATTESTER + conn.for_update, {"aid": s.attester_id})
            if locked is None or locked[0] != s.result_id:
                return None
            old_state, flags_json, cadence = locked[1], locked[2], locked[3]
            flags = list(conn.json_out(flags_json) or [])
            conn.run(_ASSIGN_UPSERT, {"aid": s.attester_id, "p": policy.name})
            report: dict[str, Any] = {
                "status": r.status,
                "appraisal_status": a.status,
                "quote_verified": a.quote_verified,
                "failures": list(a.failures),
                "warnings": list(a.warnings),
                "flags": flags,
                "new_flags": [],
                "trust_vector": a.trust_vector,
                "policy": policy.name,
                "policy_id": a.policy_id,
                "policy_sha256": policy.sha256,
                "reappraisal": marker,
                "clock": None
                if a.clock is None
                else {
                    "clock": a.clock.clock,
                    "reset_count": a.clock.reset_count,
                    "restart_count": a.clock.restart_count,
                    "safe": a.clock.safe,
                },
            }
            if s.quote_b64 is not None:
                report["evidence"] = {"quote": s.quote_b64[0], "signature": s.quote_b64[1]}
            ear = self.appraiser.sign_result(
                a,
                status=r.status,
                nonce=s.nonce,
                attester_id=s.attester_id,
                flags=flags,
                reappraisal=marker,
            )
            inserted = conn.one(
                _RESULT_INSERT,
                {
                    "aid": s.attester_id,
                    "now": conn.ts(now),
                    "status": r.status,
                    "policy": policy.name,
                    "n": s.nonce.hex(),
                    "report": conn.json_in(report),
                    "ear": ear,
                },
            )
            assert inserted is not None
            result_id = int(inserted[0])
            state, deadline = self._state(cadence, r.status, s.received_at, now)
            conn.run(
                _ATTESTER_AFTER,
                {
                    "aid": s.attester_id,
                    "rid": result_id,
                    "state": state,
                    "changed": state != old_state,
                    "now": conn.ts(now),
                    "deadline": None if deadline is None else conn.ts(deadline),
                },
            )
            conn.run(_EVIDENCE_POINT, {"aid": s.attester_id, "rid": result_id})
            if state != old_state:
                # the one writer of transitions: its webhook deliveries commit with it
                cause = {
                    "verdict": r.status,
                    "failures": [f.get("rule") for f in a.failures],
                    "flags": [f.get("flag") for f in flags],
                    "reappraisal": marker,
                }
                record(
                    conn,
                    [NewTransition(s.attester_id, old_state, state, now, cause, result_id)],
                )
            return result_id

    def _state(
        self, cadence_s: int | None, status: str, received_at: datetime, now: datetime
    ) -> tuple[str, datetime | None]:
        """The state a re-appraisal leaves: failed on contraindicated; otherwise trusted
        until the deadline the original evidence earned, stale once that has passed."""
        if status not in _TRUSTED_VERDICTS:
            return "failed", None
        cadence = cadence_s or self.config.attest_cadence_s
        deadline = received_at + timedelta(seconds=cadence * self.config.stale_grace)
        if deadline <= now:
            return "stale", None
        return "trusted", deadline
