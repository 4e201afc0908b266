"""What the runtime (IMA) part adds to the service's evidence appraisal (issue 14).

The verifier service's step 2 (``LibraryAppraiser.appraise``: quote signature,
nonce and PCR digest, boot policy, and with a ``runtime:`` part the IMA delta
replayed onto the stored state and appraised) on one real swtpm quote of
PCRs 0-10 in the SHA-1 and SHA-256 banks, whose PCR 10 holds ``--base``
synthetic ``ima-ng`` entries and then ``--delta`` more:

- with: the combined policy, the delta of ``--delta`` binary entries and the
  stored state after ``--base`` entries (what an attester sends each round);
- baseline: the same quote under the same boot policy without a runtime part
  and without a delta, in the same run, interleaved.

CPU time of the calling thread, one core (pinned), medians. The database
work (the state read with the attester row, one compare and one upsert in
the evidence transaction) is not in it.

Run: .venv/bin/python bench/ima_evidence.py [--base 1000] [--delta 100] [--runs 301]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ima import binary_entry, file_digest, path_of, pcr10_after, template_data  # noqa: E402
from verifier.attester import TpmAttester  # noqa: E402
from verifier.ear import EarSigner  # noqa: E402
from verifier.ekcert import EkValidationOptions  # noqa: E402
from verifier.ima.appraise import ImaProgress  # noqa: E402
from verifier.service.appraiser import LibraryAppraiser  # noqa: E402
from verifier.service.messages import EvidenceRequest, ImaDelta, parse_pcrs  # noqa: E402
from verifier.service.ports import ImaState  # noqa: E402
from vtpm_core.swtpm import SwtpmProcess  # noqa: E402

BANKS = ("sha1", "sha256")


def _extend(tpm: SwtpmProcess, first: int, last: int) -> None:
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    with tpm.esapi() as esapi:
        for i in range(first, last):
            data = template_data(i)
            values = []
            for bank, alg in (("sha1", TPM2_ALG.SHA1), ("sha256", TPM2_ALG.SHA256)):
                ha = TPMT_HA(hashAlg=alg)
                setattr(ha.digest, bank, hashlib.new(bank, data).digest())
                values.append(ha)
            esapi.pcr_extend(ESYS_TR.PCR10, TPML_DIGEST_VALUES(values))


def _signer() -> EarSigner:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return EarSigner.load(pem, build="bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=int, default=1000)
    parser.add_argument("--delta", type=int, default=100)
    parser.add_argument("--runs", type=int, default=301)
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):  # times are CPU time all the same
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    base, total = args.base, args.base + args.delta
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "tpm"
        state_dir.mkdir()
        subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--pcr-banks", "sha1,sha256"],
            check=True,
            capture_output=True,
        )
        with SwtpmProcess(state_dir) as tpm:
            _extend(tpm, 0, total)
            nonce = hashlib.sha256(b"bench nonce").digest()
            selection = {b: list(range(11)) for b in BANKS}
            with TpmAttester.open(tpm.endpoint.tcti) as att:
                _, ak_public = att.ak()
                quote = att.quote(nonce, selection)
    pcrs = parse_pcrs(quote.pcrs)
    boot = {"version": 1, "name": "bench", "pcrs": {"sha256": {"7": pcrs["sha256"][7].hex()}}}
    runtime = {
        "version": 1,
        "name": "bench",
        "digests": {path_of(i): [f"sha256:{file_digest(i).hex()}"] for i in range(total)},
    }
    combined = yaml.safe_dump({**boot, "runtime": runtime})
    boot_only = yaml.safe_dump(boot)
    body = b"".join(binary_entry(i) for i in range(base, total))
    with_ima = EvidenceRequest(
        nonce, quote.attest, quote.signature, pcrs, None, None, ImaDelta(base, body)
    )
    without = EvidenceRequest(nonce, quote.attest, quote.signature, pcrs, None, None)
    appraiser = LibraryAppraiser(None, EkValidationOptions(), _signer(), "bench")
    digest = appraiser.load_policy(combined).runtime.digest  # type: ignore[union-attr]
    from vtpm_core.tpm import Attest

    info = Attest.parse(quote.attest).clock_info
    progress = ImaProgress(info.reset_count, base, pcr10_after(base, BANKS), digest)
    stored = ImaState(info.reset_count, info.restart_count, base, digest.hex(), progress.to_bytes())
    sel = {b: tuple(p) for b, p in selection.items()}

    def run_with() -> None:
        a = appraiser.appraise(
            ak_public=ak_public, nonce=nonce, evidence=with_ima, selection=sel,
            policy_body=combined, ima_state=stored, appraise_runtime=True,
        )  # fmt: skip
        assert a.status == "affirming", a.failures
        assert a.ima_state is not None and a.ima_state.entry_count == total

    def run_without() -> None:
        a = appraiser.appraise(
            ak_public=ak_public, nonce=nonce, evidence=without, selection=sel,
            policy_body=boot_only,
        )  # fmt: skip
        assert a.status == "affirming", a.failures

    run_with()
    run_without()
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.runs):
        for name, fn in (("with", run_with), ("without", run_without)):
            started = time.thread_time()
            fn()
            times[name].append(time.thread_time() - started)
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    print(
        f"service appraisal of one evidence (real swtpm quote, PCRs 0-10 in {', '.join(BANKS)}),"
        f" medians of {args.runs} interleaved runs, CPU:"
    )
    print(f"  boot policy only:                      {wo * 1e6:8.1f} us")
    print(f"  + runtime part, {args.delta}-entry delta at {base:,}: {w * 1e6:8.1f} us")
    added = (w - wo) * 1e6
    print(f"  the runtime part adds {added:.1f} us ({w / wo:.2f}x the boot-only appraisal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
