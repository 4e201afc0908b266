"""One deadline-sweeper tick at 100, 10,000 and 100,000 attesters in PostgreSQL: O(changes)?

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. seeds attesters directly (``COPY``): 90 % trusted with deadlines 1-2 h ahead
   (not due), 5 % failed, 3 % stale, 2 % unknown; ``ANALYZE``;
2. per fleet size, ``--rounds`` ticks of :func:`verifier.service.sweeper.sweep`
   (the service's own function, with its advisory lock and transitions) with
   ``--changes`` trusted attesters made due just before each tick (a fixed
   number, different attesters each round), and as many ticks with nothing due;
   medians, and the ratio of each size against the 100-attester baseline of the
   same run: O(changes) means ratios near 1, O(fleet) would mean ~1,000x;
3. the same for the fleet gauges' statement (:class:`FleetStats`, cached per
   sweep interval: O(fleet) by design) and a page of ``GET /v1/attesters?state=``
   deep in the fleet (keyset, O(page));
4. prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the sweeper's statement at the
   largest size (inside a rolled-back transaction).

Run: .venv/bin/python bench/continuous.py [--sizes 100,10000,100000] [--changes 20]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verifier.service.db import Database, upgrade
from verifier.service.fleetstats import FleetStats
from verifier.service.services import AttesterService
from verifier.service.sweeper import sweep

POSTGRES = os.environ.get("VTPM_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_COLS = (
    "id, vm_id, ek_fingerprint, ek_public, identity, ak_public, ak_name, status, flags,"
    " created_at, activated_at, state, state_since, deadline, last_evidence_at, cadence_s"
)
_SWEEP_SELECT = (
    "SELECT id, state, deadline, last_evidence_at, cadence_s FROM attesters"
    " WHERE deadline < %(now)s ORDER BY deadline LIMIT 500 FOR UPDATE SKIP LOCKED"
)


def aid(i: int) -> str:
    return str(uuid.UUID(int=(1 << 120) + i))


def state_of(i: int) -> str:
    k = i % 100
    return "failed" if k < 5 else "stale" if k < 8 else "unknown" if k < 10 else "trusted"


def seed(db: Database, start: int, stop: int, now: datetime) -> None:
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY attesters ({_COLS}) FROM STDIN") as cp:  # type: ignore[attr-defined]
            for i in range(start, stop):
                state = state_of(i)
                seen = None if state == "unknown" else now - timedelta(seconds=30 + i % 600)
                deadline = now + timedelta(seconds=3600 + i % 3600) if state == "trusted" else None
                cp.write_row(
                    (
                        aid(i),
                        f"fleet-{i}",
                        f"{i:064x}",
                        b"ek",
                        "{}",
                        b"ak",
                        "00",
                        "active",
                        "[]",
                        now - timedelta(days=1),
                        now - timedelta(days=1),
                        state,
                        seen,
                        deadline,
                        seen,
                        None if seen is None else 60,
                    )
                )
        raw.commit()
        cur.execute("ANALYZE attesters")
        raw.commit()
    finally:
        raw.close()


def make_due(db: Database, size: int, changes: int, now: datetime, rng: random.Random) -> None:
    """``changes`` trusted attesters, different each round, whose deadline just passed."""
    picked: list[str] = []
    while len(picked) < changes:
        i = rng.randrange(size)
        if state_of(i) == "trusted":
            picked.append(aid(i))
    with db.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "UPDATE attesters SET state = 'trusted', deadline = :d WHERE id = ANY(:ids)"
            ),
            {"d": now - timedelta(seconds=1), "ids": picked},
        )


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def explain(db: Database, now: datetime) -> None:
    print("\nEXPLAIN (ANALYZE, BUFFERS) of the sweeper's statement, 20 due (rolled back):")
    sql = (
        "WITH c AS (" + _SWEEP_SELECT + ")"  # noqa: S608 (constant text)
        " UPDATE attesters a SET state = 'stale', state_since = %(now)s, deadline = NULL"
        " FROM c WHERE a.id = c.id RETURNING a.id"
    )
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, {"now": now})
        for (line,) in cur.fetchall():
            print("   ", line)
        raw.rollback()
        print("\nEXPLAIN of the fleet gauges' statement (no index can serve a GROUP BY of all):")
        cur.execute(
            "EXPLAIN (ANALYZE) SELECT state, count(*), count(last_evidence_at),"
            " sum(extract(epoch from last_evidence_at)) FROM attesters GROUP BY state"
        )
        for (line,) in cur.fetchall():
            print("   ", line)
        raw.rollback()
    finally:
        raw.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    opts = ap.parse_args()
    sizes = sorted(int(x) for x in opts.sizes.split(","))
    admin = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"vtpm_cont_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db = Database(POSTGRES.rsplit("/", 1)[0] + "/" + name)
    rng = random.Random(16)
    rows: list[tuple[int, float, float, float, float]] = []
    try:
        upgrade(db.engine)
        listing = AttesterService(db, None, None)  # type: ignore[arg-type]
        now = datetime.now(UTC)
        seeded = 0
        for size in sizes:
            t0 = time.perf_counter()
            seed(db, seeded, size, now)
            seeded = size
            print(f"seeded {size:,} attesters in {time.perf_counter() - t0:.1f} s", flush=True)
            sweep(db, now)  # warm: connections, statement caches
            busy, idle = [], []
            for _ in range(opts.rounds):
                make_due(db, size, opts.changes, now, rng)
                busy.append(timed(lambda: sweep(db, now)))
                idle.append(timed(lambda: sweep(db, now)))
            marked = sweep(db, now).marked
            assert marked == 0, marked
            stats = FleetStats(db, 0)
            gauges = statistics.median(timed(stats.compute) for _ in range(5))
            after = aid(size // 2)
            page = statistics.median(
                timed(lambda a=after: listing.list_page("trusted", a, 100)) for _ in range(9)
            )
            rows.append((size, statistics.median(busy), statistics.median(idle), gauges, page))
        base = rows[0]
        print(
            f"\none sweeper tick, {opts.changes} attesters going stale, medians of "
            f"{opts.rounds} (ratio vs {base[0]:,} attesters, same run):"
        )
        print(
            f"{'attesters':>10} {'tick, changes':>20} {'tick, nothing due':>22}"
            f" {'fleet gauges':>20} {'page of 100':>18}"
        )
        for size, b, i, g, p in rows:
            print(
                f"{size:>10,} {b * 1e3:>9.2f} ms ({b / base[1]:4.2f}x) {i * 1e3:>11.2f} ms"
                f" ({i / base[2]:4.2f}x) {g * 1e3:>9.2f} ms ({g / base[3]:6.1f}x)"
                f" {p * 1e3:>7.2f} ms ({p / base[4]:4.2f}x)"
            )
        make_due(db, sizes[-1], opts.changes, now, rng)
        explain(db, now)
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()
