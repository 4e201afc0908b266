"""Indexes for retention: results by creation time, nonces by expiry.

``verifier.service.retention.prune`` deletes the oldest results and the
long-expired nonces in batches; without these indexes each batch scans the
whole table (a sequential scan over days of history per attester).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_results_created_at", "results", ["created_at"])
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_nonces_expires_at", table_name="nonces")
    op.drop_index("ix_results_created_at", table_name="results")
