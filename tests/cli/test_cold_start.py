"""What each one-shot ``vtpm`` command imports at start (issue 19, cold start).

Each case runs the command's real work in a fresh interpreter and asserts both its
outcome and that the modules it does not use were not imported; bench/provision.py
times the same commands as whole processes.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

TPM = REPO / "tests" / "data" / "tpm"


def _run_and_list(argv: list[str]) -> tuple[int, str, set[str]]:
    code = (
        "import sys\n"
        "from vtpm_cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "    rc = 0\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code or 0\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
        "print('RC', rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    modules = set(out.split("MODULES ", 1)[1].split("\n", 1)[0].split())
    rc = int(out.rsplit("RC ", 1)[1].strip())
    return rc, out, modules


def test_verify_quote_imports_neither_ekcert_nor_x509_nor_the_tpm2_pytss_package() -> None:
    rc, out, modules = _run_and_list(
        [
            "verify-quote",
            "--ak", str(TPM / "swtpm_ak_ecc_ecdsa.tpm2b_public"),
            "--message", str(TPM / "swtpm_quote_ecc_ecdsa.tpms_attest"),
            "--signature", str(TPM / "swtpm_quote_ecc_ecdsa.tpmt_signature"),
            "--pcrs", str(TPM / "swtpm_quote_ecc_ecdsa.pcrs"),
            "--nonce", "00112233445566778899aabbccddeeff",
        ]
    )  # fmt: skip
    assert rc == 0 and "quote valid" in out
    # the libtss2-mu cross-check ran: its extension is loaded, the package is not
    assert "tpm2_pytss._libtpm2_pytss" in modules
    assert not {"tpm2_pytss", "verifier.ekcert", "cryptography.x509"} & modules
