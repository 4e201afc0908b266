"""``_marshal.check`` calls libtss2-mu directly; these pin that it still judges as
tpm2-pytss's ``TYPE.unmarshal`` + ``value.marshal()`` did (same verdict, same message),
that each of its four steps still fires, and that ``Public`` caches its key without
changing what a ``Public`` is.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.errors import ParseError
from vtpm_core.tpm import Public, _marshal

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"
SAMPLES = {
    "TPMS_ATTEST": [
        (DATA / f"swtpm_quote_{k}.tpms_attest").read_bytes()
        for k in ("ecc_ecdsa", "rsa_rsapss", "values")
    ],
    "TPMT_SIGNATURE": [
        (DATA / f"swtpm_quote_{k}.tpmt_signature").read_bytes() for k in ("ecc_ecdsa", "rsa_rsapss")
    ],
    "TPMT_PUBLIC": [
        (DATA / f"swtpm_{k}.tpm2b_public").read_bytes()[2:]
        for k in ("ak_ecc_ecdsa", "ak_rsa_rsapss", "ek_rsa")
    ],
    "TPML_PCR_SELECTION": [bytes.fromhex("00000001000b03ff4700"), bytes.fromhex("00000000")],
}
CASES = [(s, i) for s, samples in SAMPLES.items() for i in range(len(samples))]


def _reference(structure: str, data: bytes) -> str:
    """The check as it was written against tpm2-pytss's wrappers: its verdict as text."""
    from tpm2_pytss import types

    try:
        value, used = getattr(types, structure).unmarshal(data)
        again = bytes(value.marshal())
    except Exception as exc:
        return str(ParseError(structure, "tpm2-tss", 0, f"libtss2-mu rejects it: {exc}"))
    if used != len(data):
        return str(
            ParseError(structure, "tpm2-tss", used, f"libtss2-mu read {used} of {len(data)} bytes")
        )
    if again != data:
        return str(
            ParseError(structure, "tpm2-tss", 0, "libtss2-mu does not re-encode it identically")
        )
    return "ok"


def _verdict(structure: str, data: bytes) -> str:
    try:
        _marshal.check(structure, data)
    except ParseError as exc:
        return str(exc)
    return "ok"


def _mutations(sample: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(
        st.integers(0, len(sample)), st.binary(min_size=0, max_size=4), st.integers(0, 4)
    ).map(lambda t: sample[: t[0]] + t[1] + sample[t[0] + t[2] :])


@pytest.mark.parametrize(("structure", "index"), CASES, ids=[f"{s}[{i}]" for s, i in CASES])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_check_judges_as_the_tpm2_pytss_wrappers(structure: str, index: int, data: Any) -> None:
    mutated = data.draw(_mutations(SAMPLES[structure][index]))
    assert _verdict(structure, mutated) == _reference(structure, mutated)


@pytest.mark.parametrize(("structure", "index"), CASES, ids=[f"{s}[{i}]" for s, i in CASES])
def test_samples_pass(structure: str, index: int) -> None:
    _marshal.check(structure, SAMPLES[structure][index])


def test_step_1_unmarshal_refuses() -> None:
    with pytest.raises(ParseError, match=r"TPMS_ATTEST\.tpm2-tss at byte 0: libtss2-mu rejects"):
        _marshal.check("TPMS_ATTEST", SAMPLES["TPMS_ATTEST"][0][:20])


def test_step_3_trailing_bytes() -> None:
    sample = SAMPLES["TPMT_SIGNATURE"][0]
    with pytest.raises(ParseError, match=rf"byte {len(sample)}: libtss2-mu read {len(sample)} of"):
        _marshal.check("TPMT_SIGNATURE", sample + b"\0")


def test_step_4_a_different_re_encoding_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """No input is known that libtss2-mu reads whole yet re-encodes differently, so a
    marshaller that flips one bit stands in for one: the byte comparison must catch it."""
    mu = _marshal._mu("TPMS_ATTEST")
    real = mu.marshal

    def flipping(value: Any, buffer: Any, size: int, offset: Any) -> int:
        rc: int = real(value, buffer, size, offset)
        buffer[offset[0] - 1] ^= 1
        return rc

    monkeypatch.setattr(mu, "marshal", flipping)
    with pytest.raises(ParseError, match="does not re-encode it identically"):
        _marshal.check("TPMS_ATTEST", SAMPLES["TPMS_ATTEST"][0])


def test_unknown_structure() -> None:
    with pytest.raises(KeyError):
        _marshal.check("TPMS_NOTHING", b"")


@pytest.mark.parametrize("index", range(len(SAMPLES["TPMT_PUBLIC"])))
def test_public_key_is_built_once_and_is_not_part_of_the_value(index: int) -> None:
    raw = SAMPLES["TPMT_PUBLIC"][index]
    a, b = Public.parse(raw), Public.parse(raw)
    key = a.public_key()
    assert a.public_key() is key
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    copy = pickle.loads(pickle.dumps(a))  # noqa: S301 (our own bytes, just made)
    assert copy == a and copy.same_key(key)


def test_a_refused_key_is_refused_every_time() -> None:
    raw = SAMPLES["TPMT_PUBLIC"][0]  # ECC: x and y are the last two TPM2B_ECC_PARAMETERs
    bad = Public.parse(raw[:-1] + bytes([raw[-1] ^ 1]))  # the point leaves the curve
    for _ in range(2):
        with pytest.raises(ParseError, match="not a point on the curve"):
            bad.public_key()


def test_the_check_loads_the_bindings_without_the_tpm2_pytss_package() -> None:
    """A fresh process checks a quote with tpm2-pytss's extension alone (not its package,
    which imports ESAPI, FAPI and cryptography.x509); a later ``import tpm2_pytss``
    uses that same extension module."""
    code = (
        "import sys\n"
        "from vtpm_core.tpm import Attest, _marshal\n"
        f"data = open({str(DATA / 'swtpm_quote_ecc_ecdsa.tpms_attest')!r}, 'rb').read()\n"
        "Attest.parse(data)\n"
        "try:\n"
        "    _marshal.check('TPMS_ATTEST', data + b'x')\n"
        "except Exception as exc:\n"
        "    print('REFUSED', exc)\n"
        "print('PACKAGE', 'tpm2_pytss' in sys.modules, 'cryptography.x509' in sys.modules)\n"
        "import tpm2_pytss\n"
        "from tpm2_pytss._libtpm2_pytss import lib\n"
        "print('SAME', lib is _marshal._bindings().lib)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "REFUSED TPMS_ATTEST.tpm2-tss at byte 135: libtss2-mu read 135 of 136 bytes" in out
    assert "PACKAGE False False" in out
    assert "SAME True" in out
