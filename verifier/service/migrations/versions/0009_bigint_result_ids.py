"""64-bit result ids on PostgreSQL (issue 18).

``results.id`` was a 32-bit ``SERIAL``: 100,000 attesters at a 60 s cadence
insert 144 million results a day and pass 2^31 after ~15 days, whatever the
retention (ids are never reused). This widens the key, its sequence
(``serial`` makes an ``AS integer`` sequence, which ``ALTER COLUMN`` leaves
alone; PostgreSQL 15 manual, CREATE SEQUENCE and section 8.1.4) and every
column holding a result id: ``attesters.latest_result_id``,
``attester_transitions.result_id``, ``latest_evidence.result_id``.

On SQLite nothing changes: an ``INTEGER PRIMARY KEY`` is the 64-bit rowid and
INTEGER columns hold 64-bit values already.

On PostgreSQL ``ALTER COLUMN ... TYPE bigint`` rewrites the table under an
ACCESS EXCLUSIVE lock: on a large ``results`` table run it in a maintenance
window (docs/operations.md).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("results", "id", False),
    ("attesters", "latest_result_id", True),
    ("attester_transitions", "result_id", True),
    ("latest_evidence", "result_id", False),
)


def _retype(to: type[sa.types.TypeEngine[int]], sequence_as: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, col, nullable in _COLUMNS:
        op.alter_column(table, col, type_=to(), existing_nullable=nullable)
    op.execute(f"ALTER SEQUENCE results_id_seq AS {sequence_as}")


def upgrade() -> None:
    _retype(sa.BigInteger, "bigint")


def downgrade() -> None:
    _retype(sa.Integer, "integer")
