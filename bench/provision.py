"""Time to create one fully provisioned vTPM, against swtpm_setup + swtpm_localca.

Ours: ``VtpmStore.create`` with the project's CA in-process (LocalCaIssuer):
fresh encrypted state, RSA-2048 (L-1) and ECC P-256 (L-2) EKs, both
certificates issued, NV defined, written and write-locked, metadata written
and fsynced, published by rename.
Baseline: ``swtpm_setup --tpm2 --create-ek-cert --lock-nvram`` with
swtpm_localca as its certificate tool (configured as in
shared/recipes/qemu-vtpm-boot), each run in a fresh state directory.

Prints both medians, their ratio, where our time goes, and vTPMs/s for a
batch of 100 (what ``vtpm create --count 100 PREFIX`` does after start-up).

Run: .venv/bin/python bench/provision.py [--runs N] [--baseline-runs M] [--batch B]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ca.home import CaHome  # noqa: E402
from ca.issuer import LocalCaIssuer  # noqa: E402
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate  # noqa: E402
from vtpm_core.store import VtpmStore  # noqa: E402

PASSPHRASE = b"bench passphrase"


class _TimedIssuer:
    """Wraps an issuer and adds up the time spent in it."""

    def __init__(self, inner: LocalCaIssuer) -> None:
        self.inner = inner
        self.seconds = 0.0

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        t = time.perf_counter()
        try:
            return self.inner.issue_ek_certificate(request)
        finally:
            self.seconds += time.perf_counter() - t

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        self.inner.revoke_ek_certificate(serial, reason)


def bench_ours(work: Path, runs: int, batch: int) -> tuple[list[float], list[float], float, float]:
    CaHome(work / "ca").init(passphrase=PASSPHRASE)
    store = VtpmStore.init(work / "store")
    with LocalCaIssuer.open(work / "ca", passphrase=PASSPHRASE) as ca:
        issuer = _TimedIssuer(ca)
        store.create("warm-up", issuer=issuer)  # imports, first CA use
        times, ca_times = [], []
        for i in range(runs):
            issuer.seconds = 0.0
            t = time.perf_counter()
            store.create(f"one-{i}", issuer=issuer)
            times.append(time.perf_counter() - t)
            ca_times.append(issuer.seconds)
        t = time.perf_counter()
        store.create_many([f"batch-{i:04d}" for i in range(batch)], issuer=issuer)
        batch_s = time.perf_counter() - t
        t = time.perf_counter()
        store.create_many([f"par-{i:04d}" for i in range(batch)], issuer=issuer, jobs=2)
        par_s = time.perf_counter() - t
    return times, ca_times, batch_s, par_s


def bench_swtpm_setup(work: Path, runs: int) -> list[float]:
    localca = work / "localca"
    localca.mkdir()
    (work / "swtpm-localca.conf").write_text(
        f"statedir = {localca}\n"
        f"signingkey = {localca}/signkey.pem\n"
        f"issuercert = {localca}/issuercert.pem\n"
        f"certserial = {localca}/certserial\n"
    )
    (work / "swtpm_setup.conf").write_text(
        "create_certs_tool= /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {work}/swtpm-localca.conf\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\n"
    )

    def once(i: int) -> float:
        state = work / f"state-{i}"
        state.mkdir()
        t = time.perf_counter()
        subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", str(state),
             "--config", str(work / "swtpm_setup.conf"),
             "--create-ek-cert", "--lock-nvram", "--overwrite"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return time.perf_counter() - t

    once(-1)  # warm-up: swtpm_localca creates its CA keys on first use
    return [once(i) for i in range(runs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--baseline-runs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm_localca") is None:
        print("swtpm_setup/swtpm_localca not installed (Debian package swtpm-tools)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        work = Path(tmp)
        (work / "ours").mkdir()
        (work / "base").mkdir()
        ours, ca_times, batch_s, par_s = bench_ours(work / "ours", args.runs, args.batch)
        base = bench_swtpm_setup(work / "base", args.baseline_runs)
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    m_ca = statistics.median(ca_times)
    print(
        f"vtpm create (RSA+ECC EK, 2 certs, NV locked), median of {len(ours)}: "
        f"{m_ours * 1000:.1f} ms (min {min(ours) * 1000:.1f}, max {max(ours) * 1000:.1f})"
    )
    print(
        f"  of which CA issuance (2 certs, in-process): {m_ca * 1000:.1f} ms; "
        f"swtpm + TPM + store: {(m_ours - m_ca) * 1000:.1f} ms"
    )
    print(
        f"swtpm_setup --tpm2 --create-ek-cert --lock-nvram (swtpm_localca), "
        f"median of {len(base)}: {m_base * 1000:.1f} ms"
    )
    print(f"ratio swtpm_setup / vtpm create: {m_base / m_ours:.1f}x")
    print(
        f"batch of {args.batch}, one at a time: {batch_s:.2f} s = "
        f"{args.batch / batch_s:.1f} vTPMs/s"
    )
    print(
        f"batch of {args.batch}, 2 in parallel (--jobs 2): {par_s:.2f} s = "
        f"{args.batch / par_s:.1f} vTPMs/s"
    )
    target = m_ours <= 0.15 and m_ours < m_base
    print(f"targets (<= 150 ms median, faster than swtpm_setup): {'met' if target else 'NOT met'}")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
