"""Per-attester incremental IMA state (issue 14, "Incremental appraisal").

``ima_state``: one row per attester whose policy has a runtime (IMA) part and
whose IMA list verified at least once. ``reset_count``/``restart_count``: the
boot the list belongs to (the quote's TPMS_CLOCK_INFO; a higher pair is a
new boot, whose list starts again at entry 0); ``entry_count``: how many
entries of that list are verified; ``policy_digest``: the runtime policy
they passed under (SHA-256 hex; another one re-appraises from entry 0);
``progress``: ``verifier.ima.appraise.ImaProgress`` bytes, the running PCR 10
value per bank (~100 bytes, not the list).

Written only in the evidence transaction, under the attester's row lock
(PostgreSQL ``FOR UPDATE``; SQLite ``BEGIN IMMEDIATE``), after checking it is
still the row the appraisal extended from (services.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ima_state",
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("reset_count", sa.BigInteger(), nullable=False),
        sa.Column("restart_count", sa.BigInteger(), nullable=False),
        sa.Column("entry_count", sa.BigInteger(), nullable=False),
        sa.Column("policy_digest", sa.String(64), nullable=False),
        sa.Column("progress", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ima_state")
