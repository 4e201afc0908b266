"""Fleet queries of the console: one page of attesters, server-side sorted and paged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from verifier.service.db import Database
from verifier.service.models import Assignment, Attester, Result
from vtpm_core.errors import ParseError

__all__ = ["FleetQuery", "fleet_counts", "fleet_page"]

PAGE_SIZES = (25, 50, 100)
_SORTS = {
    "created": Attester.created_at,
    "vm_id": Attester.vm_id,
    "id": Attester.id,
}


@dataclass(frozen=True, slots=True)
class FleetQuery:
    """A checked fleet request: search text, sort column and direction, page."""

    q: str = ""
    sort: str = "created"
    descending: bool = True
    page: int = 1
    size: int = 50

    @classmethod
    def parse(cls, args: Any) -> FleetQuery:
        q = str(args.get("q", "")).strip()
        if len(q) > 255:
            raise ParseError("query", "q", 0, "search text longer than 255 characters")
        sort = str(args.get("sort", "created"))
        if sort not in _SORTS:
            raise ParseError("query", "sort", 0, f"expected one of {', '.join(_SORTS)}")
        order = str(args.get("order", "desc"))
        if order not in ("asc", "desc"):
            raise ParseError("query", "order", 0, "expected asc or desc")
        page_raw, size_raw = str(args.get("page", "1")), str(args.get("size", "50"))
        if not page_raw.isdigit() or not 1 <= int(page_raw) <= 100_000:
            raise ParseError("query", "page", 0, "expected an integer 1..100000")
        if not size_raw.isdigit() or int(size_raw) not in PAGE_SIZES:
            raise ParseError("query", "size", 0, f"expected one of {PAGE_SIZES}")
        return cls(q, sort, order == "desc", int(page_raw), int(size_raw))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def fleet_counts(db: Database) -> dict[str, int]:
    """How many attesters have each last verdict ("none": never appraised)."""
    stmt = (
        select(Result.status, func.count())
        .select_from(Attester)
        .outerjoin(Result, Result.id == Attester.latest_result_id)
        .group_by(Result.status)
    )
    with db.read() as session:
        return {str(k or "none"): int(n) for k, n in session.execute(stmt).all()}


def fleet_page(db: Database, query: FleetQuery, now: datetime) -> dict[str, Any]:
    """One page of the fleet table; ``total`` counts the matches of the search."""
    where = []
    if query.q:
        # prefix match: served by the primary key and the VM id index
        like = query.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(
            or_(Attester.vm_id.like(like, escape="\\"), Attester.id.like(like, escape="\\"))
        )
    col = _SORTS[query.sort]
    order = (col.desc(), Attester.id.desc()) if query.descending else (col.asc(), Attester.id)
    stmt = (
        select(
            Attester.id,
            Attester.vm_id,
            Attester.status,
            Attester.flags,
            Attester.identity,
            Assignment.policy_name,
            Result.status,
            Result.created_at,
        )
        .outerjoin(Result, Result.id == Attester.latest_result_id)
        .outerjoin(Assignment, Assignment.attester_id == Attester.id)
        .where(*where)
        .order_by(*order)
        .limit(query.size)
        .offset((query.page - 1) * query.size)
    )
    count = select(func.count()).select_from(Attester).where(*where)
    with db.read() as session:
        rows = session.execute(stmt).all()
        total = int(session.execute(count).scalar_one())
    attesters = []
    for aid, vm_id, status, flags, identity, policy, verdict, at in rows:
        attesters.append(
            {
                "id": aid,
                "vm_id": vm_id,
                "status": status,
                "flags": [f.get("code", "?") if isinstance(f, dict) else str(f) for f in flags],
                "ek_issuer": identity.get("issuer") if isinstance(identity, dict) else None,
                "policy": policy,
                "last_verdict": verdict,
                "evidence_at": _iso(at),
                "evidence_age_s": None if at is None else int((now - at).total_seconds()),
            }
        )
    return {
        "q": query.q,
        "sort": query.sort,
        "order": "desc" if query.descending else "asc",
        "page": query.page,
        "size": query.size,
        "total": total,
        "pages": max(1, -(-total // query.size)),
        "attesters": attesters,
    }
