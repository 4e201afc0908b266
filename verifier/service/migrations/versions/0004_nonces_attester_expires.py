"""Nonces indexed by (attester_id, expires_at) instead of attester_id alone.

Every challenge deletes the attester's expired nonces
(``attester_id = :aid AND expires_at < :now``). With an index on attester_id
alone PostgreSQL reads all of the attester's nonces and filters them (1,501
rows read to delete none in bench/fleet.py, where an attester holds many live
nonces); the composite index reads only the expired ones. It also serves every
lookup by attester_id (the foreign key's cascade), so the old index goes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_nonces_attester_expires", "nonces", ["attester_id", "expires_at"])
    op.drop_index("ix_nonces_attester_id", table_name="nonces")


def downgrade() -> None:
    op.create_index("ix_nonces_attester_id", "nonces", ["attester_id"])
    op.drop_index("ix_nonces_attester_expires", table_name="nonces")
