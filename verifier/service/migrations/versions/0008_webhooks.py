"""Webhook subscriptions and their transactional outbox (issue 16, notifications).

``webhook_subscriptions``: a receiver's URL, the HMAC secret its deliveries
are signed with, the transitions it wants (``events``: a JSON list of
patterns, see :mod:`verifier.service.webhooks`) and whether it is enabled.

``webhook_outbox``: one row per (subscription, transition), written in the
transaction that records the transition (:func:`verifier.service.transitions.record`),
so no transition is without its deliveries and none is queued twice
(``UNIQUE (subscription_id, transition_id)``). ``state``: ``pending`` (due at
``next_attempt_at``), ``delivering`` (claimed by a worker until
``lease_until``; ``next_attempt_at`` is set to the lease's end, so an expired
lease is due again through the same index), ``delivered`` or ``dead``
(``attempts`` reached ``webhook_max_attempts``). The delivery worker reads
only due rows from ``INDEX (state, next_attempt_at)``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_subscriptions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "webhook_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "subscription_id",
            sa.String(36),
            sa.ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("transition_id", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.UniqueConstraint(
            "subscription_id", "transition_id", name="uq_webhook_outbox_subscription_transition"
        ),
    )
    op.create_index("ix_webhook_outbox_state_next", "webhook_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_outbox_state_next", table_name="webhook_outbox")
    op.drop_table("webhook_outbox")
    op.drop_table("webhook_subscriptions")
