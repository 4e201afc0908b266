"""TCG EK templates: exact bytes per the EK Credential Profile, and the template check."""

from __future__ import annotations

import dataclasses

import pytest

from vtpm_core.errors import VerificationError
from vtpm_core.tpm import (
    EK_TEMPLATES,
    EccParameters,
    ObjectAttributes,
    Public,
    RsaParameters,
    SymmetricDefinition,
    TpmAlg,
    match_ek_template,
    require_ek_template,
)

POLICY_A = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"


def test_l1_template_bytes_are_the_profiles() -> None:
    # EK Credential Profile 2.x B.3.3: RSA, SHA-256, 0x000300B2, PolicyA, AES-128-CFB,
    # scheme NULL, 2048 bits, exponent 0, 256 zero bytes of unique
    expected = bytes.fromhex(
        "0001" "000b" "000300b2" "0020" + POLICY_A + "0006" "0080" "0043" "0010" "0800" "00000000"
        "0100"
    ) + bytes(256)  # fmt: skip
    assert EK_TEMPLATES["L-1"].public_template() == len(expected).to_bytes(2, "big") + expected


def test_l2_template_bytes_are_the_profiles() -> None:
    # B.3.4: ECC, SHA-256, 0x000300B2, PolicyA, AES-128-CFB, scheme NULL, P-256, KDF NULL,
    # 32 zero bytes each of x and y
    expected = bytes.fromhex(
        "0023" "000b" "000300b2" "0020" + POLICY_A + "0006" "0080" "0043" "0010" "0003" "0010"
    ) + b"\x00\x20" + bytes(32) + b"\x00\x20" + bytes(32)  # fmt: skip
    assert EK_TEMPLATES["L-2"].public_template() == len(expected).to_bytes(2, "big") + expected


@pytest.mark.parametrize(
    ("tid", "cert", "template_index", "nonce"),
    [
        ("L-1", 0x01C00002, 0x01C00004, 0x01C00003),
        ("L-2", 0x01C0000A, 0x01C0000C, 0x01C0000B),
        ("H-1", 0x01C00012, 0x01C00013, None),
        ("H-2", 0x01C00014, 0x01C00015, None),
        ("H-3", 0x01C00016, 0x01C00017, None),
        ("H-4", 0x01C00018, 0x01C00019, None),
        ("H-6", 0x01C0001C, 0x01C0001D, None),
        ("H-7", 0x01C0001E, 0x01C0001F, None),
    ],
)
def test_nv_indices(tid: str, cert: int, template_index: int, nonce: int | None) -> None:
    t = EK_TEMPLATES[tid]
    assert (t.cert_nv_index, t.template_nv_index, t.nonce_nv_index) == (
        cert,
        template_index,
        nonce,
    )
    # every template matches itself and no other
    assert match_ek_template(t.template_public()) is t


def test_high_range_attributes_set_user_with_auth() -> None:
    assert int(EK_TEMPLATES["L-1"].attributes) == 0x000300B2
    for tid in ("H-1", "H-2", "H-3", "H-4", "H-6", "H-7"):
        assert int(EK_TEMPLATES[tid].attributes) == 0x000300F2
        # high-range templates carry an empty unique
        assert EK_TEMPLATES[tid].public_template()[-4:] == b"\x00\x00\x00\x00"


L1 = EK_TEMPLATES["L-1"].template_public()
L2 = EK_TEMPLATES["L-2"].template_public()
assert isinstance(L1.parameters, RsaParameters) and isinstance(L2.parameters, EccParameters)

MISMATCHES = [
    ("fail/ek/attributes-user-with-auth",
     dataclasses.replace(L1, attributes=L1.attributes | ObjectAttributes.USER_WITH_AUTH),
     r"objectAttributes 0x000300f2 \(template L-1 has 0x000300b2\)"),
    ("fail/ek/attributes-sign",
     dataclasses.replace(L1, attributes=L1.attributes | ObjectAttributes.SIGN_ENCRYPT),
     r"objectAttributes 0x000700b2"),
    ("fail/ek/name-alg",
     dataclasses.replace(L1, name_alg=TpmAlg.SHA1), r"nameAlg SHA1 \(template L-1 has SHA256\)"),
    ("fail/ek/policy",
     dataclasses.replace(L1, auth_policy=b""), r"authPolicy \(empty\) \(template L-1 has 8371"),
    ("fail/ek/symmetric",
     dataclasses.replace(L1, parameters=dataclasses.replace(
         L1.parameters, symmetric=SymmetricDefinition(TpmAlg.AES, 256, TpmAlg.CFB))),
     r"symmetric AES-256-CFB \(template L-1 has AES-128-CFB\)"),
    ("fail/ek/rsa-scheme",
     dataclasses.replace(L1, parameters=dataclasses.replace(L1.parameters, scheme=TpmAlg.RSASSA)),
     r"scheme RSASSA"),
    ("fail/ek/exponent",
     dataclasses.replace(L1, parameters=dataclasses.replace(L1.parameters, exponent=3)),
     r"exponent 3 \(template L-1 has 0\)"),
    ("fail/ek/rsa-1024",
     dataclasses.replace(L1, parameters=dataclasses.replace(L1.parameters, key_bits=1024)),
     r"keyBits 1024"),
    ("fail/ek/ecc-kdf",
     dataclasses.replace(L2, parameters=dataclasses.replace(L2.parameters, kdf=TpmAlg.KDF2)),
     r"kdf KDF2 \(template L-2 has NULL\)"),
    ("fail/ek/pem",
     dataclasses.replace(L1, from_pem=True), r"public area \(a PEM key carries no TPM attributes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("public", "message"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES]
)
def test_require_ek_template_names_the_first_mismatch(public: Public, message: str) -> None:
    assert match_ek_template(public) is None
    with pytest.raises(VerificationError, match=r"^ek.template: not a TCG EK: " + message):
        require_ek_template(public)


@pytest.mark.parametrize("tid", list(EK_TEMPLATES))
def test_wire_prefix_is_libtss2_mu_marshalling(tid: str) -> None:
    """``wire_prefix`` (our encoding) is byte-for-byte what libtss2-mu marshals, and only
    ``unique`` follows it: what the CA's byte comparison relies on."""
    t = EK_TEMPLATES[tid]
    area = t.public_template()[2:]  # tpm2-tss's marshaller
    assert area.startswith(t.wire_prefix)
    unique = area[len(t.wire_prefix) :]
    if t.key_type == TpmAlg.RSA:
        assert unique == t.unique_size.to_bytes(2, "big") + bytes(t.unique_size)
    else:
        assert unique == 2 * (t.unique_size.to_bytes(2, "big") + bytes(t.unique_size))
    # what `vtpm create` sends, built without tpm2-pytss, is the same TPM2B_PUBLIC
    assert t.wire_template() == t.public_template()


def test_match_needs_the_bytes_and_the_fields() -> None:
    """A value whose fields were changed but whose raw bytes were not: the fields decide;
    raw bytes of another template: the bytes decide. Either alone is not a match."""
    forged_fields = dataclasses.replace(L1, name_alg=TpmAlg.SHA1)
    assert forged_fields.raw.startswith(EK_TEMPLATES["L-1"].wire_prefix)
    assert match_ek_template(forged_fields) is None
    forged_raw = dataclasses.replace(L1, raw=b"\x00\x23" + L1.raw[2:])  # type ECC
    assert match_ek_template(forged_raw) is None
    assert match_ek_template(L1) == EK_TEMPLATES["L-1"]
