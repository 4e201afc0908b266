"""atheris fuzz target for the readers of systemd's predictions and SBAT (issue 20):
.pcrlock files (verifier.policy.pcrlock), systemd-measure JSON and .pcrsig
(verifier.policy.uki), .sbat sections and SbatLevels (verifier.sbat), and a UKI's PCR 11
from a PE image.

Run:  .venv/bin/python fuzz/fuzz_systemd_predictions.py [corpus_dir] -max_total_time=60
Seed it with .pcrlock files, `systemd-measure calculate --json=short` output, .sbat
sections (tests/data/sbat/) and UKIs. The only exceptions allowed out are ParseError and
ConfigError (a well-formed PE that is no UKI); anything else is a bug.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from verifier.dbx import DbxUpdate
    from verifier.policy.pcrlock import parse_pcrlock
    from verifier.policy.uki import check_pcrsig, parse_measure_json, uki_pcr11
    from verifier.sbat import SbatLevel, parse_sbat
    from vtpm_core.errors import ConfigError, ParseError


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    for reader in (
        lambda: parse_pcrlock(data, "fuzz"),
        lambda: parse_measure_json(data, "fuzz"),
        lambda: check_pcrsig(data, None, (), "fuzz"),
        lambda: parse_sbat(data, "fuzz"),
        lambda: SbatLevel.parse(data),
        lambda: DbxUpdate.parse(data),
        lambda: uki_pcr11(data, "fuzz"),
    ):
        with contextlib.suppress(ParseError, ConfigError):
            reader()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
