"""PcrSelection and PcrValues: encodings, digests, JSON, and the algorithm helpers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import hashes

from tests.conftest import Tools
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import (
    PcrSelection,
    PcrValues,
    TpmAlg,
    cryptography_hash,
    digest_size,
    hash_alg,
    hash_name,
    hashlib_new,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"


def test_selection_wire_round_trip_and_string() -> None:
    sel = PcrSelection.from_string("sha256:0,1,2,16+sha1:7")
    wire = sel.to_bytes()
    assert wire == bytes.fromhex("00000002000b03070001000403800000")
    assert PcrSelection.parse(wire) == sel
    assert str(sel) == "sha256:0,1,2,16+sha1:7"
    assert sel.as_sets() == {"sha256": frozenset({0, 1, 2, 16}), "sha1": frozenset({7})}
    # a 4-byte bitmap re-encodes as read
    four = bytes.fromhex("00000001000b0401000000")
    assert PcrSelection.parse(four).to_bytes() == four
    assert str(PcrSelection(())) == "(none)"


def test_values_digest_is_in_selection_order() -> None:
    v = {i: bytes([i]) * 32 for i in range(4)}
    values = PcrValues({"sha256": v, "sha1": {7: b"\x07" * 20}})
    sel = PcrSelection.from_string("sha256:0,3+sha1:7")
    expected = hashlib.sha256(v[0] + v[3] + b"\x07" * 20).digest()
    assert values.digest(sel, TpmAlg.SHA256) == expected
    assert values.digest(sel, "sha256") == expected
    assert values.select(sel).as_mapping() == {
        "sha256": {0: v[0], 3: v[3]},
        "sha1": {7: b"\x07" * 20},
    }
    assert str(values.selection) == "sha1:7+sha256:0,1,2,3"
    with pytest.raises(VerificationError, match=r"pcr.values: no value for sha256:9"):
        values.digest(PcrSelection.from_string("sha256:9"), TpmAlg.SHA256)
    with pytest.raises(TypeError):
        values.values["sha256"][0] = b""  # type: ignore[index]


def test_values_json_round_trip() -> None:
    obj = {"sha256": {"0": "00" * 32, "10": "ab" * 32}, "sha1": {"7": "0x" + "11" * 20}}
    values = PcrValues.from_json(obj)
    assert values.value("sha1", 7) == b"\x11" * 20
    assert PcrValues.from_json(values.to_json()) == values
    assert values.to_json()["sha256"]["10"] == "ab" * 32


def test_values_form_needs_exact_length() -> None:
    sel = PcrSelection.from_string("sha256:0+sha1:1")
    data = b"\x01" * 32 + b"\x02" * 20
    assert PcrValues.from_tpm2_tools(data, sel).value(TpmAlg.SHA1, 1) == b"\x02" * 20
    with pytest.raises(Exception, match=r"tpm2_tools.pcrs.values.end at byte 52: 1 trailing"):
        PcrValues.from_tpm2_tools(data + b"\0", sel)


@pytest.mark.parametrize(
    ("alg", "name", "size", "crypto"),
    [
        (TpmAlg.SHA1, "sha1", 20, hashes.SHA1),
        (TpmAlg.SHA256, "sha256", 32, hashes.SHA256),
        (TpmAlg.SHA384, "sha384", 48, hashes.SHA384),
        (TpmAlg.SHA512, "sha512", 64, hashes.SHA512),
    ],
)
def test_hash_helpers(alg: TpmAlg, name: str, size: int, crypto: type) -> None:
    assert hash_name(alg) == name and hash_alg(name) == alg and hash_alg(name.upper()) == alg
    assert digest_size(alg) == size == hashlib_new(alg, b"x").digest_size
    assert isinstance(cryptography_hash(alg), crypto)


def test_hashlib_new_equals_hashlib_by_name() -> None:
    """The constructor table gives what hashlib.new(name) gives, for the enum and its int;
    hashes hashlib lacks (SM3) still say so."""
    from vtpm_core.tpm.algorithms import HASH_ALGS

    for alg, (name, size) in HASH_ALGS.items():
        try:
            expected = hashlib.new(name, b"abc").digest()
        except ValueError:
            with pytest.raises(ValueError, match="not available in hashlib"):
                hashlib_new(alg)
            continue
        for key in (alg, int(alg)):
            h = hashlib_new(key, b"abc")
            assert (h.name, h.digest_size, h.digest()) == (name, size, expected)


@pytest.mark.parametrize("bad", [TpmAlg.RSA, 0x9999])
def test_hash_helpers_reject_non_hashes(bad: int) -> None:
    with pytest.raises(ValueError, match="hash algorithm"):
        hash_name(bad)
    with pytest.raises(ValueError, match="hash algorithm"):
        digest_size(bad)
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        hash_alg("md5")


AK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"


@pytest.mark.swtpm
def test_serialized_file_equals_tpm2_checkquote(tools: Tools, tmp_path: Path) -> None:
    """Two banks, 17 values (three TPML_DIGEST blocks), read as tpm2_checkquote reads them."""
    selection = "sha1:0,1,2,16,23+sha256:0,1,2,3,4,5,6,7,8,9,16,23"
    tools.run("tpm2_pcrextend", "16:sha1=" + "11" * 20 + ",sha256=" + "22" * 32)
    tools.run("tpm2_pcrextend", "23:sha256=" + "33" * 32)
    tools.run(
        "tpm2_createprimary", "-C", "o", "-G", "rsa2048:rsassa-sha256:null",
        "-a", AK_ATTRS, "-c", "ak.ctx",
    )  # fmt: skip
    tools.run("tpm2_readpublic", "-c", "ak.ctx", "-o", "ak.pub")
    tools.run(
        "tpm2_quote", "-c", "ak.ctx", "-l", selection, "-q", "abcd",
        "-m", "q.msg", "-s", "q.sig", "-o", "q.pcrs", "-g", "sha256",
    )  # fmt: skip
    out = tools.run(
        "tpm2_checkquote", "-u", "ak.pub", "-m", "q.msg", "-s", "q.sig",
        "-f", "q.pcrs", "-g", "sha256", "-q", "abcd",
    ).stdout  # fmt: skip
    oracle = {
        bank: {int(i): int(v).to_bytes(digest_size(hash_alg(bank)), "big") for i, v in p.items()}
        for bank, p in yaml.safe_load(out)["pcrs"].items()
    }
    parsed = PcrValues.from_tpm2_tools((tmp_path / "q.pcrs").read_bytes()).as_mapping()
    assert parsed == oracle
    assert sorted(parsed["sha256"]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 23]
    assert parsed["sha256"][0] == bytes(32) and parsed["sha256"][23] != bytes(32)


def _patched_sample(offset: int, fmt: str, value: int) -> bytes:
    """The sha256:0,1,2,16+sha1:7 sample file with one little-endian field replaced."""
    data = bytearray((DATA / "swtpm_quote_rsa_rsapss.pcrs").read_bytes())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


_SELECTION_FAILURES = [
    ("fail/pcrs/bank-count", (0, "<I", 17), r"TPML_PCR_SELECTION.count at byte 0: 17 banks"),
    ("fail/pcrs/bank-unknown", (4, "<H", 0x0099), r"hash at byte 4: unknown bank 0x0099"),
    ("fail/pcrs/bank-twice", (12, "<H", 0x000B), r"hash at byte 12: bank sha256 twice"),
    ("fail/pcrs/sizeof-select", (6, "<B", 5), r"sizeofSelect at byte 6: 5 > 4"),
]


@pytest.mark.parametrize(
    ("patch", "match"),
    [c[1:] for c in _SELECTION_FAILURES],
    ids=[c[0] for c in _SELECTION_FAILURES],
)
def test_serialized_selection_errors(patch: tuple[int, str, int], match: str) -> None:
    with pytest.raises(ParseError, match=match):
        PcrValues.from_tpm2_tools(_patched_sample(*patch))
