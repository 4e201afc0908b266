"""Malformed input: every parser raises ParseError (structure, field, offset), nothing else.

Truncation at every byte offset and trailing bytes on real samples, table-driven
corruptions with their messages, and a Hypothesis property per parser.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import Attest, PcrSelection, PcrValues, Public, Signature

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"
QUOTES = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "quotes"


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


KEYLIME = "swtpm_keylime_checkquote"
INFINEON = "infineon_ak_certify_creation"

# (id, parser, sample bytes, structure named by errors on that sample)
SAMPLES: list[tuple[str, Callable[[bytes], object], Callable[[], bytes], str]] = [
    ("TPMT_PUBLIC/infineon", Public.parse,
     lambda: (QUOTES / INFINEON / "ak_pub.tpmt_public.bin").read_bytes(), "TPMT_PUBLIC"),
    ("TPMT_PUBLIC/ek-ecc", Public.parse,
     lambda: _read("swtpm_ek_ecc.tpm2b_public")[2:], "TPMT_PUBLIC"),
    ("TPM2B_PUBLIC/ak-rsa", Public.parse_tpm2b,
     lambda: _read("swtpm_ak_rsa_rsapss.tpm2b_public"), "TPM2B_PUBLIC"),
    ("TPMS_ATTEST/keylime", Attest.parse,
     lambda: (QUOTES / KEYLIME / "quote.tpms_attest.bin").read_bytes(), "TPMS_ATTEST"),
    ("TPMS_ATTEST/creation", Attest.parse,
     lambda: (QUOTES / INFINEON / "ak_creation.tpms_attest.bin").read_bytes(), "TPMS_ATTEST"),
    ("TPMS_ATTEST/swtpm-two-banks", Attest.parse,
     lambda: _read("swtpm_quote_ecc_ecdsa.tpms_attest"), "TPMS_ATTEST"),
    ("TPM2B_ATTEST/keylime", Attest.parse_tpm2b,
     lambda: Attest.parse((QUOTES / KEYLIME / "quote.tpms_attest.bin").read_bytes()).to_tpm2b(),
     "TPM2B_ATTEST"),
    ("TPMT_SIGNATURE/rsassa", Signature.parse,
     lambda: (QUOTES / KEYLIME / "quote.tpmt_signature.bin").read_bytes(), "TPMT_SIGNATURE"),
    ("TPMT_SIGNATURE/ecdsa", Signature.parse,
     lambda: _read("swtpm_quote_ecc_ecdsa.tpmt_signature"), "TPMT_SIGNATURE"),
    ("TPML_PCR_SELECTION/two-banks", PcrSelection.parse,
     lambda: PcrSelection.from_string("sha256:0,1,2,16+sha1:7").to_bytes(), "TPML_PCR_SELECTION"),
    ("tpm2_tools.pcrs/serialized", PcrValues.from_tpm2_tools,
     lambda: _read("swtpm_quote_rsa_rsapss.pcrs"), "tpm2_tools.pcrs"),
    ("tpm2_tools.pcrs/values",
     lambda d: PcrValues.from_tpm2_tools(d, PcrSelection.from_string("sha256:0,1,2,16+sha1:7")),
     lambda: _read("swtpm_quote_values.pcrs"), "tpm2_tools.pcrs"),
]  # fmt: skip
SAMPLE_IDS = [s[0] for s in SAMPLES]
PEM_SAMPLES: list[tuple[str, Callable[[bytes], object], Callable[[], bytes], str]] = [
    ("PEM/ecc-ak", Public.load, lambda: _read("swtpm_ak_ecc_ecdsa.pem"), "PEM"),
    ("PEM/rsa-ak", Public.load, lambda: _read("swtpm_ak_rsa_rsapss.pem"), "PEM"),
]


@pytest.mark.parametrize(
    ("parser", "sample", "structure"), [s[1:] for s in SAMPLES], ids=SAMPLE_IDS
)
def test_sample_parses_and_every_truncation_is_a_parse_error(
    parser: Callable[[bytes], object], sample: Callable[[], bytes], structure: str
) -> None:
    data = sample()
    parser(data)
    for cut in range(len(data)):
        with pytest.raises(ParseError) as info:
            parser(data[:cut])
        assert info.value.structure.startswith(structure), (cut, str(info.value))
        assert 0 <= info.value.offset <= len(data)


@pytest.mark.parametrize(
    ("parser", "sample", "structure"), [s[1:] for s in SAMPLES], ids=SAMPLE_IDS
)
@pytest.mark.parametrize("extra", [b"\0", b"\xff" * 7, b"\0" * 600])
def test_trailing_bytes_are_a_parse_error(
    parser: Callable[[bytes], object], sample: Callable[[], bytes], structure: str, extra: bytes
) -> None:
    with pytest.raises(ParseError) as info:
        parser(sample() + extra)
    assert info.value.structure.startswith(structure)


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _keylime_attest() -> bytes:
    return (QUOTES / KEYLIME / "quote.tpms_attest.bin").read_bytes()


def _infineon_pub() -> bytes:
    return (QUOTES / INFINEON / "ak_pub.tpmt_public.bin").read_bytes()


# keylime quote layout: magic 0, type 4, signer 6 (2+34), extra 42 (2+20), clock 64 (17),
# firmware 81, pcrSelect 89 (count 4, hash 2, size 1, bitmap 3), pcrDigest 99
FAILURES: list[tuple[str, Callable[[bytes], object], Callable[[], bytes], str]] = [
    ("fail/public/type-unknown", Public.parse,
     lambda: _patch(_infineon_pub(), 0, b"\x00\x99"), r"TPMT_PUBLIC.type at byte 0: unknown"),
    ("fail/public/type-keyedhash", Public.parse,
     lambda: _patch(_infineon_pub(), 0, b"\x00\x08"), r"unsupported key type KEYEDHASH"),
    ("fail/public/name-alg-not-hash", Public.parse,
     lambda: _patch(_infineon_pub(), 2, b"\x00\x01"), r"nameAlg at byte 2: RSA is not a hash"),
    ("fail/public/auth-policy-oversize", Public.parse,
     lambda: _patch(_infineon_pub(), 8, b"\xff\xff"), r"authPolicy.size at byte 8: 65535 bytes"),
    ("fail/public/tpm2b-size", Public.parse_tpm2b,
     lambda: b"\x01\x00" + _infineon_pub(), r"TPM2B_PUBLIC.size at byte 0: says 256 bytes"),
    ("fail/public/pem-garbage", Public.load,
     lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", r"PEM"),
    ("fail/public/pem-trailing", Public.load,
     lambda: _read("swtpm_ak_ecc_ecdsa.pem") + b"junk", r"PEM.end at byte 177: 4 bytes after"),
    ("fail/public/pem-truncated", Public.load,
     lambda: _read("swtpm_ak_ecc_ecdsa.pem")[:-10], r"PEM.*not a PEM public key"),
    ("fail/public/pem-private-key", Public.load,
     lambda: b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
     r"PEM.*not a PEM public key"),
    ("fail/attest/type-unknown", Attest.parse,
     lambda: _patch(_keylime_attest(), 4, b"\x80\x99"), r"TPMS_ATTEST.type at byte 4: 0x8099"),
    ("fail/attest/safe-not-bool", Attest.parse,
     lambda: _patch(_keylime_attest(), 80, b"\x02"), r"clockInfo.safe at byte 80: TPMI_YES_NO"),
    ("fail/attest/too-many-banks", Attest.parse,
     lambda: _patch(_keylime_attest(), 89, b"\x00\x00\x00\x11"), r"pcrSelect.count at byte 89"),
    ("fail/attest/bank-not-hash", Attest.parse,
     lambda: _patch(_keylime_attest(), 93, b"\x00\x01"), r"hash at byte 93: RSA is not a hash"),
    ("fail/attest/sizeofselect", Attest.parse,
     lambda: _patch(_keylime_attest(), 95, b"\x05"), r"sizeofSelect at byte 95: 5 bytes"),
    ("fail/attest/signer-oversize", Attest.parse,
     lambda: _patch(_keylime_attest(), 6, b"\x00\xff"), r"qualifiedSigner.size at byte 6"),
    ("fail/signature/alg-unknown", Signature.parse,
     lambda: b"\x00\x99\x00\x0b", r"TPMT_SIGNATURE.sigAlg at byte 0"),
    ("fail/signature/alg-not-signature", Signature.parse,
     lambda: b"\x00\x01\x00\x0b\x00\x00", r"sigAlg at byte 0: RSA is not a signature"),
    ("fail/signature/hash-not-hash", Signature.parse,
     lambda: b"\x00\x14\x00\x06\x00\x00", r"signature.hash at byte 2: AES is not a hash"),
    ("fail/signature/null-trailing", Signature.parse,
     lambda: b"\x00\x10\x00", r"TPMT_SIGNATURE.end at byte 2: 1 trailing"),
    ("fail/pcrs/block-count", PcrValues.from_tpm2_tools,
     lambda: _patch(_read("swtpm_quote_rsa_rsapss.pcrs"), 132, b"\x02\x00\x00\x00"),
     r"is not the size of a tpm2-tools serialized PCR file"),
    ("fail/pcrs/digest-count", PcrValues.from_tpm2_tools,
     lambda: _patch(_read("swtpm_quote_rsa_rsapss.pcrs"), 136, b"\x07\x00\x00\x00"),
     r"digests\[0\].count at byte 136: 7 digests, expected 5"),
    ("fail/pcrs/digest-size", PcrValues.from_tpm2_tools,
     lambda: _patch(_read("swtpm_quote_rsa_rsapss.pcrs"), 140, b"\x14\x00"),
     r"digests\[0\].digests\[0\].size at byte 140: 20 bytes"),
    ("fail/pcrs/selection-mismatch",
     lambda d: PcrValues.from_tpm2_tools(d, PcrSelection.from_string("sha256:0")),
     lambda: _read("swtpm_quote_rsa_rsapss.pcrs"),
     r"file selects sha256:0,1,2,16\+sha1:7, expected sha256:0"),
    ("fail/json/not-hex", PcrValues.load, lambda: b'{"sha256": {"0": "zz"}}', r"sha256.0.*not hex"),
    ("fail/json/bank", PcrValues.load, lambda: b'{"md5": {"0": "00"}}', r"unknown PCR bank"),
    ("fail/json/size", PcrValues.load,
     lambda: b'{"sha1": {"0": "00"}}', r"sha1:0 at byte 0: 1 bytes, expected 20"),
    ("fail/json/index", PcrValues.load,
     lambda: b'{"sha1": {"x": "00"}}', r'expected "index": "hex"'),
    ("fail/json/syntax", PcrValues.load, lambda: b'{"sha1": ', r"PcrValues.json.document"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("parser", "data", "message"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_malformed_input_names_field_and_offset(
    parser: Callable[[bytes], object], data: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(ParseError, match=message):
        parser(data())


PARSERS: dict[str, Callable[[bytes], object]] = {
    "Public.parse": Public.parse,
    "Public.parse_tpm2b": Public.parse_tpm2b,
    "Public.load": Public.load,
    "Attest.parse": Attest.parse,
    "Attest.parse_tpm2b": Attest.parse_tpm2b,
    "Attest.load": Attest.load,
    "Signature.parse": Signature.parse,
    "PcrSelection.parse": PcrSelection.parse,
    "PcrValues.from_tpm2_tools": PcrValues.from_tpm2_tools,
    "PcrValues.load+selection": lambda d: PcrValues.load(
        d, PcrSelection.from_string("sha256:0,1+sha1:7")
    ),
}


def _use(value: object) -> None:
    """Exercise what callers do next with a parsed value; only our errors may escape."""
    if isinstance(value, Public):
        for step in (value.public_key, value.name, value.to_tpm2b):
            with contextlib.suppress(ParseError, VerificationError):
                step()
    elif isinstance(value, Attest):
        assert Attest.parse(value.raw) == value
    elif isinstance(value, Signature):
        key = Public.load((QUOTES / KEYLIME / "ak_pub.pem").read_bytes())
        with pytest.raises(VerificationError):
            value.verify(key, b"message")
    elif isinstance(value, PcrSelection):
        assert PcrSelection.parse(value.to_bytes()) == value
        str(value)


@pytest.mark.parametrize("name", list(PARSERS))
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_give_a_value_or_parse_error(name: str, data: bytes) -> None:
    try:
        value = PARSERS[name](data)
    except ParseError:
        return
    _use(value)


def _mutations(sample: bytes) -> st.SearchStrategy[bytes]:
    """Real samples with a few bytes changed, cut or inserted: deeper than random bytes."""
    return st.tuples(
        st.integers(0, len(sample)), st.binary(min_size=0, max_size=4), st.integers(0, 4)
    ).map(lambda t: sample[: t[0]] + t[1] + sample[t[0] + t[2] :])


@pytest.mark.parametrize(
    ("parser", "sample", "structure"),
    [s[1:] for s in SAMPLES + PEM_SAMPLES],
    ids=SAMPLE_IDS + [s[0] for s in PEM_SAMPLES],
)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_samples_give_a_value_or_parse_error(
    parser: Callable[[bytes], object], sample: Callable[[], bytes], structure: str, data: Any
) -> None:
    mutated = data.draw(_mutations(sample()))
    try:
        value = parser(mutated)
    except ParseError:
        return
    _use(value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    obj=_json
    | st.dictionaries(
        st.sampled_from(["sha1", "sha256", "md5"]),
        st.dictionaries(
            st.text("0123456789x", max_size=3), st.text("0123456789abcdef", max_size=64)
        ),
        max_size=2,
    )
)
def test_arbitrary_json_gives_pcr_values_or_parse_error(obj: object) -> None:
    try:
        values = PcrValues.from_json(obj)
    except ParseError:
        return
    assert PcrValues.load(json.dumps(values.to_json()).encode()) == values
