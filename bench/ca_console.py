"""CA console with 100,000 issued EK certificates in PostgreSQL: median and p99 per request.

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. a CA home and its app (``ca.http.create_app``) over a PostgreSQL ledger; one real
   EK certificate issued through the CA (the certificate page parses its DER);
2. ``--certs`` ledger rows seeded with one ``INSERT ... SELECT generate_series``
   (``--revoked-every``: every n-th revoked, reasons spread), then VACUUM ANALYZE;
3. a console session (login with an admin token), then ``--requests`` of each kind:
   the list as HTML and JSON (page 1), page ``--deep``, searches by VM id, serial, EK
   name and any field, the revoked page, one certificate, the CRL state (which builds
   and signs the CRL, as ``GET /v1/crl`` does); median and p99 of the in-process request
   (Flask test client: view, queries, template; no socket) against the 100 ms target;
4. EXPLAIN ANALYZE of the page queries.

Run: .venv/bin/python bench/ca_console.py [--certs 100000] [--requests 200] [--deep 1000]
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

from ca.home import CaHome  # noqa: E402
from ca.http import create_app  # noqa: E402
from ca.issuance import IssueRequest  # noqa: E402
from ca.ledger import CertQuery  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
PASSPHRASE = b"bench ca console"

_SEED = """
INSERT INTO ca_certificates (serial, ek_name, ek_public_sha256, ek_template, key_type, vm_id,
  vm_name, vtpm_instance_id, not_before, not_after, status, revoked_at, revocation_reason,
  tbs_der, certificate_der, created_at)
SELECT '8' || substr(md5('s' || i), 1, 31), '000b' || md5('n' || i) || md5('m' || i),
  md5('k' || i) || md5('h' || i), CASE WHEN i % 2 = 0 THEN 'L-1' ELSE 'L-2' END,
  CASE WHEN i % 2 = 0 THEN 'rsa-2048' ELSE 'ecc-nist-p256' END, md5('v' || (i / 2))::uuid::text,
  'host-' || lpad((i / 2)::text, 6, '0'), '', now() - interval '1 day',
  now() + interval '3650 days',
  CASE WHEN i % :every = 0 THEN 'revoked' ELSE 'issued' END,
  CASE WHEN i % :every = 0 THEN now() - (i || ' seconds')::interval END,
  CASE WHEN i % :every = 0 THEN
    (ARRAY['superseded', 'key-compromise', 'cessation-of-operation'])[1 + i % 3] END,
  '\\x3000'::bytea, NULL, now() - ((2 * :n - i) || ' seconds')::interval
FROM generate_series(1, :n) AS i
"""


def _ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--certs", type=int, default=100_000)
    ap.add_argument("--revoked-every", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--deep", type=int, default=1000, help="page number of the deep page")
    args = ap.parse_args()
    name = f"bench_ca_console_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES}/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = CaHome(Path(tmp) / "ca")
            home.init(passphrase=PASSPHRASE)
            token = home.add_token("bench", "admin")
            ca = home.open(passphrase=PASSPHRASE, database=url)
            try:
                real = _issue_one(ca)
                engine = sqlalchemy.create_engine(url)
                t0 = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(
                        sqlalchemy.text(_SEED), {"n": args.certs, "every": args.revoked_every}
                    )
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sqlalchemy.text("VACUUM ANALYZE"))  # autovacuum's steady state
                print(f"seeded {args.certs} certificates in {time.perf_counter() - t0:.1f} s")
                run(create_app(ca=ca), token, real, args)
                explain(ca, engine, args)
                engine.dispose()
            finally:
                ca.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _issue_one(ca: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.ek import CertifiableEk

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ek = CertifiableEk.from_key(key, template="bare-pem", name=None, raw=b"")
    result = ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4(), vm_name="bench"))  # type: ignore[attr-defined]
    return f"{result.record.serial:x}"


def run(app: object, token: str, serial: str, args: argparse.Namespace) -> None:
    client = app.test_client()  # type: ignore[attr-defined]
    r = client.post("/ca-console/login", data={"token": token})
    assert r.status_code == 303, r.data
    vm = client.get(f"/ca-console/api/certificates?page={args.deep // 2}").get_json()[
        "certificates"
    ][0]["vm_id"]
    kinds = {
        "HTML list page 1": "/ca-console/",
        "JSON list page 1": "/ca-console/api/certificates",
        f"JSON list page {args.deep}": f"/ca-console/api/certificates?page={args.deep}",
        f"HTML list page {args.deep}": f"/ca-console/?page={args.deep}",
        "JSON search VM id": f"/ca-console/api/certificates?field=vm_id&q={vm[:13]}",
        "JSON search serial": "/ca-console/api/certificates?field=serial&q=8abc",
        "JSON search EK name": "/ca-console/api/certificates?field=ek_name&q=000b12ab",
        "JSON search any field": f"/ca-console/api/certificates?q={vm[:8]}",
        "HTML revoked page 1": "/ca-console/revoked",
        "HTML certificate": f"/ca-console/certificates/{serial}",
        "HTML CRL state": "/ca-console/crl",
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
            assert r.status_code == 200, (path, r.status_code, r.data[:300])
        med, p99 = _ms(samples)
        print(f"{label:28} {med:10.1f} {p99:8.1f}")


def explain(ca: object, engine: sqlalchemy.Engine, args: argparse.Namespace) -> None:
    ledger = ca.ledger  # type: ignore[attr-defined]
    queries = {
        f"page {args.deep} (created desc)": CertQuery(page=args.deep),
        "revoked page 1": CertQuery(status="revoked", sort="revoked"),
        "search any 8abc": CertQuery(q="8abc"),
    }
    with engine.connect() as conn:
        for label, query in queries.items():
            stmt = ledger.page_select(query, ledger.search_where(query, conn))
            sql = stmt.compile(
                dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
                compile_kwargs={"literal_binds": True},
            )
            plan = conn.execute(sqlalchemy.text(f"EXPLAIN (ANALYZE) {sql}")).scalars()
            print(f"\n-- {label}\n" + "\n".join(plan))


if __name__ == "__main__":
    main()
