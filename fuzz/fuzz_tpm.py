"""atheris fuzz target for the TPM structure parsers (vtpm_core.tpm).

Run:  .venv/bin/python fuzz/fuzz_tpm.py --seeds /tmp/tpm-seeds   (writes the seed corpus)
      .venv/bin/python fuzz/fuzz_tpm.py /tmp/tpm-seeds -max_total_time=60
The first input byte picks the parser, the rest is its input; ``--seeds``
prefixes the real samples from tests/data/tpm and ../shared/corpus/quotes with
their parser's byte. Only ParseError may come out of a parser (VerificationError
of a later step); anything else crashes the fuzzer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from vtpm_core.errors import ParseError, VerificationError
    from vtpm_core.tpm import Attest, PcrSelection, PcrValues, Public, Signature

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "tpm"
QUOTES = REPO.parent / "shared" / "corpus" / "quotes"
SELECTION = PcrSelection.from_string("sha256:0,1,2,16+sha1:7")
AK = Public.load((DATA / "swtpm_ak_rsa_rsapss.tpm2b_public").read_bytes())

# (name, parser, seed files)
PARSERS: list[tuple[str, Callable[[bytes], object], list[Path]]] = [
    ("public", Public.load,
     [*DATA.glob("*.tpm2b_public"), *DATA.glob("*.pem"), *QUOTES.glob("*/*.tpmt_public.bin")]),
    ("attest", Attest.load, [*DATA.glob("*.tpms_attest"), *QUOTES.glob("*/*.tpms_attest.bin")]),
    ("signature", Signature.parse,
     [*DATA.glob("*.tpmt_signature"), *QUOTES.glob("*/*.tpmt_signature.bin")]),
    ("selection", PcrSelection.parse, []),
    ("pcrs", lambda d: PcrValues.load(d, SELECTION), [*DATA.glob("*.pcrs")]),
    ("pcrs-serialized", PcrValues.from_tpm2_tools, [*QUOTES.glob("*/*.tpm2tools_pcrs.bin")]),
]  # fmt: skip


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    if not data:
        return
    _, parser, _ = PARSERS[data[0] % len(PARSERS)]
    try:
        value = parser(data[1:])
    except ParseError:
        return
    if isinstance(value, Public):
        with contextlib.suppress(ParseError, VerificationError):
            value.public_key()
            value.name()
    elif isinstance(value, Signature):
        with contextlib.suppress(VerificationError):
            value.verify(AK, b"message")
    elif isinstance(value, PcrSelection):
        assert PcrSelection.parse(value.to_bytes()) == value


def write_seeds(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, _, files) in enumerate(PARSERS):
        for f in files:
            (out / f"{name}-{f.name}").write_bytes(bytes([i]) + f.read_bytes())
    (out / "selection-two-banks").write_bytes(bytes([3]) + SELECTION.to_bytes())


def main() -> None:
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
