"""Seal and unseal a secret with tpm2-tools (the independent TPM client of these tests).

The sealed object is a keyedHash data object created under an ECC SRK
(TPM2_CreatePrimary in the owner hierarchy, tpm2-tools' default template)
with a PCR policy (sha256:16). Only the SRK's TPM (its owner seed) can load
it again, so unsealing works on the same TPM or a byte-copy of it, never on
another TPM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Tools
from vtpm_core.swtpm import SwtpmProcess

POLICY_PCRS = "sha256:16"


def seal(tpm: SwtpmProcess, workdir: Path, secret: bytes) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    tools = Tools(tpm, workdir)
    (workdir / "secret.bin").write_bytes(secret)
    tools.run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "srk.ctx")
    tools.run("tpm2_createpolicy", "--policy-pcr", "-l", POLICY_PCRS, "-L", "pcr.policy")
    tools.run(
        "tpm2_create", "-C", "srk.ctx", "-L", "pcr.policy", "-i", "secret.bin",
        "-u", "seal.pub", "-r", "seal.priv",
    )  # fmt: skip
    (workdir / "secret.bin").unlink()


def unseal(tpm: SwtpmProcess, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Recreate the SRK, load the sealed object, unseal with the PCR policy; result of unseal."""
    tools = Tools(tpm, workdir)
    tools.run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "srk.ctx")
    load = tools.run(
        "tpm2_load", "-C", "srk.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx",
        check=False,
    )  # fmt: skip
    if load.returncode != 0:
        return load
    return tools.run("tpm2_unseal", "-c", "seal.ctx", "-p", f"pcr:{POLICY_PCRS}", "-o", "out.bin",
                     check=False)  # fmt: skip
