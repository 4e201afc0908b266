"""SQLAlchemy 2 models of the attestation service.

The schema is owned by Alembic (``migrations/versions``); these classes
describe it for the ORM and must match the latest revision (a test compares
them). Times are UTC; binary TPM structures are stored in their wire encoding.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

__all__ = [
    "ATTESTER_STATES",
    "WEBHOOK_STATES",
    "ActivationChallenge",
    "Assignment",
    "Attester",
    "AttesterTransition",
    "Base",
    "ImaStateRow",
    "LatestEvidence",
    "Nonce",
    "Policy",
    "Result",
    "UtcDateTime",
    "WebhookOutbox",
    "WebhookSubscription",
]


# Result ids grow by a fleet's cadence (100,000 attesters at 60 s: 144 M a day,
# past 2^31 in ~15 days): 64-bit on PostgreSQL (migration 0009); SQLite's
# INTEGER (the rowid) is 64-bit already.
_RESULT_ID = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Attester states (issue 16, migration 0005): unknown (no evidence yet), trusted (the
# latest evidence was affirming or warning), failed (contraindicated), stale (no fresh
# evidence before the deadline).
ATTESTER_STATES = ("unknown", "trusted", "failed", "stale")
# Webhook deliveries (migration 0008): pending (due at next_attempt_at), delivering (a
# worker holds the lease), delivered, dead (webhook_max_attempts used up).
WEBHOOK_STATES = ("pending", "delivering", "delivered", "dead")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class Attester(Base):
    """One registered (EK, AK, VM) triple; ``status`` says whether it may attest."""

    __tablename__ = "attesters"
    # one attester per EK and VM id ("no VM id" counts as one value): migration 0002
    __table_args__ = (
        Index("uq_attesters_ek_vm", "ek_fingerprint", text("coalesce(vm_id, '')"), unique=True),
        Index("ix_attesters_state_id", "state", "id"),
        Index("ix_attesters_deadline", "deadline"),
        # the console's fleet sorts and prefix search: migration 0006
        Index("ix_attesters_created_id", "created_at", "id"),
        Index("ix_attesters_vm_id_id", "vm_id", "id"),
        Index("ix_attesters_evidence_id", "last_evidence_at", "id"),
        Index(
            "ix_attesters_vm_id_prefix", "vm_id", postgresql_ops={"vm_id": "varchar_pattern_ops"}
        ),
        Index("ix_attesters_id_prefix", "id", postgresql_ops={"id": "varchar_pattern_ops"}),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    vm_id: Mapped[str | None] = mapped_column(String(255))
    ek_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    ek_public: Mapped[bytes] = mapped_column(LargeBinary)
    ek_certificate: Mapped[bytes | None] = mapped_column(LargeBinary)
    identity: Mapped[dict[str, Any]] = mapped_column(JSON)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ak_name: Mapped[str] = mapped_column(String(140))
    # pending_activation -> active; flagged once a lineage check failed
    status: Mapped[str] = mapped_column(String(32))
    flags: Mapped[list[Any]] = mapped_column(JSON)
    token_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    reset_count: Mapped[int | None] = mapped_column(Integer)
    restart_count: Mapped[int | None] = mapped_column(Integer)
    clock: Mapped[int | None] = mapped_column(BigInteger)
    latest_result_id: Mapped[int | None] = mapped_column(_RESULT_ID)
    # continuous attestation (migration 0005): one of ATTESTER_STATES and since when;
    # deadline: when a trusted attester goes stale without new evidence (else NULL)
    state: Mapped[str] = mapped_column(String(16), server_default="unknown")
    state_since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    deadline: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_evidence_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    cadence_s: Mapped[int | None] = mapped_column(Integer)


class AttesterTransition(Base):
    """One change of an attester's state, recorded once, with its cause.

    ``cause``: ``{"verdict", "failures", "flags"}`` for a change made by evidence
    (``result_id`` names the result), ``{"missed_deadline", "last_evidence_at",
    "cadence_s"}`` for one made by the sweeper.
    """

    __tablename__ = "attester_transitions"
    # ids never reused on SQLite either (AUTOINCREMENT, migration 0010): the outbox's
    # UNIQUE (subscription_id, transition_id) outlives a deleted attester's transitions
    __table_args__ = (
        Index("ix_attester_transitions_attester_id", "attester_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    attester_id: Mapped[str] = mapped_column(ForeignKey("attesters.id", ondelete="CASCADE"))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    cause: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_id: Mapped[int | None] = mapped_column(_RESULT_ID)


class ActivationChallenge(Base):
    """The MakeCredential secret an attester must give back (stored hashed)."""

    __tablename__ = "activation_challenges"

    attester_id: Mapped[str] = mapped_column(
        ForeignKey("attesters.id", ondelete="CASCADE"), primary_key=True
    )
    secret_sha256: Mapped[str] = mapped_column(String(64))
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ak_name: Mapped[str] = mapped_column(String(140))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Nonce(Base):
    """A challenge: single use (``used``), short-lived, bound to one attester."""

    __tablename__ = "nonces"
    __table_args__ = (
        Index("ix_nonces_expires_at", "expires_at"),
        Index("ix_nonces_attester_expires", "attester_id", "expires_at"),
    )

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)  # hex
    attester_id: Mapped[str] = mapped_column(ForeignKey("attesters.id", ondelete="CASCADE"))
    pcr_selection: Mapped[dict[str, Any]] = mapped_column(JSON)
    policy_name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    used: Mapped[bool] = mapped_column(Boolean, default=False)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Result(Base):
    """One appraisal outcome and the signed EAR token that carries it."""

    __tablename__ = "results"
    __table_args__ = (
        Index("ix_results_attester_created", "attester_id", "created_at"),
        Index("ix_results_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(_RESULT_ID, primary_key=True, autoincrement=True)
    attester_id: Mapped[str] = mapped_column(ForeignKey("attesters.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(32))
    policy_name: Mapped[str | None] = mapped_column(String(128))
    nonce: Mapped[str] = mapped_column(String(128))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    ear: Mapped[str] = mapped_column(Text)


class LatestEvidence(Base):
    """The evidence behind an attester's latest result (migration 0007), for the console.

    ``pcrs``: ``{bank: {index: hex}}`` as submitted; they are the TPM's only when
    ``quote_verified``. ``event_log``: the TCG log as submitted (None: none sent).
    """

    __tablename__ = "latest_evidence"

    attester_id: Mapped[str] = mapped_column(
        ForeignKey("attesters.id", ondelete="CASCADE"), primary_key=True
    )
    result_id: Mapped[int] = mapped_column(_RESULT_ID)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    quote_verified: Mapped[bool] = mapped_column(Boolean)
    pcrs: Mapped[dict[str, Any]] = mapped_column(JSON)
    event_log: Mapped[bytes | None] = mapped_column(LargeBinary)


class ImaStateRow(Base):
    """An attester's incremental IMA state (migration 0011; ports.ImaState): which boot,
    how many entries verified under which runtime policy, PCR 10 per bank there."""

    __tablename__ = "ima_state"

    attester_id: Mapped[str] = mapped_column(
        ForeignKey("attesters.id", ondelete="CASCADE"), primary_key=True
    )
    reset_count: Mapped[int] = mapped_column(BigInteger)
    restart_count: Mapped[int] = mapped_column(BigInteger)
    entry_count: Mapped[int] = mapped_column(BigInteger)
    policy_digest: Mapped[str] = mapped_column(String(64))
    progress: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Policy(Base):
    """A named reference-value policy (issue 5 schema), kept as the text it was given in."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Assignment(Base):
    """Which policy an attester is appraised against (at most one)."""

    __tablename__ = "assignments"

    attester_id: Mapped[str] = mapped_column(
        ForeignKey("attesters.id", ondelete="CASCADE"), primary_key=True
    )
    policy_name: Mapped[str] = mapped_column(ForeignKey("policies.name", ondelete="RESTRICT"))


class WebhookSubscription(Base):
    """A receiver of attester transitions (migration 0008); ``events``: patterns
    (:func:`verifier.service.webhooks.matches`)."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # deleted (migration 0010): matches no new transition; its queued deliveries still
    # go out (or were marked dead); the pruner drops the row once no delivery names it
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class WebhookOutbox(Base):
    """One delivery of one transition to one subscription (migration 0008), written in
    the transition's transaction; ``state`` is one of WEBHOOK_STATES."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id", "transition_id", name="uq_webhook_outbox_subscription_transition"
        ),
        Index("ix_webhook_outbox_state_next", "state", "next_attempt_at"),
        # a delivery id is the receivers' idempotency key: never reused (migration 0010)
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    subscription_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    transition_id: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
