"""Attester state over time (issue 16): a state per attester and the history of its changes.

``attesters`` gains:

- ``state``: ``unknown`` (no evidence yet), ``trusted`` (the latest evidence
  was affirming or warning), ``failed`` (it was contraindicated), ``stale``
  (no fresh evidence before the deadline);
- ``state_since``: when the current state began;
- ``deadline``: when a trusted attester's trust runs out without new evidence
  (NULL: nothing to watch, in every other state);
- ``last_evidence_at`` and ``cadence_s``: the latest accepted evidence and the
  cadence the verifier asked for then.

Indexes: ``(state, id)`` for ``GET /v1/attesters?state=`` (keyset pages by id
within one state) and ``deadline`` for the sweeper, which reads only the rows
whose deadline has passed (O(changes), not O(fleet), per tick).

``attester_transitions`` records each change once: from, to, when, why (the
verdict, failing rules and flags of a result, or the missed deadline) and the
result that caused it.

Existing attesters with a result take the state of their latest result, from
its time, with one transition recorded (cause ``{"backfill": "0005"}``); a
trusted one gets the default deadline (60 s cadence x 3) after that result,
so an attester that stopped attesting before the upgrade goes stale at the
sweeper's first tick instead of staying trusted forever (fail closed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("attesters", recreate="never") as batch:
        batch.add_column(
            sa.Column("state", sa.String(16), nullable=False, server_default="unknown")
        )
        batch.add_column(sa.Column("state_since", _TS, nullable=True))
        batch.add_column(sa.Column("deadline", _TS, nullable=True))
        batch.add_column(sa.Column("last_evidence_at", _TS, nullable=True))
        batch.add_column(sa.Column("cadence_s", sa.Integer(), nullable=True))
    op.create_index("ix_attesters_state_id", "attesters", ["state", "id"])
    op.create_index("ix_attesters_deadline", "attesters", ["deadline"])
    op.create_table(
        "attester_transitions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "attester_id",
            sa.String(36),
            sa.ForeignKey("attesters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("cause", sa.JSON(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=True),
    )
    op.create_index(
        "ix_attester_transitions_attester_id", "attester_transitions", ["attester_id", "id"]
    )
    _backfill(dialect)


def _backfill(dialect: str) -> None:
    # 180 s: the default cadence (60 s) x grace (3) of verifier/service/config.py
    if dialect == "postgresql":
        op.execute(
            "UPDATE attesters a SET"
            " state = CASE WHEN r.status IN ('affirming', 'warning') THEN 'trusted'"
            " ELSE 'failed' END,"
            " state_since = r.created_at, last_evidence_at = r.created_at,"
            " deadline = CASE WHEN r.status IN ('affirming', 'warning')"
            " THEN r.created_at + interval '180 seconds' END"
            " FROM results r WHERE r.id = a.latest_result_id"
        )
    else:
        # SQLite keeps UtcDateTime as naive UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff'
        op.execute(
            "UPDATE attesters SET (state, state_since, last_evidence_at, deadline) = ("
            " SELECT CASE WHEN r.status IN ('affirming', 'warning') THEN 'trusted'"
            " ELSE 'failed' END, r.created_at, r.created_at,"
            " CASE WHEN r.status IN ('affirming', 'warning')"
            " THEN strftime('%Y-%m-%d %H:%M:%f000', r.created_at, '+180 seconds') END"
            " FROM results r WHERE r.id = attesters.latest_result_id)"
            " WHERE EXISTS (SELECT 1 FROM results r WHERE r.id = attesters.latest_result_id)"
        )
    op.execute(
        sa.text(
            "INSERT INTO attester_transitions (attester_id, from_state, to_state, at, cause,"
            " result_id) SELECT a.id, 'unknown', a.state, a.state_since, :cause,"
            " a.latest_result_id FROM attesters a WHERE a.state <> 'unknown'"
            " ORDER BY a.state_since"
        ).bindparams(sa.bindparam("cause", {"backfill": "0005"}, type_=sa.JSON()))
    )


def downgrade() -> None:
    op.drop_index("ix_attester_transitions_attester_id", table_name="attester_transitions")
    op.drop_table("attester_transitions")
    op.drop_index("ix_attesters_deadline", table_name="attesters")
    op.drop_index("ix_attesters_state_id", table_name="attesters")
    # ALTER TABLE ... DROP COLUMN in place (SQLite >= 3.35): a rebuilt SQLite table
    # would lose the expression index of 0002, which reflection cannot copy
    with op.batch_alter_table("attesters", recreate="never") as batch:
        batch.drop_column("cadence_s")
        batch.drop_column("last_evidence_at")
        batch.drop_column("deadline")
        batch.drop_column("state_since")
        batch.drop_column("state")
