"""Pkcs11KeyProvider against a real SoftHSM2 token initialised in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._keyproviders import SoftHsmToken
from vtpm_core.errors import ConfigError, ConflictError, StateError
from vtpm_core.keyprovider import KeyProviderError, UnknownKeyError, UnwrapError
from vtpm_core.keyprovider_pkcs11 import Pkcs11KeyProvider

KEY = bytes(range(32))
AAD = b"7f0c6c1e-0000-4000-8000-000000000001"


@pytest.fixture
def provider(softhsm: SoftHsmToken) -> Iterator[Pkcs11KeyProvider]:
    p = Pkcs11KeyProvider(softhsm.module, softhsm.label, softhsm.pin, "kek-1")
    p.create_key("kek-1")
    try:
        yield p
    finally:
        p.close()


def test_kek_is_sensitive_and_never_extractable(provider: Pkcs11KeyProvider) -> None:
    info = provider.key_info("kek-1")
    assert info.sensitive and not info.extractable and info.never_extractable


def test_wrap_unwrap_round_trip(provider: Pkcs11KeyProvider) -> None:
    wrapped = provider.wrap("kek-1", KEY, AAD)
    assert KEY not in wrapped
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert provider.unwrap("kek-1", wrapped, AAD) == KEY
    assert provider.wrap("kek-1", KEY, AAD) != wrapped  # a fresh IV every time


def test_a_second_session_unwraps(provider: Pkcs11KeyProvider, softhsm: SoftHsmToken) -> None:
    wrapped = provider.wrap("kek-1", KEY, AAD)
    other = Pkcs11KeyProvider(softhsm.module, softhsm.label, softhsm.pin, "kek-1")
    try:
        assert other.unwrap("kek-1", wrapped, AAD) == KEY
    finally:
        other.close()


def test_has_key_create_destroy(provider: Pkcs11KeyProvider) -> None:
    assert provider.has_key("kek-1")
    assert not provider.has_key("kek-2")
    assert not provider.has_key("../bad")
    provider.create_key("kek-2")
    wrapped = provider.wrap("kek-2", KEY, AAD)
    with pytest.raises(ConflictError, match="already holds a key labelled 'kek-2'"):
        provider.create_key("kek-2")
    provider.destroy_key("kek-2")
    assert not provider.has_key("kek-2")
    with pytest.raises(UnknownKeyError, match="no AES key labelled 'kek-2'"):
        provider.unwrap("kek-2", wrapped, AAD)
    assert provider.unwrap("kek-1", provider.wrap("kek-1", KEY, AAD), AAD) == KEY


@pytest.mark.parametrize(
    "case",
    [
        "fail/aad/other-vtpm",
        "fail/wrapped/bit-flip",
        "fail/wrapped/tag-flip",
        "fail/key/other-kek-same-label",
    ],
)
def test_unwrap_refuses(provider: Pkcs11KeyProvider, case: str) -> None:
    wrapped = provider.wrap("kek-1", KEY, AAD)
    aad = AAD
    if case == "fail/aad/other-vtpm":
        aad = b"another vtpm"
    elif case == "fail/wrapped/bit-flip":
        wrapped = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    elif case == "fail/wrapped/tag-flip":
        wrapped = wrapped[:-1] + bytes([wrapped[-1] ^ 0x80])
    elif case == "fail/key/other-kek-same-label":
        provider.destroy_key("kek-1")
        provider.create_key("kek-1")
    with pytest.raises(UnwrapError, match="does not unwrap this data key"):
        provider.unwrap("kek-1", wrapped, aad)


@pytest.mark.parametrize(
    ("wrapped", "match"),
    [
        pytest.param(b"", "0 bytes, expected 61", id="fail/wrapped/empty"),
        pytest.param(b"\x01" * 60, "60 bytes, expected 61", id="fail/wrapped/truncated"),
        pytest.param(b"\x02" * 61, "not a pkcs11-provider v1", id="fail/wrapped/version"),
    ],
)
def test_unwrap_malformed(provider: Pkcs11KeyProvider, wrapped: bytes, match: str) -> None:
    with pytest.raises(UnwrapError, match=match):
        provider.unwrap("kek-1", wrapped, AAD)


def test_missing_key_label(provider: Pkcs11KeyProvider) -> None:
    with pytest.raises(
        UnknownKeyError, match=r"token 'vtpm-[0-9a-f]+' .* no AES key labelled 'nope'"
    ):
        provider.wrap("nope", KEY, AAD)
    assert issubclass(UnknownKeyError, StateError)


def test_wrong_pin(softhsm: SoftHsmToken) -> None:
    with pytest.raises(KeyProviderError, match=r"refused the PIN \(CKR_PIN_INCORRECT\)"):
        Pkcs11KeyProvider(softhsm.module, softhsm.label, "0000", "kek-1")


def test_missing_token(softhsm: SoftHsmToken) -> None:
    with pytest.raises(KeyProviderError, match="has no token labelled 'no-such-token'"):
        Pkcs11KeyProvider(softhsm.module, "no-such-token", softhsm.pin, "kek-1")


def test_missing_module(softhsm: SoftHsmToken) -> None:
    with pytest.raises(KeyProviderError, match=r"module /nonexistent\.so does not exist"):
        Pkcs11KeyProvider("/nonexistent.so", softhsm.label, softhsm.pin, "kek-1")


def test_extractable_key_is_refused(provider: Pkcs11KeyProvider) -> None:
    """A KEK someone made extractable (it could leave the token) is never used."""
    from pkcs11 import Attribute, KeyType

    provider._session.generate_key(
        KeyType.AES,
        256,
        label="soft",
        store=True,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    with pytest.raises(KeyProviderError, match=r"'soft' .* is extractable or not sensitive"):
        provider.wrap("soft", KEY, AAD)


def test_bad_label_and_size(provider: Pkcs11KeyProvider) -> None:
    with pytest.raises(ConfigError, match="invalid PKCS#11 key label"):
        provider.create_key("../x")
    with pytest.raises(ConfigError, match="32 bytes"):
        provider.wrap("kek-1", b"short", AAD)
