"""Event-log parse + replay throughput against tpm2_eventlog (tpm2-tools) on a large log.

The large log is the real GCE RHEL 8 log (corpus, 3 banks, 83 events) with
its events repeated until it is about 1 MiB: a crypto-agile log tpm2_eventlog
also reads. Prints medians of several runs and the ratio. tpm2_eventlog's
time includes its process start and its YAML output, which is what a caller
that shells out to it pays.

Run: .venv/bin/python bench/eventlog.py [--runs N] [--target-bytes B]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verifier.eventlog import EventLog  # noqa: E402

CORPUS = Path(os.environ.get("VTPM_CORPUS", REPO.parent / "shared" / "corpus"))
SOURCE = CORPUS / "eventlogs" / "gce_rhel8_uefi_secureboot.bin"


def build_large_log(target_bytes: int) -> bytes:
    log = EventLog.parse(SOURCE.read_bytes())
    header = log.events[0].raw
    body = b"".join(e.raw for e in log.events[1:])
    copies = max(1, (target_bytes - len(header)) // len(body))
    return header + body * copies


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rate(seconds: float, events: int) -> str:
    return f"median {seconds * 1e3:8.1f} ms ({events / seconds:9.0f} events/s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--target-bytes", type=int, default=1024 * 1024)
    args = parser.parse_args()

    data = build_large_log(args.target_bytes)
    log = EventLog.parse(data)
    n_events = len(log.events)
    print(f"large log: {len(data)} bytes, {n_events} events, banks {', '.join(log.banks)}")

    parse_s = median_seconds(lambda: EventLog.parse(data), args.runs)
    replay_s = median_seconds(lambda: EventLog.parse(data).replay(), args.runs)
    full_s = median_seconds(
        lambda: (lambda lg: lg.verify(lg.replay()))(EventLog.parse(data)), args.runs
    )
    print(f"ours  parse only          : {_rate(parse_s, n_events)}")
    print(
        f"ours  parse+replay        : {_rate(replay_s, n_events)}, "
        f"{len(data) / replay_s / 2**20:.1f} MiB/s"
    )
    print(f"ours  parse+replay+decode : {_rate(full_s, n_events)} (verify + data checks)")

    tool = shutil.which("tpm2_eventlog")
    if tool is None:
        print("tpm2_eventlog not installed: no baseline")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.bin"
        path.write_bytes(data)

        def run_tool() -> None:
            subprocess.run(
                [tool, str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
                timeout=300,
            )

        tool_s = median_seconds(run_tool, args.runs)
        small = Path(tmp) / "small.bin"
        small.write_bytes(SOURCE.read_bytes())
        small_tool_s = median_seconds(
            lambda: subprocess.run(
                [tool, str(small)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
                timeout=60,
            ),
            args.runs,
        )
    small_data = SOURCE.read_bytes()
    small_ours_s = median_seconds(lambda: EventLog.parse(small_data).replay(), args.runs * 5)
    print(f"tpm2_eventlog (subprocess): {_rate(tool_s, n_events)}")
    print(f"ratio parse+replay ours/tpm2_eventlog speed: {tool_s / replay_s:5.2f}x")
    print(
        f"single real log ({len(small_data)} bytes, 83 events): ours "
        f"{small_ours_s * 1e3:.2f} ms, tpm2_eventlog {small_tool_s * 1e3:.2f} ms, "
        f"ratio {small_tool_s / small_ours_s:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
