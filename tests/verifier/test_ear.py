"""EAR results: ES256 JWTs in the draft-ietf-rats-ear shape, verified offline with a JWKS."""

from __future__ import annotations

import base64
import contextlib
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
    EAR_PROFILE_04,
    EAR_PROFILE_2023,
    EAR_PROFILES,
    Ar4si,
    EarSigner,
    Status,
    TrustVector,
    profile_named,
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


@pytest.mark.parametrize("profile", EAR_PROFILES)
def test_round_trip_in_each_profile(profile: str) -> None:
    signer = EarSigner.generate(clock=lambda: NOW, profile=profile)
    token = signer.sign(BAD, NONCE, "vm-1", "p1")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["eat_profile"] == profile
    result = verify_result(token, signer.jwks(), expected_nonce=NONCE, now=lambda: NOW)
    assert result.profile == profile and result.status == Status.CONTRAINDICATED
    sub = result.submods["vtpm-boot"]
    assert sub.policy_ids == ("p1",) and sub.failures[0]["rule"] == "secure_boot"
    assert sub.trust_vector == BAD.trust_vector
    if profile == EAR_PROFILE_04:
        assert claims["ear_status"] == "contraindicated"  # the overall status
        assert claims["submods"]["vtpm-boot"]["ear_appraisal_policy_ids"] == ["p1"]
        assert "vtpm_failures" in claims["submods"]["vtpm-boot"]
        assert result.declared_status == Status.CONTRAINDICATED
    else:
        assert "ear_status" not in claims and result.declared_status is None
    # the signer's default is overridden per call
    other = EAR_PROFILE_04 if profile == EAR_PROFILE_2023 else EAR_PROFILE_2023
    again = signer.sign(GOOD, NONCE, "vm-1", "p1", profile=other)
    assert verify_result(again, signer.jwks(), now=lambda: NOW).profile == other


def test_signer_never_writes_a_status_better_than_the_vector() -> None:
    """AR4SI §3.2: a caller claiming 'affirming' over a contraindicated claim gets
    the claim's tier, in the submod and (-04) in the overall status."""
    liar = _LyingResult(TrustVector(executables=96))
    for profile in EAR_PROFILES:
        signer = EarSigner.generate(clock=lambda: NOW, profile=profile)
        claims = signer.claims(liar, NONCE, "vm", "p")
        (sub,) = claims["submods"].values()
        assert Status.CONTRAINDICATED in sub.values()
        if profile == EAR_PROFILE_04:
            assert claims["ear_status"] == Status.CONTRAINDICATED


@dataclass(frozen=True)
class _LyingResult:
    trust_vector: TrustVector
    failure_summaries: tuple[dict[str, str], ...] = ()
    status: str = "affirming"


def _forge04(signer: EarSigner, **changes: object) -> str:
    claims = signer.claims(GOOD, NONCE, "vm", "p", profile=EAR_PROFILE_04)
    claims.update(changes)
    return jwt.encode(claims, signer._key, algorithm="ES256", headers={"kid": signer.kid})


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (
            {"ear_status": "affirming", "submods": {"a": {"ear_status": "warning"}}},
            VerificationError,
            "overall status 'affirming' is better than the worst submod",
        ),
        ({"ear_status": "bogus"}, ParseError, "not an EAR status"),
        (
            {"submods": {"a": {"ear_status": "affirming", "ear_appraisal_policy_ids": "p"}}},
            ParseError,
            "non-empty list of strings",
        ),
        (
            {"submods": {"a": {"ear_status": "affirming", "ear_appraisal_policy_ids": []}}},
            ParseError,
            "non-empty list of strings",
        ),
        ({"submods": {"a": {"ear.status": "affirming"}}}, ParseError, "ear_status"),
        (
            {
                "submods": {
                    "a": {"ear_status": "affirming", "ear_trustworthiness_vector": {"hardware": 97}}
                }
            },
            VerificationError,
            "better than its trust vector",
        ),
    ],
    ids=[
        "fail/04/overall-better-than-submod",
        "fail/04/overall-not-a-status",
        "fail/04/policy-ids-not-a-list",
        "fail/04/policy-ids-empty",
        "fail/04/2023-names-in-04",
        "fail/04/submod-better-than-vector",
    ],
)
def test_verify_04_refuses(
    signer: EarSigner, changes: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        verify_result(_forge04(signer, **changes), signer.jwks(), now=lambda: NOW)


def test_04_overall_none_makes_no_claim(signer: EarSigner) -> None:
    token = _forge04(signer, ear_status="none")
    assert verify_result(token, signer.jwks(), now=lambda: NOW).status == Status.AFFIRMING
    token = _forge04(signer, ear_status="warning")  # worse than the submods: stands
    assert verify_result(token, signer.jwks(), now=lambda: NOW).status == Status.WARNING


@pytest.mark.parametrize(
    ("source", "target"), [(EAR_PROFILE_2023, EAR_PROFILE_04), (EAR_PROFILE_04, EAR_PROFILE_2023)]
)
def test_reprofile_keeps_the_verdict(source: str, target: str) -> None:
    signer = EarSigner.generate(clock=lambda: NOW, profile=source)
    token = signer.sign(BAD, NONCE, "vm-1", "p1")
    assert signer.reprofile(token, source) is token  # already there: unchanged
    later = EarSigner.load(signer.private_pem(), clock=lambda: NOW + 600, profile=source)
    moved = later.reprofile(token, target)
    a = verify_result(token, signer.jwks(), now=lambda: NOW + 600)
    b = verify_result(moved, signer.jwks(), now=lambda: NOW + 600)
    assert b.profile == target
    # the same verdict, appraisal time and nonce; only the names differ
    assert (b.issued_at, b.nonce, b.attester_id, b.status) == (NOW, NONCE, "vm-1", a.status)
    assert (b.developer, b.build) == (a.developer, a.build)
    assert dict(b.submods) == dict(a.submods)
    assert later.reprofile(moved, source) != token  # a fresh signature, same content
    back = verify_result(later.reprofile(moved, source), signer.jwks(), now=lambda: NOW + 600)
    assert dict(back.claims) == dict(a.claims)


def test_reprofile_refuses_what_its_key_did_not_sign(signer: EarSigner) -> None:
    stranger = EarSigner.generate(clock=lambda: NOW)
    with pytest.raises(VerificationError, match="no key with kid"):
        signer.reprofile(stranger.sign(GOOD, NONCE, "vm", "p"), EAR_PROFILE_04)
    unkeyed = jwt.encode(stranger.claims(GOOD, NONCE, "vm", "p"), stranger._key, "ES256")
    with pytest.raises(VerificationError, match="does not verify"):
        signer.reprofile(unkeyed, EAR_PROFILE_04)
    with pytest.raises(VerificationError, match="no counterpart"):
        signer.reprofile(_forge(signer, ear_raw_evidence="x"), EAR_PROFILE_04)


def test_profile_names() -> None:
    assert profile_named("veraison-2023") == EAR_PROFILE_2023 == EAR_PROFILE
    assert profile_named("ietf-ear-04") == EAR_PROFILE_04
    assert profile_named(EAR_PROFILE_04) == EAR_PROFILE_04
    assert profile_named("ear-05") is None
    with pytest.raises(ConfigError, match="unknown EAR profile"):
        EarSigner.generate(profile="tag:example.com,2024:other")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=4,
)
_NAMES_04 = [
    "ear_status",
    "ear_trustworthiness_vector",
    "ear_appraisal_policy_ids",
    "vtpm_failures",
]
_NAMES_2023 = [
    "ear.status",
    "ear.trustworthiness-vector",
    "ear.appraisal-policy-id",
    "vtpm.failures",
]


@given(
    st.sampled_from(EAR_PROFILES),
    st.dictionaries(st.sampled_from(_NAMES_04 + _NAMES_2023), _JSON, max_size=4),
    st.dictionaries(
        st.sampled_from(["ear_status", "ear_verifier_id", "ear.verifier-id", "eat_nonce"]),
        _JSON,
        max_size=3,
    ),
)
def test_only_parse_or_verification_errors_escape(
    profile: str, submod: dict[str, object], top: dict[str, object]
) -> None:
    """Any signed claim set, in either profile: a result or one of the two errors."""
    signer = _PROPERTY_SIGNER
    claims = {**signer.claims(GOOD, NONCE, "vm", "p", profile=profile), **top}
    claims["submods"] = {"s": submod}
    token = jwt.encode(claims, signer._key, algorithm="ES256", headers={"kid": signer.kid})
    with contextlib.suppress(ParseError, VerificationError):
        verify_result(token, signer.jwks(), now=lambda: NOW)


_PROPERTY_SIGNER = EarSigner.generate(clock=lambda: NOW)
