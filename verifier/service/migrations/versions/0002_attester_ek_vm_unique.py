"""One attester per (EK, VM id): a unique index, so concurrent registrations cannot both insert.

A VM id may be absent (NULL); ``coalesce(vm_id, '')`` makes "no VM id" one
value for the index (NULLs are otherwise distinct in both SQLite and
PostgreSQL). Duplicates left by the race this closes stop the migration with
their ids: delete the one not in use (``DELETE /v1/attesters/{id}``) and start
again; nothing is merged or dropped silently.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "uq_attesters_ek_vm"


def upgrade() -> None:
    dupes = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT ek_fingerprint, coalesce(vm_id, '') AS vm, count(*) FROM attesters"
                " GROUP BY ek_fingerprint, coalesce(vm_id, '') HAVING count(*) > 1"
            )
        )
        .all()
    )
    if dupes:
        listed = "; ".join(f"EK {fp[:16]}... VM {vm or '(none)'!r}: {n}" for fp, vm, n in dupes)
        raise RuntimeError(
            f"attesters registered twice for one EK and VM id ({listed}): delete the "
            "duplicates not in use, then migrate again"
        )
    op.create_index(
        INDEX,
        "attesters",
        ["ek_fingerprint", sa.text("coalesce(vm_id, '')")],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="attesters")
