"""`vtpm agent` end to end: real agent processes, each with its own swtpm, against a
real `vtpm verifier serve` (gunicorn) at a 1 s cadence (issue 16).

Asserted from what the verifier recorded (attesters, results, AK names) and the
agents' own timestamped log lines: bounds, never exact times.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.verifier.service.conftest import REPO, EkCa, Server, Service, make_home, provision_tpm
from vtpm_core._process import stop_child
from vtpm_core.swtpm import SwtpmProcess

CADENCE_S = 1
BACKOFF = {"backoff_base_s": 0.2, "backoff_cap_s": 1.0, "tpm_retries": 3}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) vtpm-agent (\w+) (.*)$")


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa) -> Iterator[Service]:
    """A verifier (SQLite, 1 worker) that asks for evidence every second."""
    home = tmp_path_factory.mktemp("home-agent")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, attest_cadence_s=CADENCE_S, sweep_interval_s=1)
    server = Server(home, None, workers=1).start()
    try:
        yield Service("sqlite", home, None, admin, reader, server, ek_ca)
    finally:
        server.stop()


@dataclass
class AgentProc:
    """One `vtpm agent` process; its stderr (the log) goes to a file."""

    dir: Path
    tpm: SwtpmProcess
    url: str
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def state_file(self) -> Path:
        return self.dir / "attester.json"

    @property
    def log(self) -> Path:
        return self.dir / f"agent-{self.runs}.log"

    def env(self) -> dict[str, str]:
        config = self.dir / "agent.toml"
        config.write_text("".join(f"{k} = {v}\n" for k, v in BACKOFF.items()))
        return {
            **os.environ,
            "VTPM_AGENT_CONFIG": str(config),
            "VTPM_AGENT_URL": self.url,
            "VTPM_AGENT_TPM": self.tpm.endpoint.tcti,
            "VTPM_AGENT_STATE": str(self.state_file),
            "VTPM_AGENT_EVENTLOG": "none",
        }

    def start(self) -> AgentProc:
        self.runs += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vtpm_cli.main", "agent", "-v"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env(),
            )
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, 10.0)

    def lines(self, run: int | None = None) -> list[tuple[datetime, str, str]]:
        out = []
        path = self.dir / f"agent-{run or self.runs}.log"
        for line in path.read_text().splitlines():
            m = _STAMP.match(line)
            if m:
                stamp = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
                out.append((stamp, m[2], m[3]))
        return out

    def count(self, pattern: str, run: int | None = None) -> int:
        return sum(1 for _, _, msg in self.lines(run) if re.search(pattern, msg))


@pytest.fixture
def agents(
    fast: Service, ek_ca: EkCa, tmp_path: Path
) -> Iterator[Callable[[int], list[AgentProc]]]:
    made: list[AgentProc] = []

    def make(n: int) -> list[AgentProc]:
        for _ in range(n):
            d = tmp_path / f"agent{len(made)}"
            tpm = SwtpmProcess(provision_tpm(ek_ca, d / "tpm"))
            tpm.start()
            made.append(AgentProc(d, tpm, fast.url))
        return made[-n:]

    yield make
    for a in made:
        a.stop()
        a.tpm.stop()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def verdicts(a: AgentProc, run: int | None = None) -> int:
    return a.count(r"^attester \S+: (affirming|warning) \(state trusted\)", run)


def attester(fast: Service, a: AgentProc) -> dict[str, Any]:
    import json

    aid = json.loads(a.state_file.read_text())["attester_id"]
    resp = fast.call("GET", f"/v1/attesters/{aid}", fast.reader)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def test_agents_attest_on_cadence_and_ride_out_an_outage(
    fast: Service, agents: Callable[[int], list[AgentProc]]
) -> None:
    fleet = [a.start() for a in agents(3)]
    wait_for(lambda: all(verdicts(a) >= 3 for a in fleet), 60, "3 rounds from each agent")
    for a in fleet:  # the cadence the verifier answers with: ~1 s between rounds
        stamps = [t for t, _, m in a.lines() if m.startswith("attester ")]
        gaps = [(b - c).total_seconds() for c, b in itertools.pairwise(stamps)]
        assert all(0.9 <= g <= 15.0 for g in gaps), gaps  # not the 60 s default
    before = {a.dir: attester(fast, a)["ak_name"] for a in fleet}

    # verifier down for ~4 s: backoff, then the same attester ids resume
    port = fast.server.port
    fast.server.stop()
    t_down = time.monotonic()
    wait_for(lambda: all(a.count(r"^retrying in") >= 3 for a in fleet), 30, "retries")
    time.sleep(max(0.0, 4.0 - (time.monotonic() - t_down)))
    rounds = {a.dir: verdicts(a) for a in fleet}
    fast.server.start(port)
    down_s = time.monotonic() - t_down  # until the restarted verifier answers
    wait_for(
        lambda: all(verdicts(a) >= rounds[a.dir] + 2 for a in fleet), 60, "rounds after restart"
    )
    for a in fleet:
        assert a.count(r"^registered and activated") == 1
        retries = [(t, m) for t, _, m in a.lines() if m.startswith("retrying in")]
        # no tight loop: at most one attempt per min delay (plus the first),
        # and the delays the agent chose grow, capped at 1 s
        assert len(retries) <= down_s / 0.2 + 2, len(retries)
        delays = [float(m.split()[2]) for _, m in retries]
        assert all(0.2 <= d <= 1.0 for d in delays), delays
        # base 0.2 s: the ceiling doubles per attempt, the delay in [ceiling/2, ceiling]
        assert delays[0] == 0.2 and all(d >= 0.4 for d in delays[2:]), delays
        gaps = [(b[0] - c[0]).total_seconds() for c, b in itertools.pairwise(retries)]
        assert all(g >= 0.15 for g in gaps), gaps
        assert attester(fast, a)["ak_name"] == before[a.dir]
    resp = fast.call("GET", "/v1/attesters", fast.reader)
    ids = {row["id"] for row in resp.json()["attesters"]}
    assert {attester(fast, a)["id"] for a in fleet} <= ids


def test_restarted_agent_keeps_its_attester_and_ak(
    fast: Service, agents: Callable[[int], list[AgentProc]]
) -> None:
    (a,) = agents(1)
    a.start()
    wait_for(lambda: verdicts(a) >= 1, 30, "the first verdict")
    first = attester(fast, a)
    state = a.state_file.read_bytes()
    a.stop()
    a.start()
    wait_for(lambda: verdicts(a) >= 2, 30, "verdicts after the restart")
    assert a.count(r"^registered and activated") == 0  # resumed, not re-registered
    assert a.state_file.read_bytes() == state
    again = attester(fast, a)
    assert (again["id"], again["ak_name"]) == (first["id"], first["ak_name"])


def test_tpm_gone_is_reported_and_ends_the_agent(
    fast: Service, agents: Callable[[int], list[AgentProc]]
) -> None:
    (a,) = agents(1)
    a.start()
    wait_for(lambda: verdicts(a) >= 1, 30, "the first verdict")
    assert a.tpm.pid is not None
    os.kill(a.tpm.pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert a.proc is not None
    assert a.proc.wait(timeout=30) == 1
    elapsed = time.monotonic() - t0
    faults = a.count(r"^TPM fault, no evidence sent")
    assert faults == BACKOFF["tpm_retries"]
    assert a.count(r"^giving up after 3 TPM faults") == 1
    assert elapsed >= 2 * 0.2  # paced, not a tight loop


def once(a: AgentProc, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtpm_cli.main", "agent", "--once", *extra],
        cwd=REPO,
        env={**a.env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_once_exit_status_and_bad_config(
    fast: Service, agents: Callable[[int], list[AgentProc]]
) -> None:
    import json

    (a,) = agents(1)
    ok = once(a, "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["state"] == "trusted" and doc["next_attestation_s"] == CADENCE_S
    # a token the verifier refuses: one round, not retried as an outage
    aid = json.loads(a.state_file.read_text())["attester_id"]
    t0 = time.monotonic()
    refused = once(a, "--json", VTPM_AGENT_TOKEN="wrong", VTPM_AGENT_ATTESTER_ID=aid)
    assert refused.returncode == 1 and json.loads(refused.stdout)["fault"] == "refused"
    assert "verifier http://127.0.0.1:" in refused.stderr and time.monotonic() - t0 < 10
    # the verifier unreachable: a bounded number of attempts, then exit 1
    t0 = time.monotonic()
    down = once(a, VTPM_AGENT_URL="http://127.0.0.1:9")
    assert down.returncode == 1 and "no verdict (verifier)" in down.stdout
    assert time.monotonic() - t0 < 20
    for env, message in [
        ({"VTPM_AGENT_URL": "ftp://x"}, "VTPM_AGENT_URL: 'ftp://x' is not an http(s) URL"),
        ({"VTPM_AGENT_CA_BUNDLE": "/nonexistent.pem"}, "CA bundle /nonexistent.pem not found"),
        ({"VTPM_AGENT_TOKEN": "t"}, "token and attester_id go together"),
        ({"VTPM_AGENT_URL": "", "VTPM_AGENT_CONFIG": ""}, "no verifier URL"),
    ]:
        bad = once(a, **env)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    (a.dir / "bad.toml").write_text("backoff_cap_s = -1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "vtpm_cli.main", "agent", "--once",
         "--config", str(a.dir / "bad.toml")],
        cwd=REPO, env={**a.env(), "VTPM_AGENT_CONFIG": ""}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "bad.toml: backoff_cap_s: expected a number" in bad.stderr, bad.stderr
