"""Full attestations per second over HTTP: gunicorn (2 workers), SQLite and PostgreSQL.

One run prints, for 1, 8 and 32 concurrent clients and each database:

- "tpm-in-loop": each client owns a real swtpm and loops challenge -> TPM2_Quote
  -> evidence; attestations/s and p50/p99 latency of the whole loop;
- "server-only": the same HTTP work (challenge + evidence) with evidence quoted
  beforehand (each client first collects quotes for nonces it was issued, then
  submits them as fast as it can, asking a fresh challenge each time), so the
  TPM's signing time is not in the loop: the service's own capacity;
- "in-process": LibraryAppraiser.appraise on the same evidence in one process
  (no HTTP, no database): the ceiling.

Clients run as 4 processes x threads, each thread one keep-alive HTTP/1.1
connection (http.client, bodies encoded beforehand); everything shares this
2-core machine (clients, swtpm, gunicorn, PostgreSQL), so the numbers are a
lower bound for a dedicated verifier host. Server-only evidence is submitted
oldest first (TPM clocks only grow), so attesters stay unflagged.

Run: .venv/bin/python bench/http_attest.py [--seconds 4] [--clients 1,8,32]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402

from verifier.attester import AttesterState, TpmAttester, enroll  # noqa: E402
from verifier.service.config import init_home, load_config  # noqa: E402

POSTGRES = os.environ.get("VTPM_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PROCS = 4
TARGET = 500  # full attestations/s (issue 6)


def b64(d: bytes) -> str:
    return base64.b64encode(d).decode()


def provision(root: Path, n: int) -> tuple[Path, list[Path]]:
    ca = root / "ca"
    ca.mkdir()
    conf = root / "localca.conf"
    conf.write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    setup = root / "setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {conf}\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n"
    )

    def one(i: int) -> Path:
        d = root / f"tpm{i}"
        d.mkdir()
        subprocess.run(
            [
                "swtpm_setup",
                "--tpm2",
                "--tpmstate",
                str(d),
                "--config",
                str(setup),
                "--create-ek-cert",
                "--pcr-banks",
                "sha256",
                "--overwrite",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return d

    first = one(0)  # creates the CA
    with ThreadPoolExecutor(4) as pool:
        rest = list(pool.map(one, range(1, n)))
    return ca, [first, *rest]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    home: Path, db: str | None, workers: int = 2
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vtpm_cli.main",
        "verifier",
        "serve",
        "--home",
        str(home),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    if db:
        cmd += ["--db", db]
    log = open(home / f"serve-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server did not start; see {home}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _quote_for(att: TpmAttester, ch: dict[str, Any]) -> bytes:
    """The evidence body answering challenge ``ch``, JSON-encoded once."""
    q = att.quote(base64.b64decode(ch["nonce"]), ch["pcr_selection"])
    return json.dumps(
        {
            "nonce": ch["nonce"],
            "quote": b64(q.attest),
            "signature": b64(q.signature),
            "pcrs": q.pcrs,
        }
    ).encode()


class LeanHttp:
    """The load generator's client: one persistent HTTP/1.1 keep-alive connection
    (``http.client``), bodies encoded beforehand. ``requests`` costs several times
    the CPU per request, and the clients share the server's two cores."""

    def __init__(self, url: str, token: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self._hdr = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self._conn.request("POST", path, body, self._hdr)
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._conn.close()  # reconnects on the next request
                return resp.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # the server closed an idle keep-alive connection before reading this request
                self._conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


# (url to attest at, url issuing the pre-quoted nonces, tcti, attester, mode, seconds, prequote)
Job = tuple[str, str, str, dict[str, Any], str, float, int]


def _prepare(job: Job) -> list[bytes]:
    """server-only mode: collect quotes for nonces issued now, to submit later."""
    _url, url, tcti, st, mode, _seconds, prequote = job
    base = f"/v1/attesters/{st['attester_id']}"
    ready: list[bytes] = []
    if mode != "server-only":
        return ready
    http = LeanHttp(url, st["token"])
    try:
        with TpmAttester.open(tcti) as att:
            for _ in range(prequote):
                status, data = http.post(f"{base}/challenges")
                assert status == 201, data
                ready.append(_quote_for(att, json.loads(data)))
    finally:
        http.close()
    return ready


def _client(job: Job, ready: list[bytes]) -> list[float]:
    """One client thread: latencies (s) of full attestations (challenge + evidence).

    Prepared evidence goes out oldest first, as a TPM would produce it: its clock
    only grows. (Newest first, every evidence after the first would carry an
    older TPM clock than the one before: a "clock-regressed" lineage flag each
    time, and a flag list that grows with every request.)
    """
    url, _prep_url, tcti, st, mode, seconds, _prequote = job
    ready = ready[::-1]  # pop() from the end: oldest first
    challenges = f"/v1/attesters/{st['attester_id']}/challenges"
    evidence = f"/v1/attesters/{st['attester_id']}/evidence"
    lat: list[float] = []
    http = LeanHttp(url, st["token"])
    try:
        with TpmAttester.open(tcti) as att:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                status, data = http.post(challenges)
                assert status == 201, data
                if mode == "server-only":
                    if not ready:
                        break
                    ev = ready.pop()
                else:
                    ev = _quote_for(att, json.loads(data))
                status, data = http.post(evidence, ev)
                assert status == 200, data
                lat.append(time.perf_counter() - t0)
    finally:
        http.close()
    return lat


_START: Any = None


def _init(start: Any) -> None:
    global _START
    _START = start


def _proc_main(jobs: list[Job]) -> list[float]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        ready = list(pool.map(_prepare, jobs))
        _START.wait(timeout=600)  # every process has prepared: go together
        return [x for lat in pool.map(_client, jobs, ready) for x in lat]


def run_cell(
    url: str | Sequence[str],
    tpms: list[tuple[str, AttesterState]],
    clients: int,
    mode: str,
    seconds: float,
    on_go: Callable[[], object] | None = None,
    on_done: Callable[[], object] | None = None,
) -> dict[str, float]:
    """One timed cell. Several ``url`` (verifier processes on one database): client
    ``i`` attests at ``url[i % n]`` with nonces pre-issued by ``url[(i + 1) % n]``.
    ``on_go`` runs when the timed part starts, ``on_done`` when it has ended."""
    urls = [url] if isinstance(url, str) else list(url)
    prequote = int(seconds * 1000 / max(clients, 1)) + 20 if mode == "server-only" else 0
    jobs = [
        (
            urls[i % len(urls)],
            urls[(i + 1) % len(urls)],
            tpms[i][0],
            {"attester_id": tpms[i][1].attester_id, "token": tpms[i][1].token},
            mode,
            seconds,
            prequote,
        )
        for i in range(clients)
    ]
    nproc = min(PROCS, clients)
    groups = [jobs[i::nproc] for i in range(nproc)]
    ctx = mp.get_context("fork")
    start = ctx.Barrier(nproc + 1)
    with ctx.Pool(nproc, initializer=_init, initargs=(start,)) as pool:
        results = [pool.apply_async(_proc_main, (g,)) for g in groups]
        start.wait(timeout=600)  # everyone has pre-quoted: go
        t0 = time.perf_counter()
        if on_go is not None:
            on_go()
        lat = [x for r in results for x in r.get(timeout=600)]
        wall = time.perf_counter() - t0
        if on_done is not None:
            on_done()
    lat.sort()
    n = len(lat)
    return {
        "attestations": n,
        "per_s": n / min(wall, seconds + 0.5) if n else 0.0,
        "p50_ms": lat[n // 2] * 1000 if n else 0.0,
        "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


def in_process_rate(home: Path, tcti: str, state: AttesterState, url: str, seconds: float) -> float:
    from verifier.service.appraiser import LibraryAppraiser
    from verifier.service.messages import EvidenceRequest

    appraiser = LibraryAppraiser.from_config(load_config(home))
    with requests.Session() as http, TpmAttester.open(tcti) as att:
        hdr = {"Authorization": f"Bearer {state.token}"}
        ch = http.post(f"{url}/v1/attesters/{state.attester_id}/challenges", headers=hdr).json()
        ev = json.loads(_quote_for(att, ch))
        _, ak = att.ak()
    req = EvidenceRequest.parse(ev)
    sel = {b: tuple(p) for b, p in ch["pcr_selection"].items()}
    policy = json.dumps({"version": 1, "pcrs": {"sha256": ev["pcrs"]["sha256"]}})
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = appraiser.appraise(
            ak_public=ak, nonce=req.nonce, evidence=req, selection=sel, policy_body=policy
        )
        assert a.status == "affirming", a
        n += 1
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--backends", default="sqlite,postgres")
    opts = ap.parse_args()
    levels = [int(x) for x in opts.clients.split(",")]
    root = Path(tempfile.mkdtemp(prefix="http-attest-"))
    procs: list[Any] = []
    pg_admin = None
    pg_dbs: list[str] = []
    try:
        t0 = time.perf_counter()
        ca, states = provision(root, max(levels))
        took = time.perf_counter() - t0
        print(f"provisioned {len(states)} swtpm TPMs with EK certs in {took:.1f} s")
        from vtpm_core.swtpm import SwtpmProcess

        tpms = [SwtpmProcess(d) for d in states]
        for t in tpms:
            t.start()
            procs.append(t)
        rows: list[tuple[str, int, str, dict[str, float]]] = []
        ceiling = 0.0
        for backend in opts.backends.split(","):
            home = root / f"home-{backend}"
            init_home(home, verifier_id="bench")
            shutil.copyfile(ca / "swtpm-localca-rootca-cert.pem", home / "roots" / "root.pem")
            shutil.copyfile(ca / "issuercert.pem", home / "intermediates" / "issuer.pem")
            cfg = home / "verifier.yaml"
            raw = yaml.safe_load(cfg.read_text())
            raw["nonce_lifetime_s"] = 3600  # server-only mode quotes ahead
            cfg.write_text(yaml.safe_dump(raw))
            db = None
            if backend == "postgres":
                pg_admin = pg_admin or sqlalchemy.create_engine(
                    POSTGRES, isolation_level="AUTOCOMMIT"
                )
                name = f"vtpm_bench_{secrets.token_hex(4)}"
                with pg_admin.connect() as conn:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                pg_dbs.append(name)
                db = POSTGRES.rsplit("/", 1)[0] + "/" + name
            server, url = start_server(home, db)
            try:
                enrolled: list[tuple[str, AttesterState]] = []
                with requests.Session() as http:
                    for i, t in enumerate(tpms):
                        with TpmAttester.open(t.endpoint.tcti) as att:
                            enrolled.append(
                                (t.endpoint.tcti, enroll(http, url, att, vm_id=f"bench-{i}"))
                            )
                if not ceiling:
                    ceiling = in_process_rate(home, *enrolled[0], url, opts.seconds)
                for clients in levels:
                    for mode in ("tpm-in-loop", "server-only"):
                        cell = run_cell(url, enrolled, clients, mode, opts.seconds)
                        rows.append((backend, clients, mode, cell))
                        print(
                            f"  {backend:8} {clients:3} clients {mode:12} "
                            f"{cell['per_s']:7.1f}/s  p50 {cell['p50_ms']:6.1f} ms  "
                            f"p99 {cell['p99_ms']:6.1f} ms  (n={cell['attestations']})",
                            flush=True,
                        )
            finally:
                stop(server)
        print()
        print("| database | clients | mode | attestations/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|")
        for backend, clients, mode, c in rows:
            print(
                f"| {backend} | {clients} | {mode} | {c['per_s']:.1f} | {c['p50_ms']:.1f} | "
                f"{c['p99_ms']:.1f} |"
            )
        print(
            f"\nin-process appraisal (quote + PCR policy, RSA-2048 AK, no HTTP/DB): "
            f"{ceiling:.0f}/s on one core"
        )
        print(
            "clients: 4 processes x threads, one keep-alive http.client connection each;"
            " server: gunicorn 2 workers (gthread, 1 thread)"
        )
        for backend in opts.backends.split(","):
            cells = [
                (c[3]["per_s"], c[1]) for c in rows if c[0] == backend and c[2] == "server-only"
            ]
            if cells:
                best, at = max(cells)
                verdict = "met" if best >= TARGET else "not met"
                print(
                    f"target: >= {TARGET} attestations/s: {verdict} on {backend} "
                    f"(best server-only {best:.1f}/s with {at} clients)"
                )
    finally:
        for p in procs:
            p.stop()
        if pg_admin is not None:
            with pg_admin.connect() as conn:
                for name in pg_dbs:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            pg_admin.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
