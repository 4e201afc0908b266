"""CA signing keys behind one small interface.

Two backends:

- :class:`FileSigningKey`: an encrypted PKCS#8 file (RFC 5958 EncryptedPrivateKeyInfo,
  PEM "ENCRYPTED PRIVATE KEY", PBES2 via cryptography's BestAvailableEncryption).
  The passphrase comes from ``--passphrase-file`` or ``VTPM_CA_PASSPHRASE``;
  the key is never written in plaintext.
- :class:`Pkcs11SigningKey`: a key pair generated inside a PKCS#11 token
  (SoftHSM2 in tests) with CKA_SENSITIVE and not CKA_EXTRACTABLE: only
  signatures leave the token.

How certificates are signed with a key we cannot hand to cryptography's
builders: every X.509 structure (certificate, CRL, OCSP response) is built
with cryptography's builder signed by a *stand-in* key of the same signature
algorithm (:meth:`SigningKey.stand_in`). We take the to-be-signed bytes out of
that structure, sign exactly those bytes with the real key, and assemble the
final ``SEQUENCE { tbs, signatureAlgorithm, signature }`` ourselves
(:func:`ca.der.resign`). The signatureAlgorithm inside the TBS is the same for
both keys because it depends only on the algorithm and hash, never on the key.
The stand-in signature is thrown away; the real key signs once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from vtpm_core.errors import ConfigError, StateError

__all__ = [
    "KEY_TYPES",
    "FileSigningKey",
    "Pkcs11SigningKey",
    "SigningKey",
    "generate_private_key",
    "read_passphrase",
]

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CaPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# key type name -> (family, size or curve, signature hash)
SignHash = hashes.SHA256 | hashes.SHA384

KEY_TYPES: dict[str, tuple[str, int, type[SignHash]]] = {
    "ecdsa-p256": ("ec", 256, hashes.SHA256),
    "ecdsa-p384": ("ec", 384, hashes.SHA384),
    "rsa-2048": ("rsa", 2048, hashes.SHA256),
    "rsa-3072": ("rsa", 3072, hashes.SHA384),
}

_CURVES: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}
PASSPHRASE_ENV = "VTPM_CA_PASSPHRASE"  # noqa: S105 - the name of the variable
PIN_ENV = "VTPM_CA_PKCS11_PIN"


def read_passphrase(passphrase_file: Path | None, env: str = PASSPHRASE_ENV) -> bytes:
    """The passphrase from a file (first line, newline stripped) or the environment."""
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {passphrase_file}: {exc}") from exc
        value = text.splitlines()[0] if text.strip() else b""
    else:
        value = os.environ.get(env, "").encode()
    if not value:
        raise ConfigError(f"no passphrase: give --passphrase-file or set {env}")
    return value


def generate_private_key(key_type: str) -> CaPrivateKey:
    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")
    family, size, _ = KEY_TYPES[key_type]
    if family == "ec":
        return ec.generate_private_key(_CURVES[size])
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def _stand_in(public: CaPublicKey) -> CaPrivateKey:
    # Only the signature algorithm identifier of the stand-in matters: RSA keys of
    # any size give sha*WithRSAEncryption, any curve gives ecdsa-with-SHA*.
    if isinstance(public, rsa.RSAPublicKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - never trusted
    return ec.generate_private_key(ec.SECP256R1())


def key_type_of(public: CaPublicKey) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        return "rsa-3072" if public.key_size >= 3072 else "rsa-2048"
    return "ecdsa-p384" if public.curve.key_size >= 384 else "ecdsa-p256"


class SigningKey(Protocol):
    """A CA key that signs to-be-signed bytes; it never hands out the private key."""

    @property
    def public_key(self) -> CaPublicKey: ...

    @property
    def hash_algorithm(self) -> SignHash: ...

    @property
    def stand_in(self) -> CaPrivateKey:
        """A throwaway key with the same signature algorithm (see the module docstring)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """The X.509 signature value over ``data`` (DER ECDSA-Sig-Value or PKCS#1 v1.5)."""
        ...

    @property
    def signs_remotely(self) -> bool:
        """True when signatures come from outside this process (a token): verify each."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FileSigningKey:
    """A CA key loaded from an encrypted PKCS#8 file."""

    private_key: CaPrivateKey
    stand_in: CaPrivateKey
    hash_algorithm: SignHash

    @classmethod
    def create(cls, path: Path, key_type: str, passphrase: bytes) -> FileSigningKey:
        """Generate a key and write it encrypted (mode 0600); refuses to overwrite."""
        key = generate_private_key(key_type)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return cls.from_private_key(key)

    @classmethod
    def from_private_key(cls, key: CaPrivateKey) -> FileSigningKey:
        _, _, hash_cls = KEY_TYPES[key_type_of(key.public_key())]
        return cls(key, _stand_in(key.public_key()), hash_cls())

    @classmethod
    def load(cls, path: Path, passphrase: bytes) -> FileSigningKey:
        """Load and decrypt; a wrong passphrase or plaintext file is a :class:`StateError`."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read CA key {path}: {exc}") from exc
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in pem:
            raise StateError(f"CA key {path} is not an encrypted PKCS#8 file; refusing to use it")
        try:
            key = serialization.load_pem_private_key(pem, password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise StateError(f"cannot decrypt CA key {path}: wrong passphrase?") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise StateError(f"CA key {path} is neither EC nor RSA")
        return cls.from_private_key(key)

    @property
    def public_key(self) -> CaPublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        key = self.private_key
        if isinstance(key, ec.EllipticCurvePrivateKey):  # the common case first
            return key.sign(data, ec.ECDSA(self.hash_algorithm))
        return key.sign(data, padding.PKCS1v15(), self.hash_algorithm)

    @property
    def signs_remotely(self) -> bool:
        return False

    def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the CA key lives in a token. The PIN is never stored in the CA config."""

    module: str
    token_label: str
    key_label: str


class Pkcs11SigningKey:
    """A CA key inside a PKCS#11 token; holds one open session until :meth:`close`.

    Sessions are not shared across processes: each gunicorn worker opens its own.
    """

    def __init__(self, config: Pkcs11Config, pin: str) -> None:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key
        from pkcs11.util.rsa import encode_rsa_public_key

        try:
            lib = pkcs11.lib(config.module)
            token = lib.get_token(token_label=config.token_label)
            self._session = token.open(user_pin=pin)
        except Exception as exc:  # python-pkcs11 raises many unrelated types
            raise StateError(
                f"cannot open PKCS#11 token {config.token_label!r} with {config.module}: "
                f"{type(exc).__name__} {exc}"
            ) from exc
        try:
            self._private: Any = self._session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, label=config.key_label
            )
            public: Any = self._session.get_key(
                object_class=ObjectClass.PUBLIC_KEY, label=config.key_label
            )
            if self._private.key_type == KeyType.EC:
                spki = encode_ec_public_key(public)
            else:
                pkcs1 = encode_rsa_public_key(public)
                spki = serialization.load_der_public_key(_rsa_spki(pkcs1)).public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            if self._private[Attribute.EXTRACTABLE] or not self._private[Attribute.SENSITIVE]:
                raise StateError(f"PKCS#11 key {config.key_label!r} is extractable; refusing it")
        except StateError:
            self._session.close()
            raise
        except Exception as exc:
            self._session.close()
            raise StateError(f"no usable key {config.key_label!r} in the token: {exc}") from exc
        pub = serialization.load_der_public_key(spki)
        if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise StateError("PKCS#11 key is neither EC nor RSA")
        self._public: CaPublicKey = pub
        _, _, hash_cls = KEY_TYPES[key_type_of(pub)]
        self._hash = hash_cls()
        self._stand_in = _stand_in(pub)

    @staticmethod
    def generate(config: Pkcs11Config, pin: str, key_type: str) -> None:
        """Generate the CA key pair inside the token (sensitive, never extractable)."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.util.ec import encode_named_curve_parameters

        if key_type not in KEY_TYPES:
            raise ConfigError(f"unknown key type {key_type!r}")
        family, size, _ = KEY_TYPES[key_type]
        private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        try:
            token = pkcs11.lib(config.module).get_token(token_label=config.token_label)
            with token.open(rw=True, user_pin=pin) as session:
                if family == "ec":
                    curve = "secp256r1" if size == 256 else "secp384r1"
                    params = session.create_domain_parameters(
                        KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                        local=True,
                    )
                    params.generate_keypair(
                        store=True,
                        label=config.key_label,
                        mechanism=Mechanism.EC_KEY_PAIR_GEN,
                        private_template=private_template,
                    )
                else:
                    session.generate_keypair(
                        KeyType.RSA,
                        size,
                        store=True,
                        label=config.key_label,
                        private_template=private_template,
                    )
        except Exception as exc:
            raise StateError(f"cannot generate a key in PKCS#11 token: {exc}") from exc

    @property
    def public_key(self) -> CaPublicKey:
        return self._public

    @property
    def hash_algorithm(self) -> SignHash:
        return self._hash

    @property
    def stand_in(self) -> CaPrivateKey:
        return self._stand_in

    @property
    def signs_remotely(self) -> bool:
        return True

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.util.ec import encode_ecdsa_signature

        if isinstance(self._public, rsa.RSAPublicKey):
            mech = (
                Mechanism.SHA256_RSA_PKCS
                if self._hash.name == "sha256"
                else (Mechanism.SHA384_RSA_PKCS)
            )
            return bytes(self._private.sign(data, mechanism=mech))
        # SoftHSM2 and most tokens sign a digest with CKM_ECDSA: hash here.
        digest = hashes.Hash(self._hash)
        digest.update(data)
        raw = self._private.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
        return bytes(encode_ecdsa_signature(raw))

    def close(self) -> None:
        self._session.close()


def _rsa_spki(pkcs1: bytes) -> bytes:
    from asn1crypto import keys

    return bytes(
        keys.PublicKeyInfo(
            {
                "algorithm": {"algorithm": "rsa", "parameters": None},
                "public_key": keys.RSAPublicKey.load(pkcs1),
            }
        ).dump()
    )
