"""atheris fuzz target for the PE/COFF Authenticode parser (vtpm_core.authenticode).

Run:  .venv/bin/python fuzz/fuzz_authenticode.py [corpus_dir] -max_total_time=60
Seed it with EFI binaries, e.g. /usr/lib/systemd/boot/efi/*.efi and the
cached kernel. The only exception allowed out is ParseError; anything else
(IndexError, struct.error, a hang) is a bug and crashes the fuzzer.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vtpm_core.authenticode import PeImage
    from vtpm_core.errors import ParseError


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        image = PeImage.parse(data)
    except ParseError:
        return
    for bank in ("sha1", "sha256"):
        image.digest(bank)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
