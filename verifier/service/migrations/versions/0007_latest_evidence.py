"""The latest evidence of each attester, kept for the console's event-log timeline (issue 17).

Results keep the verdict and the failing rules, not the evidence: a timeline
of the boot needs the event log and the PCR values it was replayed against.
One row per attester (``attester_id`` is the key, replaced by each accepted
submission in the transaction that stores its result), so the table grows
with the fleet, not with history. ``quote_verified``: whether the quote's
signature, nonce and PCR digest verified, i.e. whether ``pcrs`` are the TPM's;
the console replays the log against them again and trusts nothing else.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "latest_evidence",
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quote_verified", sa.Boolean(), nullable=False),
        sa.Column("pcrs", sa.JSON(), nullable=False),
        sa.Column("event_log", sa.LargeBinary(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("latest_evidence")
