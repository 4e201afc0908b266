"""KmipKeyProvider against a real PyKMIP server with mutual TLS on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests._server import free_port
from tests.vtpm_core._kmip import KmipServer, make_pki
from vtpm_core.errors import ConfigError
from vtpm_core.keyprovider import KeyProviderError, UnknownKeyError, UnwrapError
from vtpm_core.keyprovider_kmip import KmipKeyProvider

KEY = bytes(range(32))
AAD = b"7f0c6c1e-0000-4000-8000-000000000001"


@pytest.fixture
def provider(kmip: KmipServer) -> Iterator[KmipKeyProvider]:
    p = KmipKeyProvider(kmip.config())
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def kek(provider: KmipKeyProvider) -> str:
    return provider.create_key(f"vtpm-{uuid.uuid4()}")


def test_wrap_unwrap_round_trip(provider: KmipKeyProvider, kek: str) -> None:
    assert provider.key_state(kek) == "ACTIVE"
    wrapped = provider.wrap(kek, KEY, AAD)
    assert KEY not in wrapped
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert provider.unwrap(kek, wrapped, AAD) == KEY
    assert provider.wrap(kek, KEY, AAD) != wrapped  # a fresh IV every time


def test_a_new_connection_unwraps(kmip: KmipServer, provider: KmipKeyProvider, kek: str) -> None:
    wrapped = provider.wrap(kek, KEY, AAD)
    other = KmipKeyProvider(kmip.config())
    try:
        assert other.unwrap(kek, wrapped, AAD) == KEY
    finally:
        other.close()


@pytest.mark.parametrize(
    "case", ["fail/aad/other-vtpm", "fail/wrapped/bit-flip", "fail/wrapped/tag-flip"]
)
def test_unwrap_refuses(provider: KmipKeyProvider, kek: str, case: str) -> None:
    wrapped = provider.wrap(kek, KEY, AAD)
    aad = AAD
    if case == "fail/aad/other-vtpm":
        aad = b"another vtpm"
    elif case == "fail/wrapped/bit-flip":
        wrapped = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    elif case == "fail/wrapped/tag-flip":
        wrapped = wrapped[:-1] + bytes([wrapped[-1] ^ 0x80])
    with pytest.raises(UnwrapError, match="does not unwrap this data key"):
        provider.unwrap(kek, wrapped, aad)
    # the connection survives a refusal
    assert provider.unwrap(kek, provider.wrap(kek, KEY, AAD), AAD) == KEY


def test_other_key_does_not_unwrap(provider: KmipKeyProvider, kek: str) -> None:
    other = provider.create_key(f"vtpm-{uuid.uuid4()}")
    wrapped = provider.wrap(kek, KEY, AAD)
    with pytest.raises(UnwrapError, match="does not unwrap"):
        provider.unwrap(other, wrapped, AAD)


def test_unwrap_malformed(provider: KmipKeyProvider, kek: str) -> None:
    with pytest.raises(UnwrapError, match="60 bytes, expected 61"):
        provider.unwrap(kek, b"\x01" * 60, AAD)


def test_destroyed_key_unwraps_nothing(provider: KmipKeyProvider, kek: str) -> None:
    wrapped = provider.wrap(kek, KEY, AAD)
    provider.destroy_key(kek)
    assert not provider.has_key(kek)
    with pytest.raises(UnknownKeyError, match=f"has no key '{kek}'.*ITEM_NOT_FOUND"):
        provider.unwrap(kek, wrapped, AAD)
    provider.destroy_key(kek)  # already gone: nothing to do


def test_missing_key(provider: KmipKeyProvider) -> None:
    assert not provider.has_key("999999")
    with pytest.raises(UnknownKeyError, match=r"KMIP server 127\.0\.0\.1:\d+ has no key '999999'"):
        provider.wrap("999999", KEY, AAD)


def test_another_client_cannot_use_the_key(kmip: KmipServer, kek: str) -> None:
    """PyKMIP's default policy: only the creator (client certificate CN) may use its key."""
    intruder = KmipKeyProvider(kmip.config("intruder"))
    try:
        with pytest.raises(KeyProviderError, match=f"Encrypt with key '{kek}' refused: PERM"):
            intruder.wrap(kek, KEY, AAD)
    finally:
        intruder.close()


def test_server_down(kmip: KmipServer) -> None:
    config = replace(kmip.config(), port=free_port())
    p = KmipKeyProvider(config)
    with pytest.raises(KeyProviderError, match=r"KMIP server 127\.0\.0\.1:\d+: cannot connect"):
        p.wrap("1", KEY, AAD)


def test_untrusted_server_certificate(kmip: KmipServer, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "another CA")
    config = replace(kmip.config(), ca=other.ca)
    with pytest.raises(
        KeyProviderError, match=r"TLS handshake failed \(CERTIFICATE_VERIFY_FAILED\)"
    ):
        KmipKeyProvider(config).wrap("1", KEY, AAD)


def test_server_name_is_checked(kmip: KmipServer) -> None:
    config = replace(kmip.config(), server_name="kms.example.com")
    with pytest.raises(KeyProviderError, match="TLS handshake failed"):
        KmipKeyProvider(config).wrap("1", KEY, AAD)


def test_client_without_certificate_the_server_trusts(kmip: KmipServer, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "another CA")
    cert, key = other.client("stranger")
    config = replace(kmip.config(), cert=cert, key=key)
    with pytest.raises(
        KeyProviderError, match=r"127\.0\.0\.1:\d+: TLS handshake failed \(TLSV1_ALERT_UNKNOWN_CA\)"
    ):
        KmipKeyProvider(config).wrap("1", KEY, AAD)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        pytest.param("port", 0, "port 0 out of range", id="fail/config/port"),
        pytest.param("kmip_version", "3.0", "kmip_version '3.0'", id="fail/config/version"),
        pytest.param("timeout", 0.0, "timeout", id="fail/config/timeout"),
        pytest.param("host", "", "host is empty", id="fail/config/host"),
    ],
)
def test_bad_config(kmip: KmipServer, field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(kmip.config(), **{field: value})


def test_missing_tls_file(kmip: KmipServer, tmp_path: Path) -> None:
    config = replace(kmip.config(), cert=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"cert file .*nope\.pem does not exist"):
        KmipKeyProvider(config)
