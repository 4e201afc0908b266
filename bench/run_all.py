"""Run every benchmark in bench/ in turn (``make bench``).

Each script measures the project against a named baseline in the same run
and prints medians and ratios; this runner only sequences them and reports
which failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHES = [
    "issue.py",
    "provision.py",
    "eventlog.py",
    "appraise.py",
    "http_attest.py",
    "keyprovider.py",
    "ima.py",
    "webhooks.py",
    "continuous.py",
]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHES:
        script = here / name
        if not script.exists():
            print(f"== {name}: not present, skipped")
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(script)], check=False)
        print(f"== {name}: exit {result.returncode} after {time.monotonic() - started:.1f} s\n")
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
