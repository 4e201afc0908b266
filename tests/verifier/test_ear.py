"""EAR results: ES256 JWTs in the draft-ietf-rats-ear shape, verified offline with a JWKS."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from verifier.ear import (
    AR4SI_CLAIMS,
    EAR_PROFILE,
    Ar4si,
    EarSigner,
    Status,
    TrustVector,
    verify_result,
)
from vtpm_core.errors import ConfigError, ParseError, VerificationError

NONCE = bytes(range(32))
NOW = 1_790_000_000


@dataclass(frozen=True)
class _Result:
    trust_vector: TrustVector
    failure_summaries: tuple[dict[str, str], ...] = ()

    @property
    def status(self) -> str:
        return self.trust_vector.status


GOOD = _Result(TrustVector(instance_identity=2, configuration=2, executables=3))
BAD = _Result(
    TrustVector(instance_identity=2, configuration=96, executables=3),
    ({"rule": "secure_boot", "claim": "configuration", "message": "secure boot off"},),
)


@pytest.fixture
def signer() -> EarSigner:
    return EarSigner.generate(clock=lambda: NOW)


def test_claims_have_the_ear_shape(signer: EarSigner) -> None:
    token = signer.sign(GOOD, NONCE, "vm-1", "policy:sha256:ab")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "ES256" and header["kid"] == signer.kid
    assert claims["eat_profile"] == "tag:github.com,2023:veraison/ear"
    assert claims["iat"] == NOW
    assert set(claims["ear.verifier-id"]) == {"developer", "build"}
    assert base64.urlsafe_b64decode(claims["eat_nonce"] + "=") == NONCE
    (sub,) = claims["submods"].values()
    assert sub == {
        "ear.status": "affirming",
        "ear.trustworthiness-vector": {
            "instance-identity": 2,
            "configuration": 2,
            "executables": 3,
        },
        "ear.appraisal-policy-id": "policy:sha256:ab",
    }


def test_round_trip_through_the_jwks(signer: EarSigner) -> None:
    jwks = json.dumps(signer.jwks())
    result = verify_result(
        signer.sign(BAD, NONCE, "vm-1", "p1"), jwks, expected_nonce=NONCE, now=lambda: NOW
    )
    assert result.status == Status.CONTRAINDICATED
    assert result.nonce == NONCE and result.attester_id == "vm-1"
    sub = result.submods["vtpm-boot"]
    assert sub.trust_vector.configuration == Ar4si.UNSUPPORTABLE_CONFIG
    assert sub.policy_id == "p1"
    assert sub.failures[0]["rule"] == "secure_boot"
    assert result.profile == EAR_PROFILE


def test_status_tiers() -> None:
    assert TrustVector().status == Status.NONE
    assert TrustVector(executables=3).status == Status.AFFIRMING
    assert TrustVector(executables=3, configuration=32).status == Status.WARNING
    assert TrustVector(instance_identity=99).status == Status.CONTRAINDICATED


def test_signer_key_must_be_p256() -> None:
    with pytest.raises(ConfigError, match="P-256"):
        EarSigner(ec.generate_private_key(ec.SECP384R1()))


def test_signer_pem_round_trip(signer: EarSigner) -> None:
    again = EarSigner.load(signer.private_pem(b"pw"), b"pw")
    assert again.jwks() == signer.jwks()


def test_nonce_bounds(signer: EarSigner) -> None:
    with pytest.raises(ConfigError, match=r"8\.\.64 bytes"):
        signer.sign(GOOD, b"short", "vm", "p")


def _forge(signer: EarSigner, **changes: object) -> str:
    claims = signer.claims(GOOD, NONCE, "vm", "p")
    claims.update(changes)
    return jwt.encode(claims, signer._key, algorithm="ES256", headers={"kid": signer.kid})


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("fail/signature/other-key", VerificationError, "does not verify|no key with kid"),
        ("fail/nonce/mismatch", VerificationError, "nonce mismatch"),
        ("fail/profile/other", VerificationError, "eat_profile"),
        ("fail/status/better-than-vector", VerificationError, "better than its trust vector"),
        ("fail/iat/future", VerificationError, "in the future"),
        ("fail/iat/too-old", VerificationError, "ago, limit"),
        ("fail/token/garbage", ParseError, "not a JWT"),
        ("fail/vector/unknown-claim", ParseError, "unknown claim"),
        ("fail/alg/hs256", VerificationError, "expected ES256"),
    ],
)
def test_verify_refuses(signer: EarSigner, case: str, error: type[Exception], match: str) -> None:
    jwks = signer.jwks()
    now = NOW
    max_age: float | None = None
    token = signer.sign(GOOD, NONCE, "vm", "p")
    if case == "fail/signature/other-key":
        token = EarSigner.generate(kid=signer.kid).sign(GOOD, NONCE, "vm", "p")
    elif case == "fail/nonce/mismatch":
        pass
    elif case == "fail/profile/other":
        token = _forge(signer, eat_profile="tag:example.com,2024:other")
    elif case == "fail/status/better-than-vector":
        sub = {"ear.status": "affirming", "ear.trustworthiness-vector": {"executables": 96}}
        token = _forge(signer, submods={"boot": sub})
    elif case == "fail/iat/future":
        now = NOW - 3600
    elif case == "fail/iat/too-old":
        now, max_age = NOW + 3600, 60
    elif case == "fail/token/garbage":
        token = "not.a.token"
    elif case == "fail/vector/unknown-claim":
        sub = {"ear.status": "affirming", "ear.trustworthiness-vector": {"magic": 2}}
        token = _forge(signer, submods={"boot": sub})
    elif case == "fail/alg/hs256":
        token = jwt.encode(signer.claims(GOOD, NONCE, "vm", "p"), "k" * 32, algorithm="HS256")
    expected = b"\xff" * 32 if case == "fail/nonce/mismatch" else NONCE
    with pytest.raises(error, match=match):
        verify_result(token, jwks, expected_nonce=expected, max_age=max_age, now=lambda: now)


@pytest.mark.parametrize(
    "jwks",
    [b"{", {"keys": "x"}, {"keys": [{"kty": "RSA"}]}, {"keys": [{"kty": "EC", "crv": "P-256"}]}],
    ids=["fail/jwks/not-json", "fail/jwks/keys-not-list", "fail/jwks/no-ec", "fail/jwks/no-xy"],
)
def test_bad_jwks(signer: EarSigner, jwks: object) -> None:
    token = signer.sign(GOOD, NONCE, "vm", "p")
    with pytest.raises(ParseError, match="JWKS"):
        verify_result(token, jwks, now=lambda: NOW)  # type: ignore[arg-type]


def _worst_tier_claim_by_claim(vector: TrustVector) -> str:
    """The status as first written: each claim's tier, the worst one kept."""
    rank = [Status.NONE, Status.AFFIRMING, Status.WARNING, Status.CONTRAINDICATED]
    worst = Status.NONE
    for name in AR4SI_CLAIMS:
        code = abs(getattr(vector, name.replace("-", "_")))
        tier = rank[0 if code <= 1 else 1 if code <= 31 else 2 if code <= 95 else 3]
        worst = max(worst, tier, key=rank.index)
    return worst


@given(st.lists(st.integers(-128, 127), min_size=8, max_size=8))
def test_status_is_the_worst_claims_tier(codes: list[int]) -> None:
    vector = TrustVector(*codes)
    assert vector.status == _worst_tier_claim_by_claim(vector)
    assert vector.to_json() == {
        name: code for name, code in zip(AR4SI_CLAIMS, codes, strict=True) if code
    }


@pytest.mark.parametrize("code", range(-128, 128))
def test_status_of_one_claim(code: int) -> None:
    for name in AR4SI_CLAIMS:
        vector = TrustVector(**{name.replace("-", "_"): code})
        assert vector.status == _worst_tier_claim_by_claim(vector)
