"""EK certificate issuance rate: vtpm-trust's CA in-process and over HTTP vs swtpm_localca.

Run: .venv/bin/python bench/issue.py [--rounds 5] [--per-round 300]

All three issue for the same ECC P-256 EK public keys. The keys are real
tpm2-tools EK publics: one TPM2B_PUBLIC from `tpm2_createek -G ecc` on a real
swtpm, with its unique.x/unique.y replaced by fresh P-256 points, so each
passes the full EK template check like a new vTPM's EK would.

- in-process: parse the TPM2B_PUBLIC, check the EK template, build, lint,
  record, sign, store (ECDSA P-256 CA key in an encrypted PKCS#8 file, SQLite
  WAL ledger), one request after the other, each committed to the ledger
  before the next starts;
- HTTP: `vtpm ca serve` (gunicorn, 2 workers) on 127.0.0.1, 4 client threads;
- swtpm_localca (swtpm-tools 0.7.1, as swtpm_setup runs it: one process per
  certificate, which runs swtpm_cert; its own RSA-2048 local CA).

Prints the median of the rounds' certificates per second, and the ratios.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ca.ek import CertifiableEk  # noqa: E402
from ca.home import CaHome  # noqa: E402
from ca.issuance import IssueRequest  # noqa: E402
from vtpm_core.swtpm import SwtpmProcess  # noqa: E402

PASSPHRASE = b"bench passphrase"


def real_ecc_ek(work: Path) -> bytes:
    with SwtpmProcess(work / "swtpm") as tpm:
        subprocess.run(
            ["tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub"],
            env=tpm.tool_env,
            cwd=work,
            check=True,
            capture_output=True,
        )
    return (work / "ek.pub").read_bytes()


def ek_variants(template: bytes, count: int) -> list[tuple[bytes, int, int]]:
    """TPM2B_PUBLICs of the real EK with fresh P-256 points (x, y at the end: 2+32, 2+32)."""
    out = []
    for _ in range(count):
        numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
        x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
        out.append((template[:-68] + b"\x00\x20" + x + b"\x00\x20" + y, numbers.x, numbers.y))
    return out


def in_process(home: Path, keys: list[tuple[bytes, int, int]], rounds: int, per: int) -> float:
    ca = CaHome(home).open(passphrase=PASSPHRASE)
    try:
        warm = CertifiableEk.load(keys[0][0], allow_bare_key=False)
        ca.issuance.issue(IssueRequest(ek=warm, vm_id=uuid.uuid4()))  # pkilint's first lint
        rates = []
        for r in range(rounds):
            batch = keys[1 + r * per : 1 + (r + 1) * per]
            start = time.perf_counter()
            for data, _, _ in batch:
                ek = CertifiableEk.load(data, allow_bare_key=False)
                ca.issuance.issue(IssueRequest(ek=ek, vm_id=uuid.uuid4(), vm_name="bench"))
            rates.append(len(batch) / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        ca.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def over_http(home: Path, keys: list[tuple[bytes, int, int]], rounds: int, per: int) -> float:
    token = CaHome(home).add_token("bench", "provisioner")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VTPM_CA_PASSPHRASE=PASSPHRASE.decode())
    vtpm = str(Path(sys.executable).with_name("vtpm"))
    proc = subprocess.Popen(
        [vtpm, "ca", "serve", "--home", str(home), "--bind", f"127.0.0.1:{port}", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                requests.get(url + "/v1/ca/chain", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        rates = []
        threads_n = 4
        for r in range(rounds + 1):  # round 0 warms both workers (pkilint's first lint)
            batch = keys[r * per : (r + 1) * per]
            chunks = [batch[i::threads_n] for i in range(threads_n)]
            failures: list[str] = []

            def run(chunk: list[tuple[bytes, int, int]], failures: list[str] = failures) -> None:
                with requests.Session() as session:
                    session.headers["Authorization"] = f"Bearer {token}"
                    for data, _, _ in chunk:
                        body = {
                            "ek_public": base64.b64encode(data).decode(),
                            "vm_id": str(uuid.uuid4()),
                            "vm_name": "bench",
                        }
                        response = session.post(url + "/v1/ek-certificates", json=body, timeout=30)
                        if response.status_code != 201:
                            failures.append(response.text)

            threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            if failures:
                raise SystemExit(f"HTTP issuance failed: {failures[0]}")
            if r > 0:
                rates.append(len(batch) / elapsed)
        return statistics.median(rates)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def swtpm_localca(work: Path, keys: list[tuple[bytes, int, int]], rounds: int, per: int) -> float:
    state = work / "localca"
    state.mkdir()
    conf = work / "localca.conf"
    conf.write_text(
        f"statedir = {state}\nsignkey = {state}/signkey.pem\nsigningkey = {state}/signkey.pem\n"
        f"issuercert = {state}/issuercert.pem\ncertserial = {state}/certserial\n"
    )
    (work / "localca.options").write_text("")

    def issue(x: int, y: int, outdir: Path) -> None:
        subprocess.run(
            [
                "swtpm_localca",
                "--type",
                "ek",
                "--ek",
                f"x={x:064x},y={y:064x},id=secp256r1",
                "--dir",
                str(outdir),
                "--vmid",
                str(uuid.uuid4()),
                "--tpm2",
                "--configfile",
                str(conf),
                "--optsfile",
                str(work / "localca.options"),
                "--tpm-spec-family",
                "2.0",
                "--tpm-spec-revision",
                "164",
                "--tpm-spec-level",
                "0",
                "--tpm-manufacturer",
                "id:49424D00",
                "--tpm-model",
                "swtpm",
                "--tpm-version",
                "id:20191023",
            ],
            check=True,
            capture_output=True,
        )

    out = work / "localca-out"
    out.mkdir()
    issue(keys[0][1], keys[0][2], out)  # first call creates swtpm-localca's CA
    rates = []
    for r in range(rounds):
        batch = keys[1 + r * per : 1 + (r + 1) * per]
        start = time.perf_counter()
        for _, x, y in batch:
            issue(x, y, out)
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=300)
    parser.add_argument("--http-per-round", type=int, default=200)
    parser.add_argument("--localca-per-round", type=int, default=20)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-issue-") as tmp:
        work = Path(tmp)
        template = real_ecc_ek(work)
        n = 1 + args.rounds * max(args.per_round, args.http_per_round, args.localca_per_round)
        keys = ek_variants(template, n + args.http_per_round)
        CaHome(work / "ca-inproc").init(passphrase=PASSPHRASE, key_type="ecdsa-p256")
        CaHome(work / "ca-http").init(passphrase=PASSPHRASE, key_type="ecdsa-p256")
        local = in_process(work / "ca-inproc", keys, args.rounds, args.per_round)
        http = over_http(work / "ca-http", keys, args.rounds, args.http_per_round)
        baseline = swtpm_localca(work, keys, args.rounds, args.localca_per_round)
    load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"cpus: {os.cpu_count()}, rounds: {args.rounds} (median of rounds), {load}")
    print(f"in-process (ECDSA P-256 CA, SQLite WAL): {local:8.0f} certs/s")
    print(f"HTTP (gunicorn, 2 workers, 4 clients):   {http:8.0f} certs/s")
    print(f"swtpm_localca (process per cert):        {baseline:8.1f} certs/s")
    print(f"ratio in-process / swtpm_localca: {local / baseline:6.1f}x (target >= 50x)")
    print(f"ratio HTTP / swtpm_localca:       {http / baseline:6.1f}x")
    met = "met" if local >= 50 * baseline else "NOT met"
    print(f"target >= 50x in-process / swtpm_localca: {met}")
    print(f"target >= 1000 certs/s in-process: {'met' if local >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
