"""The soak with faults (issue 18): ``python -m tests.soak.driver --seconds 600`` (``make
soak``), or :func:`run_soak` (the short CI version, tests/soak/test_soak.py).

Everything is real: swtpm TPMs provisioned with EK certificates (swtpm_localca),
``vtpm verifier serve`` gunicorn masters, a private PostgreSQL cluster
(tests/_pgcluster.py: its own data directory and port, so restarting it harms
nobody else) and a SQLite file on a size-limited file system.

PostgreSQL run (``--seconds``): two verifiers (separate gunicorn masters, 2
workers each, on two 127.0.0.1 ports, one database) and ``--good`` attesters
(_clients.GoodClient threads, one swtpm each) attesting as fast as they can,
challenge and evidence each on either verifier; beside them a registrar, a reader
and an operator who flips the first attester's policy every second (its state
goes trusted <-> failed, so its history grows under the faults).

1. baseline: the good clients alone (the first tenth of the run, 3 s at least);
2. bad clients (malformed, oversized, replayed evidence) start and run to the end;
   a second tenth without faults gives the rate to compare with the baseline;
3. faults, one per slot, cycling: SIGKILL of one gunicorn worker; a whole verifier
   stopped (SIGTERM) and started again on its port; PostgreSQL restarted (``pg_ctl
   stop -m fast``, then ``-m immediate``: a crash), down 1 s each time.

SQLite run (``--sqlite-seconds``): one verifier whose database lives on a tmpfs of
``--sqlite-fs-mb`` MiB that the driver mounts (``mount -t tmpfs -o size=...``: root
is needed; the run fails, it does not skip, without). A third of the way in, a
filler file takes every free block (the store's file system is full) until the
clients have seen the service answer for it (503) and a second more, then it is
removed.

After each run the clients' answers (``logs-*/CLIENT.jsonl``), the database and the
verifiers' logs are checked (tests/soak/_checks.py) and the counts printed; any
problem fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests._pgcluster import PgCluster
from tests._server import answers as serves
from tests._server import free_port
from tests.soak._checks import (
    RECOVERY_LIMIT_S,
    Fault,
    Findings,
    check_answers,
    check_database,
    check_server_logs,
)
from tests.soak._clients import (
    Answer,
    Client,
    GoodClient,
    MalformedClient,
    OversizedClient,
    PolicyFlipper,
    ReaderClient,
    RegistrarClient,
    ReplayClient,
    ReplayPool,
)
from tests.verifier.service.conftest import EkCa, make_ek_ca, make_home, provision_tpm
from verifier.attester import AttesterState, TpmAttester, enroll
from verifier.service.config import DEFAULT_MAX_BODY_BYTES, load_config
from vtpm_core._process import stop_child
from vtpm_core.swtpm import SwtpmProcess

__all__ = ["Report", "SoakConfig", "main", "run_soak"]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
PG_DOWN_S = 1.0
FAULT_KINDS = 3  # kill-worker, restart-verifier, restart-postgres
TAIL_S = 3.0
IMA_MAX_DELTA_BYTES = 64 << 10
# what the operator assigns and unassigns: a PCR 0 no swtpm has (contraindicated)
FAILING_POLICY: dict[str, object] = {
    "version": 1,
    "name": "soak-strict",
    "pcrs": {"sha256": {"0": "11" * 32}},
}


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 20.0  # the PostgreSQL run
    sqlite_seconds: float = 8.0
    good: int = 4
    workers: int = 2
    sqlite_fs_mb: int = 32
    # seconds per fault slot (None: the run's fault phase split into at least 3)
    fault_every_s: float | None = None


@dataclass
class Run:
    """One run's results: the findings (counts, problems) and the faults."""

    name: str
    findings: Findings
    faults: list[Fault]
    rates: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    runs: list[Run]

    @property
    def problems(self) -> list[str]:
        return [f"{r.name}: {p}" for r in self.runs for p in r.findings.problems]

    def text(self) -> str:
        lines = []
        for r in self.runs:
            lines.append(f"== {r.name}")
            for k in sorted(r.findings.counts):
                lines.append(f"  {k:48} {r.findings.counts[k]:>9,}")
            for k, v in r.rates.items():
                lines.append(f"  {k:48} {v:>9.2f}")
            for f in r.faults:
                rec = ", ".join(f"v{v} {s:.2f} s" for v, s in sorted(f.recovered.items()))
                lines.append(
                    f"  fault {f.kind:17} at {f.t_start:6.1f} s, took {f.t_end - f.t_start:4.1f} s"
                    f" ({f.detail}); recovered: {rec or 'NO'}"
                )
        problems = self.problems
        lines.append(f"problems: {len(problems)}")
        lines += [f"  - {p}" for p in problems]
        return "\n".join(lines)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (gunicorn's workers), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@dataclass
class Verifier:
    """One ``vtpm verifier serve`` (its PID is the gunicorn master's); the log is appended
    to across restarts."""

    index: int
    home: Path
    db_url: str
    workers: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / f"serve-{self.index}.log"

    def launch(self) -> None:
        cmd = [sys.executable, "-m", "vtpm_cli.main", "verifier", "serve", "--home",
               str(self.home), "--bind", f"127.0.0.1:{self.port}", "--workers",
               str(self.workers), "--db", self.db_url]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        if not serves(self.proc, f"{self.url}/healthz", START_TIMEOUT_S):
            raise AssertionError(
                f"verifier {self.index} did not start: {self.log.read_text()[-3000:]}"
            )

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, 15.0)

    def worker_pids(self) -> list[int]:
        return [] if self.proc is None else _children(self.proc.pid)


class Soak:
    """The shared parts of both runs: the clock, the TPMs, the clients."""

    def __init__(self, work: Path, config: SoakConfig, say: Callable[[str], None]) -> None:
        self.work = work
        self.config = config
        self.say = say
        self._t0 = time.monotonic()
        self.stack = contextlib.ExitStack()
        self.ek: EkCa | None = None
        self.tpms: list[SwtpmProcess] = []
        self.max_evidence_bytes = DEFAULT_MAX_BODY_BYTES

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def provision(self, n: int) -> None:
        self.ek = make_ek_ca(self.work / "ekca")
        for i in range(n):
            tpm = SwtpmProcess(provision_tpm(self.ek, self.work / f"tpm{i}"))
            tpm.start()
            self.stack.callback(tpm.stop)
            self.tpms.append(tpm)

    def home(self, name: str) -> tuple[Path, tuple[str, str]]:
        """A verifier home trusting the TPMs' EK CA; and its admin and reader tokens.
        The evidence body limit stays ~1 MiB (the fleet sends no IMA lists): the
        oversized client's bodies are that limit's size, not the IMA one's 22 MiB."""
        assert self.ek is not None
        home = self.work / name
        tokens = make_home(home, self.ek, ima_max_delta_bytes=IMA_MAX_DELTA_BYTES)
        self.max_evidence_bytes = load_config(home).evidence_max_body_bytes
        return home, tokens

    def enroll_all(self, urls: list[str]) -> list[AttesterState]:
        states = []
        with requests.Session() as http:
            for i, tpm in enumerate(self.tpms):
                with TpmAttester.open(tpm.endpoint.tcti) as att:
                    states.append(enroll(http, urls[i % len(urls)], att, vm_id=f"soak-{i}"))
        return states

    def clients(
        self, urls: list[str], states: list[AttesterState], tokens: tuple[str, str]
    ) -> tuple[list[Client], list[Client]]:
        """The good attesters, a registrar, a reader and an operator flipping the first
        attester's policy; the bad clients. The last two TPMs are the registrar's and the
        bad clients' attester."""
        admin, reader = tokens
        resp = requests.put(
            f"{urls[0]}/v1/policies/{FAILING_POLICY['name']}",
            json={"policy": FAILING_POLICY},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        pool = ReplayPool()
        attesting = states[:-2]
        good: list[Client] = [
            GoodClient(f"good-{i}", urls, self.clock, s, self.tpms[i].endpoint.tcti, pool)
            for i, s in enumerate(attesting)
        ]
        tcti, vm_id = self.tpms[-2].endpoint.tcti, f"soak-{len(self.tpms) - 2}"  # as enrolled
        good.append(RegistrarClient("registrar", urls, self.clock, tcti, vm_id))
        ids = [s.attester_id for s in attesting]
        good.append(ReaderClient("reader", urls, self.clock, reader, ids))
        flipper = PolicyFlipper(
            "operator", urls, self.clock, admin, ids[0], str(FAILING_POLICY["name"])
        )
        good.append(flipper)
        bad_state = states[-1]
        bad: list[Client] = [
            MalformedClient("malformed", urls, self.clock, bad_state),
            OversizedClient("oversized", urls, self.clock, bad_state, self.max_evidence_bytes),
            ReplayClient("replayed", urls, self.clock, pool),
        ]
        return good, bad

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.clock()))


def _stop(clients: list[Client]) -> None:
    for c in clients:
        c.stop()
    for c in clients:
        c.join(TIMEOUT_JOIN_S)


TIMEOUT_JOIN_S = 30.0


def _finish(
    soak: Soak, name: str, clients: list[Client], faults: list[Fault]
) -> tuple[Findings, list[Answer]]:
    logs = soak.work / f"logs-{name}"
    logs.mkdir()
    answers: list[Answer] = []
    findings = Findings()
    for c in clients:
        c.write_log(logs)
        answers += c.answers
        if c.is_alive():
            findings.problem(f"client {c.name} did not stop within {TIMEOUT_JOIN_S:.0f} s")
        if c.crashed:
            findings.problem(f"client {c.name} crashed: {c.crashed}")
    findings.merge(check_answers(answers, faults))
    return findings, answers


def _rate(answers: list[Answer], start: float, end: float) -> float:
    n = sum(
        1
        for a in answers
        if a.kind == "good" and a.case == "evidence" and a.outcome == "200" and start <= a.t1 < end
    )
    return n / (end - start)


def postgres_run(soak: Soak, pg: PgCluster) -> Run:
    cfg = soak.config
    home, tokens = soak.home("home-pg")
    verifiers = [Verifier(i, home, pg.url(), cfg.workers) for i in range(2)]
    for v in verifiers:  # both masters migrate the empty database at once: serialised
        v.launch()
        soak.stack.callback(v.stop)
    for v in verifiers:
        v.wait_ready()
    urls = [v.url for v in verifiers]
    states = soak.enroll_all(urls)
    good, bad = soak.clients(urls, states, tokens)
    phase = max(3.0, cfg.seconds / 10)
    t0 = soak.clock()
    soak.say(f"postgres run: {cfg.good} attesters, 2 verifiers {urls}, {cfg.seconds:.0f} s")
    for c in good:
        c.start()
    soak.wait_until(t0 + phase)
    for c in bad:
        c.start()
    soak.wait_until(t0 + 2 * phase)
    faults: list[Fault] = []
    end = t0 + cfg.seconds
    actions = _pg_faults(soak, pg, verifiers)
    slot = cfg.fault_every_s or max(3.0, (end - soak.clock()) / 3)
    kinds: set[str] = set()
    for action in itertools.cycle(actions):
        # every kind at least once however slow the machine is; then until the end
        if soak.clock() >= end and len(kinds) == FAULT_KINDS:
            break
        at = soak.clock()
        fault = action()
        faults.append(fault)
        kinds.add(fault.kind)
        took = _await_recovery(soak, fault, good)
        soak.say(f"  {fault.kind} ({fault.detail}) at {fault.t_start:.1f} s, recovered {took}")
        soak.wait_until(at + slot)
    soak.wait_until(max(end, soak.clock() + TAIL_S))
    _stop(good + bad)
    healthy = [_healthz(v.url) for v in verifiers]
    for v in verifiers:
        v.stop()
    findings, answers = _finish(soak, "pg", good + bad, faults)
    for v, ok in zip(verifiers, healthy, strict=True):
        if not ok:
            findings.problem(f"verifier {v.index} did not answer /healthz 200 at the end")
    findings.merge(check_database(pg.url(), answers), "db ")
    findings.merge(check_server_logs(v.log for v in verifiers))
    base = _rate(answers, t0 + 1, t0 + phase)
    loaded = _rate(answers, t0 + phase + 1, t0 + 2 * phase)
    rates = {
        "good attestations/s, no bad clients": base,
        "good attestations/s, bad clients on": loaded,
        "ratio (bad on / off)": loaded / base if base else 0.0,
    }
    return Run("postgres", findings, faults, rates)


def _await_recovery(soak: Soak, fault: Fault, clients: list[Client]) -> str:
    """Wait (up to RECOVERY_LIMIT_S) until evidence was accepted through every verifier
    the fault hit since it ended; the next fault never starts before. The checks measure
    the recovery again from the clients' logs; this only paces the run."""
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    pending = set(fault.targets)
    while pending and time.monotonic() < deadline:
        for c in clients:
            for a in reversed(c.answers[-50:]):
                if a.case == "evidence" and a.outcome == "200" and a.t0 >= fault.t_end:
                    pending.discard(a.verifier)
        time.sleep(0.02)
    return "NOT within the limit" if pending else f"after {soak.clock() - fault.t_end:.1f} s"


def _healthz(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _pg_faults(soak: Soak, pg: PgCluster, verifiers: list[Verifier]) -> list[Callable[[], Fault]]:
    def kill_worker(v: Verifier) -> Callable[[], Fault]:
        def act() -> Fault:
            t0 = soak.clock()
            pids = v.worker_pids()
            assert pids, f"verifier {v.index} has no workers"
            os.kill(pids[0], signal.SIGKILL)
            t1 = soak.clock()
            # the master replaces it by itself; how long that took, for the record
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                now = v.worker_pids()
                if len(now) == v.workers and pids[0] not in now:
                    break
                time.sleep(0.05)
            back = soak.clock() - t1
            return Fault(
                "kill-worker", (v.index,), t0, t1, f"pid {pids[0]}, respawned in {back:.1f} s"
            )

        return act

    def restart_verifier(v: Verifier) -> Callable[[], Fault]:
        def act() -> Fault:
            t0 = soak.clock()
            v.stop()
            down = soak.clock()
            v.start()
            up = soak.clock()
            detail = f"stopped in {down - t0:.1f} s, serving again {up - down:.1f} s later"
            return Fault("restart-verifier", (v.index,), t0, up, detail)

        return act

    def restart_postgres(mode: str) -> Callable[[], Fault]:
        def act() -> Fault:
            t0 = soak.clock()
            pg.restart(mode=mode, down_s=PG_DOWN_S)
            return Fault(
                "restart-postgres", tuple(v.index for v in verifiers), t0, soak.clock(),
                f"-m {mode}, down {PG_DOWN_S:.0f} s",
            )  # fmt: skip

        return act

    return [
        kill_worker(verifiers[0]),
        restart_verifier(verifiers[1]),
        restart_postgres("fast"),
        kill_worker(verifiers[1]),
        restart_verifier(verifiers[0]),
        restart_postgres("immediate"),
    ]


@contextlib.contextmanager
def small_fs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``path`` (root needed), unmounted on exit."""
    if os.geteuid() != 0:
        raise AssertionError(
            "the SQLite disk-full soak mounts a tmpfs (mount -t tmpfs -o size=...): run as root"
        )
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until its file system has no free block left; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < chunk:
                    break
    finally:
        os.close(fd)
    return written


def sqlite_run(soak: Soak) -> Run:
    cfg = soak.config
    fs = soak.stack.enter_context(small_fs(soak.work / "sqlite-fs", cfg.sqlite_fs_mb))
    home, tokens = soak.home("home-sqlite")
    db_url = f"sqlite:///{fs / 'verifier.db'}"
    verifier = Verifier(0, home, db_url, cfg.workers)
    verifier.start()
    soak.stack.callback(verifier.stop)
    states = soak.enroll_all([verifier.url])
    good, bad = soak.clients([verifier.url], states, tokens)
    t0 = soak.clock()
    end = t0 + cfg.sqlite_seconds
    soak.say(f"sqlite run: {cfg.good} attesters, {verifier.url}, {cfg.sqlite_fs_mb} MiB tmpfs")
    for c in good + bad:
        c.start()
    soak.wait_until(t0 + cfg.sqlite_seconds / 3)
    filler = fs / "filler"
    f_start = soak.clock()
    filled = fill(filler)
    # held until the clients have been told (or a third of the run), then a second more
    hold_until = f_start + max(3.0, cfg.sqlite_seconds / 3)
    while soak.clock() < hold_until and not _saw_503(good, f_start):
        time.sleep(0.05)
    bit = soak.clock() - f_start
    time.sleep(1.0)
    filler.unlink()
    fault = Fault(
        "disk-full", (0,), f_start, soak.clock(),
        f"{filled / (1 << 20):.1f} MiB filler; first 503 after {bit:.1f} s",
    )  # fmt: skip
    took = _await_recovery(soak, fault, good)
    soak.say(f"  disk-full ({fault.detail}) at {f_start:.1f} s, recovered {took}")
    soak.wait_until(max(end, soak.clock() + TAIL_S))
    _stop(good + bad)
    healthy = _healthz(verifier.url)
    verifier.stop()
    findings, answers = _finish(soak, "sqlite", good + bad, [fault])
    if not healthy:
        findings.problem("the SQLite verifier did not answer /healthz 200 at the end")
    if not _saw_503(good, f_start):
        findings.problem("the full file system was never noticed: no 503 while it was full")
    findings.merge(check_database(db_url, answers), "db ")
    findings.merge(check_server_logs([verifier.log]))
    return Run("sqlite", findings, [fault])


def _saw_503(clients: list[Client], since: float) -> bool:
    return any(a.outcome == "503" and a.t0 >= since for c in clients for a in list(c.answers))


def run_soak(work: Path, config: SoakConfig, say: Callable[[str], None] = print) -> Report:
    """Both runs in ``work``; every process it started is stopped when it returns."""
    soak = Soak(work, config, say)
    with soak.stack, ThreadPoolExecutor(1) as pool:
        # not under ``work`` when that is pytest's tmp_path: a concurrent pytest session
        # resets /tmp/pytest-of-USER to 0700, and the postgres user loses its data
        # directory (pg_ctl stop then fails mid-run)
        pg_base = soak.stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-pg-"))
        making = pool.submit(PgCluster.create, Path(pg_base))  # initdb while swtpm_setup runs
        soak.stack.callback(lambda: making.exception() or making.result().close())
        soak.provision(config.good + 2)  # and the registrar's and the bad clients' TPMs
        runs = [postgres_run(soak, making.result())]
        if config.sqlite_seconds > 0:
            runs.append(sqlite_run(soak))
    return Report(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak.driver", description=__doc__)
    p.add_argument("--seconds", type=float, default=600.0, help="the PostgreSQL run")
    p.add_argument("--sqlite-seconds", type=float, default=60.0)
    p.add_argument("--good", type=int, default=6, help="good attesters (one swtpm each)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers per verifier")
    p.add_argument("--sqlite-fs-mb", type=int, default=64)
    p.add_argument("--fault-every", type=float, default=20.0, help="seconds per fault slot")
    p.add_argument("--work", type=Path, help="keep everything here (default: a temporary dir)")
    args = p.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        sqlite_seconds=args.sqlite_seconds,
        good=args.good,
        workers=args.workers,
        sqlite_fs_mb=args.sqlite_fs_mb,
        fault_every_s=args.fault_every,
    )
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vtpm-soak-")))
        else:
            work = args.work
            work.mkdir(parents=True)
        t = time.monotonic()
        report = run_soak(work, config, lambda s: print(s, flush=True))
        print(report.text())
        print(f"soak took {time.monotonic() - t:.0f} s")
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
