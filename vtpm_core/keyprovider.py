"""Key providers: who wraps each vTPM's data key.

The model is VMware's VM encryption: every vTPM has its own data key (the
key swtpm encrypts its state with); a *key provider* holds key-encryption
keys (KEKs) and wraps / unwraps data keys. Only the wrapped form is stored.

``KeyProvider`` is the whole interface, small on purpose so that a KMIP
(OASIS KMIP 2.1, Encrypt/Decrypt with a server-held key) or PKCS#11
(C_WrapKey/C_UnwrapKey or C_Encrypt with CKM_AES_GCM, PKCS#11 v3.0 section
2.14) provider can implement it without the store changing.

``LocalKeyProvider`` keeps KEKs as 32-byte files (mode 0600) in a directory,
one per key id, and wraps with AES-256-GCM (NIST SP 800-38D). The associated
data binds the wrapped key to its key id and to the vTPM id, so a wrapped
key copied to another vTPM's metadata does not unwrap.

Wrapped format (local provider): ``01 || nonce (12) || ciphertext || tag (16)``.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vtpm_core._atomic import fsync_dir
from vtpm_core.errors import ConfigError, ConflictError, PermissionDeniedError, StateError

__all__ = [
    "DATA_KEY_SIZE",
    "KeyProvider",
    "KeyProviderError",
    "LocalKeyProvider",
    "UnknownKeyError",
    "UnwrapError",
    "binding_aad",
]

DATA_KEY_SIZE = 32  # AES-256 (swtpm --key mode=aes-256-cbc)
_KEK_SIZE = 32
_WRAP_VERSION = 1
_NONCE = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyProviderError(StateError):
    """The key provider cannot be reached or refuses: names the provider and what it said."""


class UnknownKeyError(StateError):
    """The key provider does not hold the key id a wrapped key names."""


class UnwrapError(StateError):
    """The key provider holds the key id but the wrapped key does not open with it."""


class KeyProvider(Protocol):
    """Wraps and unwraps data keys under key-encryption keys it holds.

    ``associated_data`` is bound into the wrapping (the vTPM id): unwrapping
    with other associated data fails. Implementations raise
    :class:`UnknownKeyError` for a key id they do not hold and
    :class:`UnwrapError` when the wrapped bytes do not open.
    """

    @property
    def kind(self) -> str:
        """Short provider type recorded beside each wrapped key ("local", "kmip", ...)."""
        ...

    def current_key_id(self) -> str:
        """The key id new data keys are wrapped under."""
        ...

    def has_key(self, key_id: str) -> bool: ...

    def wrap(self, key_id: str, data_key: bytes, associated_data: bytes) -> bytes: ...

    def unwrap(self, key_id: str, wrapped: bytes, associated_data: bytes) -> bytes: ...

    def create_key(self, name: str) -> str:
        """Create a new KEK (not made current) and return its key id (``name`` is a label hint)."""
        ...

    def destroy_key(self, key_id: str) -> None:
        """Destroy the KEK for good: nothing it wrapped opens again. Unknown ids count as done."""
        ...

    def close(self) -> None: ...


def binding_aad(key_id: str, associated_data: bytes) -> bytes:
    """The AEAD associated data every provider binds a wrapped data key to.

    It names the key id and carries the caller's context (the vTPM id), so a
    wrapped key opens only under the key id and for the vTPM it was made for.
    """
    return b"vtpm-trust data key v1\0" + key_id.encode() + b"\0" + associated_data


class LocalKeyProvider:
    """KEK files ``DIR/<key id>.kek`` (32 random bytes, mode 0600), AES-256-GCM wrapping.

    Guarantees: a KEK file readable or writable by group/others is refused
    (PermissionDeniedError), never silently used. Not provided: protection
    of the KEK at rest (that is what a KMIP/PKCS#11 provider is for).
    """

    kind = "local"

    def __init__(self, directory: Path, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.directory = Path(directory)
        self._rng = rng

    # -- set-up ----------------------------------------------------------------------

    @classmethod
    def create(
        cls, directory: Path, *, rng: Callable[[int], bytes] = os.urandom
    ) -> LocalKeyProvider:
        """Create the directory (0700) and a first KEK; return the provider."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        provider = cls(directory, rng=rng)
        provider.new_key()
        return provider

    def new_key(self) -> str:
        """Create a new KEK, make it the current one, and return its id."""
        key_id = f"kek-{rng_hex(self._rng, 8)}"
        path = self._path(key_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self._rng(_KEK_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        current = self.directory / "current"
        tmp = self.directory / f".current.tmp-{secrets.token_hex(4)}"
        tmp.write_text(key_id + "\n")
        os.replace(tmp, current)
        fsync_dir(self.directory)
        return key_id

    def create_key(self, name: str) -> str:
        """A new KEK file ``<name>.kek`` that does not become current (a per-vTPM key)."""
        path = self._path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConflictError(f"local key provider already has a key {name!r}") from None
        try:
            os.write(fd, self._rng(_KEK_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.directory)
        return name

    def destroy_key(self, key_id: str) -> None:
        """Overwrite the KEK file with zeros, fsync, unlink (best effort on COW/SSD media)."""
        path = self._path(key_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            os.write(fd, bytes(_KEK_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        fsync_dir(self.directory)

    def close(self) -> None:
        return None

    # -- KeyProvider -----------------------------------------------------------------

    def current_key_id(self) -> str:
        current = self.directory / "current"
        try:
            key_id = current.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"local key provider at {self.directory} has no current key; run `vtpm init`"
            ) from None
        self._check_id(key_id)
        return key_id

    def has_key(self, key_id: str) -> bool:
        return _KEY_ID.match(key_id) is not None and self._path(key_id).is_file()

    def wrap(self, key_id: str, data_key: bytes, associated_data: bytes) -> bytes:
        if len(data_key) != DATA_KEY_SIZE:
            raise ConfigError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
        kek = self._load(key_id)
        nonce = self._rng(_NONCE)
        sealed = AESGCM(kek).encrypt(nonce, data_key, binding_aad(key_id, associated_data))
        return bytes([_WRAP_VERSION]) + nonce + sealed

    def unwrap(self, key_id: str, wrapped: bytes, associated_data: bytes) -> bytes:
        kek = self._load(key_id)
        if len(wrapped) != 1 + _NONCE + DATA_KEY_SIZE + 16 or wrapped[0] != _WRAP_VERSION:
            raise UnwrapError(
                f"wrapped key is not a local-provider v{_WRAP_VERSION} wrapping "
                f"({len(wrapped)} bytes, expected {1 + _NONCE + DATA_KEY_SIZE + 16})"
            )
        nonce, sealed = wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :]
        try:
            return AESGCM(kek).decrypt(nonce, sealed, binding_aad(key_id, associated_data))
        except InvalidTag:
            raise UnwrapError(
                f"key {key_id!r} does not unwrap this data key "
                "(a different key-encryption key under that id, or the wrapped key was altered)"
            ) from None

    # -- internals -------------------------------------------------------------------

    def _check_id(self, key_id: str) -> None:
        if _KEY_ID.match(key_id) is None:
            raise ConfigError(f"invalid key id {key_id!r}")

    def _path(self, key_id: str) -> Path:
        self._check_id(key_id)
        return self.directory / f"{key_id}.kek"

    def _load(self, key_id: str) -> bytes:
        path = self._path(key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise UnknownKeyError(f"local key provider has no key {key_id!r} (no {path})") from None
        except OSError as exc:
            raise StateError(f"cannot read key {key_id!r} at {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise PermissionDeniedError(
                    f"key-encryption key {path} is accessible to group/others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            data = os.read(fd, _KEK_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) != _KEK_SIZE:
            raise StateError(
                f"key-encryption key {path} is {len(data)} bytes, expected {_KEK_SIZE}"
            )
        return data


def rng_hex(rng: Callable[[int], bytes], n: int) -> str:
    return rng(n).hex()
