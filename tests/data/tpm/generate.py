"""Regenerate the swtpm-made golden files in this folder (see README.md).

Run from the repository root:  .venv/bin/python tests/data/tpm/generate.py
Starts a fresh swtpm, makes EKs, AKs and quotes with tpm2-tools 5.4 and
copies the files here. The outputs differ on every run (fresh EK seed).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from vtpm_core.swtpm import SwtpmProcess

HERE = Path(__file__).resolve().parent
NONCE = "00112233445566778899aabbccddeeff"
PCRS = "sha256:0,1,2,16+sha1:7"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with SwtpmProcess(work / "state") as tpm:

            def run(*args: str) -> None:
                subprocess.run(
                    list(args), env=tpm.tool_env, cwd=work, check=True, capture_output=True,
                    timeout=60,
                )  # fmt: skip
                subprocess.run(
                    ["tpm2_flushcontext", "-t"], env=tpm.tool_env, cwd=work, capture_output=True,
                    timeout=30,
                )  # fmt: skip

            run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "swtpm_ek_rsa.tpm2b_public")
            run("tpm2_createek", "-c", "ek2.ctx", "-G", "ecc", "-u", "swtpm_ek_ecc.tpm2b_public")
            for g, s in (("rsa", "rsapss"), ("ecc", "ecdsa")):
                ak = f"swtpm_ak_{g}_{s}"
                run(
                    "tpm2_createak", "-C", "ek.ctx", "-c", f"{ak}.ctx", "-G", g, "-g", "sha256",
                    "-s", s, "-u", f"{ak}.tpm2b_public", "-n", f"{ak}.name",
                )  # fmt: skip
                run("tpm2_readpublic", "-c", f"{ak}.ctx", "-f", "pem", "-o", f"{ak}.pem")
                q = f"swtpm_quote_{g}_{s}"
                run(
                    "tpm2_quote", "-c", f"{ak}.ctx", "-l", PCRS, "-q", NONCE, "-g", "sha256",
                    "--scheme", s, "-m", f"{q}.tpms_attest", "-s", f"{q}.tpmt_signature",
                    "-o", f"{q}.pcrs",
                )  # fmt: skip
            q = "swtpm_quote_values"
            run(
                "tpm2_quote", "-c", "swtpm_ak_rsa_rsapss.ctx", "-l", PCRS, "-q", NONCE,
                "-g", "sha256", "--scheme", "rsapss", "-m", f"{q}.tpms_attest",
                "-s", f"{q}.tpmt_signature", "-o", f"{q}.pcrs", "-F", "values",
            )  # fmt: skip
        for f in sorted(work.iterdir()):
            if f.is_file() and f.name.startswith("swtpm_") and not f.name.endswith(".ctx"):
                shutil.copyfile(f, HERE / f.name)
                print(f.name)


if __name__ == "__main__":
    main()
