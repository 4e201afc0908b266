"""What each key provider costs: wrapping at creation, unwrapping at start (issue 15).

Providers, all real and in the same run: ``local`` (the shared KEK file, the
embedded default), ``local-per-vtpm`` (a KEK file per vTPM), ``pkcs11``
(SoftHSM2 token made in a temp dir, a non-extractable AES KEK per vTPM,
C_Encrypt/C_Decrypt AES-GCM) and ``kmip`` (PyKMIP's own server on 127.0.0.1,
mutual TLS, a KEK per vTPM, server-side Encrypt/Decrypt; connection kept).

Columns, medians of N:
- ``new key``: what ``VtpmStore.wrap_new`` pays at creation: the vTPM's KEK
  created (per-vTPM providers), the data key wrapped, then read back;
- ``unwrap``: what ``vtpm start`` / backup / restore pay to get the data key;
- ``create``: a whole ``VtpmStore.create`` (one ECC P-256 EK, external-CA
  mode so the CA is not in the number) - the provider's share of it;
- ``start``: ``VtpmStore.running`` open + close (unwrap + swtpm start/stop);
and each provider's ratio to ``local`` for ``new key``, ``unwrap`` and ``create``.

Run: .venv/bin/python bench/keyprovider.py [--runs N] [--vtpms M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.vtpm_core._kmip import kmip_server  # noqa: E402
from vtpm_core.keyconfig import (  # noqa: E402
    KmipProviderConfig,
    LocalProviderConfig,
    Pkcs11ProviderConfig,
    ProviderConfig,
)
from vtpm_core.store import VtpmStore  # noqa: E402

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def _median_ms(f: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def softhsm_config(work: Path) -> Pkcs11ProviderConfig:
    """A fresh SoftHSM2 token "bench" under ``work`` (SOFTHSM2_CONF set), PIN in a 0600 file."""
    tokens = work / "tokens"
    tokens.mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", "bench"),
            *("--pin", "1234", "--so-pin", "5678"),
        ],
        check=True,
        capture_output=True,
    )
    pin = work / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    return Pkcs11ProviderConfig(Path(SOFTHSM), "bench", pin_file=pin)


def measure(store: VtpmStore, runs: int, vtpms: int) -> dict[str, float]:
    data_key = os.urandom(32)
    refs = []

    def new_key() -> None:
        refs.append((vid := uuid.uuid4(), store.wrap_new(vid, data_key)))

    out = {"new key": _median_ms(new_key, runs)}
    provider = store.providers.get(store.providers.default)
    it = iter(refs * 2)

    def unwrap() -> None:
        vid, ref = next(it)
        provider.unwrap(ref.key_id, ref.wrapped, str(vid).encode())

    out["unwrap"] = _median_ms(unwrap, runs)
    for _vid, ref in refs:  # leave the token/KMS as we found it
        if store.providers.config(ref.provider).key_per_vtpm:
            provider.destroy_key(ref.key_id)
    names = iter(f"vm{i}" for i in range(vtpms))
    out["create"] = _median_ms(
        lambda: store.create(next(names), issuer=None, ek=["ecc-p256"]), vtpms
    )

    def start() -> None:
        with store.running("vm0"):
            pass

    out["start"] = _median_ms(start, vtpms)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="wrap/unwrap samples per provider")
    ap.add_argument("--vtpms", type=int, default=5, help="vTPMs created (and starts) per provider")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtpm-bench-kp-") as tmp:
        work = Path(tmp)
        with kmip_server(work / "kmip") as kms:
            c = kms.config()
            providers: dict[str, ProviderConfig] = {
                "local": LocalProviderConfig(Path("keys")),
                "local-per-vtpm": LocalProviderConfig(Path("keys"), key_per_vtpm=True),
                "pkcs11": softhsm_config(work),
                "kmip": KmipProviderConfig(c.host, c.port, c.ca, c.cert, c.key),
            }
            results = {}
            for pid, config in providers.items():
                with VtpmStore.init(work / pid, provider_id=pid, provider=config) as store:
                    results[pid] = measure(store, args.runs, args.vtpms)
    cols = ["new key", "unwrap", "create", "start"]
    print(f"key providers: medians in ms (wrap/unwrap n={args.runs}, create/start n={args.vtpms})")
    print(
        f"{'provider':<16}"
        + "".join(f"{c:>10}" for c in cols)
        + "   x local: new key / unwrap / create"
    )
    base = results["local"]
    for pid, r in results.items():
        ratios = " / ".join(f"{r[c] / base[c]:.1f}" for c in ("new key", "unwrap", "create"))
        print(f"{pid:<16}" + "".join(f"{r[c]:>10.2f}" for c in cols) + f"   {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
