"""EK certificates from real TPMs and vTPMs (../shared/corpus/ekcerts) against their vendor chains.

Each case's chain comes from the corpus INDEX.json ``chain_check`` (last file
= trust anchor, the rest intermediates). The old STMicro certs are SHA-1
signed and expired in 2024: they pass only with both explicit flags.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509

from verifier.ekcert import (
    EkValidationOptions,
    TrustStore,
    ValidatedEkCertificate,
    load_certificates,
    normalize_certificate,
    parse_certificate,
    validate_ek_certificate,
)
from verifier.ekcert.parse import verify_signature
from vtpm_core.errors import ParseError, VerificationError

CORPUS_EK = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "ekcerts"
RELAXED = EkValidationOptions(allow_sha1=True, allow_expired_ek=True)

# file -> (tpm_manufacturer, options needed, key type)
EK_CASES = {
    "gce_vtpm/uca_tpm_rsa_enc_cert.der": ("id:474F4F47", None, "rsa"),
    "gce_vtpm/uca_tpm_ecc_enc_cert.der": ("id:474F4F47", None, "ecc"),
    "gce_vtpm/pca_tpm_rsa_enc_cert.der": (None, None, "rsa"),  # no SAN: Google allow-list
    "gce_vtpm/pca_tpm_ecc_enc_cert.der": (None, None, "ecc"),
    "stmicro/stm_ek_rsa_ab21ccf2.der": ("id:53544D20", RELAXED, "rsa"),
    "stmicro/stm_ek_rsa_nuc1.der": ("id:53544D20", RELAXED, "rsa"),
    "stmicro/stm_ek_rsa_nuc2.der": ("id:53544D20", RELAXED, "rsa"),
    "stmicro/stm_ek_rsa_ff_padded.trimmed.der": ("id:53544D20", None, "rsa"),
    "stmicro/stm_ek_ecc_p256.der": ("id:53544D20", None, "ecc"),
    "infineon/infineon_ek_rsa_slb9670_ca007.der": ("id:49465800", None, "rsa"),
}
AK_CERTS = [
    "gce_vtpm/uca_tpm_rsa_sign_cert.der",
    "gce_vtpm/uca_tpm_ecc_sign_cert.der",
    "gce_vtpm/pca_tpm_rsa_sign_cert.der",
    "gce_vtpm/pca_tpm_ecc_sign_cert.der",
]


def _index(corpus: Path) -> dict[str, dict[str, object]]:
    entries = json.loads((corpus / "ekcerts" / "INDEX.json").read_text())
    return {str(e["file"]): e for e in entries}


def _trust_for(corpus: Path, name: str) -> TrustStore:
    chain = _index(corpus)[name]["chain_check"]
    assert isinstance(chain, dict)
    files = [corpus / "ekcerts" / f for f in chain["chain_files"]]
    return TrustStore.load([files[-1]], files[:-1])


def _validate(corpus: Path, name: str, **kwargs: object) -> ValidatedEkCertificate:
    data = (corpus / "ekcerts" / name).read_bytes()
    return validate_ek_certificate(data, _trust_for(corpus, name), **kwargs)  # type: ignore[arg-type]


def test_every_ek_cert_in_the_corpus_is_covered(corpus: Path) -> None:
    eks = {f for f, e in _index(corpus).items() if str(e["kind"]).startswith("EK")}
    assert eks == set(EK_CASES)


@pytest.mark.parametrize("name", sorted(EK_CASES), ids=[f"ok/{n}" for n in sorted(EK_CASES)])
def test_corpus_ek_cert_validates_against_its_vendor_chain(corpus: Path, name: str) -> None:
    manufacturer, options, key_type = EK_CASES[name]
    result = _validate(corpus, name, options=options)
    assert result.tpm_manufacturer == manufacturer
    assert result.profile.key_type == key_type
    assert len(result.chain) >= 2
    assert (
        result.chain[0].der == normalize_certificate((corpus / "ekcerts" / name).read_bytes()).der
    )
    # the presented EK public: the certificate's own key matches, another does not
    assert _validate(corpus, name, options=options, ek_public=result.public_key).certificate
    other = (
        "stmicro/stm_ek_ecc_p256.der"
        if key_type == "rsa"
        else "infineon/infineon_ek_rsa_slb9670_ca007.der"
    )
    other_key = parse_certificate((corpus / "ekcerts" / other).read_bytes()).public_key
    assert other_key is not None
    with pytest.raises(VerificationError, match=r"^ek\.public: "):
        _validate(corpus, name, options=options, ek_public=other_key)


def test_google_pca_certs_pass_only_through_the_allow_list(corpus: Path) -> None:
    name = "gce_vtpm/pca_tpm_rsa_enc_cert.der"
    result = _validate(corpus, name)
    assert any("exemption list" in w for w in result.warnings)
    strict = EkValidationOptions(eku_exempt_anchors=frozenset())
    with pytest.raises(VerificationError, match=r"^ek\.profile\.eku: no extKeyUsage"):
        _validate(corpus, name, options=strict)


@pytest.mark.parametrize("name", AK_CERTS, ids=[f"fail/ak-cert/{n}" for n in AK_CERTS])
def test_ak_certificates_are_not_ek_certificates(corpus: Path, name: str) -> None:
    with pytest.raises(VerificationError, match=r"^ek\.profile\.key_usage: .* needs key_"):
        _validate(corpus, name)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(
            None, r"^ek\.chain\.signature: SHA-1 signature refused", id="fail/sha1/default"
        ),
        pytest.param(
            EkValidationOptions(allow_sha1=True),
            r"^ek\.validity: EK certificate not valid",
            id="fail/expired-ek/default",
        ),
        pytest.param(
            EkValidationOptions(allow_expired_ek=True),
            r"^ek\.chain\.signature: SHA-1",
            id="fail/sha1/expired-allowed",
        ),
    ],
)
def test_old_stm_chain_needs_explicit_flags(
    corpus: Path, options: EkValidationOptions | None, match: str
) -> None:
    with pytest.raises(VerificationError, match=match):
        _validate(corpus, "stmicro/stm_ek_rsa_nuc1.der", options=options)


def test_old_stm_cert_valid_in_its_window_with_sha1(corpus: Path) -> None:
    options = EkValidationOptions(allow_sha1=True, clock=lambda: datetime(2020, 1, 1, tzinfo=UTC))
    result = _validate(corpus, "stmicro/stm_ek_rsa_nuc1.der", options=options)
    assert result.tpm_model == "ST33ZP24PVSP"
    assert any("SHA-1" in w for w in result.warnings)


def test_wrong_vendor_roots_fail(corpus: Path) -> None:
    data = (corpus / "ekcerts" / "infineon/infineon_ek_rsa_slb9670_ca007.der").read_bytes()
    trust = TrustStore.load([corpus / "ekcerts" / "stmicro" / "chain"])
    with pytest.raises(VerificationError, match=r"^ek\.chain: no issuer found"):
        validate_ek_certificate(data, trust)


def test_roots_from_a_bundle_directory(corpus: Path) -> None:
    # keylime's store: every file a trust anchor (roots and intermediates together)
    trust = TrustStore.load([corpus / "ekcerts" / "ca_bundles" / "keylime_tpm_cert_store"])
    result = validate_ek_certificate(
        (corpus / "ekcerts" / "stmicro/stm_ek_ecc_p256.der").read_bytes(), trust
    )
    assert "STM TPM ECC Intermediate CA 01" in result.anchor.subject


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda d: d + b"\xff" * (2048 - len(d)), id="ok/nv-padding-ff"),
        pytest.param(lambda d: d + b"\x00" * 300, id="ok/nv-padding-zero"),
        pytest.param(
            lambda d: b"\x10\x01\x00" + (len(d) + 2).to_bytes(2, "big") + b"\x10\x02" + d,
            id="ok/tcg-stored-cert-header",
        ),
        pytest.param(
            lambda d: (
                b"\x10\x01\x00" + (len(d) + 2).to_bytes(2, "big") + b"\x10\x02" + d + b"\xff" * 64
            ),
            id="ok/header-and-padding",
        ),
    ],
)
def test_nv_encodings_are_normalised(corpus: Path, wrap: object) -> None:
    name = "infineon/infineon_ek_rsa_slb9670_ca007.der"
    der = (corpus / "ekcerts" / name).read_bytes()
    data = wrap(der)  # type: ignore[operator]
    result = validate_ek_certificate(data, _trust_for(corpus, name))
    assert result.certificate.der == der
    assert result.certificate.notes


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"", r"Certificate\.tag at byte 0", id="fail/parse/empty"),
        pytest.param(b"\x31\x03\x02\x01\x00", r"expected SEQUENCE", id="fail/parse/not-sequence"),
        pytest.param(
            b"\x30\x82\x05\x00\x30", r"declares 1284 bytes, 5 present", id="fail/parse/truncated"
        ),
        pytest.param(b"\x30\x80\x00\x00", r"indefinite length", id="fail/parse/ber-indefinite"),
        pytest.param(
            b"\x30\x83\x01\x11\x70" + bytes(70000), r"exceeds 65536", id="fail/parse/oversize"
        ),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----",
            r"bad base64",
            id="fail/parse/pem",
        ),
    ],
)
def test_malformed_input_is_a_parse_error(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        parse_certificate(data)


def test_truncation_at_every_offset_is_a_parse_error(corpus: Path) -> None:
    der = (corpus / "ekcerts" / "stmicro/stm_ek_ecc_p256.der").read_bytes()
    for cut in range(len(der)):
        with pytest.raises(ParseError):
            parse_certificate(der[:cut])


def test_nuvoton_root_is_read_leniently_and_verified_over_original_bytes(corpus: Path) -> None:
    [root] = load_certificates(corpus / "ekcerts/ca_bundles/keylime_tpm_cert_store/NUVO_2110.pem")
    assert root.x509 is None and root.strict_error and "InvalidSetOrdering" in root.strict_error
    verify_signature(
        "selfsig",
        root.public_key,
        root.signature_algorithm,
        root.signature_parameters,
        root.signature,
        root.tbs_bytes,
        allow_sha1=False,
    )
    # the same TBS re-encoded in DER order (what a strict library would sign-check) fails
    reencoded = asn1_x509.TbsCertificate.load(root.tbs_bytes)
    subject = asn1_x509.Name.load(root.subject_der)
    rdn = subject.chosen[0]
    resorted = asn1_x509.RelativeDistinguishedName(sorted(rdn, key=lambda a: a.dump()))
    reencoded["subject"] = asn1_x509.Name.build({})  # force a fresh encoding
    reencoded["subject"] = asn1_x509.Name(name="", value=asn1_x509.RDNSequence([resorted]))
    assert reencoded.dump(force=True) != root.tbs_bytes
    with pytest.raises(VerificationError, match="does not verify"):
        verify_signature(
            "selfsig",
            root.public_key,
            root.signature_algorithm,
            root.signature_parameters,
            root.signature,
            reencoded.dump(force=True),
            allow_sha1=False,
        )
