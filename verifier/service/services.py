"""The attestation service's use cases: registration, activation, challenges, evidence, results,
policies. Views call these; these own the transactions.

Flows (DESIGN.md "Flows" 2-4; RFC 9334 section 5.1, background-check model):

Registration -> activation (TPM 2.0 Part 3, 12.5 TPM2_ActivateCredential):
  1. the appraiser checks the EK chain, the EK/cert key match and the AK;
  2. the same EK already registered under another VM id flags every attester
     holding it ("ek-shared"): a copy-cloned vTPM;
  3. MakeCredential binds a random secret to (EK, AK name); only its SHA-256
     is stored; activation compares it in constant time and hands out the
     attester's token. Evidence is refused until then.

Evidence (single transaction for every write):
  1. parse (ParseError -> 400, nothing written, nonce not consumed);
  2. verify + appraise outside the write transaction (CPU only);
  3. in one transaction: consume the nonce with a conditional UPDATE (exactly
     one of N concurrent submissions matches a row), check lineage against the
     attester's high-water marks, insert the result, update the attester and
     its state (issue 16: trusted for affirming/warning, failed otherwise; a
     trusted attester's deadline moves to now + cadence x grace), and record a
     transition when the state changed;
  4. the runtime (IMA) part (issue 14): step 2 extends the attester's IMA state
     as read in step 1; step 3, under the attester's lock, checks the stored
     state is still that one (else 409: a concurrent evidence moved it, nothing
     is recorded) and stores the new state when the delta passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from verifier.service.config import ServiceConfig, hash_token, new_token
from verifier.service.db import Database, RawConnection
from verifier.service.errors import ExpiredError, TokenMismatchError
from verifier.service.messages import (
    ActivationRequest,
    EvidenceRequest,
    FaultReport,
    PolicyRequest,
    RegistrationRequest,
)
from verifier.service.metrics import Metrics
from verifier.service.models import (
    ActivationChallenge,
    Assignment,
    Attester,
    AttesterTransition,
    ImaStateRow,
    LatestEvidence,
    Nonce,
    Policy,
    Result,
)
from verifier.service.ports import Appraisal, Appraiser, CheckedRegistration, ImaState
from verifier.service.reappraise import ReappraisalService
from verifier.service.transitions import NewTransition, record
from vtpm_core.errors import (
    ConflictError,
    ConstraintError,
    NotFoundError,
    PermissionDeniedError,
    StateError,
)

__all__ = [
    "AttesterService",
    "EvidenceService",
    "PolicyService",
    "Services",
    "make_services",
]

Clock = Callable[[], datetime]
Random = Callable[[int], bytes]

_NONCE_BYTES = 32
_REGISTRATION_LOCK = 0x7654_5247  # advisory-lock namespace ("vtRG") for registrations
_ACTIVATION_ATTEMPTS = 5
# Lineage flags (issue 6, "Identity and lineage"); each makes results contraindicated.
FLAG_EK_SHARED = "ek-shared"
FLAG_AK_SWAPPED = "ak-not-activated"
FLAG_RESET_BACK = "reset-count-regressed"
FLAG_RESTART_BACK = "restart-count-regressed"
FLAG_CLOCK_BACK = "clock-regressed"
# EAR statuses that leave an attester trusted (issue 16); contraindicated fails it
_TRUSTED_VERDICTS = frozenset({"affirming", "warning"})


# Hot-path SQL (challenge, evidence), run by the driver on a bare connection
# (db.RawConnection): SQLAlchemy's per-statement machinery cost more than the
# statements. The attester's token digest comes with the row every hot path
# reads anyway; no separate token lookup.
_CHALLENGE_READ = (
    "SELECT a.activated_at, a.token_sha256, p.name, p.body,"
    " i.reset_count, i.restart_count, i.entry_count, i.policy_digest FROM attesters a"
    " LEFT JOIN assignments s ON s.attester_id = a.id"
    " LEFT JOIN policies p ON p.name = s.policy_name"
    " LEFT JOIN ima_state i ON i.attester_id = a.id"
    " WHERE a.id = :aid"
)
_NONCE_INSERT = (
    "INSERT INTO nonces (nonce, attester_id, pcr_selection, policy_name, created_at,"
    " expires_at, used, used_at)"
    " VALUES (:nonce, :aid, :sel, :policy, :now, :expires, :false, NULL)"
)
_NONCE_PURGE = "DELETE FROM nonces WHERE attester_id = :aid AND expires_at < :now"
_SUBMIT_READ = (
    "SELECT a.activated_at, a.token_sha256, a.ak_public, a.ak_name,"
    " n.attester_id, n.used, n.expires_at, n.pcr_selection, n.policy_name, p.body, p.sha256,"
    " i.reset_count, i.restart_count, i.entry_count, i.policy_digest, i.progress"
    " FROM attesters a"
    " LEFT JOIN nonces n ON n.nonce = :n"
    " LEFT JOIN policies p ON p.name = n.policy_name"
    " LEFT JOIN ima_state i ON i.attester_id = a.id"
    " WHERE a.id = :aid"
)
# the IMA state again, under the attester's lock (step 4): still the one appraised from?
_IMA_READ = "SELECT progress FROM ima_state WHERE attester_id = :aid"
_IMA_UPSERT = (
    "INSERT INTO ima_state (attester_id, reset_count, restart_count, entry_count,"
    " policy_digest, progress, updated_at) VALUES (:aid, :r, :s, :c, :pd, :pg, :now)"
    " ON CONFLICT (attester_id) DO UPDATE SET reset_count = excluded.reset_count,"
    " restart_count = excluded.restart_count, entry_count = excluded.entry_count,"
    " policy_digest = excluded.policy_digest, progress = excluded.progress,"
    " updated_at = excluded.updated_at"
)
# the single-use rule: exactly one transaction can match this row
_NONCE_CONSUME = (
    "UPDATE nonces SET used = :true, used_at = :now"
    " WHERE nonce = :n AND attester_id = :aid AND used = :false AND expires_at > :now"
)
_ATTESTER_MARKS = (
    "SELECT flags, status, reset_count, restart_count, clock, state FROM attesters WHERE id = :aid"
)
# PostgreSQL: one round trip each. The UPDATE's row lock makes a concurrent
# consumer of the same nonce wait and then re-check "used = false" (no row);
# FOR UPDATE OF a serialises evidence of one attester for the lineage marks.
_CONSUME_AND_LOCK_PG = (
    "WITH c AS (UPDATE nonces SET used = :true, used_at = :now"
    " WHERE nonce = :n AND attester_id = :aid AND used = :false AND expires_at > :now"
    " RETURNING attester_id)"
    " SELECT a.flags, a.status, a.reset_count, a.restart_count, a.clock, a.state"
    " FROM attesters a JOIN c ON c.attester_id = a.id FOR UPDATE OF a"
)
_RESULT_INSERT = (
    "INSERT INTO results (attester_id, created_at, status, policy_name, nonce, report, ear)"
    " VALUES (:aid, :now, :status, :policy, :n, :report, :ear) RETURNING id"
)
# ... and the attester's state (issue 16): state_since moves only when the state
# changes (:changed compares with the state read under the row lock)
_ATTESTER_AFTER = (
    "UPDATE attesters SET latest_result_id = :rid, flags = :flags, status = :astatus,"
    " reset_count = :r, restart_count = :s, clock = :k,"
    " state = :state, state_since = CASE WHEN :changed THEN :now ELSE state_since END,"
    " last_evidence_at = :now, cadence_s = :cadence, deadline = :deadline WHERE id = :aid"
)
_RESULT_AND_ATTESTER_PG = (
    "WITH r AS (INSERT INTO results (attester_id, created_at, status, policy_name, nonce,"
    " report, ear) VALUES (:aid, :now, :status, :policy, :n, :report, :ear) RETURNING id)"
    " UPDATE attesters SET latest_result_id = (SELECT id FROM r), flags = :flags,"
    " status = :astatus, reset_count = :r, restart_count = :s, clock = :k,"
    " state = :state, state_since = CASE WHEN :changed THEN :now ELSE state_since END,"
    " last_evidence_at = :now, cadence_s = :cadence, deadline = :deadline"
    " WHERE id = :aid RETURNING latest_result_id"
)
# the evidence behind the latest result, for the console's timeline (migration 0007)
_EVIDENCE_UPSERT = (
    "INSERT INTO latest_evidence (attester_id, result_id, received_at, quote_verified, pcrs,"
    " event_log) VALUES (:aid, :rid, :now, :qv, :pcrs, :log)"
    " ON CONFLICT (attester_id) DO UPDATE SET result_id = excluded.result_id,"
    " received_at = excluded.received_at, quote_verified = excluded.quote_verified,"
    " pcrs = excluded.pcrs, event_log = excluded.event_log"
)
# an agent's fault report (issue 16): the attester fails closed, no deadline
_FAULT_READ = "SELECT token_sha256, activated_at, state FROM attesters WHERE id = :aid"
_FAULT_MARK = (
    "UPDATE attesters SET state = 'failed', deadline = NULL,"
    " state_since = CASE WHEN :changed THEN :now ELSE state_since END WHERE id = :aid"
)
_NONCE_STATE = "SELECT attester_id, used, expires_at FROM nonces WHERE nonce = :n"


def _token_ok(presented: str | None, stored: str | None) -> bool:
    """``presented`` None: the caller is already authorised (the admin)."""
    if presented is None:
        return True
    return stored is not None and hmac.compare_digest(presented, stored)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t else None


def _flag(code: str, detail: str, at: datetime) -> dict[str, Any]:
    return {"flag": code, "detail": detail, "at": _iso(at)}


def _get_attester(session: Session, attester_id: str, *, lock: bool = False) -> Attester:
    stmt = select(Attester).where(Attester.id == attester_id)
    if lock:
        stmt = stmt.with_for_update()
    attester = session.scalar(stmt)
    if attester is None:
        raise NotFoundError(f"attester {attester_id!r} is not registered")
    return attester


def result_view(result: Result) -> dict[str, Any]:
    return {
        "id": result.id,
        "attester_id": result.attester_id,
        "created_at": _iso(result.created_at),
        "status": result.status,
        "policy": result.policy_name,
        "nonce": result.nonce,
        "report": result.report,
        "ear": result.ear,
    }


def attester_view(attester: Attester, latest: Result | None, policy: str | None) -> dict[str, Any]:
    return {
        "id": attester.id,
        "vm_id": attester.vm_id,
        "status": attester.status,
        "activated": attester.activated_at is not None,
        "flags": attester.flags,
        "identity": attester.identity,
        "ek_fingerprint": attester.ek_fingerprint,
        "ak_name": attester.ak_name,
        "policy": policy,
        "created_at": _iso(attester.created_at),
        "activated_at": _iso(attester.activated_at),
        "clock": None
        if attester.reset_count is None
        else {
            "reset_count": attester.reset_count,
            "restart_count": attester.restart_count,
            "clock": attester.clock,
        },
        "latest_result": result_view(latest) if latest is not None else None,
        **state_view(attester),
    }


def state_view(attester: Attester) -> dict[str, Any]:
    """The attester's continuous-attestation state (issue 16)."""
    return {
        "state": attester.state,
        "state_since": _iso(attester.state_since),
        "deadline": _iso(attester.deadline),
        "last_evidence_at": _iso(attester.last_evidence_at),
        "cadence_s": attester.cadence_s,
    }


def transition_view(t: AttesterTransition) -> dict[str, Any]:
    """One recorded state change (issue 16) and its cause."""
    return {
        "id": t.id,
        "from_state": t.from_state,
        "to_state": t.to_state,
        "at": _iso(t.at),
        "cause": t.cause,
        "result_id": t.result_id,
    }


@dataclass
class AttesterService:
    db: Database
    config: ServiceConfig
    appraiser: Appraiser
    clock: Clock = utc_now
    random: Random = secrets.token_bytes

    def register(self, request: RegistrationRequest, *, admin: bool) -> dict[str, Any]:
        """Steps 1-3 of registration; returns the attester id and the credential challenge."""
        checked = self.appraiser.check_registration(request, allow_bare_ek=admin)
        vm_id = checked.vm_id or request.vm_id
        if checked.vm_id and request.vm_id and request.vm_id != checked.vm_id:
            raise PermissionDeniedError(
                f"vm_id {request.vm_id!r} contradicts the EK certificate's VM id {checked.vm_id!r}"
            )
        secret = self.random(32)
        credential = self.appraiser.make_credential(checked.ek_public, checked.ak_name, secret)
        now = self.clock()
        try:
            attester_id, status, expires_at = self._store_registration(checked, vm_id, secret, now)
        except IntegrityError:
            # a concurrent registration of the same EK and VM id inserted first
            # (the unique index, migration 0002): this one now finds its row
            attester_id, status, expires_at = self._store_registration(checked, vm_id, secret, now)
        return {
            "attester_id": attester_id,
            "status": status,
            "credential_blob": _b64(credential.credential_blob),
            "encrypted_secret": _b64(credential.encrypted_secret),
            "activation_expires_at": _iso(expires_at),
        }

    def _store_registration(
        self, checked: CheckedRegistration, vm_id: str | None, secret: bytes, now: datetime
    ) -> tuple[str, str, datetime]:
        """Steps 2-3 in one transaction: the attester row (new, or the one this EK and
        VM id already have), ek-shared flags, and the pending activation."""
        with self.db.transaction() as session:
            if self.db.dialect == "postgresql":
                # registrations of one EK one at a time: the FOR UPDATE below
                # locks nothing while no attester holds the EK yet, and two
                # first registrations under different VM ids must see each
                # other to flag "ek-shared" (SQLite: BEGIN IMMEDIATE already)
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:ns, :k)"),
                    {"ns": _REGISTRATION_LOCK, "k": int(checked.ek_fingerprint[:7], 16)},
                )
            same_ek = list(
                session.scalars(
                    select(Attester)
                    .where(Attester.ek_fingerprint == checked.ek_fingerprint)
                    .with_for_update()
                )
            )
            attester = next((a for a in same_ek if a.vm_id == vm_id), None)
            if attester is None:
                attester = Attester(
                    id=str(uuid.uuid4()),
                    vm_id=vm_id,
                    ek_fingerprint=checked.ek_fingerprint,
                    ek_public=checked.ek_public,
                    ek_certificate=checked.ek_certificate,
                    identity=checked.identity,
                    ak_public=checked.ak_public,
                    ak_name=checked.ak_name.hex(),
                    status="pending_activation",
                    flags=[],
                    created_at=now,
                )
                session.add(attester)
            others = [a for a in same_ek if a.id != attester.id and a.vm_id != vm_id]
            if others:
                # step 2: one EK under several VM ids is a copied vTPM
                ids = sorted(a.id for a in [*others, attester])
                for a in [*others, attester]:
                    if not any(f.get("flag") == FLAG_EK_SHARED for f in a.flags):
                        detail = f"the same EK is registered by attesters {', '.join(ids)}"
                        a.flags = [*a.flags, _flag(FLAG_EK_SHARED, detail, now)]
                    a.status = "flagged"
            session.flush()
            challenge = session.get(ActivationChallenge, attester.id)
            if challenge is None:
                challenge = ActivationChallenge(attester_id=attester.id, attempts=0)
                session.add(challenge)
            challenge.secret_sha256 = hashlib.sha256(secret).hexdigest()
            challenge.ak_public = checked.ak_public
            challenge.ak_name = checked.ak_name.hex()
            challenge.expires_at = now + timedelta(seconds=self.config.activation_lifetime_s)
            challenge.attempts = 0
            return attester.id, attester.status, challenge.expires_at

    def activate(self, attester_id: str, request: ActivationRequest) -> dict[str, Any]:
        """Compare the returned secret; on success issue the attester's token (shown once)."""
        now = self.clock()
        failure: Exception | None = None
        token = new_token()
        with self.db.transaction() as session:
            attester = _get_attester(session, attester_id, lock=True)
            challenge = session.get(ActivationChallenge, attester_id, with_for_update=True)
            if challenge is None:
                raise StateError(f"attester {attester_id} has no pending activation")
            if challenge.expires_at <= now:
                session.delete(challenge)
                failure = ExpiredError("the activation challenge expired; register again")
            elif not hmac.compare_digest(
                hashlib.sha256(request.secret).hexdigest(), challenge.secret_sha256
            ):
                challenge.attempts += 1
                if challenge.attempts >= _ACTIVATION_ATTEMPTS:
                    session.delete(challenge)
                failure = PermissionDeniedError(
                    "activation secret does not match: the AK is not in the TPM that holds the EK"
                )
            else:
                attester.ak_public = challenge.ak_public
                attester.ak_name = challenge.ak_name
                attester.token_sha256 = hash_token(token)
                attester.activated_at = now
                if attester.status == "pending_activation":
                    attester.status = "active"
                session.delete(challenge)
                status = attester.status
        if failure is not None:
            raise failure  # after the commit: attempts and expiry are recorded
        return {"attester_id": attester_id, "status": status, "token": token}

    def get(self, attester_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            attester = _get_attester(session, attester_id)
            latest = (
                session.get(Result, attester.latest_result_id)
                if attester.latest_result_id is not None
                else None
            )
            assignment = session.get(Assignment, attester_id)
            view = attester_view(attester, latest, assignment.policy_name if assignment else None)
            ima = session.get(ImaStateRow, attester_id)
            view["ima"] = (
                None
                if ima is None
                else {
                    "reset_count": ima.reset_count,
                    "restart_count": ima.restart_count,
                    "entry_count": ima.entry_count,
                    "runtime_policy_sha256": ima.policy_digest,
                    "updated_at": _iso(ima.updated_at),
                }
            )
            return view

    def list_page(self, state: str | None, after: str | None, limit: int) -> dict[str, Any]:
        """One page of attesters in id order, within ``state`` when given, starting after the
        id ``after``; ``next`` is the cursor of the following page (None: this was the last).

        A keyset read of ``limit + 1`` entries from ``ix_attesters_state_id`` (with a state)
        or the primary key: the cost of a page does not grow with the fleet or the page
        number. An attester that changes state while a client pages appears in the pages of
        the state it had when each page was read (no snapshot across pages).
        """
        cols = (
            Attester.id,
            Attester.vm_id,
            Attester.status,
            Attester.flags,
            Attester.state,
            Attester.state_since,
            Attester.deadline,
            Attester.last_evidence_at,
            Attester.cadence_s,
        )
        stmt = select(*cols).order_by(Attester.id).limit(limit + 1)
        if state is not None:
            stmt = stmt.where(Attester.state == state)  # = on the index's first column
        if after is not None:
            stmt = stmt.where(Attester.id > after)
        with self.db.read() as session:
            rows = session.execute(stmt).all()
        page = [
            {
                "id": r.id,
                "vm_id": r.vm_id,
                "status": r.status,
                "flags": r.flags,
                "state": r.state,
                "state_since": _iso(r.state_since),
                "deadline": _iso(r.deadline),
                "last_evidence_at": _iso(r.last_evidence_at),
                "cadence_s": r.cadence_s,
            }
            for r in rows[:limit]
        ]
        return {"attesters": page, "next": page[-1]["id"] if len(rows) > limit else None}

    def history(self, attester_id: str, after: int | None, limit: int) -> dict[str, Any]:
        """The attester's state transitions, newest first, from before the transition id
        ``after`` when given; ``next`` as in :meth:`list_page`. Reads
        ``ix_attester_transitions_attester_id`` backwards, ``limit + 1`` entries."""
        stmt = (
            select(AttesterTransition)
            .where(AttesterTransition.attester_id == attester_id)
            .order_by(AttesterTransition.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            stmt = stmt.where(AttesterTransition.id < after)
        with self.db.read() as session:
            _get_attester(session, attester_id)
            rows = session.scalars(stmt).all()
            page = [transition_view(t) for t in rows[:limit]]
        return {
            "attester_id": attester_id,
            "transitions": page,
            "next": str(page[-1]["id"]) if len(rows) > limit else None,
        }

    def delete(self, attester_id: str) -> None:
        with self.db.transaction() as session:
            attester = _get_attester(session, attester_id, lock=True)
            for table in (
                Nonce,
                Result,
                Assignment,
                ActivationChallenge,
                AttesterTransition,
                LatestEvidence,
                ImaStateRow,
            ):
                session.execute(delete(table).where(table.attester_id == attester_id))
            session.delete(attester)

    def results(self, attester_id: str, limit: int) -> list[dict[str, Any]]:
        with self.db.read() as session:
            _get_attester(session, attester_id)
            rows = session.scalars(
                select(Result)
                .where(Result.attester_id == attester_id)
                .order_by(Result.id.desc())
                .limit(limit)
            ).all()
            return [result_view(r) for r in rows]


@dataclass
class EvidenceService:
    db: Database
    config: ServiceConfig
    appraiser: Appraiser
    metrics: Metrics
    clock: Clock = utc_now
    random: Random = secrets.token_bytes
    # called after a transition committed (the app wakes its webhook deliverer)
    on_transition: Callable[[], None] | None = None

    def challenge(self, attester_id: str, *, token_sha256: str | None = None) -> dict[str, Any]:
        """A fresh nonce bound to the attester, and the PCR selection its policy needs.

        ``token_sha256``: the caller's token digest, which must be the attester's
        (None: an admin, already authorised).
        """
        now = self.clock()
        nonce = self.random(_NONCE_BYTES)
        expires = now + timedelta(seconds=self.config.nonce_lifetime_s)
        # Two statements, each its own transaction: the nonce row stands alone,
        # and an attester deleted in between fails the insert's foreign key.
        with self.db.raw() as conn:
            row = conn.one(_CHALLENGE_READ, {"aid": attester_id})
            if row is None or not _token_ok(token_sha256, row[1]):
                if token_sha256 is not None:
                    raise TokenMismatchError("the token is not this attester's")
                raise NotFoundError(f"attester {attester_id!r} is not registered")
            activated_at, _token, policy_name, policy_body = row[:4]
            if activated_at is None:
                raise StateError(f"attester {attester_id} is not activated yet")
            selection = (
                self.appraiser.check_policy(policy_body)
                if policy_body is not None
                else self.config.default_pcr_selection
            )
            pcr_selection = {bank: list(pcrs) for bank, pcrs in selection.items()}
            with conn.writing():
                if nonce[-1] < 8:
                    # housekeeping on ~1 in 32 challenges (the nonce's last byte is
                    # uniform): this attester's expired nonces are of no use any more
                    conn.run(_NONCE_PURGE, {"aid": attester_id, "now": conn.ts(now)})
                try:
                    conn.run(
                        _NONCE_INSERT,
                        {
                            "nonce": nonce.hex(),
                            "aid": attester_id,
                            "sel": conn.json_in(pcr_selection),
                            "policy": policy_name,
                            "now": conn.ts(now),
                            "expires": conn.ts(expires),
                            "false": False,
                        },
                    )
                except ConstraintError:
                    raise NotFoundError(f"attester {attester_id!r} is not registered") from None
        self.metrics.challenges.inc()
        out: dict[str, Any] = {
            "nonce": _b64(nonce),
            "expires_at": _iso(expires),
            "pcr_selection": pcr_selection,
            "policy": policy_name,
        }
        runtime = (
            self.appraiser.runtime_policy_digest(policy_body) if policy_body is not None else None
        )
        if runtime is not None:
            out["ima"] = _ima_hint(runtime, row[4:8])
        return out

    @staticmethod
    def _nonce_problem(conn: RawConnection, attester_id: str, nonce_hex: str) -> Exception:
        row = conn.one(_NONCE_STATE, {"n": nonce_hex})
        if row is None or not hmac.compare_digest(row[0], attester_id):
            return NotFoundError("unknown nonce: not issued to this attester (or already purged)")
        if row[1]:
            return ConflictError("nonce already used: each challenge answers once")
        return ExpiredError(f"nonce expired at {_iso(conn.from_ts(row[2]))}")

    def _consume(
        self, conn: RawConnection, attester_id: str, nonce_hex: str, now: datetime
    ) -> tuple[Any, ...]:
        """Consume the nonce (the single-use rule) and lock the attester: its flags,
        status and clock high-water marks. Inside the write transaction."""
        params = {"n": nonce_hex, "aid": attester_id, "now": conn.ts(now)}
        params.update(true=True, false=False)
        if conn.sqlite:
            row = None
            if conn.run(_NONCE_CONSUME, params) == 1:
                row = conn.one(_ATTESTER_MARKS, params)
        else:
            row = conn.one(_CONSUME_AND_LOCK_PG, params)
        if row is None:
            # consumed by a concurrent submission, expired meanwhile, or the
            # attester (and with it its nonces) deleted since the read
            self.metrics.nonce_rejections.inc()
            raise self._nonce_problem(conn, attester_id, nonce_hex)
        return row

    @staticmethod
    def _check_ima_unmoved(
        conn: RawConnection, attester_id: str, appraised_from: ImaState | None
    ) -> None:
        """Step 4: the stored IMA state is still the one step 2 extended (the attester's
        row is locked: no other evidence can move it until this commits). Two evidences
        racing from one state: the second is refused here, before it records anything."""
        row = conn.one(_IMA_READ, {"aid": attester_id})
        now_stored = None if row is None else bytes(row[0])
        before = None if appraised_from is None else appraised_from.progress
        if now_stored is None and before is None:
            return
        if now_stored is None or before is None or not hmac.compare_digest(now_stored, before):
            raise ConflictError(
                "ima.state: the attester's IMA state moved while this evidence was appraised "
                "(another evidence was accepted first): ask for a new challenge and send "
                "the entries from its ima.next_index"
            )

    def submit(
        self, attester_id: str, evidence: EvidenceRequest, *, token_sha256: str | None = None
    ) -> dict[str, Any]:
        """Steps 1-3 of evidence; returns the stored result (with its EAR).

        ``token_sha256``: the caller's token digest, which must be the attester's
        (None: already authorised by the caller).
        """
        now = self.clock()
        nonce_hex = evidence.nonce.hex()
        with self.db.raw() as conn:
            row = conn.one(_SUBMIT_READ, {"n": nonce_hex, "aid": attester_id})
            if row is None or not _token_ok(token_sha256, row[1]):
                if token_sha256 is not None:
                    raise TokenMismatchError("the token is not this attester's")
                raise NotFoundError(f"attester {attester_id!r} is not registered")
            (activated_at, _token, ak_public, ak_name, nonce_owner, used, expires_at) = row[:7]
            pcr_selection, policy_name, policy_body, policy_sha = row[7:11]
            ima_state = _ima_state(row[11:16])
            if activated_at is None:
                raise StateError(f"attester {attester_id} is not activated: no evidence accepted")
            if (
                used is None
                or used
                or conn.from_ts(expires_at) <= now  # type: ignore[operator]
                or not hmac.compare_digest(nonce_owner, attester_id)
            ):
                raise self._nonce_problem(conn, attester_id, nonce_hex)
            selection = {bank: tuple(p) for bank, p in conn.json_out(pcr_selection).items()}
            if policy_name is not None and policy_body is None:
                raise ConflictError(f"policy {policy_name!r} was deleted after the challenge")
            ak_public = bytes(ak_public)

            # step 2: CPU-only work, no lock held
            with self.metrics.appraisal_seconds.time():
                appraisal = self.appraiser.appraise(
                    ak_public=ak_public,
                    nonce=evidence.nonce,
                    evidence=evidence,
                    selection=selection,
                    policy_body=policy_body,
                    now=now,
                    ima_state=ima_state,
                    appraise_runtime=True,
                )
            new_flags: list[dict[str, Any]] = []
            if evidence.ak_public is not None:
                presented = _ak_name_of(self.appraiser, evidence.ak_public)
                if not hmac.compare_digest(presented, ak_name):
                    new_flags.append(
                        _flag(
                            FLAG_AK_SWAPPED,
                            f"evidence names AK {presented[:16]}..., "
                            f"activated AK is {ak_name[:16]}...",
                            now,
                        )
                    )

            # step 3: one transaction for every write
            with conn.write():
                marks_row = self._consume(conn, attester_id, nonce_hex, now)
                if appraisal.ima is not None:
                    self._check_ima_unmoved(conn, attester_id, ima_state)
                old_flags, old_status, *old_marks, old_state = marks_row
                lineage_flags, marks = _lineage(
                    (old_marks[0], old_marks[1], old_marks[2]), appraisal, now
                )
                new_flags += lineage_flags
                known = conn.json_out(old_flags)
                flags = [*known, *new_flags]  # this result's: the attester's and today's
                # the attester keeps the first flag of each kind: a flagged attester
                # repeating a regression cannot grow its row (and every later
                # result and EAR) without bound; each result still names its own
                seen = {f.get("flag") for f in known}
                kept = [*known, *(f for f in new_flags if f["flag"] not in seen)]
                status = "contraindicated" if flags else appraisal.status
                report = {
                    "status": status,
                    "appraisal_status": appraisal.status,
                    "quote_verified": appraisal.quote_verified,
                    "failures": list(appraisal.failures),
                    "warnings": list(appraisal.warnings),
                    "flags": flags,
                    "new_flags": new_flags,
                    "trust_vector": appraisal.trust_vector,
                    "policy": policy_name,
                    "policy_id": appraisal.policy_id,
                    "policy_sha256": policy_sha,
                    # what re-appraisal needs besides latest_evidence (issue 20)
                    "evidence": {
                        "quote": _b64(evidence.quote),
                        "signature": _b64(evidence.signature),
                    },
                    "clock": None
                    if appraisal.clock is None
                    else {
                        "clock": appraisal.clock.clock,
                        "reset_count": appraisal.clock.reset_count,
                        "restart_count": appraisal.clock.restart_count,
                        "safe": appraisal.clock.safe,
                    },
                }
                # step 4: a delta that passed moves the state; lineage flags (a
                # regressed clock) keep it where it was, like the marks
                store_ima = appraisal.ima_state is not None and not new_flags
                if appraisal.ima is not None:
                    report["ima"] = {**appraisal.ima, "state_stored": store_ima}
                    if not store_ima and "start_index" in appraisal.ima:
                        # not moved: the verified list still stands where this delta began
                        report["ima"]["next_index"] = appraisal.ima["start_index"]
                ear = self.appraiser.sign_result(
                    appraisal,
                    status=status,
                    nonce=evidence.nonce,
                    attester_id=attester_id,
                    flags=flags,
                )
                if marks is None:
                    marks = (old_marks[0], old_marks[1], old_marks[2])
                state = "trusted" if status in _TRUSTED_VERDICTS else "failed"
                cadence = self.config.attest_cadence_s
                # only trust runs out: a failed attester stays failed until evidence
                # says otherwise, whether or not more of it arrives
                deadline = (
                    now + timedelta(seconds=cadence * self.config.stale_grace)
                    if state == "trusted"
                    else None
                )
                values = {
                    "aid": attester_id,
                    "now": conn.ts(now),
                    "status": status,
                    "policy": policy_name,
                    "n": nonce_hex,
                    "report": conn.json_in(report),
                    "ear": ear,
                    "flags": conn.json_in(kept),
                    "astatus": "flagged" if new_flags else old_status,
                    "r": marks[0],
                    "s": marks[1],
                    "k": marks[2],
                    "state": state,
                    "changed": state != old_state,
                    "cadence": cadence,
                    "deadline": None if deadline is None else conn.ts(deadline),
                }
                if conn.sqlite:
                    inserted = conn.one(_RESULT_INSERT, values)
                    assert inserted is not None
                    conn.run(_ATTESTER_AFTER, {**values, "rid": inserted[0]})
                else:
                    inserted = conn.one(_RESULT_AND_ATTESTER_PG, values)
                    assert inserted is not None
                result_id = int(inserted[0])
                if store_ima:
                    st = appraisal.ima_state
                    assert st is not None
                    conn.run(
                        _IMA_UPSERT,
                        {
                            "aid": attester_id,
                            "r": st.reset_count,
                            "s": st.restart_count,
                            "c": st.entry_count,
                            "pd": st.policy_digest,
                            "pg": st.progress,
                            "now": values["now"],
                        },
                    )
                conn.run(
                    _EVIDENCE_UPSERT,
                    {
                        "aid": attester_id,
                        "rid": result_id,
                        "now": values["now"],
                        "qv": appraisal.quote_verified,
                        "pcrs": conn.json_in(
                            {
                                bank: {str(i): v.hex() for i, v in sorted(pcrs.items())}
                                for bank, pcrs in sorted(evidence.pcrs.items())
                            }
                        ),
                        "log": evidence.event_log,
                    },
                )
                if values["changed"]:
                    # in the same transaction as the state it records: never lost,
                    # never twice (the attester row is locked until the commit);
                    # its webhook deliveries with it (transitions.record)
                    cause = {
                        "verdict": status,
                        "failures": [f.get("rule") for f in appraisal.failures],
                        "flags": [f["flag"] for f in flags],
                    }
                    record(
                        conn,
                        [NewTransition(attester_id, old_state, state, now, cause, result_id)],
                    )
        if values["changed"] and self.on_transition is not None:
            self.on_transition()
        self.metrics.results.labels(status=status).inc()
        return {
            "id": result_id,
            "attester_id": attester_id,
            "created_at": _iso(now),
            "status": status,
            "policy": policy_name,
            "nonce": nonce_hex,
            "report": report,
            "ear": ear,
            "state": state,
            "next_attestation_s": cadence,
        }

    def report_fault(
        self, attester_id: str, fault: FaultReport, *, token_sha256: str
    ) -> dict[str, Any]:
        """The attester's agent says it cannot produce evidence (its TPM failed, its log is
        unreadable): the attester is ``failed`` at once, not left trusted until its
        deadline, with one transition whose cause is ``{"fault", "detail"}`` (none
        when it was failed already). Only the attester's own token may report: it can
        only make its own standing worse."""
        now = self.clock()
        with self.db.raw() as conn, conn.write():
            row = conn.one(_FAULT_READ + conn.for_update, {"aid": attester_id})
            if row is None or not _token_ok(token_sha256, row[0]):
                raise TokenMismatchError("the token is not this attester's")
            if row[1] is None:
                raise StateError(f"attester {attester_id} is not activated")
            old_state = str(row[2])
            changed = old_state != "failed"
            conn.run(_FAULT_MARK, {"aid": attester_id, "now": conn.ts(now), "changed": changed})
            if changed:
                cause = {"fault": fault.kind, "detail": fault.detail}
                record(conn, [NewTransition(attester_id, old_state, "failed", now, cause)])
        if changed and self.on_transition is not None:
            self.on_transition()
        return {"attester_id": attester_id, "state": "failed", "recorded": changed}


def _ima_state(cols: tuple[Any, ...]) -> ImaState | None:
    """The ``ima_state`` columns of a hot-path read (None: no row)."""
    reset, restart, count, digest, progress = cols
    if progress is None:
        return None
    return ImaState(int(reset), int(restart), int(count), str(digest), bytes(progress))


def _ima_hint(runtime_digest: str, cols: tuple[Any, ...]) -> dict[str, Any]:
    """What a challenge tells the attester about its IMA list: the entry to send from
    and the boot that index belongs to. An attester whose quote shows another
    resetCount/restartCount sends from entry 0 (a new boot); a changed runtime policy
    re-appraises from entry 0 too."""
    reset, restart, count, digest = cols
    same_policy = digest is not None and hmac.compare_digest(str(digest), runtime_digest)
    return {
        "next_index": int(count) if count is not None and same_policy else 0,
        "reset_count": None if reset is None else int(reset),
        "restart_count": None if restart is None else int(restart),
    }


def _ak_name_of(appraiser: Appraiser, ak_public: bytes) -> str:
    return appraiser.object_name(ak_public).hex()


def _lineage(
    marks: tuple[int | None, int | None, int | None], appraisal: Appraisal, now: datetime
) -> tuple[list[dict[str, Any]], tuple[int, int, int] | None]:
    """Compare the verified clock with the attester's high-water marks.

    resetCount and restartCount never go down on one TPM, and Clock only grows
    within one reset/restart cycle (TPM 2.0 Part 1, 36.3-36.6): a lower value
    is a reverted snapshot or a cloned vTPM. Returns the flags and the new
    marks; marks only move forward (None: leave them).
    """
    c = appraisal.clock
    if c is None or not appraisal.quote_verified:
        return [], None
    flags: list[dict[str, Any]] = []
    r0, s0, k0 = marks
    if r0 is not None and s0 is not None and k0 is not None:
        if c.reset_count < r0:
            flags.append(_flag(FLAG_RESET_BACK, f"resetCount {c.reset_count} < {r0} seen", now))
        elif c.reset_count == r0 and c.restart_count < s0:
            flags.append(
                _flag(FLAG_RESTART_BACK, f"restartCount {c.restart_count} < {s0} seen", now)
            )
        elif c.reset_count == r0 and c.restart_count == s0 and c.clock < k0:
            flags.append(_flag(FLAG_CLOCK_BACK, f"clock {c.clock} < {k0} seen", now))
    if flags:
        return flags, None
    return flags, (c.reset_count, c.restart_count, c.clock)


def _assigned_policy(session: Session, attester_id: str) -> Policy | None:
    assignment = session.get(Assignment, attester_id)
    if assignment is None:
        return None
    return session.get(Policy, assignment.policy_name)


@dataclass
class PolicyService:
    db: Database
    appraiser: Appraiser
    clock: Clock = utc_now

    def put(self, request: PolicyRequest, *, create_only: bool) -> dict[str, Any]:
        self.appraiser.check_policy(request.body)  # a policy that does not load is refused
        now = self.clock()
        digest = hashlib.sha256(request.body.encode("utf-8")).hexdigest()
        with self.db.transaction() as session:
            policy = session.get(Policy, request.name, with_for_update=True)
            if policy is not None and create_only:
                raise ConflictError(f"policy {request.name!r} exists; PUT to replace it")
            if policy is None:
                policy = Policy(name=request.name, version=0, created_at=now)
                session.add(policy)
            policy.version += 1
            policy.body = request.body
            policy.sha256 = digest
            policy.updated_at = now
            return _policy_view(policy)

    def get(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            policy = session.get(Policy, name)
            if policy is None:
                raise NotFoundError(f"policy {name!r} does not exist")
            return {**_policy_view(policy), "policy": policy.body}

    def list_all(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            return [_policy_view(p) for p in session.scalars(select(Policy).order_by(Policy.name))]

    def delete(self, name: str) -> None:
        with self.db.transaction() as session:
            policy = session.get(Policy, name, with_for_update=True)
            if policy is None:
                raise NotFoundError(f"policy {name!r} does not exist")
            users = session.scalars(
                select(Assignment.attester_id).where(Assignment.policy_name == name)
            ).all()
            if users:
                raise ConflictError(f"policy {name!r} is assigned to {len(users)} attester(s)")
            session.delete(policy)

    def assign(self, attester_id: str, name: str | None) -> dict[str, Any]:
        with self.db.transaction() as session:
            _get_attester(session, attester_id, lock=True)
            assignment = session.get(Assignment, attester_id)
            if name is None:
                if assignment is not None:
                    session.delete(assignment)
                return {"attester_id": attester_id, "policy": None}
            if session.get(Policy, name) is None:
                raise NotFoundError(f"policy {name!r} does not exist")
            if assignment is None:
                session.add(Assignment(attester_id=attester_id, policy_name=name))
            else:
                assignment.policy_name = name
            return {"attester_id": attester_id, "policy": name}


def _policy_view(p: Policy) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "sha256": p.sha256,
        "created_at": _iso(p.created_at),
        "updated_at": _iso(p.updated_at),
    }


@dataclass(frozen=True, slots=True)
class Services:
    attesters: AttesterService
    evidence: EvidenceService
    policies: PolicyService
    appraiser: Appraiser
    metrics: Metrics
    reappraisal: ReappraisalService


def make_services(
    db: Database,
    config: ServiceConfig,
    appraiser: Appraiser,
    metrics: Metrics,
    *,
    clock: Clock = utc_now,
    random: Random = secrets.token_bytes,
) -> Services:
    return Services(
        attesters=AttesterService(db, config, appraiser, clock, random),
        evidence=EvidenceService(db, config, appraiser, metrics, clock, random),
        policies=PolicyService(db, appraiser, clock),
        appraiser=appraiser,
        metrics=metrics,
        reappraisal=ReappraisalService(db, config, appraiser, clock),
    )
