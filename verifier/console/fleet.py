"""Fleet queries of the console: counts by state and one page of attesters, in the database.

Every sort is served by an index that ends in the attester id (migration 0006), so a
page is an index range read of ``size`` rows after skipping ``offset`` index entries,
never a sort of the table; the search is a prefix match on the VM id or the attester id
(PostgreSQL: ``varchar_pattern_ops`` indexes, whatever the database's collation). The
counts come from the ``(state, id)`` index. docs/console.md shows the plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select

from verifier.service.db import Database
from verifier.service.models import ATTESTER_STATES, Assignment, Attester, Result
from vtpm_core.errors import ParseError

__all__ = ["PAGE_SIZES", "SORTS", "FleetQuery", "fleet_counts", "fleet_page", "page_select"]

PAGE_SIZES = (25, 50, 100)
MAX_PAGE = 100_000
# sort name -> column; each has an index (column, id): migration 0006 and 0005's (state, id)
SORTS = {
    "created": Attester.created_at,
    "vm_id": Attester.vm_id,
    "id": Attester.id,
    "state": Attester.state,
    "evidence": Attester.last_evidence_at,
}


def _choice(args: Any, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = str(args.get(name, default))
    if value not in allowed:
        raise ParseError("query", name, 0, f"expected one of {', '.join(allowed)}")
    return value


def _int(args: Any, name: str, default: str, low: int, high: int) -> int:
    raw = str(args.get(name, default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ParseError("query", name, 0, f"expected an integer {low}..{high}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class FleetQuery:
    """A checked fleet request: search text, state filter, sort column and direction, page."""

    q: str = ""
    state: str = ""
    sort: str = "created"
    descending: bool = True
    page: int = 1
    size: int = 50

    @classmethod
    def parse(cls, args: Any) -> FleetQuery:
        q = str(args.get("q", "")).strip()
        if len(q) > 255:
            raise ParseError("query", "q", 0, "search text longer than 255 characters")
        state = _choice(args, "state", "", ("", *ATTESTER_STATES))
        sort = _choice(args, "sort", "created", tuple(SORTS))
        order = _choice(args, "order", "desc", ("asc", "desc"))
        page = _int(args, "page", "1", 1, MAX_PAGE)
        size = _int(args, "size", "50", min(PAGE_SIZES), max(PAGE_SIZES))
        if size not in PAGE_SIZES:
            raise ParseError("query", "size", 0, f"expected one of {PAGE_SIZES}")
        return cls(q, state, sort, order == "desc", page, size)

    def where(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.q:
            like = self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(
                or_(Attester.vm_id.like(like, escape="\\"), Attester.id.like(like, escape="\\"))
            )
        if self.state:
            where.append(Attester.state == self.state)
        return where


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def fleet_counts(db: Database) -> dict[str, int]:
    """How many attesters are in each state (issue 16's unknown/trusted/failed/stale)."""
    stmt = select(Attester.state, func.count()).group_by(Attester.state)
    counts = dict.fromkeys(ATTESTER_STATES, 0)
    with db.read() as session:
        for state, n in session.execute(stmt).all():
            counts[str(state)] = int(n)
    return counts


def _vm_name(identity: Any) -> str | None:
    vm = identity.get("vm_identity") if isinstance(identity, dict) else None
    name = vm.get("vm_name") if isinstance(vm, dict) else None
    return str(name) if name else None


def _flag_codes(flags: Any) -> list[str]:
    if not isinstance(flags, list):
        return []
    return [str(f.get("flag", "?")) if isinstance(f, dict) else str(f) for f in flags]


def page_select(query: FleetQuery) -> Select[Any]:
    """The statement of one fleet page (bench/console.py explains it).

    A deferred join: the inner query picks the page's ids from the sort's index alone
    (skipping OFFSET index entries, no join), the outer one joins only those rows; a
    single query with the joins makes PostgreSQL sort the joined table for a deep page."""
    col = SORTS[query.sort]
    if query.descending:
        order: tuple[Any, ...] = (col.desc(), Attester.id.desc())
    else:
        order = (col.asc(), Attester.id.asc())
    ids = (
        select(Attester.id)
        .where(*query.where())
        .order_by(*order)
        .limit(query.size)
        .offset((query.page - 1) * query.size)
        .subquery("page")
    )
    return (
        select(
            Attester.id,
            Attester.vm_id,
            Attester.state,
            Attester.state_since,
            Attester.status,
            Attester.flags,
            Attester.identity,
            Attester.last_evidence_at,
            Attester.created_at,
            Assignment.policy_name,
            Result.status,
        )
        .join(ids, ids.c.id == Attester.id)
        .outerjoin(Result, Result.id == Attester.latest_result_id)
        .outerjoin(Assignment, Assignment.attester_id == Attester.id)
        .order_by(*order)
    )


def fleet_page(
    db: Database, query: FleetQuery, now: datetime, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """One page of the fleet table; ``total`` counts the matches of the search.

    ``counts`` (from :func:`fleet_counts`) saves the count query when nothing is filtered:
    the total is then their sum."""
    where = query.where()
    stmt = page_select(query)
    with db.read() as session:
        rows = session.execute(stmt).all()
        if where or counts is None:
            count = select(func.count()).select_from(Attester).where(*where)
            total = int(session.execute(count).scalar_one())
        else:
            total = sum(counts.values())
    attesters = []
    for aid, vm_id, state, since, status, flags, identity, at, created, policy, verdict in rows:
        attesters.append(
            {
                "id": aid,
                "vm_id": vm_id,
                "name": _vm_name(identity),
                "state": state,
                "state_since": _iso(since),
                "status": status,
                "flags": _flag_codes(flags),
                "ek_issuer": identity.get("issuer") if isinstance(identity, dict) else None,
                "policy": policy,
                "last_verdict": verdict,
                "evidence_at": _iso(at),
                "evidence_age_s": None if at is None else int((now - at).total_seconds()),
                "created_at": _iso(created),
            }
        )
    return {
        "q": query.q,
        "state": query.state,
        "sort": query.sort,
        "order": "desc" if query.descending else "asc",
        "page": query.page,
        "size": query.size,
        "total": total,
        "pages": max(1, -(-total // query.size)),
        "attesters": attesters,
    }
