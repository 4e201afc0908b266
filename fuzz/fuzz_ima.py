"""atheris fuzz target for the IMA measurement-list parser (binary and ASCII).

Run:  .venv/bin/python fuzz/fuzz_ima.py [corpus_dir] -max_total_time=60
Seed it with tests/data/ima. The only exceptions allowed out of the parser
are ParseError and VerificationError (a forged template hash); anything
else is a bug and crashes the fuzzer. Every entry parsed must survive its
own round trip.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from verifier.ima.limits import ImaLimits
    from verifier.ima.parse import parse_binary, parse_list
    from vtpm_core.errors import ParseError, VerificationError

# small limits keep each input cheap
LIMITS = ImaLimits(max_list_bytes=256 * 1024, max_entries=4096, max_template_data=64 * 1024)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        entries = parse_list(data, limits=LIMITS)
    except (ParseError, VerificationError):
        return
    for entry in entries:
        (again,) = parse_binary(
            entry.to_bytes(), offset_index=entry.index, limits=LIMITS,
            template_hash_algo=entry.template_hash_algo,
        )  # fmt: skip
        if again.fields != entry.fields:
            raise AssertionError(f"entry {entry.index} does not round-trip")
        _ = entry.to_ascii()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
