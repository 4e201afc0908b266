"""Indexes for the console's fleet page (issue 17): every sort and the prefix search.

The fleet table sorts by registration time, VM id, state or evidence time, ties
broken by the attester id, and pages with LIMIT/OFFSET. An index on
``(column, id)`` makes a page an index range read in that order (forwards or
backwards), never a sort of the whole table; ``(state, id)`` exists since 0005.
The search is a prefix match (``LIKE 'x%'``) on the VM id or the attester id:
PostgreSQL only uses a btree for that under the C collation, so it gets
``varchar_pattern_ops`` indexes whatever the database's collation (SQLite has
plain ones, which its case-insensitive LIKE does not use: embedded fleets are
small).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ORDERED = {
    "ix_attesters_created_id": ["created_at", "id"],
    "ix_attesters_vm_id_id": ["vm_id", "id"],
    "ix_attesters_evidence_id": ["last_evidence_at", "id"],
}
_PREFIX = {"ix_attesters_vm_id_prefix": "vm_id", "ix_attesters_id_prefix": "id"}


def upgrade() -> None:
    for name, columns in _ORDERED.items():
        op.create_index(name, "attesters", columns)
    for name, column in _PREFIX.items():
        op.create_index(name, "attesters", [column], postgresql_ops={column: "varchar_pattern_ops"})


def downgrade() -> None:
    for name in (*_PREFIX, *_ORDERED):
        op.drop_index(name, table_name="attesters")
