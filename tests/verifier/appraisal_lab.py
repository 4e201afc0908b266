"""Real evidence for appraisal tests and bench/appraise.py.

A fresh swtpm's PCRs are extended, through tpm2-pytss TPM2_PCR_Extend, with
every extended event of a real corpus log (all banks the log carries), so
the log replays to the TPM's PCRs; tpm2-tools then makes an EK, RSA and ECC
AKs and TPM2_Quotes with a nonce (the same files a guest would send, also
usable by tpm2_checkquote). Logs with a StartupLocality event cannot be
reproduced (swtpm starts at locality 0) and are refused.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from verifier.eventlog import EventLog
from verifier.eventlog.events import EventType
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import PcrValues, Public

NONCE = bytes.fromhex("5a" * 32)
QUOTE_PCRS = "sha256:0,1,2,3,4,5,6,7,8,9,14"
AKS = {"rsa": ("rsa", "sha256", "rsassa"), "ecc": ("ecc", "sha256", "ecdsa")}
_ALGS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}


@dataclass(frozen=True)
class Quoted:
    """One AK's evidence: the files tpm2-tools wrote, and their parsed forms."""

    kind: str
    dir: Path
    ak: Public
    attest: bytes
    signature: bytes
    pcrs: PcrValues

    def path(self, suffix: str) -> Path:
        return self.dir / f"{self.kind}.{suffix}"


@dataclass(frozen=True)
class Lab:
    log_path: Path
    log: bytes
    nonce: bytes
    quotes: dict[str, Quoted]


def _run(tpm: SwtpmProcess, cwd: Path, *args: str) -> None:
    result = subprocess.run(
        list(args), env=tpm.tool_env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    subprocess.run(["tpm2_flushcontext", "-t"], env=tpm.tool_env, capture_output=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")


def _extend_log(tpm: SwtpmProcess, log: EventLog) -> None:
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    if log.startup_locality is not None:
        raise ValueError("a log with a StartupLocality event cannot be replayed into swtpm")
    with tpm.esapi() as esapi:
        for event in log.events:
            if event.event_type == EventType.EV_NO_ACTION:
                continue
            values = []
            for bank, digest in event.digests.items():
                ha = TPMT_HA(hashAlg=TPM2_ALG(_ALGS[bank]))
                setattr(ha.digest, bank, digest)
                values.append(ha)
            esapi.pcr_extend(ESYS_TR.PCR0 + event.pcr, TPML_DIGEST_VALUES(values))


def build_lab(
    state: Path,
    work: Path,
    log_path: Path,
    nonce: bytes = NONCE,
    pcrs: str = QUOTE_PCRS,
    unlogged: Sequence[tuple[int, bytes]] = (),
) -> Lab:
    """``unlogged``: (PCR, data) extended after the log with TPM2_PCR_Event (the TPM
    hashes the data in every bank) and logged nowhere, as systemd-pcrphase's are."""
    data = log_path.read_bytes()
    log = EventLog.parse(data)
    quotes: dict[str, Quoted] = {}
    with SwtpmProcess(state) as tpm:
        _extend_log(tpm, log)
        if unlogged:
            from tpm2_pytss import ESYS_TR, TPM2B_EVENT

            with tpm.esapi() as esapi:
                for pcr, event in unlogged:
                    esapi.pcr_event(ESYS_TR.PCR0 + pcr, TPM2B_EVENT(event))
        _run(tpm, work, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        for kind, (key, hash_alg, scheme) in AKS.items():
            _run(
                tpm, work, "tpm2_createak", "-C", "ek.ctx", "-c", f"{kind}.ctx", "-G", key,
                "-g", hash_alg, "-s", scheme, "-u", f"{kind}.pub", "-n", f"{kind}.name",
            )  # fmt: skip
            _run(
                tpm, work, "tpm2_quote", "-c", f"{kind}.ctx", "-l", pcrs,
                "-q", nonce.hex(), "-m", f"{kind}.msg", "-s", f"{kind}.sig",
                "-o", f"{kind}.pcrs", "-g", hash_alg, "--scheme", scheme,
            )  # fmt: skip
            quotes[kind] = Quoted(
                kind,
                work,
                Public.load((work / f"{kind}.pub").read_bytes()),
                (work / f"{kind}.msg").read_bytes(),
                (work / f"{kind}.sig").read_bytes(),
                PcrValues.load((work / f"{kind}.pcrs").read_bytes()),
            )
    return Lab(log_path, data, nonce, quotes)
