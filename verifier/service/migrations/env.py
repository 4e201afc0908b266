"""Alembic environment: runs on the connection the service hands over (no ini file).

On PostgreSQL an advisory lock serialises concurrent upgrades, so several
verifier processes started together against one database migrate it once.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from verifier.service.models import Base

_LOCK_KEY = 0x7654_7470  # "vtpt"

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
