"""The CA home directory: configuration, key, certificate, chain, ledger.

Layout::

    HOME/ca.yaml      configuration (key backend, ledger URL, EK profile, API tokens as SHA-256)
    HOME/ca-key.p8    the CA key, encrypted PKCS#8 (file backend only; mode 0600)
    HOME/ca.csr       subordinate mode: the request for the parent CA
    HOME/ca.pem       the CA certificate
    HOME/chain.pem    the CA certificate followed by its parents up to the root
    HOME/ledger.db    the SQLite ledger (unless ``database`` names another URL)
    HOME/lint-cache/  lint keys pkilint passed, one issued certificate each (ca.lint.LintCache)

Root mode: ``init`` writes everything. Subordinate mode: ``init --subordinate``
writes the key and ``ca.csr``; ``import-chain`` checks the parent's certificate
(our key, CA:TRUE, keyCertSign, chain signatures up to a self-signed root) and
writes ``ca.pem``/``chain.pem``. Issuance never contacts the parent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ca.der import replace_signature
from ca.issuance import CaMaterial, EkIssuance
from ca.keys import (
    KEY_TYPES,
    FileSigningKey,
    Pkcs11Config,
    Pkcs11SigningKey,
    SigningKey,
)
from ca.ledger import Ledger
from ca.lint import LintCache
from ca.profile import EkProfile, parse_subject
from vtpm_core.errors import ConfigError, PermissionDeniedError, StateError

if TYPE_CHECKING:
    from ca.revocation import Revocation

__all__ = ["ROLES", "CaHome", "OpenedCa", "Token"]

CONFIG = "ca.yaml"
# provisioner: issues (and reads what it issued); admin: also revokes; reader: the
# console only (ca.console), no API route
ROLES = ("provisioner", "admin", "reader")
DEFAULT_SUBJECT = "CN=vtpm-trust EK CA,O=vtpm-trust"


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    role: str
    sha256: str


@dataclass(frozen=True, slots=True)
class OpenedCa:
    """A CA ready to issue: its services share one key and one ledger."""

    home: Path
    material: CaMaterial
    profile: EkProfile
    ledger: Ledger
    issuance: EkIssuance
    tokens: tuple[Token, ...]
    crl_validity: dt.timedelta = dt.timedelta(days=7)
    _revocation: Revocation | None = field(default=None, repr=False, compare=False)

    @property
    def revocation(self) -> Revocation:
        """Revocation (CRL, OCSP), made when first asked for: ``vtpm create`` never
        imports it. Stateless, so two threads making one each get equal services."""
        revocation = self._revocation
        if revocation is None:
            from ca.revocation import Revocation

            revocation = Revocation(self.material, self.ledger, crl_validity=self.crl_validity)
            object.__setattr__(self, "_revocation", revocation)
        return revocation

    def role_of(self, token: str) -> str:
        """The role of a bearer token; PermissionDeniedError when unknown."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        role = None
        for known in self.tokens:  # no early exit: constant work per token
            if hmac.compare_digest(known.sha256, digest):
                role = known.role
        if role is None:
            raise PermissionDeniedError("unknown bearer token")
        return role

    def close(self) -> None:
        self.ledger.close()
        self.material.key.close()


def _sign_with(key: SigningKey, stand_in_signed: bytes) -> bytes:
    """Re-sign a structure the builder signed with the stand-in (see ca.keys)."""
    from ca.der import tbs_of

    der, _ = replace_signature(stand_in_signed, key.sign(tbs_of(stand_in_signed)))
    return der


class CaHome:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    # -- configuration -------------------------------------------------------

    def load_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a CA home (no {CONFIG}); run `vtpm ca init`")
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.config_path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != 1:
            raise ConfigError(f"{self.config_path}: expected a mapping with version: 1")
        return raw

    def save_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)

    def database_url(self, config: dict[str, Any]) -> str:
        url = config.get("database") or f"sqlite:///{self.path / 'ledger.db'}"
        return str(url)

    # -- init ------------------------------------------------------------------

    def init(
        self,
        *,
        key_type: str = "ecdsa-p256",
        subject: str = DEFAULT_SUBJECT,
        validity_years: int = 20,
        passphrase: bytes | None = None,
        pkcs11: Pkcs11Config | None = None,
        pin: str | None = None,
        database: str | None = None,
        subordinate: bool = False,
        ek_profile: dict[str, Any] | None = None,
        clock: dt.datetime | None = None,
    ) -> bytes | None:
        """Create the home. Returns the CSR (PEM) in subordinate mode, else None."""
        if key_type not in KEY_TYPES:
            raise ConfigError(f"unknown --key-type {key_type!r} (one of {', '.join(KEY_TYPES)})")
        if not 1 <= validity_years <= 50:
            raise ConfigError(f"--validity-years {validity_years} not in 1..50")
        if self.config_path.exists():
            raise ConfigError(f"{self.path} is already a CA home")
        name = parse_subject(subject)
        if len(name) == 0:
            raise ConfigError("a CA needs a non-empty subject")
        EkProfile.from_config(ek_profile or {})  # fail before creating anything
        self.path.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"version": 1, "subject": subject}
        key: SigningKey
        if pkcs11 is not None:
            if pin is None:
                raise ConfigError("a PKCS#11 key needs a PIN (--pin-file or VTPM_CA_PKCS11_PIN)")
            Pkcs11SigningKey.generate(pkcs11, pin, key_type)
            key = Pkcs11SigningKey(pkcs11, pin)
            config["key"] = {
                "backend": "pkcs11",
                "module": pkcs11.module,
                "token_label": pkcs11.token_label,
                "key_label": pkcs11.key_label,
            }
        else:
            if passphrase is None:
                raise ConfigError("the CA key needs a passphrase")
            key = FileSigningKey.create(self.path / "ca-key.p8", key_type, passphrase)
            config["key"] = {"backend": "file", "path": "ca-key.p8"}
        if database:
            config["database"] = database
        config["ek_profile"] = ek_profile or {}
        config["crl_validity_days"] = 7
        config["tokens"] = []
        try:
            now = clock or dt.datetime.now(dt.UTC)
            if subordinate:
                pem = _pem("CERTIFICATE REQUEST", _csr(key, name))
                (self.path / "ca.csr").write_bytes(pem)
                config["mode"] = "subordinate"
                self.save_config(config)
                self._ledger(config).create_schema_and_close()
                return pem
            cert = self._self_signed(key, name, now, validity_years)
            (self.path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (self.path / "chain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            config["mode"] = "root"
            self.save_config(config)
            self._ledger(config).create_schema_and_close()
            return None
        finally:
            key.close()

    @staticmethod
    def _self_signed(
        key: SigningKey, name: x509.Name, now: dt.datetime, years: int
    ) -> x509.Certificate:
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
        )
        stand_in = builder.sign(key.stand_in, key.hash_algorithm)
        return x509.load_der_x509_certificate(
            _sign_with(key, stand_in.public_bytes(serialization.Encoding.DER))
        )

    # -- subordinate: import the parent's answer ---------------------------------

    def import_chain(
        self, ca_pem: bytes, chain_pem: bytes, passphrase: bytes | None, pin: str | None
    ) -> x509.Certificate:
        """Install the parent-signed CA certificate and the chain above it."""
        config = self.load_config()
        if config.get("mode") != "subordinate":
            raise ConfigError(f"{self.path} is not a subordinate CA home")
        try:
            cert = x509.load_pem_x509_certificate(ca_pem)
            parents = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
        except ValueError as exc:
            raise ConfigError(f"cannot read certificate PEM: {exc}") from exc
        key = self._key(config, passphrase, pin)
        try:
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if cert.public_key().public_bytes(der, spki) != key.public_key.public_bytes(der, spki):
                raise ConfigError("the CA certificate is not for this CA's key")
        finally:
            key.close()
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound as exc:
            raise ConfigError(f"the CA certificate lacks {exc.oid.dotted_string}") from exc
        if not bc.ca or not ku.key_cert_sign or not ku.crl_sign:
            raise ConfigError("the CA certificate must have CA:TRUE, keyCertSign and cRLSign")
        chain = [cert, *[p for p in parents if p != cert]]
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, Exception) as exc:
                raise ConfigError(
                    f"{child.subject.rfc4514_string()} is not issued by "
                    f"{parent.subject.rfc4514_string()}: {exc}"
                ) from exc
        if chain[-1].issuer != chain[-1].subject or len(chain) < 2:
            raise ConfigError("the chain must end in the parent's self-signed root")
        pem = serialization.Encoding.PEM
        (self.path / "ca.pem").write_bytes(cert.public_bytes(pem))
        (self.path / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in chain))
        config["mode"] = "subordinate-ready"
        self.save_config(config)
        return cert

    # -- open ------------------------------------------------------------------

    def _key(self, config: dict[str, Any], passphrase: bytes | None, pin: str | None) -> SigningKey:
        key_cfg = config.get("key") or {}
        if key_cfg.get("backend") == "pkcs11":
            if pin is None:
                raise ConfigError("the CA key is in a PKCS#11 token: give its PIN")
            return Pkcs11SigningKey(
                Pkcs11Config(
                    str(key_cfg["module"]), str(key_cfg["token_label"]), str(key_cfg["key_label"])
                ),
                pin,
            )
        if key_cfg.get("backend") != "file":
            raise ConfigError(f"{self.config_path}: key.backend must be file or pkcs11")
        if passphrase is None:
            raise ConfigError(
                "the CA key is encrypted: give --passphrase-file or VTPM_CA_PASSPHRASE"
            )
        return FileSigningKey.load(self.path / str(key_cfg.get("path", "ca-key.p8")), passphrase)

    def _ledger(self, config: dict[str, Any], url: str | None = None) -> _LedgerInit:
        return _LedgerInit(Ledger(url or self.database_url(config)))

    def open(
        self,
        *,
        passphrase: bytes | None = None,
        pin: str | None = None,
        database: str | None = None,
        ledger_prefix: str = "ca_",
    ) -> OpenedCa:
        """Load key, certificates, profile and ledger. Errors name what is missing."""
        config = self.load_config()
        if config.get("mode") == "subordinate":
            raise StateError(
                f"{self.path} is a subordinate CA waiting for its certificate: "
                "run `vtpm ca import-chain` first"
            )
        profile = EkProfile.from_config(dict(config.get("ek_profile") or {}))
        tokens = tuple(
            Token(str(t["name"]), str(t["role"]), str(t["sha256"]))
            for t in config.get("tokens", [])
        )
        try:
            cert = x509.load_pem_x509_certificate((self.path / "ca.pem").read_bytes())
            chain = tuple(x509.load_pem_x509_certificates((self.path / "chain.pem").read_bytes()))
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read the CA certificate/chain in {self.path}: {exc}") from exc
        key = self._key(config, passphrase, pin)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, spki) != key.public_key.public_bytes(der, spki):
            key.close()
            raise StateError("ca.pem is not the certificate of the CA key")
        material = CaMaterial(key, cert, chain)
        ledger = Ledger(database or self.database_url(config), prefix=ledger_prefix)
        ledger.create_schema()
        crl_days = int(config.get("crl_validity_days", 7))
        return OpenedCa(
            self.path,
            material,
            profile,
            ledger,
            EkIssuance(
                material, profile, ledger, lint_cache=LintCache(self.path / "lint-cache", cert)
            ),
            tokens,
            dt.timedelta(days=crl_days),
        )

    # -- tokens ------------------------------------------------------------------

    def add_token(self, name: str, role: str) -> str:
        """Create a bearer token; only its SHA-256 is stored. Returns the token once."""
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        config = self.load_config()
        tokens = list(config.get("tokens") or [])
        if any(t.get("name") == name for t in tokens):
            raise ConfigError(f"a token named {name!r} exists")
        token = secrets.token_urlsafe(32)
        tokens.append(
            {"name": name, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        )
        config["tokens"] = tokens
        self.save_config(config)
        return token


def _csr(key: SigningKey, name: x509.Name) -> bytes:
    """PKCS#10 (RFC 2986) for the CA key, built with asn1crypto and signed once.

    cryptography's CSR builder takes the subject key from the signing key, so the
    stand-in trick of ca.keys cannot be used for a CSR.
    """
    from asn1crypto import csr as acsr
    from asn1crypto import keys as akeys
    from asn1crypto import x509 as ax509

    spki = key.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    extensions = [
        {"extn_id": "basic_constraints", "critical": True,
         "extn_value": {"ca": True, "path_len_constraint": 0}},
        {"extn_id": "key_usage", "critical": True,
         "extn_value": {"key_cert_sign", "crl_sign", "digital_signature"}},
    ]  # fmt: skip
    info = acsr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": ax509.Name.load(name.public_bytes()),
            "subject_pk_info": akeys.PublicKeyInfo.load(spki),
            "attributes": [{"type": "extension_request", "values": [extensions]}],
        }
    )
    family = "rsa" if isinstance(key.public_key, rsa.RSAPublicKey) else "ecdsa"
    request = acsr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": f"{key.hash_algorithm.name}_{family}"},
            "signature": key.sign(info.dump()),
        }
    )
    return bytes(request.dump())


class _LedgerInit:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def create_schema_and_close(self) -> None:
        try:
            self.ledger.create_schema()
        finally:
            self.ledger.close()


def _pem(label: str, der: bytes) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode()
