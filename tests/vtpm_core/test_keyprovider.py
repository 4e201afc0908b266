"""LocalKeyProvider: AES-256-GCM wrapping bound to key id and vTPM id; KEK file hygiene."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vtpm_core.errors import ConfigError, PermissionDeniedError, StateError
from vtpm_core.keyprovider import LocalKeyProvider, UnknownKeyError, UnwrapError

KEY = bytes(range(32))
AAD = b"7f0c6c1e-0000-4000-8000-000000000001"


@pytest.fixture
def provider(tmp_path: Path) -> LocalKeyProvider:
    return LocalKeyProvider.create(tmp_path / "keys")


def test_kek_file_is_0600_and_32_bytes(provider: LocalKeyProvider) -> None:
    key_id = provider.current_key_id()
    path = provider.directory / f"{key_id}.kek"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert stat.S_IMODE(provider.directory.stat().st_mode) == 0o700


def test_wrap_unwrap_round_trip(provider: LocalKeyProvider) -> None:
    key_id = provider.current_key_id()
    wrapped = provider.wrap(key_id, KEY, AAD)
    assert KEY not in wrapped
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert provider.unwrap(key_id, wrapped, AAD) == KEY
    # a fresh nonce every time
    assert provider.wrap(key_id, KEY, AAD) != wrapped


def test_new_key_keeps_old_keys_usable(provider: LocalKeyProvider) -> None:
    old = provider.current_key_id()
    wrapped = provider.wrap(old, KEY, AAD)
    new = provider.new_key()
    assert new != old and provider.current_key_id() == new
    assert provider.unwrap(old, wrapped, AAD) == KEY


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        pytest.param(
            "fail/aad/other-vtpm", UnwrapError, "does not unwrap", id="fail/aad/other-vtpm"
        ),
        pytest.param(
            "fail/wrapped/bit-flip", UnwrapError, "does not unwrap", id="fail/wrapped/bit-flip"
        ),
        pytest.param(
            "fail/wrapped/truncated", UnwrapError, "expected 61", id="fail/wrapped/truncated"
        ),
        pytest.param(
            "fail/wrapped/version",
            UnwrapError,
            "not a local-provider v1",
            id="fail/wrapped/version",
        ),
        pytest.param(
            "fail/key/other-kek-same-id",
            UnwrapError,
            "does not unwrap",
            id="fail/key/other-kek-same-id",
        ),
        pytest.param("fail/key/missing", UnknownKeyError, "has no key", id="fail/key/missing"),
        pytest.param("fail/key/bad-id", ConfigError, "invalid key id", id="fail/key/bad-id"),
    ],
)
def test_unwrap_failures(
    provider: LocalKeyProvider, case: str, exc: type[Exception], match: str
) -> None:
    key_id = provider.current_key_id()
    wrapped = provider.wrap(key_id, KEY, AAD)
    aad = AAD
    if case == "fail/aad/other-vtpm":
        aad = b"another vtpm"
    elif case == "fail/wrapped/bit-flip":
        wrapped = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    elif case == "fail/wrapped/truncated":
        wrapped = wrapped[:-1]
    elif case == "fail/wrapped/version":
        wrapped = b"\x02" + wrapped[1:]
    elif case == "fail/key/other-kek-same-id":
        path = provider.directory / f"{key_id}.kek"
        path.write_bytes(os.urandom(32))
    elif case == "fail/key/missing":
        (provider.directory / f"{key_id}.kek").unlink()
    elif case == "fail/key/bad-id":
        key_id = "../etc/passwd"
    with pytest.raises(exc, match=match):
        provider.unwrap(key_id, wrapped, aad)
    if exc is not ConfigError:
        assert issubclass(exc, StateError)


def test_group_readable_kek_is_refused(provider: LocalKeyProvider) -> None:
    key_id = provider.current_key_id()
    (provider.directory / f"{key_id}.kek").chmod(0o640)
    with pytest.raises(PermissionDeniedError, match="chmod 600"):
        provider.wrap(key_id, KEY, AAD)


def test_wrong_data_key_size_is_refused(provider: LocalKeyProvider) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        provider.wrap(provider.current_key_id(), b"short", AAD)
