"""KMIP key provider: data keys wrapped by the KMS with a key that stays in the KMS.

The model is VMware's "standard key provider": a KMS speaking KMIP holds the
key-encryption keys (KEKs); vtpm-trust sends the data key to the KMS and gets
it back encrypted (KMIP 1.4, section 4.29 Encrypt, 4.30 Decrypt), so the KEK
itself is never fetched (no Get, section 4.11). The key id recorded with a
vTPM is the KEK's KMIP Unique Identifier (section 3.1).

Wrapping is AES-256-GCM done by the server, with a random 96-bit IV from
our random source, a 16-byte tag and the same
:func:`vtpm_core.keyprovider.binding_aad` as the other providers (key id +
vTPM id) as Authenticated Encryption Additional Data (KMIP 1.4, 2.1.5
Cryptographic Parameters; 4.29 fields IV/Counter/Nonce, Authenticated
Encryption Additional Data, 4.30 Authenticated Encryption Tag).

Wrapped format: ``01 || IV (12) || ciphertext (32) || tag (16)``.

Transport: TLS 1.2 or later with a client certificate (mutual TLS, KMIP
1.4 profiles section 3.1 "Basic Authentication Suite" / TLS 1.2 suite). The
server certificate is checked against the configured CA *and* the configured
server name; PyKMIP's own client does not check the host name, so the TLS
socket is made here.

Key lifecycle: :meth:`KmipKeyProvider.create_key` is Create (AES, 256,
usage Encrypt|Decrypt) then Activate (4.19); :meth:`destroy_key` is Revoke
(4.20, reason Cessation of Operation) then Destroy (4.21). A destroyed key
cannot decrypt anything it wrapped, in any copy or backup.

PyKMIP (the client library) declares its object model with SQLAlchemy's
pre-2.0 ``declarative_base`` and imports long-deprecated ciphers from
cryptography; both only warn under SQLAlchemy 2 and cryptography 4x, so the
import is made with those two warnings silenced and nothing else changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpm_core.errors import ConfigError
from vtpm_core.keyprovider import (
    DATA_KEY_SIZE,
    KeyProviderError,
    UnknownKeyError,
    UnwrapError,
    binding_aad,
)

__all__ = ["KmipConfig", "KmipKeyProvider"]

_VERSION = 1
_IV = 12
_TAG = 16
_WRAPPED_LEN = 1 + _IV + DATA_KEY_SIZE + _TAG
_MAX_KEY_ID = 128
KMIP_VERSIONS = ("1.2", "1.3", "1.4", "2.0")


@dataclass(frozen=True, slots=True)
class KmipConfig:
    """Where the KMS is and how to authenticate to it (paths to PEM files)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None  # the name the server certificate must carry; default host
    timeout: float = 10.0
    kmip_version: str = "1.4"

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("KMIP provider: host is empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"KMIP provider: port {self.port} out of range")
        if self.kmip_version not in KMIP_VERSIONS:
            raise ConfigError(
                f"KMIP provider: kmip_version {self.kmip_version!r} not one of {KMIP_VERSIONS}"
            )
        if not self.timeout > 0:
            raise ConfigError("KMIP provider: timeout must be > 0 seconds")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _import_kmip() -> Any:
    """Import PyKMIP with its two known deprecation warnings silenced (see module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy MovedIn20Warning
        warnings.simplefilter("ignore", UserWarning)  # CryptographyDeprecationWarning
        import kmip.pie.client
        import kmip.services.kmip_client

    # PyKMIP logs each failure at ERROR before raising; the raised error is ours
    # to report (with the provider and key named), so its log records go nowhere
    # unless the application configures the "kmip" logger itself.
    kmip_log = logging.getLogger("kmip")
    if not kmip_log.handlers:
        kmip_log.addHandler(logging.NullHandler())
    return kmip


def _tls_context(config: KmipConfig) -> ssl.SSLContext:
    for what, path in (("ca", config.ca), ("cert", config.cert), ("key", config.key)):
        if not Path(path).is_file():
            raise ConfigError(f"KMIP provider: {what} file {path} does not exist")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(config.ca))
        ctx.load_cert_chain(str(config.cert), str(config.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"KMIP provider: cannot load TLS files: {exc}") from None
    return ctx


class KmipKeyProvider:
    """KEKs in a KMIP server; wrap = server-side AES-256-GCM Encrypt, unwrap = Decrypt.

    Connects lazily and keeps one connection (calls serialised by a lock);
    a failed call drops it so the next call reconnects. Every error names
    the server, the key's Unique Identifier and the server's result reason.
    Not provided: the server's access policy (who else may Get the KEK) -
    that is the KMS's configuration; see docs/vtpm.md.
    """

    kind = "kmip"

    def __init__(
        self,
        config: KmipConfig,
        *,
        key_id: str | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self._key_id = key_id
        self._rng = rng
        self._lock = threading.Lock()
        self._ctx = _tls_context(config)
        self._client: Any = None
        self._where = f"KMIP server {config.address}"

    # -- KeyProvider -----------------------------------------------------------------

    def current_key_id(self) -> str:
        if self._key_id is None:
            raise ConfigError(f"{self._where}: no shared key id configured (key_id)")
        return self._key_id

    def has_key(self, key_id: str) -> bool:
        return self.key_state(key_id) is not None

    def key_state(self, key_id: str) -> str | None:
        """The key's KMIP State (``"ACTIVE"``, ``"DEACTIVATED"``...), None if unknown."""
        _check_id(key_id)
        try:
            with self._call(key_id, "Get Attributes") as client:
                _, attrs = client.get_attributes(key_id, ["State"])
        except UnknownKeyError:
            return None
        for attr in attrs:
            if attr.attribute_name.value == "State":
                return str(attr.attribute_value.value.name)
        return None

    def wrap(self, key_id: str, data_key: bytes, associated_data: bytes) -> bytes:
        _check_id(key_id)
        if len(data_key) != DATA_KEY_SIZE:
            raise ConfigError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
        kmip = _import_kmip()
        payloads = kmip.core.messages.payloads
        iv = self._rng(_IV)
        request = payloads.EncryptRequestPayload(
            unique_identifier=key_id,
            cryptographic_parameters=self._gcm(kmip),
            data=data_key,
            iv_counter_nonce=iv,
            auth_additional_data=binding_aad(key_id, associated_data),
        )
        with self._call(key_id, "Encrypt") as client:
            response = client.proxy.send_request_payload(kmip.core.enums.Operation.ENCRYPT, request)
        sealed, tag = response.data, response.auth_tag
        if response.iv_counter_nonce not in (None, iv):
            raise KeyProviderError(f"{self._where}: Encrypt with {key_id!r} changed the IV")
        if not isinstance(sealed, bytes) or len(sealed) != DATA_KEY_SIZE:
            raise KeyProviderError(
                f"{self._where}: Encrypt with {key_id!r} returned no or a "
                f"{len(sealed or b'')}-byte ciphertext, expected {DATA_KEY_SIZE}"
            )
        if not isinstance(tag, bytes) or len(tag) != _TAG:
            raise KeyProviderError(
                f"{self._where}: Encrypt with {key_id!r} returned no {_TAG}-byte GCM tag "
                "(the server does not do authenticated encryption)"
            )
        return bytes([_VERSION]) + iv + sealed + tag

    def unwrap(self, key_id: str, wrapped: bytes, associated_data: bytes) -> bytes:
        _check_id(key_id)
        if len(wrapped) != _WRAPPED_LEN or wrapped[0] != _VERSION:
            raise UnwrapError(
                f"wrapped key is not a kmip-provider v{_VERSION} wrapping "
                f"({len(wrapped)} bytes, expected {_WRAPPED_LEN})"
            )
        kmip = _import_kmip()
        payloads = kmip.core.messages.payloads
        iv = wrapped[1 : 1 + _IV]
        sealed = wrapped[1 + _IV : 1 + _IV + DATA_KEY_SIZE]
        tag = wrapped[1 + _IV + DATA_KEY_SIZE :]
        request = payloads.DecryptRequestPayload(
            unique_identifier=key_id,
            cryptographic_parameters=self._gcm(kmip),
            data=sealed,
            iv_counter_nonce=iv,
            auth_additional_data=binding_aad(key_id, associated_data),
            auth_tag=tag,
        )
        with self._call(key_id, "Decrypt", refused_is_unwrap=True) as client:
            response = client.proxy.send_request_payload(kmip.core.enums.Operation.DECRYPT, request)
        out = response.data
        if not isinstance(out, bytes) or len(out) != DATA_KEY_SIZE:
            raise UnwrapError(
                f"{self._where}: Decrypt with {key_id!r} returned "
                f"{len(out or b'')} bytes, expected {DATA_KEY_SIZE}"
            )
        return out

    # -- key lifecycle -----------------------------------------------------------------

    def create_key(self, name: str) -> str:
        """Create and activate an AES-256 KEK named ``name``; return its Unique Identifier."""
        kmip = _import_kmip()
        enums = kmip.core.enums
        with self._call(name, "Create") as client:
            uid = client.create(
                enums.CryptographicAlgorithm.AES,
                256,
                name=name,
                cryptographic_usage_mask=[
                    enums.CryptographicUsageMask.ENCRYPT,
                    enums.CryptographicUsageMask.DECRYPT,
                ],
            )
        uid = str(uid)
        _check_id(uid)
        with self._call(uid, "Activate") as client:
            client.activate(uid)
        return uid

    def destroy_key(self, key_id: str) -> None:
        """Revoke (cessation of operation) and Destroy the KEK; unknown keys count as done."""
        _check_id(key_id)
        kmip = _import_kmip()
        enums = kmip.core.enums
        state = self.key_state(key_id)
        if state is None:
            return
        if state in ("PRE_ACTIVE", "ACTIVE"):
            with self._call(key_id, "Revoke") as client:
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, key_id)
        with self._call(key_id, "Destroy") as client:
            client.destroy(key_id)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- internals -------------------------------------------------------------------

    def _gcm(self, kmip: Any) -> Any:
        enums = kmip.core.enums
        return kmip.core.attributes.CryptographicParameters(
            block_cipher_mode=enums.BlockCipherMode.GCM,
            cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
            tag_length=_TAG,
        )

    def _connect(self) -> Any:
        kmip = _import_kmip()
        enums = kmip.core.enums
        ctx = self._ctx
        server_name = self.config.server_name or self.config.host
        timeout = self.config.timeout

        class _Proxy(kmip.services.kmip_client.KMIPProxy):  # type: ignore[misc,name-defined]
            def _create_socket(self, sock: socket.socket) -> None:
                self.socket = ctx.wrap_socket(sock, server_hostname=server_name)
                self.socket.settimeout(timeout)

        version = {
            "1.2": enums.KMIPVersion.KMIP_1_2,
            "1.3": enums.KMIPVersion.KMIP_1_3,
            "1.4": enums.KMIPVersion.KMIP_1_4,
            "2.0": enums.KMIPVersion.KMIP_2_0,
        }[self.config.kmip_version]
        client = kmip.pie.client.ProxyKmipClient(config_file=os.devnull, kmip_version=version)
        client.proxy = _Proxy(
            host=self.config.host,
            port=self.config.port,
            kmip_version=version,
            config_file=os.devnull,
        )
        try:
            client.open()
        except ssl.SSLError as exc:
            raise KeyProviderError(
                f"{self._where}: TLS handshake failed ({exc.reason or exc}); check the "
                "server certificate, its name, the CA and the client certificate"
            ) from None
        except (OSError, kmip.pie.exceptions.ClientConnectionFailure) as exc:
            raise KeyProviderError(
                f"{self._where}: cannot connect: {type(exc).__name__} {exc}"
            ) from None
        return client

    def _drop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):  # closing a broken link may fail too
                client.close()

    @contextmanager
    def _call(
        self, key_id: str, operation: str, *, refused_is_unwrap: bool = False
    ) -> Iterator[Any]:
        """Run one KMIP operation; map every failure to our errors and drop a broken link."""
        kmip = _import_kmip()
        enums = kmip.core.enums
        failures = (kmip.core.exceptions.OperationFailure, kmip.pie.exceptions.KmipOperationFailure)
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            try:
                yield self._client
            except failures as exc:
                reason = getattr(exc, "reason", None)
                name = getattr(reason, "name", str(reason))
                said = f"{name}: {getattr(exc, 'message', '') or exc}"
                if reason == enums.ResultReason.ITEM_NOT_FOUND:
                    raise UnknownKeyError(
                        f"{self._where} has no key {key_id!r} ({operation}: {said})"
                    ) from None
                if refused_is_unwrap and reason in (
                    enums.ResultReason.CRYPTOGRAPHIC_FAILURE,
                    enums.ResultReason.INVALID_FIELD,
                    enums.ResultReason.INVALID_MESSAGE,
                    enums.ResultReason.GENERAL_FAILURE,
                ):
                    raise UnwrapError(
                        f"key {key_id!r} in {self._where} does not unwrap this data key "
                        f"({operation} answered {said})"
                    ) from None
                raise KeyProviderError(
                    f"{self._where}: {operation} with key {key_id!r} refused: {said}"
                ) from None
            except (OSError, kmip.core.exceptions.KmipError) as exc:
                self._drop()
                raise KeyProviderError(
                    f"{self._where}: {operation} with key {key_id!r} failed: "
                    f"{type(exc).__name__} {exc}"
                ) from None


def _check_id(key_id: str) -> None:
    if not key_id or len(key_id) > _MAX_KEY_ID or not key_id.isprintable():
        raise ConfigError(f"invalid KMIP key id {key_id!r}")
