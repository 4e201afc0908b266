"""Fleet scale on PostgreSQL: challenge + evidence at 1k, 10k and 100k attesters with history.

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. enrols ``--clients`` real swtpm-backed attesters through the service
   (gunicorn, 2 workers) and attests each once, so one real result row and
   one real nonce row exist to copy;
2. for each fleet size, seeds attesters up to that size with ``COPY`` (copies
   of the real attester row with fresh ids and EK fingerprints), each with
   ``--history-minutes`` results at a 60 s cadence (copies of the real result:
   same report and EAR sizes) and the two recent nonces a live attester has;
3. measures "server-only" challenge + evidence throughput and p50/p99 of the
   real attesters (evidence quoted beforehand, as in bench/http_attest.py), so
   the TPM's signing time is not in the loop; ratios against the 1k size;
4. prints EXPLAIN (ANALYZE) of the hot statements at the largest size, table
   and index sizes, and the storage per attester per day at a 60 s cadence.

Everything shares this 2-core machine (clients, swtpm, gunicorn, PostgreSQL).

Run: .venv/bin/python bench/fleet.py [--sizes 1000,10000,100000] [--seconds 4]

Several verifier processes on one PostgreSQL and CA processes on one ledger:
bench/fleet_procs.py --processes 1,2,3 --ca-processes 1,2 (make bench-fleet-procs).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import requests  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402
from http_attest import POSTGRES, provision, run_cell, start_server, stop  # noqa: E402

from verifier.attester import AttesterState, TpmAttester, enroll  # noqa: E402
from verifier.service.config import init_home  # noqa: E402

_ATTESTER_COLS = (
    "id, vm_id, ek_fingerprint, ek_public, ek_certificate, identity, ak_public, ak_name,"
    " status, flags, token_sha256, created_at, activated_at, reset_count, restart_count,"
    " clock, latest_result_id"
)
_RESULT_COLS = "attester_id, created_at, status, policy_name, nonce, report, ear"
_NONCE_COLS = (
    "nonce, attester_id, pcr_selection, policy_name, created_at, expires_at, used, used_at"
)


def _plain(row: Any) -> list[Any]:
    """A fetched row with its JSON values as text, as COPY takes them."""
    return [json.dumps(v) if isinstance(v, dict | list) else v for v in row]


def seed(engine: sqlalchemy.Engine, start: int, stop_at: int, minutes: int) -> float:
    """Attesters ``start..stop_at-1`` with ``minutes`` of history, by COPY; seconds taken."""
    t0 = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f"SELECT {_ATTESTER_COLS} FROM attesters LIMIT 1")  # noqa: S608
        att = _plain(cur.fetchone())
        cur.execute(f"SELECT {_RESULT_COLS} FROM results LIMIT 1")  # noqa: S608
        res = _plain(cur.fetchone())
        cur.execute(f"SELECT {_NONCE_COLS} FROM nonces LIMIT 1")  # noqa: S608
        non = _plain(cur.fetchone())
        now = datetime.now(UTC)
        ids = [str(uuid.UUID(int=(1 << 120) + i)) for i in range(start, stop_at)]
        with cur.copy(f"COPY attesters ({_ATTESTER_COLS}) FROM STDIN") as cp:
            for i, aid in zip(range(start, stop_at), ids, strict=True):
                att[0], att[1], att[2] = aid, f"fleet-{i}", f"{i:064x}"
                att[16] = None
                cp.write_row(att)
        with cur.copy(f"COPY results ({_RESULT_COLS}) FROM STDIN") as cp:
            for aid in ids:
                for m in range(minutes, 0, -1):
                    res[0], res[1], res[4] = aid, now - timedelta(minutes=m), secrets.token_hex(32)
                    cp.write_row(res)
        with cur.copy(f"COPY nonces ({_NONCE_COLS}) FROM STDIN") as cp:
            for aid in ids:
                for m in (2, 1):
                    at = now - timedelta(minutes=m)
                    non[0], non[1] = secrets.token_hex(32), aid
                    non[4], non[5], non[6], non[7] = at, at + timedelta(seconds=120), True, at
                    cp.write_row(non)
        raw.commit()
        cur.execute("ANALYZE")  # without statistics the join below runs for minutes at 100k
        # each seeded attester's latest result, as the service keeps it
        cur.execute(
            "UPDATE attesters a SET latest_result_id = r.id FROM"
            " (SELECT attester_id, max(id) AS id FROM results GROUP BY attester_id) r"
            " WHERE r.attester_id = a.id AND a.latest_result_id IS NULL"
        )
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - t0


def explain(engine: sqlalchemy.Engine, aid: str) -> None:
    """EXPLAIN ANALYZE of the hot statements for one real attester (rolled back)."""
    now = datetime.now(UTC)
    nonce = secrets.token_hex(32)
    statements = [
        (
            "challenge: read attester + policy",
            "SELECT a.activated_at, a.token_sha256, p.name, p.body FROM attesters a"
            " LEFT JOIN assignments s ON s.attester_id = a.id"
            " LEFT JOIN policies p ON p.name = s.policy_name WHERE a.id = :aid",
        ),
        (
            "challenge: purge this attester's expired nonces",
            "DELETE FROM nonces WHERE attester_id = :aid AND expires_at < :now",
        ),
        (
            "challenge: insert nonce",
            "INSERT INTO nonces (nonce, attester_id, pcr_selection, policy_name, created_at,"
            " expires_at, used, used_at) VALUES (:n, :aid, '{}', NULL, :now, :now, false, NULL)",
        ),
        (
            "evidence: read attester + nonce + policy",
            "SELECT a.ak_public, n.used, n.expires_at, p.body FROM attesters a"
            " LEFT JOIN nonces n ON n.nonce = :n LEFT JOIN policies p ON p.name = n.policy_name"
            " WHERE a.id = :aid",
        ),
        (
            "evidence: consume nonce + lock attester",
            "WITH c AS (UPDATE nonces SET used = true, used_at = :now WHERE nonce = :n"
            " AND attester_id = :aid AND used = false RETURNING attester_id)"
            " SELECT a.flags FROM attesters a JOIN c ON c.attester_id = a.id FOR UPDATE OF a",
        ),
        (
            "evidence: insert result + update attester",
            "WITH r AS (INSERT INTO results (attester_id, created_at, status, policy_name,"
            " nonce, report, ear) VALUES (:aid, :now, 'affirming', NULL, :n, '{}', '')"
            " RETURNING id) UPDATE attesters SET latest_result_id = (SELECT id FROM r)"
            " WHERE id = :aid",
        ),
        (
            "status: an attester's recent results",
            "SELECT id, status FROM results WHERE attester_id = :aid"
            " ORDER BY created_at DESC LIMIT 20",
        ),
        (
            "retention: one batch of old results",
            "SELECT id FROM results WHERE created_at < :cut AND id NOT IN"
            " (SELECT latest_result_id FROM attesters WHERE latest_result_id IS NOT NULL)"
            " ORDER BY created_at LIMIT 1000",
        ),
    ]
    params = {"aid": aid, "now": now, "n": nonce, "cut": now - timedelta(minutes=3)}
    with engine.connect() as conn:
        for title, sql in statements:
            tx = conn.begin()
            plan = conn.execute(
                sqlalchemy.text(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}"),
                params,
            )
            print(f"\n-- {title}")
            for (line,) in plan:
                print(f"   {line}")
            tx.rollback()


def sizes(engine: sqlalchemy.Engine, attesters: int, minutes: int) -> None:
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(
                "SELECT relname, pg_total_relation_size(oid), pg_relation_size(oid)"
                " FROM pg_class WHERE relname IN ('attesters', 'results', 'nonces')"
            )
        ).all()
    print("\n| table | total (with indexes, TOAST) | heap |")
    print("|---|---|---|")
    total = {name: tot for name, tot, _heap in rows}
    for name, tot, heap in sorted(rows):
        print(f"| {name} | {tot / 2**20:.1f} MiB | {heap / 2**20:.1f} MiB |")
    per_result = total["results"] / max(1, attesters * minutes)
    per_day = per_result * 1440
    print(
        f"\nresults: {per_result:.0f} bytes per row (indexes included); at a 60 s cadence "
        f"{per_day / 2**20:.2f} MiB per attester per day "
        f"({per_day * 1e5 / 2**30:.0f} GiB per day for 100,000 attesters)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--history-minutes", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=8)
    opts = ap.parse_args()
    levels = sorted(int(x) for x in opts.sizes.split(","))
    root = Path(tempfile.mkdtemp(prefix="fleet-"))
    admin = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"vtpm_fleet_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES.rsplit("/", 1)[0] + "/" + name
    engine = sqlalchemy.create_engine(url)
    tpms: list[Any] = []
    try:
        ca, dirs = provision(root, opts.clients)
        from vtpm_core.swtpm import SwtpmProcess

        for d in dirs:
            t = SwtpmProcess(d)
            t.start()
            tpms.append(t)
        home = root / "home"
        init_home(home, verifier_id="fleet")
        shutil.copyfile(ca / "swtpm-localca-rootca-cert.pem", home / "roots" / "root.pem")
        shutil.copyfile(ca / "issuercert.pem", home / "intermediates" / "issuer.pem")
        cfg = home / "verifier.yaml"
        raw = yaml.safe_load(cfg.read_text())
        raw["nonce_lifetime_s"] = 3600  # server-only mode quotes ahead
        cfg.write_text(yaml.safe_dump(raw))
        server, base = start_server(home, url)
        rows: list[tuple[int, dict[str, float], float]] = []
        try:
            enrolled: list[tuple[str, AttesterState]] = []
            with requests.Session() as http:
                for i, t in enumerate(tpms):
                    with TpmAttester.open(t.endpoint.tcti) as att:
                        enrolled.append((t.endpoint.tcti, enroll(http, base, att, vm_id=f"r-{i}")))
            run_cell(base, enrolled, 1, "tpm-in-loop", 0.5)  # one real result and nonce
            have = len(enrolled)
            # warm-up: workers' pools, caches and the appraiser's memo filled before timing
            run_cell(base, enrolled, opts.clients, "server-only", 1.0)
            for size in levels:
                took = seed(engine, have, size, opts.history_minutes)
                have = size
                cell = run_cell(base, enrolled, opts.clients, "server-only", opts.seconds)
                rows.append((size, cell, took))
                print(
                    f"  {size:7} attesters (seeded in {took:5.1f} s): {cell['per_s']:7.1f}/s"
                    f"  p50 {cell['p50_ms']:6.1f} ms  p99 {cell['p99_ms']:6.1f} ms"
                    f"  (n={cell['attestations']})",
                    flush=True,
                )
            explain(engine, enrolled[0][1].attester_id)
        finally:
            stop(server)
        base_cell = rows[0][1]
        print(
            "\n| attesters | results rows | seeded in s | attestations/s | vs first |"
            " p50 ms | p99 ms |"
        )
        print("|---|---|---|---|---|---|---|")
        for size, c, took in rows:
            ratio = c["per_s"] / base_cell["per_s"] if base_cell["per_s"] else 0.0
            print(
                f"| {size:,} | {size * opts.history_minutes:,} | {took:.1f} | {c['per_s']:.1f} |"
                f" {ratio:.2f}x | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} |"
            )
        worst = min(c["per_s"] for _s, c, _t in rows) / base_cell["per_s"]
        verdict = "met" if worst >= 0.8 else "not met"
        print(
            f"target: throughput within 20% from {levels[0]:,} to {levels[-1]:,}: {verdict}"
            f" (worst {worst:.2f}x)"
        )
        sizes(engine, levels[-1], opts.history_minutes)
        print(
            f"clients: {opts.clients} real attesters, 4 processes; server: gunicorn 2 workers;"
            " one 2-core machine shared with other work"
        )
    finally:
        for t in tpms:
            t.stop()
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
