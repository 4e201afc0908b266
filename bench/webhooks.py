"""Time from a failing evidence to its webhook's arrival (issue 16): median and p99.

Per backend (SQLite, PostgreSQL): `vtpm verifier serve` (gunicorn, 2 workers), one
real swtpm attester, one receiver process on 127.0.0.1 subscribed to ``failed``.
Each round makes the attester trusted (no policy), assigns a policy its PCRs miss,
quotes a fresh challenge, and then times from just before ``POST .../evidence``
(the failing evidence) until the receiver has logged the delivery of that
result's ``trusted -> failed`` transition. The baseline, measured in the same
rounds, is the evidence request's own round trip (the verdict reaching the
attester); the ratio says what the notification adds on top.

Run: .venv/bin/python bench/webhooks.py [--rounds 40] [--backends sqlite,postgres]
(``measure(...)`` is callable from bench/continuous.py.)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402

from bench.http_attest import free_port, provision, start_server, stop  # noqa: E402
from verifier.attester import TpmAttester, enroll  # noqa: E402
from verifier.service.config import init_home  # noqa: E402

POSTGRES = os.environ.get("VTPM_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RECEIVER = REPO / "tests" / "verifier" / "service" / "_webhook_receiver.py"
NEVER = {"version": 1, "name": "never", "pcrs": {"sha256": {"7": "11" * 32}}}
TARGET_P99_S = 5.0  # "hear about a change within seconds" (issue 16)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(url: str, admin: str, tcti: str, rounds: int, workdir: Path) -> dict[str, Any]:
    """``rounds`` failing evidences against the verifier at ``url``; latencies in seconds."""
    port = free_port()
    log = workdir / f"received-{port}.jsonl"
    receiver = subprocess.Popen(
        [sys.executable, str(RECEIVER), str(port), str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    admin_h = {"Authorization": f"Bearer {admin}"}
    try:
        for _ in range(100):
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        http = requests.Session()
        r = http.post(
            f"{url}/v1/webhooks",
            headers=admin_h,
            json={"url": f"http://127.0.0.1:{port}/hook", "events": ["failed"]},
            timeout=10,
        )
        r.raise_for_status()
        http.put(f"{url}/v1/policies/never", headers=admin_h, json={"policy": NEVER}, timeout=10)
        arrival: list[float] = []
        evidence_rtt: list[float] = []
        with TpmAttester.open(tcti) as att:
            state = enroll(http, url, att, vm_id=f"bench-hooks-{port}")
            base = f"{url}/v1/attesters/{state.attester_id}"
            tok = {"Authorization": f"Bearer {state.token}"}

            def evidence(policy: str | None) -> tuple[float, float, dict[str, Any]]:
                r = http.put(f"{base}/policy", headers=admin_h, json={"policy": policy}, timeout=10)
                r.raise_for_status()
                ch = http.post(f"{base}/challenges", headers=tok, timeout=10).json()
                q = att.quote(base64.b64decode(ch["nonce"]), ch["pcr_selection"])
                body = {
                    "nonce": ch["nonce"],
                    "quote": base64.b64encode(q.attest).decode(),
                    "signature": base64.b64encode(q.signature).decode(),
                    "pcrs": q.pcrs,
                }
                t0 = time.time()
                r = http.post(f"{base}/evidence", headers=tok, json=body, timeout=30)
                t1 = time.time()
                r.raise_for_status()
                return t0, t1, r.json()

            for _ in range(rounds):
                _, _, good = evidence(None)
                assert good["state"] == "trusted", good
                t0, t1, bad = evidence("never")
                assert bad["state"] == "failed", bad
                evidence_rtt.append(t1 - t0)
                deadline = time.monotonic() + 60
                while True:
                    got = (
                        [json.loads(x) for x in log.read_text().splitlines()]
                        if log.exists()
                        else []
                    )
                    hit = [g for g in got if json.loads(g["body"])["result_id"] == bad["id"]]
                    if hit:
                        arrival.append(hit[0]["t"] - t0)
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"no webhook for result {bad['id']} within 60 s")
                    time.sleep(0.002)
        return {
            "rounds": rounds,
            "arrival_median_s": statistics.median(arrival),
            "arrival_p99_s": _pct(arrival, 0.99),
            "evidence_median_s": statistics.median(evidence_rtt),
            "evidence_p99_s": _pct(evidence_rtt, 0.99),
        }
    finally:
        receiver.terminate()
        receiver.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--backends", default="sqlite,postgres")
    opts = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    tpm = None
    pg_admin = None
    pg_dbs: list[str] = []
    rows = []
    try:
        ca, [state_dir] = provision(root, 1)
        from vtpm_core.swtpm import SwtpmProcess

        tpm = SwtpmProcess(state_dir)
        tpm.start()
        for backend in opts.backends.split(","):
            home = root / f"home-{backend}"
            admin = init_home(home, verifier_id="bench")
            shutil.copyfile(ca / "swtpm-localca-rootca-cert.pem", home / "roots" / "root.pem")
            shutil.copyfile(ca / "issuercert.pem", home / "intermediates" / "issuer.pem")
            cfg = home / "verifier.yaml"
            raw = yaml.safe_load(cfg.read_text())
            raw["webhook_poll_ms"] = 500  # the default: the wake-up after a commit is what counts
            cfg.write_text(yaml.safe_dump(raw))
            db = None
            if backend == "postgres":
                pg_admin = pg_admin or sqlalchemy.create_engine(
                    POSTGRES, isolation_level="AUTOCOMMIT"
                )
                name = f"vtpm_bench_{secrets.token_hex(4)}"
                with pg_admin.connect() as c:
                    c.exec_driver_sql(f'CREATE DATABASE "{name}"')
                pg_dbs.append(name)
                db = POSTGRES.rsplit("/", 1)[0] + "/" + name
            server, url = start_server(home, db)
            try:
                cell = measure(url, admin, tpm.endpoint.tcti, opts.rounds, root)
            finally:
                stop(server)
            rows.append((backend, cell))
            med, p99 = cell["arrival_median_s"] * 1000, cell["arrival_p99_s"] * 1000
            print(
                f"  {backend:8} failing evidence -> webhook: median {med:.1f} ms, p99 {p99:.1f} ms"
                f"  (evidence round trip median {cell['evidence_median_s'] * 1000:.1f} ms;"
                f" n={cell['rounds']})",
                flush=True,
            )
        print()
        print("| database | webhook median ms | webhook p99 ms | evidence median ms | ratio |")
        print("|---|---|---|---|---|")
        for backend, c in rows:
            ratio = c["arrival_median_s"] / c["evidence_median_s"]
            print(
                f"| {backend} | {c['arrival_median_s'] * 1000:.1f} | "
                f"{c['arrival_p99_s'] * 1000:.1f} | {c['evidence_median_s'] * 1000:.1f} | "
                f"{ratio:.2f}x |"
            )
        worst = max(c["arrival_p99_s"] for _, c in rows)
        verdict = "met" if worst <= TARGET_P99_S else "MISSED"
        print(f"target: p99 <= {TARGET_P99_S:.0f} s: {verdict} (worst p99 {worst * 1000:.1f} ms)")
        print("ratio: webhook arrival median / evidence round-trip median (baseline, same rounds)")
    finally:
        if tpm is not None:
            tpm.stop()
        if pg_admin is not None:
            with pg_admin.connect() as c:
                for name in pg_dbs:
                    c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            pg_admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
