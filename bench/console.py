"""Console fleet page with 100,000 attesters in PostgreSQL: median and p99 per request kind.

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. a verifier home and the app (``create_app``, migrated to the latest revision);
2. ``--attesters`` attesters seeded with one ``INSERT ... SELECT generate_series``
   (states spread over trusted/failed/stale/unknown, an EK issuer and VM name in the
   identity, a latest result and a policy assignment each), then ANALYZE;
3. a console session (login with the admin token), then ``--requests`` of each:
   the fleet page as HTML and as JSON (page 1), page ``--deep`` (OFFSET deep in the
   table), a VM-id prefix search, the ``failed`` filter sorted by evidence age;
   median and p99 of the in-process request time (Flask test client: the view, the
   queries and the template, no socket), against the 100 ms target;
4. EXPLAIN (ANALYZE, BUFFERS) of the page queries and the count query.

Run: .venv/bin/python bench/console.py [--attesters 100000] [--requests 200] [--deep 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import sqlalchemy  # noqa: E402
from sqlalchemy.dialects import postgresql  # noqa: E402

from verifier.service.app import create_app  # noqa: E402
from verifier.service.config import init_home, load_config  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"

_SEED = """
INSERT INTO policies (name, version, body, sha256, created_at, updated_at)
VALUES ('bench', 1, 'pcrs: {}', repeat('0', 64), now(), now());
INSERT INTO attesters (id, vm_id, ek_fingerprint, ek_public, identity, ak_public, ak_name,
  status, flags, created_at, activated_at, state, state_since, last_evidence_at)
SELECT md5('a' || i)::uuid::text, 'vm-' || lpad(i::text, 7, '0'), md5('ek' || i) || md5('k' || i),
  '\\x00'::bytea,
  json_build_object('issuer', 'CN=vtpm-trust EK CA ' || (i % 3), 'vm_identity',
    json_build_object('vm_name', 'host-' || i)),
  '\\x00'::bytea, '000b', 'active', CASE WHEN i % 97 = 0 THEN
    '[{"flag": "clock-regressed", "detail": "bench", "at": "2026-12-06T00:00:00Z"}]'::json
    ELSE '[]'::json END,
  now() - (i || ' seconds')::interval, now() - (i || ' seconds')::interval,
  (ARRAY['trusted', 'trusted', 'trusted', 'failed', 'stale', 'unknown'])[1 + i % 6],
  now() - ((i % 3600) || ' seconds')::interval, now() - ((i % 3600) || ' seconds')::interval
FROM generate_series(1, :n) AS i;
INSERT INTO results (attester_id, created_at, status, policy_name, nonce, report, ear)
SELECT id, last_evidence_at, CASE state WHEN 'failed' THEN 'contraindicated'
  ELSE 'affirming' END, 'bench', md5(id), '{"failures": []}'::json, 'x'
FROM attesters WHERE state <> 'unknown';
UPDATE attesters a SET latest_result_id = r.id FROM results r WHERE r.attester_id = a.id;
INSERT INTO assignments (attester_id, policy_name) SELECT id, 'bench' FROM attesters;
"""


def _ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attesters", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--deep", type=int, default=1000, help="page number of the deep page")
    args = ap.parse_args()
    name = f"bench_console_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES}/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            token = init_home(home, database_url=url)
            app = create_app(load_config(home, database_url=url), migrate=True)
            engine = sqlalchemy.create_engine(url)
            t0 = time.perf_counter()
            with engine.begin() as conn:
                for stmt in _SEED.split(";\n"):
                    if stmt.strip():
                        conn.execute(sqlalchemy.text(stmt), {"n": args.attesters})
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sqlalchemy.text("VACUUM ANALYZE"))  # autovacuum's steady state
            print(f"seeded {args.attesters} attesters in {time.perf_counter() - t0:.1f} s")
            run(app, token, args)
            explain(engine, args)
            engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def run(app: object, token: str, args: argparse.Namespace) -> None:
    client = app.test_client()  # type: ignore[attr-defined]
    r = client.post("/console/login", data={"token": token})
    assert r.status_code == 303, r.data
    kinds = {
        "HTML page 1": "/console/",
        "JSON page 1": "/console/api/fleet",
        f"JSON page {args.deep}": f"/console/api/fleet?page={args.deep}",
        f"HTML page {args.deep}": f"/console/?page={args.deep}",
        "JSON search vm-00123": "/console/api/fleet?q=vm-00123",
        "JSON failed, by evidence": "/console/api/fleet?state=failed&sort=evidence",
    }
    print(f"\n{'request':28} {'median ms':>10} {'p99 ms':>8}  (target < 100 ms)")
    for label, path in kinds.items():
        for _ in range(5):  # warm-up: pools, template cache
            client.get(path)
        samples = []
        for _ in range(args.requests):
            t = time.perf_counter()
            r = client.get(path)
            samples.append(time.perf_counter() - t)
            assert r.status_code == 200, (path, r.status_code)
        med, p99 = _ms(samples)
        print(f"{label:28} {med:10.1f} {p99:8.1f}")


def explain(engine: sqlalchemy.Engine, args: argparse.Namespace) -> None:
    # imported after the app: verifier.service imports the console's blueprint
    from verifier.console.fleet import FleetQuery, page_select

    queries = {
        "page 1 (created desc)": FleetQuery(),
        f"page {args.deep} (created desc)": FleetQuery(page=args.deep),
        "search vm-00123": FleetQuery(q="vm-00123"),
        "failed by evidence": FleetQuery(state="failed", sort="evidence"),
    }
    with engine.connect() as conn:
        for label, query in queries.items():
            sql = page_select(query).compile(
                dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
                compile_kwargs={"literal_binds": True},
            )
            plan = conn.execute(sqlalchemy.text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).scalars()
            print(f"\n-- {label}\n" + "\n".join(plan))
        plan = conn.execute(
            sqlalchemy.text(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT state, count(*) FROM attesters GROUP BY state"
            )
        ).scalars()
        print("\n-- counts by state\n" + "\n".join(plan))


if __name__ == "__main__":
    main()
