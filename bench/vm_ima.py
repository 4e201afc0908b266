"""A real VM with IMA on against the same VM without it: boot time, list length, fetch time.

Boots the attestation guest (QEMU TCG + OVMF + systemd-boot + Debian's kernel,
docs/vm.md) alternately without and with ``vtpm.ima=1`` (the guest loads its
IMA policy first thing), ``--runs`` times each, on a fresh bare swtpm each
time. Per boot: QEMU start to the guest's READY, one quote (PCRs 0-9, and
PCR 10 in both banks with IMA), and with IMA the entries and bytes of
``binary_runtime_measurements`` and the time to fetch it over the serial
channel. Prints medians and the ratio IMA / no IMA of the same run.

Not in ``make bench``: each boot is 15-30 s of emulation. One VM at a time.

Run: .venv/bin/python bench/vm_ima.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verifier.ima.parse import parse_list  # noqa: E402
from vtpm_core.swtpm import SwtpmProcess  # noqa: E402
from vtpm_core.vm import DEFAULT_CMDLINE, QemuVm, guest_esp, ima_cmdline  # noqa: E402

BOOT = "sha256:0,1,2,3,4,5,6,7,8,9"
WITH_IMA = "sha1:10+sha256:0,1,2,3,4,5,6,7,8,9,10"


def one_boot(work: Path, ima: bool) -> dict[str, float]:
    esp = guest_esp(cmdline=ima_cmdline() if ima else DEFAULT_CMDLINE)
    sock = Path(tempfile.mkdtemp(prefix="vtpm-bench-"))
    try:
        with (
            SwtpmProcess(work / "tpm", transport="qemu", socket_dir=sock) as tpm,
            QemuVm(work / "vm", esp=esp, tpm=tpm, timeout_s=300) as vm,
        ):
            t0 = time.monotonic()
            with vm.connect(boot_timeout=280) as chan:
                ready = time.monotonic() - t0
                chan.hello()
                t1 = time.monotonic()
                chan.quote(os.urandom(32), WITH_IMA if ima else BOOT)
                out = {"ready_s": ready, "quote_s": time.monotonic() - t1}
                if ima:
                    t2 = time.monotonic()
                    data = chan.ima_list(0)
                    out["fetch_s"] = time.monotonic() - t2
                    out["entries"] = len(parse_list(data))
                    out["bytes"] = len(data)
            art = vm.wait(30)
            if art.returncode != 0:
                raise SystemExit(f"VM ended with {art.returncode}: see {art.console_log}")
        return out
    finally:
        shutil.rmtree(sock, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    guest_esp(cmdline=DEFAULT_CMDLINE)  # build the images before timing anything
    guest_esp(cmdline=ima_cmdline())
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="vtpm-bench-vm-") as tmp:
        for run in range(args.runs):
            for ima in (False, True):  # interleaved: the machine's load hits both alike
                work = Path(tmp) / f"{run}-{'ima' if ima else 'plain'}"
                got = one_boot(work, ima)
                results[ima].append(got)
                print(f"run {run} ima={'on' if ima else 'off'}: {json.dumps(got)}", flush=True)
                shutil.rmtree(work, ignore_errors=True)

    def med(ima: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[ima])

    plain, with_ima = med(False, "ready_s"), med(True, "ready_s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"QEMU start -> READY, median of {args.runs}: without IMA {plain:.1f} s, "
          f"with IMA {with_ima:.1f} s ({with_ima / plain:.2f}x)")  # fmt: skip
    print(f"quote: without {med(False, 'quote_s'):.2f} s, with (+PCR 10, 2 banks) "
          f"{med(True, 'quote_s'):.2f} s")  # fmt: skip
    print(f"IMA list after the quote: {med(True, 'entries'):.0f} entries, "
          f"{med(True, 'bytes'):.0f} bytes, fetched in {med(True, 'fetch_s'):.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
