"""Our TPMT_PUBLIC parser and libtss2-mu (tpm2-pytss) agree; and where the CA skips the
libtss2-mu read (``cross_check=False``), the EK template check leaves nothing for it to catch.

The CA parses EK publics with ``Public.load(data, cross_check=False)`` (see
docs/tpm-structures.md, "The tpm2-tss cross-check"); these properties are why that is safe.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.ek import CertifiableEk
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import EK_TEMPLATES, Public, TpmAlg, _marshal, match_ek_template
from vtpm_core.tpm.templates import read_ek_tpm2b

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"
SAMPLES = {
    name: (DATA / name).read_bytes()
    for name in (
        "swtpm_ek_ecc.tpm2b_public",
        "swtpm_ek_rsa.tpm2b_public",
        "swtpm_ak_ecc_ecdsa.tpm2b_public",
        "swtpm_ak_rsa_rsapss.tpm2b_public",
    )
}
EK_SAMPLES = [n for n in SAMPLES if n.startswith("swtpm_ek")]


def _mutations(sample: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(
        st.integers(0, len(sample)), st.binary(min_size=0, max_size=4), st.integers(0, 4)
    ).map(lambda t: sample[: t[0]] + t[1] + sample[t[0] + t[2] :])


def _parse(data: bytes, cross_check: bool) -> Public | None:
    try:
        return Public.load(data, cross_check=cross_check)
    except ParseError:
        return None


@pytest.mark.parametrize("name", list(SAMPLES))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_parsers_agree_on_mutated_samples(name: str, data: Any) -> None:
    """Where our parser accepts a mutated public area, libtss2-mu reads exactly the same
    bytes and re-encodes them identically; where ours refuses, so does Public.load."""
    mutated = data.draw(_mutations(SAMPLES[name]))
    ours = _parse(mutated, cross_check=False)
    both = _parse(mutated, cross_check=True)
    if ours is None:
        assert both is None
        return
    _marshal.check("TPMT_PUBLIC", ours.raw)  # raises ParseError on a disagreement
    assert both == ours


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_parsers_agree_on_arbitrary_bytes(data: bytes) -> None:
    ours = _parse(data, cross_check=False)
    if ours is not None and not ours.from_pem:
        _marshal.check("TPMT_PUBLIC", ours.raw)


@pytest.mark.parametrize("name", EK_SAMPLES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_what_the_ca_accepts_libtss2_mu_accepts(name: str, data: Any) -> None:
    """Every mutated EK the CA's boundary (no libtss2-mu read) accepts passes the
    cross-check too, and matches its template by bytes and by fields."""
    mutated = data.draw(_mutations(SAMPLES[name]))
    try:
        ek = CertifiableEk.load(mutated, allow_bare_key=False)
    except (ParseError, VerificationError):
        return
    public = Public.load(mutated)  # with the cross-check: must not raise
    template = match_ek_template(public)
    assert template is not None and template.id == ek.template
    assert public.raw.startswith(template.wire_prefix)
    assert all(t.mismatch(public) is not None for t in EK_TEMPLATES.values() if t != template)


def test_cross_check_is_on_by_default() -> None:
    """Callers that do not opt out keep the second reader (the verifier's parsers)."""
    sample = SAMPLES["swtpm_ek_ecc.tpm2b_public"]
    calls: list[str] = []
    original = _marshal.check

    def spy(structure: str, data: bytes) -> None:
        calls.append(structure)
        original(structure, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_marshal, "check", spy)
        Public.load(sample)
        Public.parse(sample[2:])
        Public.parse_tpm2b(sample)
        assert calls == ["TPMT_PUBLIC"] * 3
        Public.load(sample, cross_check=False)
        assert len(calls) == 3
    with contextlib.suppress(ParseError):
        Public.load(sample[:-1], cross_check=False)


def _full(data: bytes) -> tuple[Public, str] | None:
    try:
        public = Public.parse_tpm2b(data)
    except ParseError:
        return None
    template = match_ek_template(public)
    return (public, template.id) if template is not None else None


@pytest.mark.parametrize("name", list(SAMPLES))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_ek_read_equals_the_full_parse(name: str, data: Any) -> None:
    """read_ek_tpm2b gives exactly parse_tpm2b's value and match_ek_template's template,
    or None (never a value the full path would refuse or read differently)."""
    mutated = data.draw(_mutations(SAMPLES[name]))
    fast = read_ek_tpm2b(mutated)
    if fast is None:
        return
    public, template = fast
    assert _full(mutated) == (public, template.id)


@pytest.mark.parametrize("tid", list(EK_TEMPLATES))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_fast_ek_read_of_every_template(tid: str, data: Any) -> None:
    """Each template with a unique of any size up to the bounds (and one over)."""
    template = EK_TEMPLATES[tid]
    limit = 512 if template.key_type == TpmAlg.RSA else 128
    sizes = [data.draw(st.integers(0, limit + 1)) for _ in range(1 if limit == 512 else 2)]
    area = template.wire_prefix + b"".join(n.to_bytes(2, "big") + bytes(n) for n in sizes)
    tpm2b = len(area).to_bytes(2, "big") + area
    fast = read_ek_tpm2b(tpm2b)
    if max(sizes) > limit:
        assert fast is None
        with pytest.raises(ParseError):
            Public.parse_tpm2b(tpm2b)
        return
    assert fast is not None
    assert _full(tpm2b) == (fast[0], tid)
    assert read_ek_tpm2b(tpm2b + b"\x00") is None
    assert read_ek_tpm2b(tpm2b[:-1]) is None
