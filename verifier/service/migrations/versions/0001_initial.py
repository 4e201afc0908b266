"""Initial schema: attesters, activation challenges, nonces, results, policies, assignments.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "attesters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("vm_id", sa.String(255), nullable=True),
        sa.Column("ek_fingerprint", sa.String(64), nullable=False),
        sa.Column("ek_public", sa.LargeBinary(), nullable=False),
        sa.Column("ek_certificate", sa.LargeBinary(), nullable=True),
        sa.Column("identity", sa.JSON(), nullable=False),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("ak_name", sa.String(140), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("activated_at", _TS, nullable=True),
        sa.Column("reset_count", sa.Integer(), nullable=True),
        sa.Column("restart_count", sa.Integer(), nullable=True),
        sa.Column("clock", sa.BigInteger(), nullable=True),
        sa.Column("latest_result_id", sa.Integer(), nullable=True),
    )
    op.create_index("ix_attesters_ek_fingerprint", "attesters", ["ek_fingerprint"])
    op.create_table(
        "activation_challenges",
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("ak_name", sa.String(140), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
    )
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("pcr_selection", sa.JSON(), nullable=False),
        sa.Column("policy_name", sa.String(128), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.Column("used_at", _TS, nullable=True),
    )
    op.create_index("ix_nonces_attester_id", "nonces", ["attester_id"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("policy_name", sa.String(128), nullable=True),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("ear", sa.Text(), nullable=False),
    )
    op.create_index("ix_results_attester_created", "results", ["attester_id", "created_at"])
    op.create_table(
        "policies",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "assignments",
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "policy_name",
            sa.String(128),
            sa.ForeignKey("policies.name", ondelete="RESTRICT"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    for table in (
        "assignments",
        "policies",
        "results",
        "nonces",
        "activation_challenges",
        "attesters",
    ):
        op.drop_table(table)
