"""Several verifier processes on one PostgreSQL, and several CA processes on one ledger.

One run, in a private PostgreSQL database made (and dropped) by the bench:

1. verifier: ``max(--processes)`` separate ``vtpm verifier serve`` gunicorn
   masters (``--workers`` each) on their own 127.0.0.1 ports, one database.
   ``--clients`` real swtpm-backed attesters are enrolled, the fleet is seeded
   to ``--seed-attesters`` with history (``bench/fleet.py``'s COPY seeding),
   and for each process count ``k`` the load driver (4 processes x threads, as
   in ``bench/http_attest.py``) spreads the clients over the first ``k``
   masters: client ``i`` attests at master ``i % k`` with evidence for nonces
   issued by master ``(i + 1) % k``, so every accepted evidence crossed
   processes through the database. Evidence is quoted beforehand
   ("server-only"): the TPM's signing time is not in the loop.
2. CA: ``max(--ca-processes)`` ``vtpm ca serve`` masters on one CA home and one
   ledger (PostgreSQL, then SQLite WAL), EK certificates for fresh P-256 EKs
   (``bench/issue.py``'s real tpm2_createek template), spread the same way;
   afterwards the ledger must hold exactly one issued row per 201 answer.

Each cell is timed ``--rounds`` times, the process counts interleaved; the
medians are printed with ratios against 1 process, and where the CPU went
during the timed part (``/proc``: the masters and their workers, this
database's PostgreSQL backends, all PostgreSQL processes, the load driver, the
whole machine) plus what PostgreSQL's busy backends were waiting on (10 Hz
samples of ``pg_stat_activity``). The load average is printed with each cell:
the machine is shared.

Run: .venv/bin/python bench/fleet_procs.py [--processes 1,2,3] [--ca-processes 1,2]
(``make bench-fleet-procs``).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import requests  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402
from fleet import seed  # noqa: E402
from http_attest import (  # noqa: E402
    POSTGRES,
    LeanHttp,
    free_port,
    provision,
    run_cell,
    start_server,
    stop,
)
from issue import PASSPHRASE, ek_variants, real_ecc_ek  # noqa: E402

from ca.home import CaHome  # noqa: E402
from verifier.attester import AttesterState, TpmAttester, enroll  # noqa: E402
from verifier.service.config import init_home  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
DRIVER_PROCS = 4


# --- where the CPU went (/proc) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """CPU seconds so far of every process (comm, ppid, seconds) and of the machine."""

    at: float
    procs: dict[int, tuple[str, int, float]]
    busy: float

    @classmethod
    def take(cls) -> Snapshot:
        procs: dict[int, tuple[str, int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                data = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            # proc(5): "pid (comm) state ppid ... utime stime" (fields 14, 15); comm may hold ")"
            close = data.rindex(")")
            rest = data[close + 2 :].split()
            cpu = (int(rest[11]) + int(rest[12])) / _TICK
            procs[int(entry.name)] = (data[data.index("(") + 1 : close], int(rest[1]), cpu)
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user)
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK
        return cls(time.perf_counter(), procs, busy)

    def tree(self, roots: list[int]) -> set[int]:
        kids: dict[int, list[int]] = {}
        for pid, (_comm, ppid, _cpu) in self.procs.items():
            kids.setdefault(ppid, []).append(pid)
        out: set[int] = set()
        todo = [r for r in roots if r in self.procs]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo.extend(kids.get(pid, []))
        return out


def cpu_of(start: Snapshot, end: Snapshot, pids: set[int]) -> float:
    """CPU seconds ``pids`` (as seen at ``end``) used since ``start``."""
    return sum(end.procs[p][2] - (start.procs[p][2] if p in start.procs else 0.0) for p in pids)


class WaitSampler:
    """10 Hz samples of this database's backends in pg_stat_activity (another connection)."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine
        self._stop = threading.Event()
        self.samples = 0
        self.active = 0
        self.waits: Counter[str] = Counter()
        self.pids: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = sqlalchemy.text(
            "SELECT pid, state, wait_event_type, wait_event FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with self._engine.connect() as conn:
            while not self._stop.wait(0.1):
                rows = conn.execute(query).all()
                conn.rollback()
                self.samples += 1
                for pid, state, wtype, wevent in rows:
                    self.pids.add(pid)
                    if state == "active":
                        self.active += 1
                        self.waits[f"{wtype}:{wevent}" if wtype else "on CPU"] += 1

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(slots=True)
class Meter:
    """CPU of each party during one cell's timed part."""

    servers: list[int]  # gunicorn master PIDs in use
    engine: sqlalchemy.Engine
    start: Snapshot | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    load: float = 0.0
    sampler: WaitSampler | None = None

    def go(self) -> None:
        self.sampler = WaitSampler(self.engine).__enter__()
        self.start = Snapshot.take()

    def done(self) -> None:
        end = Snapshot.take()
        assert self.start is not None and self.sampler is not None
        self.sampler.__exit__()
        start, self.wall, self.load = self.start, end.at - self.start.at, os.getloadavg()[0]
        servers = end.tree(self.servers)
        mine = end.tree([os.getpid()]) - {os.getpid()}
        postgres = {p for p, (comm, _pp, _c) in end.procs.items() if comm == "postgres"}
        ours = self.sampler.pids & postgres
        self.cpu = {
            "server": cpu_of(start, end, servers),
            "pg_ours": cpu_of(start, end, ours),
            "pg_all": cpu_of(start, end, postgres),
            # the load driver: this process's other children (not the servers, not swtpm)
            "driver": cpu_of(
                start, end, {p for p in mine - servers if end.procs[p][0].startswith("python")}
            ),
            "machine": end.busy - start.busy,
        }
        # the rest of the machine: other work sharing it (swtpm is idle in server-only mode)
        self.cpu["other"] = max(
            0.0, self.cpu["machine"] - self.cpu["server"] - self.cpu["pg_all"] - self.cpu["driver"]
        )

    def cores(self, key: str) -> float:
        return self.cpu[key] / self.wall if self.wall else 0.0

    def waits(self) -> str:
        s = self.sampler
        if s is None or not s.active:
            return "idle"
        top = ", ".join(f"{k} {n / s.active:.0%}" for k, n in s.waits.most_common(3))
        return f"{s.active / s.samples:.1f} busy backends avg; {top}"


# --- the verifier ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cell:
    processes: int
    per_s: float
    p50_ms: float
    p99_ms: float
    n: int
    meter: Meter
    failed: int = 0


def verifier_part(opts: argparse.Namespace, url: str, root: Path) -> list[Cell]:
    from vtpm_core.swtpm import SwtpmProcess

    engine = sqlalchemy.create_engine(url)
    tpms: list[Any] = []
    servers: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        ca, dirs = provision(root, opts.clients)
        for d in dirs:
            t = SwtpmProcess(d)
            t.start()
            tpms.append(t)
        home = root / "home"
        init_home(home, verifier_id="fleet-procs")
        shutil.copyfile(ca / "swtpm-localca-rootca-cert.pem", home / "roots" / "root.pem")
        shutil.copyfile(ca / "issuercert.pem", home / "intermediates" / "issuer.pem")
        cfg = home / "verifier.yaml"
        raw = yaml.safe_load(cfg.read_text())
        raw["nonce_lifetime_s"] = 3600  # server-only mode quotes ahead
        cfg.write_text(yaml.safe_dump(raw))
        for _ in range(max(opts.processes)):  # one after the other: each migrates first
            servers.append(start_server(home, url, workers=opts.workers))
        urls = [u for _p, u in servers]
        enrolled: list[tuple[str, AttesterState]] = []
        with requests.Session() as http:
            for i, t in enumerate(tpms):
                with TpmAttester.open(t.endpoint.tcti) as att:
                    at = urls[i % len(urls)]
                    enrolled.append((t.endpoint.tcti, enroll(http, at, att, vm_id=f"p-{i}")))
        run_cell(urls, enrolled, 1, "tpm-in-loop", 0.5)  # one real result and nonce to copy
        if opts.seed_attesters > len(enrolled):
            took = seed(engine, len(enrolled), opts.seed_attesters, opts.history_minutes)
            print(f"seeded {opts.seed_attesters:,} attesters in {took:.1f} s", flush=True)
        # warm-up: every master's workers, pools and the appraiser's memo
        run_cell(urls, enrolled, opts.clients, "server-only", 1.0)
        cells: list[Cell] = []
        for r in range(opts.rounds):
            for k in opts.processes:
                meter = Meter([p.pid for p, _u in servers[:k]], engine)
                c = run_cell(
                    urls[:k], enrolled, opts.clients, "server-only", opts.seconds,
                    on_go=meter.go, on_done=meter.done,
                )  # fmt: skip
                cell = Cell(k, c["per_s"], c["p50_ms"], c["p99_ms"], int(c["attestations"]), meter)
                cells.append(cell)
                print(f"  round {r + 1} verifier {_line(cell)}", flush=True)
        return cells
    finally:
        for proc, _u in servers:
            stop(proc)
        for t in tpms:
            t.stop()
        engine.dispose()


# --- the CA ------------------------------------------------------------------------------------

CaJob = tuple[str, str, list[bytes], float]


def _ca_client(job: CaJob) -> tuple[list[float], int]:
    """One driver connection: POST the bodies until time is up; latencies and non-201s."""
    url, token, bodies, seconds = job
    http = LeanHttp(url, token)
    lat: list[float] = []
    failed = 0
    try:
        end = time.perf_counter() + seconds
        for body in bodies:
            if time.perf_counter() >= end:
                break
            t0 = time.perf_counter()
            status, _data = http.post("/v1/ek-certificates", body)
            if status == 201:
                lat.append(time.perf_counter() - t0)
            else:
                failed += 1
    finally:
        http.close()
    return lat, failed


_GO: Any = None


def _ca_init(go: Any) -> None:
    global _GO
    _GO = go


def _ca_proc(jobs: list[CaJob]) -> tuple[list[float], int]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        _GO.wait(timeout=600)
        done = list(pool.map(_ca_client, jobs))
    return [x for lat, _f in done for x in lat], sum(f for _lat, f in done)


def ca_cell(
    urls: list[str], token: str, bodies: list[bytes], conns: int, seconds: float, meter: Meter
) -> tuple[dict[str, float], int]:
    jobs: list[CaJob] = [
        (urls[i % len(urls)], token, bodies[i::conns], seconds) for i in range(conns)
    ]
    nproc = min(DRIVER_PROCS, conns)
    ctx = mp.get_context("fork")
    go = ctx.Barrier(nproc + 1)
    with ctx.Pool(nproc, initializer=_ca_init, initargs=(go,)) as pool:
        results = [pool.apply_async(_ca_proc, (jobs[i::nproc],)) for i in range(nproc)]
        go.wait(timeout=600)
        t0 = time.perf_counter()
        meter.go()
        got = [r.get(timeout=600) for r in results]
        wall = time.perf_counter() - t0
        meter.done()
    lat = sorted(x for part, _f in got for x in part)
    n = len(lat)
    cell = {
        "per_s": n / min(wall, seconds + 0.5) if n else 0.0,
        "p50_ms": lat[n // 2] * 1000 if n else 0.0,
        "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
        "n": n,
    }
    return cell, sum(f for _p, f in got)


def _bodies(template: bytes, count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "ek_public": base64.b64encode(data).decode(),
                "vm_id": str(uuid.uuid4()),
                "vm_name": "bench",
            }
        ).encode()
        for data, _x, _y in ek_variants(template, count)
    ]


def start_ca(home: Path, database: str | None, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("vtpm")), "ca", "serve", "--home", str(home)]
    cmd += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    if database:
        cmd += ["--db", database]
    env = dict(os.environ, VTPM_CA_PASSPHRASE=PASSPHRASE.decode())
    log = open(home / f"serve-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    for _ in range(300):
        try:
            if requests.get(url + "/v1/ca/chain", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    raise SystemExit(f"vtpm ca serve did not start; see {home}")


def ca_part(
    opts: argparse.Namespace,
    ledger: str,
    pg_url: str,
    engine: sqlalchemy.Engine,
    root: Path,
    template: bytes,
) -> tuple[list[Cell], str]:
    home = root / f"ca-{ledger}"
    database = pg_url if ledger == "postgres" else None
    CaHome(home).init(passphrase=PASSPHRASE, key_type="ecdsa-p256", database=database)
    token = CaHome(home).add_token("bench", "provisioner")
    servers: list[tuple[subprocess.Popen[bytes], str]] = []
    answered = 0
    cells: list[Cell] = []
    try:
        for _ in range(max(opts.ca_processes)):
            servers.append(start_ca(home, database, opts.workers))
        urls = [u for _p, u in servers]
        per_cell = int(opts.seconds * 2000) + 50 * opts.ca_connections  # more than it can take
        warm = _bodies(template, 20 * opts.ca_connections)
        meter = Meter([p.pid for p, _u in servers], engine)
        c, _failed = ca_cell(urls, token, warm, opts.ca_connections, 1.0, meter)  # first lints
        answered += int(c["n"])
        for r in range(opts.rounds):
            for k in opts.ca_processes:
                meter = Meter([p.pid for p, _u in servers[:k]], engine)
                bodies = _bodies(template, per_cell)
                c, failed = ca_cell(
                    urls[:k], token, bodies, opts.ca_connections, opts.seconds, meter
                )
                answered += int(c["n"])
                cell = Cell(k, c["per_s"], c["p50_ms"], c["p99_ms"], int(c["n"]), meter, failed)
                cells.append(cell)
                print(f"  round {r + 1} CA ({ledger}) {_line(cell)}", flush=True)
    finally:
        for proc, _u in servers:
            stop(proc)
    ledger_url = database or f"sqlite:///{home / 'ledger.db'}"
    check = sqlalchemy.create_engine(ledger_url)
    try:
        with check.connect() as conn:
            rows, serials, issued = conn.execute(
                sqlalchemy.text(
                    "SELECT count(*), count(DISTINCT serial),"
                    " sum(CASE WHEN status = 'issued' THEN 1 ELSE 0 END) FROM ca_certificates"
                )
            ).one()
    finally:
        check.dispose()
    ok = rows == serials == issued == answered
    verdict = (
        f"ledger ({ledger}): {rows} rows, {serials} distinct serials, {issued} issued,"
        f" {answered} x 201 answered: {'consistent' if ok else 'MISMATCH'}"
    )
    print(verdict, flush=True)
    return cells, verdict


# --- report ------------------------------------------------------------------------------------


def _line(c: Cell) -> str:
    m = c.meter
    return (
        f"{c.processes} process(es): {c.per_s:7.1f}/s  p50 {c.p50_ms:6.1f} ms"
        f"  p99 {c.p99_ms:6.1f} ms  (n={c.n}{f', {c.failed} failed' if c.failed else ''})"
        f"  cores: server {m.cores('server'):.2f} pg {m.cores('pg_ours'):.2f}"
        f" (all pg {m.cores('pg_all'):.2f}) driver {m.cores('driver'):.2f}"
        f" other {m.cores('other'):.2f} machine {m.cores('machine'):.2f}  load {m.load:.1f}"
    )


def table(title: str, unit: str, cells: list[Cell], counts: list[int]) -> None:
    """Medians per process count, over the rounds."""
    print(f"\n{title}\n")
    print(
        f"| processes | {unit}/s | vs 1 | p50 ms | p99 ms | server cores | PostgreSQL cores"
        " (this db / all) | driver cores | other work's cores | machine busy (of 2) |"
        " PG ms CPU per op |"
        " server ms CPU per op | load avg | PG backends waiting on |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = 0.0
    for k in counts:
        cs = [c for c in cells if c.processes == k]

        def med(f: Any, cs: list[Cell] = cs) -> float:
            return float(statistics.median(f(c) for c in cs))

        rate = med(lambda c: c.per_s)
        base = base or rate
        pg_ms = med(lambda c: c.meter.cpu["pg_ours"] / max(c.n, 1) * 1000)
        srv_ms = med(lambda c: c.meter.cpu["server"] / max(c.n, 1) * 1000)
        mid = sorted(cs, key=lambda c: c.per_s)[len(cs) // 2]
        print(
            f"| {k} | {rate:.1f} | {rate / base:.2f}x | {med(lambda c: c.p50_ms):.1f} |"
            f" {med(lambda c: c.p99_ms):.1f} | {med(lambda c: c.meter.cores('server')):.2f} |"
            f" {med(lambda c: c.meter.cores('pg_ours')):.2f} /"
            f" {med(lambda c: c.meter.cores('pg_all')):.2f} |"
            f" {med(lambda c: c.meter.cores('driver')):.2f} |"
            f" {med(lambda c: c.meter.cores('other')):.2f} |"
            f" {med(lambda c: c.meter.cores('machine')):.2f} | {pg_ms:.2f} | {srv_ms:.2f} |"
            f" {med(lambda c: c.meter.load):.1f} | {mid.meter.waits()} |"
        )


def sizing(unit: str, cells: list[Cell]) -> None:
    """What the measured CPU per operation says about a bigger deployment."""
    pg = statistics.median(c.meter.cpu["pg_ours"] / max(c.n, 1) for c in cells) * 1000
    srv = statistics.median(c.meter.cpu["server"] / max(c.n, 1) for c in cells) * 1000
    if pg <= 0:
        return
    print(
        f"{unit}: PostgreSQL {pg:.2f} ms CPU and the service {srv:.2f} ms CPU per operation:"
        f" one PostgreSQL core carries ~{1000 / pg:,.0f}/s, which takes ~{srv / pg:.1f}"
        " service cores (worker processes) to feed"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", default="1,2,3", help="verifier masters per cell")
    ap.add_argument("--ca-processes", default="1,2", help="CA masters per cell")
    ap.add_argument("--ledgers", default="postgres,sqlite", help="CA ledgers to try")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers per master")
    ap.add_argument("--clients", type=int, default=12, help="swtpm attesters (driver threads)")
    ap.add_argument("--ca-connections", type=int, default=8)
    ap.add_argument("--seed-attesters", type=int, default=10000)
    ap.add_argument("--history-minutes", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    opts = ap.parse_args()
    opts.processes = [int(x) for x in opts.processes.split(",") if x]
    opts.ca_processes = [int(x) for x in opts.ca_processes.split(",") if x]
    ledgers = [x for x in opts.ledgers.split(",") if x]
    load0 = os.getloadavg()
    print(
        f"cpus {os.cpu_count()}, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f};"
        f" {opts.workers} gunicorn workers per master, {opts.seconds} s x {opts.rounds} rounds",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="fleet-procs-"))
    admin = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"vtpm_fleetp_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        max_conn = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
    url = POSTGRES.rsplit("/", 1)[0] + "/" + name
    engine = sqlalchemy.create_engine(url)
    try:
        vcells = verifier_part(opts, url, root) if opts.processes else []
        ca_cells: dict[str, tuple[list[Cell], str]] = {}
        if opts.ca_processes and ledgers:
            template = real_ecc_ek(root)  # a real tpm2_createek ECC EK public
            for ledger in ledgers:
                ca_cells[ledger] = ca_part(opts, ledger, url, engine, root, template)
        if vcells:
            table(
                f"verifier: challenge + evidence, {opts.clients} clients,"
                f" {opts.seed_attesters:,} attesters seeded, {opts.workers} workers per master",
                "attestations",
                vcells,
                opts.processes,
            )
            conns = max(len(c.meter.sampler.pids) for c in vcells if c.meter.sampler)
            print(
                f"\nPostgreSQL connections of this database at {max(opts.processes)} masters:"
                f" {conns} (max_connections {max_conn}, shared with everything else)"
            )
            sizing("verifier", vcells)
        for ledger, (cells, verdict) in ca_cells.items():
            table(
                f"CA: EK certificates over HTTP, {opts.ca_connections} connections,"
                f" {ledger} ledger, {opts.workers} workers per master",
                "certificates",
                cells,
                opts.ca_processes,
            )
            print(verdict)
            if ledger == "postgres":
                sizing("CA", cells)
        load1 = os.getloadavg()
        print(f"\nload average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
