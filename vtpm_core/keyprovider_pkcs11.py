"""PKCS#11 key provider: data keys wrapped by an AES key that never leaves the token.

The key-encryption key (KEK) is a token object (CKO_SECRET_KEY, CKK_AES,
256 bits) with CKA_SENSITIVE true and CKA_EXTRACTABLE false (PKCS#11 v3.0,
section 4.10 "Secret key objects"): the token will not reveal it, wrapped or
plain. Its CKA_LABEL is the key id recorded with each vTPM.

Wrapping is C_Encrypt with CKM_AES_GCM (PKCS#11 v3.0 current mechanisms,
section 2.12.8; NIST SP 800-38D) and a random 96-bit IV from our random
source, 128-bit tag. GCM is chosen over CKM_AES_KEY_WRAP_PAD (RFC 5649)
because it authenticates associated data: the same
:func:`vtpm_core.keyprovider.binding_aad` as the local provider (key id +
vTPM id), so a wrapped key copied into another vTPM's record does not open.
Key wrap with padding has no associated data.

Wrapped format: ``01 || IV (12) || ciphertext (32) || tag (16)``, the same
layout as the local provider; only the place the KEK lives differs.

One session (read/write, user logged in) is held until :meth:`close`; calls
are serialised with a lock because a PKCS#11 session must not run two
operations at once (PKCS#11 v3.0 base, section 5.6 "Sessions").
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vtpm_core.errors import ConfigError, ConflictError
from vtpm_core.keyprovider import (
    DATA_KEY_SIZE,
    KeyProviderError,
    UnknownKeyError,
    UnwrapError,
    binding_aad,
)

__all__ = ["KeyInfo", "Pkcs11KeyProvider"]

_VERSION = 1
_IV = 12
_TAG = 16
_WRAPPED_LEN = 1 + _IV + DATA_KEY_SIZE + _TAG
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the token says about a KEK (for ``vtpm key-providers check``)."""

    key_id: str
    sensitive: bool
    extractable: bool
    never_extractable: bool


def _check_label(label: str) -> str:
    if _LABEL.match(label) is None:
        raise ConfigError(
            f"invalid PKCS#11 key label {label!r}: 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return label


class Pkcs11KeyProvider:
    """A KEK per label in one PKCS#11 token; AES-256-GCM by C_Encrypt/C_Decrypt.

    Guarantees: a KEK that the token reports as extractable or not sensitive
    is refused, never used. Every failure names the token, the key label and
    the PKCS#11 error. Not provided: the PIN's protection (the caller reads
    it from a file or the environment, never from the store configuration).
    """

    kind = "pkcs11"

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        key_label: str | None = None,
        *,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        import pkcs11
        from pkcs11 import exceptions as p11

        self.module = module
        self.token_label = token_label
        self._key_label = _check_label(key_label) if key_label is not None else None
        self._rng = rng
        self._lock = threading.Lock()
        where = f"PKCS#11 token {token_label!r} ({module})"
        self._where = where
        if not os.path.isfile(module):
            raise KeyProviderError(f"PKCS#11 module {module} does not exist")
        try:
            lib = pkcs11.lib(module)
        except Exception as exc:  # the loader raises plain RuntimeError/OSError
            raise KeyProviderError(
                f"cannot load PKCS#11 module {module}: {type(exc).__name__} {exc}"
            ) from None
        try:
            token = lib.get_token(token_label=token_label)
        except p11.NoSuchToken:
            raise KeyProviderError(f"{module} has no token labelled {token_label!r}") from None
        except p11.MultipleTokensReturned:
            raise KeyProviderError(
                f"{module} has several tokens labelled {token_label!r}; labels must be unique"
            ) from None
        except p11.PKCS11Error as exc:
            raise KeyProviderError(f"{where}: {_p11_name(exc)}") from None
        try:
            self._session: Any = token.open(rw=True, user_pin=pin)
        except p11.PinIncorrect:
            raise KeyProviderError(f"{where} refused the PIN (CKR_PIN_INCORRECT)") from None
        except p11.UserAlreadyLoggedIn:
            # login state is per application, not per session (PKCS#11 v3.0 base,
            # section 5.6.6): another provider object in this process logged in
            self._session = token.open(rw=True)
        except p11.PinLocked:
            raise KeyProviderError(f"{where}: the user PIN is locked (CKR_PIN_LOCKED)") from None
        except p11.PKCS11Error as exc:
            raise KeyProviderError(f"{where}: cannot log in: {_p11_name(exc)}") from None

    # -- KeyProvider -----------------------------------------------------------------

    def current_key_id(self) -> str:
        if self._key_label is None:
            raise ConfigError(f"{self._where}: no shared key label configured (key_label)")
        return self._key_label

    def has_key(self, key_id: str) -> bool:
        if _LABEL.match(key_id) is None:
            return False
        try:
            self._key(key_id)
        except UnknownKeyError:
            return False
        return True

    def wrap(self, key_id: str, data_key: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        if len(data_key) != DATA_KEY_SIZE:
            raise ConfigError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
        iv = self._rng(_IV)
        params = GCMParams(iv, binding_aad(key_id, associated_data), _TAG * 8)
        with self._op(key_id, "wrap") as key:
            sealed = bytes(
                key.encrypt(data_key, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )
        if len(sealed) != DATA_KEY_SIZE + _TAG:
            raise KeyProviderError(
                f"{self._where}: CKM_AES_GCM returned {len(sealed)} bytes, "
                f"expected {DATA_KEY_SIZE + _TAG}"
            )
        return bytes([_VERSION]) + iv + sealed

    def unwrap(self, key_id: str, wrapped: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as p11
        from pkcs11.mechanisms import GCMParams

        if len(wrapped) != _WRAPPED_LEN or wrapped[0] != _VERSION:
            raise UnwrapError(
                f"wrapped key is not a pkcs11-provider v{_VERSION} wrapping "
                f"({len(wrapped)} bytes, expected {_WRAPPED_LEN})"
            )
        iv, sealed = wrapped[1 : 1 + _IV], wrapped[1 + _IV :]
        params = GCMParams(iv, binding_aad(key_id, associated_data), _TAG * 8)
        # a failed GCM tag check is CKR_ENCRYPTED_DATA_INVALID in most tokens;
        # SoftHSM2 2.6 answers CKR_GENERAL_ERROR. Either way nothing is returned.
        refused = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.GeneralError)
        try:
            with self._op(key_id, "unwrap", passthrough=refused) as key:
                out = bytes(
                    key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                )
        except refused as exc:
            raise UnwrapError(
                f"key {key_id!r} in {self._where} does not unwrap this data key "
                f"({type(exc).__name__}: another key under that label, or the wrapped key "
                "was altered)"
            ) from None
        if len(out) != DATA_KEY_SIZE:
            raise UnwrapError(f"unwrapped data key is {len(out)} bytes, expected {DATA_KEY_SIZE}")
        return out

    # -- key lifecycle -----------------------------------------------------------------

    def create_key(self, key_id: str) -> str:
        """Generate a new AES-256 KEK in the token (sensitive, never extractable)."""
        from pkcs11 import Attribute, KeyType
        from pkcs11 import exceptions as p11

        _check_label(key_id)
        with self._lock:
            if self._find(key_id):
                raise ConflictError(f"{self._where} already holds a key labelled {key_id!r}")
            template = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
                Attribute.DERIVE: False,
            }
            try:
                self._session.generate_key(
                    KeyType.AES,
                    256,
                    label=key_id,
                    id=key_id.encode(),
                    store=True,
                    template=template,
                )
            except p11.PKCS11Error as exc:
                raise KeyProviderError(
                    f"{self._where}: cannot generate key {key_id!r}: {_p11_name(exc)}"
                ) from None
        return key_id

    def destroy_key(self, key_id: str) -> None:
        """C_DestroyObject on the KEK: every data key it wrapped is unrecoverable after this.

        A label the token does not hold counts as destroyed.
        """
        from pkcs11 import exceptions as p11

        if not self.has_key(key_id):
            return
        with self._op(key_id, "destroy") as key:
            try:
                key.destroy()
            except p11.PKCS11Error as exc:
                raise KeyProviderError(
                    f"{self._where}: cannot destroy key {key_id!r}: {_p11_name(exc)}"
                ) from None

    def key_info(self, key_id: str) -> KeyInfo:
        from pkcs11 import Attribute

        with self._lock:
            key = self._key(key_id, check=False)
            return KeyInfo(
                key_id,
                bool(key[Attribute.SENSITIVE]),
                bool(key[Attribute.EXTRACTABLE]),
                bool(key[Attribute.NEVER_EXTRACTABLE]),
            )

    def close(self) -> None:
        with self._lock:
            self._session.close()

    # -- internals -------------------------------------------------------------------

    @contextmanager
    def _op(
        self, key_id: str, what: str, passthrough: tuple[type[Exception], ...] = ()
    ) -> Iterator[Any]:
        from pkcs11 import exceptions as p11

        with self._lock:
            key = self._key(key_id)
            try:
                yield key
            except passthrough:
                raise
            except p11.PKCS11Error as exc:
                raise KeyProviderError(
                    f"{self._where}: {what} with key {key_id!r} failed: {_p11_name(exc)}"
                ) from None

    def _find(self, key_id: str) -> list[Any]:
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11 import exceptions as p11

        try:
            return list(
                self._session.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: KeyType.AES,
                        Attribute.LABEL: key_id,
                    }
                )
            )
        except p11.PKCS11Error as exc:
            raise KeyProviderError(
                f"{self._where}: cannot search for key {key_id!r}: {_p11_name(exc)}"
            ) from None

    def _key(self, key_id: str, *, check: bool = True) -> Any:
        from pkcs11 import Attribute

        _check_label(key_id)
        found = self._find(key_id)
        if not found:
            raise UnknownKeyError(f"{self._where} has no AES key labelled {key_id!r}")
        if len(found) > 1:
            raise KeyProviderError(
                f"{self._where} has {len(found)} AES keys labelled {key_id!r}; refusing to guess"
            )
        key = found[0]
        if check and (key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]):
            raise KeyProviderError(
                f"key {key_id!r} in {self._where} is extractable or not sensitive; "
                "refusing to wrap data keys with a KEK that can leave the token"
            )
        return key


def _p11_name(exc: Exception) -> str:
    """``CKR_``-style name of a python-pkcs11 exception, with its message if any."""
    name = type(exc).__name__
    text = str(exc)
    return f"{name}: {text}" if text else name
