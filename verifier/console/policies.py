"""Policy pages of the console: each policy's text, the attesters assigned to it, and a
line diff between two policies.

The verifier keeps one body per policy name (``PUT`` replaces it and bumps ``version``);
earlier versions are not stored, so the diff is between two named policies, never between
two versions of one.
"""

from __future__ import annotations

import difflib
from typing import Any

from sqlalchemy import func, select

from verifier.service.db import Database
from verifier.service.models import Assignment, Attester, Policy
from vtpm_core.errors import NotFoundError

__all__ = ["USERS_SHOWN", "policy_detail", "policy_diff", "policy_list"]

USERS_SHOWN = 100  # attesters listed on a policy's page; the rest are in the fleet's search


def _summary(p: Policy) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "sha256": p.sha256,
        "created_at": p.created_at.isoformat(),
        "updated_at": p.updated_at.isoformat(),
    }


def policy_list(db: Database) -> dict[str, Any]:
    """Every policy with how many attesters are assigned to it (one grouped count)."""
    with db.read() as session:
        users = dict(
            session.execute(
                select(Assignment.policy_name, func.count()).group_by(Assignment.policy_name)
            ).all()
        )
        policies = session.scalars(select(Policy).order_by(Policy.name)).all()
        return {
            "policies": [{**_summary(p), "attesters": int(users.get(p.name, 0))} for p in policies]
        }


def policy_detail(db: Database, name: str) -> dict[str, Any]:
    """One policy's text and the first ``USERS_SHOWN`` attesters (by id) assigned to it."""
    with db.read() as session:
        policy = session.get(Policy, name)
        if policy is None:
            raise NotFoundError(f"policy {name!r} does not exist")
        total = session.execute(
            select(func.count()).select_from(Assignment).where(Assignment.policy_name == name)
        ).scalar_one()
        rows = session.execute(
            select(Attester.id, Attester.vm_id, Attester.state)
            .join(Assignment, Assignment.attester_id == Attester.id)
            .where(Assignment.policy_name == name)
            .order_by(Attester.id)
            .limit(USERS_SHOWN)
        ).all()
        return {
            **_summary(policy),
            "policy": policy.body,
            "attesters_total": int(total),
            "attesters": [{"id": i, "vm_id": v, "state": s} for i, v, s in rows],
        }


def policy_diff(db: Database, a: str, b: str) -> dict[str, Any]:
    """A unified line diff from policy ``a`` to policy ``b`` (their stored texts).

    Each line is ``{"op": " " | "-" | "+" | "@", "text": ...}``; ``@`` opens a hunk."""
    left, right = policy_detail(db, a), policy_detail(db, b)
    lines = []
    diff = difflib.unified_diff(
        left["policy"].splitlines(), right["policy"].splitlines(), a, b, lineterm="", n=3
    )
    for line in diff:
        if line.startswith(("---", "+++")):
            continue
        op = "@" if line.startswith("@@") else line[:1]
        lines.append({"op": op, "text": line if op == "@" else line[1:]})
    return {
        "a": {k: left[k] for k in ("name", "version", "sha256")},
        "b": {k: right[k] for k in ("name", "version", "sha256")},
        "identical": left["sha256"] == right["sha256"],
        "lines": lines,
    }
