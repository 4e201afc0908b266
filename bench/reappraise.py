"""Re-appraisal throughput: N stored evidences on PostgreSQL against the in-process rate.

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. real evidence, made once on a swtpm (as bench/appraise.py): the corpus log
   vm_rhel9_qemu_ovmf_secureboot_keylime.bin (99 events) extended into the
   swtpm's PCRs, an RSA-2048 AK quote of sha256:0-9,14; a policy learned from
   the log (secure boot, S-CRTM, PCR 0, boot apps, cmdline, db, dbx);
2. seeds ``--count`` attesters with ``COPY``, each with one stored result
   (report.evidence: that quote and signature) and its latest_evidence row
   (the PCRs and the 41 KB log), as the service stores them;
3. times ``ReappraisalService.dry_run(policy, fleet)``: the service's own
   re-appraisal, reading the evidence back from PostgreSQL in keyset pages and
   appraising each with the service's appraiser (quote verified in full each
   time; replay and rules memoised per identical log, as for a fleet booting
   one image: the in-process baseline has the same memo);
4. the baseline, same run: ``LibraryAppraiser.appraise`` in-process on the same
   evidence (no database), and the stateless ``appraise()`` as a floor.

Prints evidences/s (median of ``--runs`` passes over the fleet), the baselines
(medians) and the ratio re-appraisal / in-process appraisal. Everything shares
this 2-core machine (PostgreSQL included).

Run: VTPM_CORPUS=/path/to/corpus .venv/bin/python bench/reappraise.py [--count 100000]
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import sqlalchemy  # noqa: E402
from appraise import rate  # noqa: E402
from http_attest import POSTGRES  # noqa: E402

from tests.conftest import CORPUS  # noqa: E402
from tests.verifier.appraisal_lab import build_lab  # noqa: E402
from verifier.appraisal import Evidence, appraise  # noqa: E402
from verifier.eventlog import EventLog  # noqa: E402
from verifier.policy import learn_policy  # noqa: E402
from verifier.service.appraiser import LibraryAppraiser  # noqa: E402
from verifier.service.config import init_home, load_config  # noqa: E402
from verifier.service.db import Database, upgrade  # noqa: E402
from verifier.service.messages import EvidenceRequest  # noqa: E402
from verifier.service.reappraise import ReappraisalRequest, ReappraisalService  # noqa: E402
from vtpm_core.tpm import Public  # noqa: E402

LOG = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"
_ATTESTER_COLS = (
    "id, vm_id, ek_fingerprint, ek_public, identity, ak_public, ak_name, status, flags,"
    " created_at, activated_at, latest_result_id, state, state_since, last_evidence_at,"
    " cadence_s"
)
_RESULT_COLS = "id, attester_id, created_at, status, policy_name, nonce, report, ear"
_EVIDENCE_COLS = "attester_id, result_id, received_at, quote_verified, pcrs, event_log"


def seed(url: str, count: int, lab_dir: Path, ev: EvidenceRequest, policy_yaml: str) -> float:
    """``count`` attesters with one stored result and evidence each, by COPY; seconds taken."""
    engine = sqlalchemy.create_engine(url)
    t0 = time.perf_counter()
    now = datetime.now(UTC)
    ak_public = (lab_dir / "rsa.pub").read_bytes()
    ak_name = Public.parse_tpm2b(ak_public).name().hex()
    ek_public = (lab_dir / "ek.pub").read_bytes()
    pcrs = json.dumps(
        {b: {str(i): v.hex() for i, v in sorted(p.items())} for b, p in ev.pcrs.items()}
    )
    report = json.dumps(
        {
            "status": "affirming",
            "failures": [],
            "warnings": [],
            "flags": [],
            "policy": "bench",
            "evidence": {
                "quote": base64.b64encode(ev.quote).decode(),
                "signature": base64.b64encode(ev.signature).decode(),
            },
        }
    )
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(
            "INSERT INTO policies (name, version, body, sha256, created_at, updated_at)"
            " VALUES ('bench', 1, %s, %s, %s, %s)",
            (policy_yaml, "0" * 64, now, now),
        )
        ids = [str(uuid.UUID(int=(1 << 120) + i)) for i in range(count)]
        with cur.copy(f"COPY attesters ({_ATTESTER_COLS}) FROM STDIN") as cp:
            for i, aid in enumerate(ids):
                cp.write_row(
                    [aid, f"fleet-{i}", f"{i:064x}", ek_public, "{}", ak_public, ak_name,
                     "active", "[]", now, now, i + 1, "trusted", now, now, 60]
                )  # fmt: skip
        with cur.copy(f"COPY results ({_RESULT_COLS}) FROM STDIN") as cp:
            for i, aid in enumerate(ids):
                cp.write_row([i + 1, aid, now, "affirming", "bench", ev.nonce.hex(), report, "-"])
        with cur.copy(f"COPY latest_evidence ({_EVIDENCE_COLS}) FROM STDIN") as cp:
            for i, aid in enumerate(ids):
                cp.write_row([aid, i + 1, now, True, pcrs, ev.event_log])
        cur.execute("SELECT setval('results_id_seq', %s)", (count,))
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="passes over the fleet")
    parser.add_argument("--seconds", type=float, default=1.0, help="per baseline window")
    args = parser.parse_args()

    admin = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"vtpm_bench_reappraise_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES.rsplit("/", 1)[0] + "/" + name
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            lab = build_lab(work / "state", work, LOG)
            q = lab.quotes["rsa"]
            log = EventLog.parse(lab.log)
            policy = learn_policy(log.verify(log.replay()), name="bench")
            ev = EvidenceRequest(
                nonce=lab.nonce,
                quote=q.attest,
                signature=q.signature,
                pcrs={b: dict(p) for b, p in q.pcrs.values.items()},
                event_log=lab.log,
                ak_public=None,
            )
            home = work / "home"
            init_home(home, verifier_id="bench", database_url=url)
            config = load_config(home, database_url=url)
            db = Database(url)
            upgrade(db.engine)
            seconds = seed(url, args.count, work, ev, policy.to_yaml())
            print(
                f"seeded {args.count:,} attesters with stored evidence ({len(lab.log):,}-byte "
                f"log, RSA-2048 AK quote) on PostgreSQL in {seconds:.1f} s"
            )

            appraiser = LibraryAppraiser.from_config(config)
            selection = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)}
            body = policy.to_yaml()
            one = appraiser.appraise(
                ak_public=(work / "rsa.pub").read_bytes(),
                nonce=lab.nonce,
                evidence=ev,
                selection=selection,
                policy_body=body,
            )
            assert one.status == "affirming", one.failures
            service = ReappraisalService(db, config, appraiser, lambda: datetime.now(UTC))
            passes = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                doc = service.dry_run("bench", ReappraisalRequest(None))
                elapsed = time.perf_counter() - t0
                assert doc["reappraised"] == args.count, doc["skipped"][:3]
                assert doc["verdicts"] == {"affirming": args.count}, doc["verdicts"]
                passes.append(args.count / elapsed)
            reapp = statistics.median(passes)
            inproc = rate(
                partial(
                    appraiser.appraise,
                    ak_public=(work / "rsa.pub").read_bytes(),
                    nonce=lab.nonce,
                    evidence=ev,
                    selection=selection,
                    policy_body=body,
                ),
                args.seconds,
                5,
            )
            stateless = rate(
                partial(
                    appraise,
                    Evidence(q.attest, q.signature, q.pcrs, lab.log),
                    policy,
                    nonce=lab.nonce,
                    ak=q.ak,
                ),
                args.seconds,
                5,
            )
            db.dispose()
        total = args.count / reapp
        print(
            f"re-appraisal (dry run, fleet): {reapp:,.0f} evidences/s "
            f"(median of {args.runs} passes: {', '.join(f'{p:,.0f}' for p in passes)}); "
            f"{args.count:,} in {total:.1f} s"
        )
        print(f"in-process appraisal (service appraiser, no database): {inproc:,.0f}/s")
        print(f"stateless appraise() (nothing memoised): {stateless:,.0f}/s")
        print(f"ratio re-appraisal / in-process appraisal: {reapp / inproc:.2f}")
        print(f"100,000 evidences at this rate: {100_000 / reapp / 60:.1f} min")
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
