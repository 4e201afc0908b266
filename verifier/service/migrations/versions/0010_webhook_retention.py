"""Webhook outbox retention and deletion (issue 16): ids never reused, subscription tombstones.

``webhook_subscriptions.deleted_at``: ``DELETE /v1/webhooks/{id}`` no longer
drops the queued deliveries with the row. The subscription stops matching new
transitions at once; what was already queued is still delivered (or marked
``dead`` with the reason when the deletion discards it); the retention pruner
removes the tombstone once no outbox row names it (docs/continuous.md).

On SQLite, ``webhook_outbox`` and ``attester_transitions`` are rebuilt with
``AUTOINCREMENT``: a plain ``INTEGER PRIMARY KEY`` hands out ``max(rowid) + 1``,
so deleting the newest rows (the pruner, a deleted attester's transitions)
made the next row reuse their ids. A reused delivery id is a new delivery a
receiver drops as a duplicate (``X-Vtpm-Delivery`` is its idempotency key); a
reused transition id collides with the queued deliveries of the deleted one
(``UNIQUE (subscription_id, transition_id)``) and fails the evidence that
recorded it. PostgreSQL sequences never hand an id out twice: nothing to do.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TABLES = ("webhook_outbox", "attester_transitions")


def _autoincrement(on: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name in _TABLES:
        with warnings.catch_warnings():
            # reflecting attester_transitions' foreign key reads attesters, whose
            # expression index (0002) SQLAlchemy cannot reflect; it is not rebuilt here
            warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression")
            with op.batch_alter_table(
                name, recreate="always", table_kwargs={"sqlite_autoincrement": on}
            ):
                pass


def upgrade() -> None:
    # a plain ADD/DROP COLUMN, never a rebuilt table: dropping the old
    # webhook_subscriptions would cascade (ON DELETE CASCADE) to the outbox
    op.add_column(
        "webhook_subscriptions", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True)
    )
    _autoincrement(True)


def downgrade() -> None:
    _autoincrement(False)
    op.execute("ALTER TABLE webhook_subscriptions DROP COLUMN deleted_at")  # SQLite >= 3.35
