"""Round trips and signature checks on real TPM output: the corpus and our swtpm golden files."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import (
    ST_ATTEST_CREATION,
    ST_ATTEST_QUOTE,
    TPM_GENERATED_VALUE,
    Attest,
    CreationInfo,
    ObjectAttributes,
    PcrSelection,
    PcrValues,
    Public,
    RsaParameters,
    Signature,
    TpmAlg,
    match_ek_template,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"


def test_keylime_quote_round_trips_and_verifies(corpus: Path) -> None:
    d = corpus / "quotes" / "swtpm_keylime_checkquote"
    raw_attest = (d / "quote.tpms_attest.bin").read_bytes()
    raw_sig = (d / "quote.tpmt_signature.bin").read_bytes()
    attest = Attest.parse(raw_attest)
    sig = Signature.parse(raw_sig)
    assert attest.raw == raw_attest and attest.to_bytes() == raw_attest
    assert Attest.load(attest.to_tpm2b()) == attest
    assert sig.raw == raw_sig
    assert attest.magic == TPM_GENERATED_VALUE and attest.type == ST_ATTEST_QUOTE
    assert attest.extra_data == (d / "nonce.txt").read_bytes().strip()
    assert attest.firmware_version == 0x2019102300163636
    assert attest.clock_info.reset_count == 3 and attest.clock_info.safe
    quote = attest.quote
    assert quote is not None
    assert str(quote.pcr_select) == "sha256:16"
    assert quote.pcr_select.to_bytes() == raw_attest[-(4 + 2 + 1 + 3 + 2 + 32) : -34]
    assert (sig.sig_alg, sig.hash_alg) == (TpmAlg.RSASSA, TpmAlg.SHA256)

    ak = Public.load((d / "ak_pub.pem").read_bytes())
    assert ak.from_pem and ak.attributes == ObjectAttributes(0)
    sig.verify(ak, raw_attest)
    pcrs = PcrValues.load((d / "pcrs.tpm2tools_pcrs.bin").read_bytes())
    assert pcrs.digest(quote.pcr_select, sig.hash_alg) == quote.pcr_digest
    assert pcrs.to_json() == PcrValues.load((d / "pcrs.json").read_bytes()).to_json()

    tampered = bytearray(raw_attest)
    tampered[-1] ^= 1
    with pytest.raises(VerificationError, match="signature: rsassa/sha256 signature does not"):
        sig.verify(ak, bytes(tampered))


def test_infineon_creation_attestation_verifies(corpus: Path) -> None:
    d = corpus / "quotes" / "infineon_ak_certify_creation"
    raw_pub = (d / "ak_pub.tpmt_public.bin").read_bytes()
    raw_attest = (d / "ak_creation.tpms_attest.bin").read_bytes()
    ak = Public.parse(raw_pub)
    assert ak.raw == raw_pub and Public.load(ak.to_tpm2b()) == ak
    assert ak.type == TpmAlg.RSA and ak.name_alg == TpmAlg.SHA256
    assert isinstance(ak.parameters, RsaParameters) and ak.parameters.key_bits == 2048
    assert ak.is_signing_key and ak.is_restricted and match_ek_template(ak) is None
    attest = Attest.parse(raw_attest)
    assert attest.raw == raw_attest and attest.type == ST_ATTEST_CREATION
    assert isinstance(attest.attested, CreationInfo)
    assert attest.attested.object_name == ak.name()
    sig = Signature.parse((d / "ak_creation.tpmt_signature.bin").read_bytes())
    sig.verify(ak, raw_attest)
    # the PEM form of the same key verifies too
    Signature.parse(sig.raw).verify(Public.load(ak.to_pem()), raw_attest)


@pytest.mark.parametrize("kind", ["rsa_rsapss", "ecc_ecdsa"])
def test_swtpm_golden_quotes(kind: str) -> None:
    ak_bytes = (DATA / f"swtpm_ak_{kind}.tpm2b_public").read_bytes()
    ak = Public.load(ak_bytes)
    assert ak.to_tpm2b() == ak_bytes
    assert ak.name() == (DATA / f"swtpm_ak_{kind}.name").read_bytes()
    assert Public.load((DATA / f"swtpm_ak_{kind}.pem").read_bytes()).same_key(ak)
    raw = (DATA / f"swtpm_quote_{kind}.tpms_attest").read_bytes()
    attest = Attest.parse(raw)
    sig = Signature.parse((DATA / f"swtpm_quote_{kind}.tpmt_signature").read_bytes())
    sig.verify(ak, raw)
    quote = attest.quote
    assert quote is not None and quote.pcr_select == PcrSelection.from_string(
        "sha256:0,1,2,16+sha1:7"
    )
    pcrs = PcrValues.load((DATA / f"swtpm_quote_{kind}.pcrs").read_bytes())
    assert pcrs.digest(quote.pcr_select, TpmAlg.SHA256) == quote.pcr_digest
    assert PcrValues.from_json(pcrs.to_json()) == pcrs


def test_swtpm_golden_values_form() -> None:
    raw = (DATA / "swtpm_quote_values.tpms_attest").read_bytes()
    quote = Attest.parse(raw).quote
    assert quote is not None
    values = (DATA / "swtpm_quote_values.pcrs").read_bytes()
    pcrs = PcrValues.load(values, quote.pcr_select)
    assert len(values) == 4 * 32 + 20
    assert pcrs.digest(quote.pcr_select, "sha256") == quote.pcr_digest
    with pytest.raises(ParseError, match="not the size of a tpm2-tools serialized PCR file"):
        PcrValues.load(values)  # without the selection the values form cannot be read


@pytest.mark.parametrize(("name", "template"), [("rsa", "L-1"), ("ecc", "L-2")])
def test_swtpm_golden_eks(name: str, template: str) -> None:
    raw = (DATA / f"swtpm_ek_{name}.tpm2b_public").read_bytes()
    ek = Public.load(raw)
    assert ek.to_tpm2b() == raw
    found = match_ek_template(ek)
    assert found is not None and found.id == template
