"""atheris fuzz target for the EK certificate parser (verifier.ekcert.parse).

Run:  .venv/bin/python fuzz/fuzz_ekcert.py [corpus_dir] -max_total_time=60
Seed it with ../shared/corpus/ekcerts (every .der/.pem). The only exception
allowed out is ParseError; anything else is a bug and crashes the fuzzer.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from verifier.ekcert import CertificateRevocationList, check_ek_profile, parse_certificate
    from vtpm_core.errors import ParseError, VerificationError


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        cert = parse_certificate(data)
    except ParseError:
        pass
    else:
        with contextlib.suppress(VerificationError):
            check_ek_profile(cert, exempt_eku_and_san=False)
    with contextlib.suppress(ParseError):
        CertificateRevocationList.parse(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
