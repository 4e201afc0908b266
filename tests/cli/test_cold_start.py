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


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return set(out.split())


def test_the_ca_package_imports_a_name_only_when_it_is_read() -> None:
    """``vtpm create --ca-home`` imports ca.issuer: not the HTTP server (Flask), the
    HTTP client (requests) or the revocation code; ``from ca import X`` still works."""
    modules = _modules_after("import ca.issuer")
    assert not {"flask", "requests", "ca.http", "ca.client", "ca.revocation"} & modules
    import ca

    for name in ca.__all__:
        assert getattr(ca, name).__name__ == name
    from ca import HttpCaIssuer, create_app

    assert HttpCaIssuer.__module__ == "ca.client" and create_app.__module__ == "ca.http"


def test_the_tpm_package_imports_a_structure_family_only_when_it_is_read() -> None:
    """``vtpm create`` reads one TPM2B_PUBLIC: the quote's structures stay unimported,
    and every name of ``vtpm_core.tpm`` is still there when read."""
    modules = _modules_after("import vtpm_core.tpm.public, vtpm_core.tpm.templates")
    assert not {"vtpm_core.tpm.attest", "vtpm_core.tpm.pcr", "vtpm_core.tpm.signature"} & modules
    import vtpm_core.tpm as tpm

    for name in tpm.__all__:
        assert getattr(tpm, name) is getattr(sys.modules[tpm._HOME[name]], name)


def test_the_lint_cache_key_reads_pkilints_version_without_importlib_metadata() -> None:
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom ca.lint import _pkilint_version\n"
         "print(_pkilint_version(), 'importlib.metadata' in sys.modules)"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    from importlib import metadata

    assert out == [metadata.version("pkilint"), "False"]


def test_an_issuance_path_imports_no_asn1crypto() -> None:
    modules = _modules_after("import ca.issuer, ca.lint, vtpm_core.vm_identity")
    assert not {m for m in modules if m.startswith("asn1crypto")}
