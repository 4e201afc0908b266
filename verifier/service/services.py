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
     attester's high-water marks, insert the result, update the attester.
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

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from verifier.service.config import ServiceConfig, hash_token, new_token
from verifier.service.db import Database
from verifier.service.errors import ExpiredError
from verifier.service.messages import (
    ActivationRequest,
    EvidenceRequest,
    PolicyRequest,
    RegistrationRequest,
)
from verifier.service.metrics import Metrics
from verifier.service.models import (
    ActivationChallenge,
    Assignment,
    Attester,
    Nonce,
    Policy,
    Result,
    UtcDateTime,
)
from verifier.service.ports import Appraisal, Appraiser
from vtpm_core.errors import ConflictError, NotFoundError, PermissionDeniedError, StateError

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
_ACTIVATION_ATTEMPTS = 5
# Lineage flags (issue 6, "Identity and lineage"); each makes results contraindicated.
FLAG_EK_SHARED = "ek-shared"
FLAG_AK_SWAPPED = "ak-not-activated"
FLAG_RESET_BACK = "reset-count-regressed"
FLAG_RESTART_BACK = "restart-count-regressed"
FLAG_CLOCK_BACK = "clock-regressed"


# Hot-path statements are built once, with bind parameters: building SQLAlchemy
# expressions per request costs more than executing them.
_CHALLENGE_READ = (
    select(Attester.activated_at, Policy.name, Policy.body)
    .select_from(Attester)
    .outerjoin(Assignment, Assignment.attester_id == Attester.id)
    .outerjoin(Policy, Policy.name == Assignment.policy_name)
    .where(Attester.id == bindparam("aid"))
)
_NONCE_INSERT = insert(Nonce)
_NONCE_PURGE = delete(Nonce).where(
    Nonce.attester_id == bindparam("aid"), Nonce.expires_at < bindparam("now")
)
_SUBMIT_READ = (
    select(
        Attester.activated_at,
        Attester.ak_public,
        Attester.ak_name,
        Nonce.attester_id,
        Nonce.used,
        Nonce.expires_at,
        Nonce.pcr_selection,
        Nonce.policy_name,
        Policy.body,
        Policy.sha256,
    )
    .select_from(Attester)
    .outerjoin(Nonce, Nonce.nonce == bindparam("n"))
    .outerjoin(Policy, Policy.name == Nonce.policy_name)
    .where(Attester.id == bindparam("aid"))
)
# the single-use rule: exactly one transaction can match this row
_NONCE_CONSUME = (
    update(Nonce)
    .where(
        Nonce.nonce == bindparam("n"),
        Nonce.attester_id == bindparam("aid"),
        Nonce.used.is_(False),
        Nonce.expires_at > bindparam("now"),
    )
    .values(used=True, used_at=bindparam("used_at", type_=UtcDateTime()))
)
_ATTESTER_LOCK = (
    select(
        Attester.vm_id,
        Attester.flags,
        Attester.status,
        Attester.reset_count,
        Attester.restart_count,
        Attester.clock,
    )
    .where(Attester.id == bindparam("aid"))
    .with_for_update()
)
_RESULT_INSERT = insert(Result).returning(Result.id)
_NONCE_STATE = select(Nonce.attester_id, Nonce.used, Nonce.expires_at).where(
    Nonce.nonce == bindparam("n")
)


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
        with self.db.transaction() as session:
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
            attester_id = attester.id
            status = attester.status
        return {
            "attester_id": attester_id,
            "status": status,
            "credential_blob": _b64(credential.credential_blob),
            "encrypted_secret": _b64(credential.encrypted_secret),
            "activation_expires_at": _iso(challenge.expires_at),
        }

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
            return attester_view(attester, latest, assignment.policy_name if assignment else None)

    def list_all(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.scalars(select(Attester).order_by(Attester.created_at)).all()
            return [
                {"id": a.id, "vm_id": a.vm_id, "status": a.status, "flags": a.flags} for a in rows
            ]

    def delete(self, attester_id: str) -> None:
        with self.db.transaction() as session:
            attester = _get_attester(session, attester_id, lock=True)
            for table in (Nonce, Result, Assignment, ActivationChallenge):
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

    def challenge(self, attester_id: str) -> dict[str, Any]:
        """A fresh nonce bound to the attester, and the PCR selection its policy needs."""
        now = self.clock()
        nonce = self.random(_NONCE_BYTES)
        with self.db.transaction() as session:
            conn = session.connection()
            row = conn.execute(_CHALLENGE_READ, {"aid": attester_id}).first()
            if row is None:
                raise NotFoundError(f"attester {attester_id!r} is not registered")
            activated_at, policy_name, policy_body = row
            if activated_at is None:
                raise StateError(f"attester {attester_id} is not activated yet")
            selection = (
                self.appraiser.check_policy(policy_body)
                if policy_body is not None
                else self.config.default_pcr_selection
            )
            if nonce[-1] < 8:
                # housekeeping on ~1 in 32 challenges (the nonce's last byte is
                # uniform): this attester's expired nonces are of no use any more
                conn.execute(_NONCE_PURGE, {"aid": attester_id, "now": now})
            expires = now + timedelta(seconds=self.config.nonce_lifetime_s)
            conn.execute(
                _NONCE_INSERT,
                {
                    "nonce": nonce.hex(),
                    "attester_id": attester_id,
                    "pcr_selection": {bank: list(pcrs) for bank, pcrs in selection.items()},
                    "policy_name": policy_name,
                    "created_at": now,
                    "expires_at": expires,
                    "used": False,
                    "used_at": None,
                },
            )
        self.metrics.challenges.inc()
        return {
            "nonce": _b64(nonce),
            "expires_at": _iso(expires),
            "pcr_selection": {bank: list(pcrs) for bank, pcrs in selection.items()},
            "policy": policy_name,
        }

    def _nonce_problem(self, conn: Connection, attester_id: str, nonce_hex: str) -> Exception:
        row = conn.execute(_NONCE_STATE, {"n": nonce_hex}).first()
        if row is None or not hmac.compare_digest(row.attester_id, attester_id):
            return NotFoundError("unknown nonce: not issued to this attester (or already purged)")
        if row.used:
            return ConflictError("nonce already used: each challenge answers once")
        return ExpiredError(f"nonce expired at {_iso(row.expires_at)}")

    def submit(self, attester_id: str, evidence: EvidenceRequest) -> dict[str, Any]:
        """Steps 1-3 of evidence; returns the stored result (with its EAR)."""
        now = self.clock()
        nonce_hex = evidence.nonce.hex()
        with self.db.read_connection() as rconn:
            row = rconn.execute(_SUBMIT_READ, {"n": nonce_hex, "aid": attester_id}).first()
            if row is None:
                raise NotFoundError(f"attester {attester_id!r} is not registered")
            if row.activated_at is None:
                raise StateError(f"attester {attester_id} is not activated: no evidence accepted")
            if (
                row.used is None
                or row.used
                or row.expires_at <= now
                or not hmac.compare_digest(row[3], attester_id)
            ):
                raise self._nonce_problem(rconn, attester_id, nonce_hex)
            selection = {bank: tuple(p) for bank, p in row.pcr_selection.items()}
            policy_name, policy_body, policy_sha = row.policy_name, row.body, row.sha256
            ak_public, ak_name = row.ak_public, row.ak_name
        if policy_name is not None and policy_body is None:
            raise ConflictError(f"policy {policy_name!r} was deleted after the challenge")

        # step 2: CPU-only work, no lock held
        with self.metrics.appraisal_seconds.time():
            appraisal = self.appraiser.appraise(
                ak_public=ak_public,
                nonce=evidence.nonce,
                evidence=evidence,
                selection=selection,
                policy_body=policy_body,
            )
        new_flags: list[dict[str, Any]] = []
        if evidence.ak_public is not None:
            presented = _ak_name_of(self.appraiser, evidence.ak_public)
            if not hmac.compare_digest(presented, ak_name):
                new_flags.append(
                    _flag(
                        FLAG_AK_SWAPPED,
                        f"evidence names AK {presented[:16]}..., activated AK is {ak_name[:16]}...",
                        now,
                    )
                )

        # step 3: one transaction for every write
        with self.db.transaction() as session:
            conn = session.connection()
            consumed = conn.execute(
                _NONCE_CONSUME, {"n": nonce_hex, "aid": attester_id, "now": now, "used_at": now}
            )
            if consumed.rowcount != 1:
                self.metrics.nonce_rejections.inc()
                raise self._nonce_problem(conn, attester_id, nonce_hex)
            att = conn.execute(_ATTESTER_LOCK, {"aid": attester_id}).one()
            lineage_flags, marks = _lineage(
                (att.reset_count, att.restart_count, att.clock), appraisal, now
            )
            new_flags += lineage_flags
            flags = [*att.flags, *new_flags]
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
                "clock": None
                if appraisal.clock is None
                else {
                    "clock": appraisal.clock.clock,
                    "reset_count": appraisal.clock.reset_count,
                    "restart_count": appraisal.clock.restart_count,
                    "safe": appraisal.clock.safe,
                },
            }
            ear = self.appraiser.sign_result(
                appraisal,
                status=status,
                nonce=evidence.nonce,
                attester_id=attester_id,
                flags=flags,
            )
            result_id = conn.execute(
                _RESULT_INSERT,
                {
                    "attester_id": attester_id,
                    "created_at": now,
                    "status": status,
                    "policy_name": policy_name,
                    "nonce": nonce_hex,
                    "report": report,
                    "ear": ear,
                },
            ).scalar_one()
            changes: dict[str, Any] = {"latest_result_id": result_id}
            if new_flags:
                changes.update(flags=flags, status="flagged")
            if marks is not None:
                changes.update(reset_count=marks[0], restart_count=marks[1], clock=marks[2])
            conn.execute(update(Attester).where(Attester.id == attester_id).values(**changes))
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
    )
