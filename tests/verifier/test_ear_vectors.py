"""Both EAR profiles against Veraison's own test vectors (tests/data/ear/README.md).

Reading: each claim set Veraison's tests decode is signed with a test key and
verified by :func:`verifier.ear.verify_result`, which must read it under its
own profile's names with the outcome Veraison's test asserts; Veraison's one
signed 2023 token verifies with Veraison's own test key. Writing: what
:class:`verifier.ear.EarSigner` writes for the same appraisal holds every
claim of Veraison's expected output, with the same value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest

from verifier.ear import (
    EAR_PROFILE_04,
    EAR_PROFILE_2023,
    EarSigner,
    Status,
    TrustVector,
    verify_result,
)
from vtpm_core.errors import ParseError, VerificationError

DATA = Path(__file__).resolve().parents[1] / "data" / "ear"
IAT = 1666091373
POLICY = "policy://test/01234"
FIGURE_POLICY = "https://veraison.example/policy/1/60a0068d"


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


@pytest.fixture(scope="module")
def signer() -> EarSigner:
    return EarSigner.generate(clock=lambda: IAT)


def _sign(signer: EarSigner, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, signer._key, algorithm="ES256", headers={"kid": signer.kid})


def _now(claims: dict[str, Any]) -> float:
    return float(claims["iat"]) + 10


def test_veraisons_signed_2023_token_verifies_with_veraisons_key() -> None:
    token = (DATA / "veraison-2023-verify-pass.jwt").read_text()
    jwks = (DATA / "veraison-test-key.jwks.json").read_bytes()
    ear = verify_result(token, jwks, now=lambda: IAT + 10)
    assert ear.profile == EAR_PROFILE_2023
    assert (ear.developer, ear.build, ear.issued_at) == ("Acme Inc.", "rrtrap-v1.0.0", IAT)
    assert ear.nonce is None and ear.attester_id is None
    sub = ear.submods["test"]
    assert (sub.status, sub.policy_ids, sub.trust_vector) == (
        Status.AFFIRMING,
        (POLICY,),
        TrustVector(),
    )
    # Veraison's extensions stay in the claims, unread
    assert ear.claims["submods"]["test"]["ear.veraison.key-attestation"] == {"akpub": "YWtwdWIK"}
    with pytest.raises(VerificationError, match="eat_profile"):
        verify_result(token, jwks, now=lambda: IAT + 10, profiles=(EAR_PROFILE_04,))
    with pytest.raises(VerificationError, match="carries no eat_nonce"):
        verify_result(token, jwks, now=lambda: IAT + 10, expected_nonce=bytes(16))
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(VerificationError, match="does not verify"):
        verify_result(tampered, jwks, now=lambda: IAT + 10)


# file, profile, {submod: (status, policy ids)}, overall status
_READ = [
    ("veraison-2023-minimalist.json", EAR_PROFILE_2023, {"test": (Status.AFFIRMING, (POLICY,))}),
    ("veraison-2023-hefty.json", EAR_PROFILE_2023, {"test": (Status.AFFIRMING, (POLICY,))}),
    ("ietf-04-minimalist.json", EAR_PROFILE_04, {"test": (Status.AFFIRMING, (POLICY,))}),
    ("ietf-04-hefty.json", EAR_PROFILE_04, {"test": (Status.AFFIRMING, (POLICY,))}),
    ("ietf-04-extensions.json", EAR_PROFILE_04, {"test": (Status.AFFIRMING, (POLICY,))}),
    (
        "ietf-04-arc-claims.json",
        EAR_PROFILE_04,
        {"test": (Status.AFFIRMING, (FIGURE_POLICY,))},
    ),
    (
        "ietf-04-figure3.json",
        EAR_PROFILE_04,
        {"PSA": (Status.CONTRAINDICATED, (FIGURE_POLICY,))},
    ),
    (
        "ietf-04-figure4.json",
        EAR_PROFILE_04,
        {
            "CCA Platform": (Status.AFFIRMING, (FIGURE_POLICY,)),
            "CCA Realm": (Status.AFFIRMING, (FIGURE_POLICY,)),
        },
    ),
]


@pytest.mark.parametrize(("name", "profile", "expected"), _READ, ids=[r[0] for r in _READ])
def test_reads_veraisons_claim_sets(
    signer: EarSigner, name: str, profile: str, expected: dict[str, tuple[str, tuple[str, ...]]]
) -> None:
    claims = _load(name)
    ear = verify_result(_sign(signer, claims), signer.jwks(), now=lambda: _now(claims))
    assert ear.profile == profile and ear.issued_at == claims["iat"]
    assert {n: (s.status, s.policy_ids) for n, s in ear.submods.items()} == expected
    for n, sub in ear.submods.items():
        raw = claims["submods"][n]
        vector = raw.get("ear.trustworthiness-vector", raw.get("ear_trustworthiness_vector", {}))
        assert sub.trust_vector.to_json() == vector
    assert ear.status == max(
        (s for s, _ in expected.values()),
        key=[Status.NONE, Status.AFFIRMING, Status.WARNING, Status.CONTRAINDICATED].index,
    )


@pytest.mark.parametrize("name", [r[0] for r in _READ])
def test_each_profile_reads_only_its_own_names(signer: EarSigner, name: str) -> None:
    """The same claim set under the other profile's tag: its names are not read."""
    claims = _load(name)
    other = EAR_PROFILE_04 if claims["eat_profile"] == EAR_PROFILE_2023 else EAR_PROFILE_2023
    token = _sign(signer, {**claims, "eat_profile": other})
    with pytest.raises(ParseError, match=r"verifier-id|verifier_id|ear\.status|ear_status"):
        verify_result(token, signer.jwks(), now=lambda: _now(claims))


@pytest.mark.parametrize("name", ["veraison-2023-colors.json", "ietf-04-colors.json"])
def test_trust_tiers_as_veraison_reports_them(name: str) -> None:
    """Example_colors: instance-identity 96 and configuration 96 contraindicated,
    executables 32 warning, hardware 2 affirming, the rest no claim."""
    (sub,) = _load(name)["submods"].values()
    raw = sub.get("ear.trustworthiness-vector") or sub["ear_trustworthiness_vector"]
    tiers = {k: TrustVector.from_json({k: v}).status for k, v in raw.items()}
    assert tiers == {
        "instance-identity": Status.CONTRAINDICATED,
        "configuration": Status.CONTRAINDICATED,
        "executables": Status.WARNING,
        "hardware": Status.AFFIRMING,
    }
    assert TrustVector.from_json(raw).status == Status.CONTRAINDICATED


class _Result:
    def __init__(self, vector: TrustVector) -> None:
        self.trust_vector = vector
        self.status = vector.status
        self.failure_summaries: tuple[dict[str, str], ...] = ()


# what we write beyond Veraison's examples: the nonce, the subject, and (-04) the
# overall status; never Veraison's raw evidence (we do not echo evidence)
_OURS_ONLY = {"eat_nonce", "sub", "ear_status"}
_THEIRS_ONLY = {"ear.raw-evidence", "ear_raw_evidence"}


def _contains(ours: Any, theirs: Any, path: str = "") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        for key, value in theirs.items():
            if key in _THEIRS_ONLY:
                continue
            assert key in ours, f"{path}.{key} missing"
            _contains(ours[key], value, f"{path}.{key}")
    else:
        assert ours == theirs, path


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("veraison-2023-minimalist.json", EAR_PROFILE_2023),
        ("veraison-2023-hefty.json", EAR_PROFILE_2023),
        ("ietf-04-minimalist.json", EAR_PROFILE_04),
        ("ietf-04-hefty.json", EAR_PROFILE_04),
    ],
)
def test_writes_what_veraison_writes(name: str, profile: str) -> None:
    expected = _load(name)
    (sub,) = expected["submods"].values()
    vector = TrustVector.from_json(
        sub.get("ear.trustworthiness-vector", sub.get("ear_trustworthiness_vector", {}))
    )
    if not vector.to_json():
        vector = TrustVector(instance_identity=2)  # status affirming, as the example's
    signer = EarSigner.generate(
        developer="Acme Inc.", build="rrtrap-v1.0.0", clock=lambda: IAT, profile=profile
    )
    ours = signer.claims(_Result(vector), bytes(16), "vm", POLICY, submod="test")
    expected_sub = expected["submods"]["test"]
    if "ear.trustworthiness-vector" not in expected_sub and (
        "ear_trustworthiness_vector" not in expected_sub
    ):
        ours["submods"]["test"].pop("ear.trustworthiness-vector", None)
        ours["submods"]["test"].pop("ear_trustworthiness_vector", None)
    _contains(ours, expected)
    extra = set(ours) - set(expected)
    assert extra <= _OURS_ONLY
    if profile == EAR_PROFILE_04:
        assert ours["ear_status"] == Status.AFFIRMING
