"""The store's key providers: ``store.json``'s ``key_providers`` map, parsed once.

Shape (``store.json``)::

    "key_providers": {
      "local": {"kind": "local", "path": "keys"},
      "hsm":   {"kind": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so",
                "token_label": "vtpm", "pin_file": "/etc/vtpm/hsm.pin",
                "key_per_vtpm": true},
      "kms":   {"kind": "kmip", "host": "kms.example.com", "port": 5696,
                "ca": "/etc/vtpm/kms-ca.pem", "cert": "/etc/vtpm/kms-client.pem",
                "key": "/etc/vtpm/kms-client.key", "key_per_vtpm": true}
    },
    "default_key_provider": "kms"

The map key is the *provider id*: it is recorded with every vTPM (its
``vtpm.json`` ``key.provider``) and in every backup, so a store can hold vTPMs
under several providers and a backup says which provider and key it needs.
Secrets are never in ``store.json``: a PKCS#11 PIN comes from ``pin_file``
(mode 0600) or the environment variable ``pin_env``; a KMIP client key is a
file path.

``key_per_vtpm``: every new vTPM gets its own key-encryption key in the
provider (label / name ``vtpm-<vtpm id>-<random>``), so ``vtpm delete --shred``
can destroy it without touching any other vTPM. Without it, new data keys are
wrapped under the provider's one shared key (``key_label`` / ``key_id``; the
local provider's ``current``).

Stores written before this had one ``key_provider`` object; it is read as
``{"local": <it>}``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpm_core.errors import ConfigError, ParseError, PermissionDeniedError
from vtpm_core.keyprovider import KeyProvider, KeyProviderError, LocalKeyProvider

__all__ = [
    "KmipProviderConfig",
    "LocalProviderConfig",
    "Pkcs11ProviderConfig",
    "ProviderConfig",
    "Providers",
    "check_provider_id",
    "parse_provider",
    "parse_providers",
]

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_S = "store.json"
KINDS = ("local", "pkcs11", "kmip")


def check_provider_id(pid: str) -> str:
    if _ID.match(pid) is None:
        raise ConfigError(
            f"invalid key provider id {pid!r}: 1-32 characters of a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return pid


@dataclass(frozen=True, slots=True)
class LocalProviderConfig:
    path: Path  # relative to the store root unless absolute
    key_per_vtpm: bool = False
    kind: str = "local"

    def describe(self) -> str:
        return f"local key files in {self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "local", "path": str(self.path), "key_per_vtpm": self.key_per_vtpm}


@dataclass(frozen=True, slots=True)
class Pkcs11ProviderConfig:
    module: Path
    token_label: str
    key_label: str | None = None  # the shared KEK; needed unless key_per_vtpm
    pin_file: Path | None = None
    pin_env: str | None = None
    key_per_vtpm: bool = True
    kind: str = "pkcs11"

    def describe(self) -> str:
        return f"PKCS#11 token {self.token_label!r} ({self.module})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "pkcs11",
            "module": str(self.module),
            "token_label": self.token_label,
            "key_per_vtpm": self.key_per_vtpm,
        }
        if self.key_label is not None:
            out["key_label"] = self.key_label
        if self.pin_file is not None:
            out["pin_file"] = str(self.pin_file)
        if self.pin_env is not None:
            out["pin_env"] = self.pin_env
        return out

    def pin(self) -> str:
        """The user PIN from ``pin_file`` (must not be group/other readable) or ``pin_env``."""
        if self.pin_file is not None:
            try:
                st = self.pin_file.stat()
                text = self.pin_file.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read PIN file {self.pin_file}: {exc.strerror}") from None
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise PermissionDeniedError(
                    f"PIN file {self.pin_file} is accessible to group/others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            return text.strip()
        assert self.pin_env is not None  # parse_provider requires one of the two
        value = os.environ.get(self.pin_env)
        if not value:
            raise ConfigError(f"PKCS#11 PIN: environment variable {self.pin_env} is not set")
        return value


@dataclass(frozen=True, slots=True)
class KmipProviderConfig:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None
    key_id: str | None = None  # the shared KEK's Unique Identifier; needed unless key_per_vtpm
    timeout: float = 10.0
    kmip_version: str = "1.4"
    key_per_vtpm: bool = True
    kind: str = "kmip"

    def describe(self) -> str:
        return f"KMIP server {self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "kmip",
            "host": self.host,
            "port": self.port,
            "ca": str(self.ca),
            "cert": str(self.cert),
            "key": str(self.key),
            "timeout": self.timeout,
            "kmip_version": self.kmip_version,
            "key_per_vtpm": self.key_per_vtpm,
        }
        if self.server_name is not None:
            out["server_name"] = self.server_name
        if self.key_id is not None:
            out["key_id"] = self.key_id
        return out


ProviderConfig = LocalProviderConfig | Pkcs11ProviderConfig | KmipProviderConfig


class _Fields:
    """Typed reads of one provider object; errors name ``key_providers.<id>.<field>``."""

    def __init__(self, pid: str, doc: Mapping[str, Any], structure: str) -> None:
        self.pid, self.doc, self.structure = pid, doc, structure
        self.seen: set[str] = {"kind"}

    def _err(self, field: str, msg: str) -> ParseError:
        return ParseError(self.structure, f"key_providers.{self.pid}.{field}", 0, msg)

    def text(self, field: str, default: str | None = None, *, required: bool = True) -> str | None:
        self.seen.add(field)
        v = self.doc.get(field, default)
        if v is None:
            if required:
                raise self._err(field, "missing")
            return None
        if not isinstance(v, str) or not v:
            raise self._err(field, f"expected a non-empty string, got {v!r}")
        return v

    def path(self, field: str, base: Path, *, required: bool = True) -> Path | None:
        v = self.text(field, required=required)
        if v is None:
            return None
        p = Path(v)
        return p if p.is_absolute() else base / p

    def flag(self, field: str, default: bool) -> bool:
        self.seen.add(field)
        v = self.doc.get(field, default)
        if not isinstance(v, bool):
            raise self._err(field, f"expected true or false, got {v!r}")
        return v

    def number(self, field: str, default: float | None = None) -> float:
        self.seen.add(field)
        v = self.doc.get(field, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._err(field, f"expected a number, got {v!r}")
        return float(v)

    def done(self) -> None:
        extra = sorted(set(self.doc) - self.seen)
        if extra:
            raise self._err(extra[0], "unknown field (a typo would silently change the meaning)")


def parse_provider(pid: str, doc: object, *, base: Path, structure: str = _S) -> ProviderConfig:
    """One provider object -> a frozen config. ``base`` resolves relative paths."""
    check_provider_id(pid)
    if not isinstance(doc, dict):
        raise ParseError(structure, f"key_providers.{pid}", 0, "expected an object")
    kind = doc.get("kind")
    f = _Fields(pid, doc, structure)
    config: ProviderConfig
    if kind == "local":
        path = f.text("path", "keys")
        assert path is not None
        config = LocalProviderConfig(Path(path), f.flag("key_per_vtpm", False))
    elif kind == "pkcs11":
        module = f.path("module", base)
        assert module is not None
        config = Pkcs11ProviderConfig(
            module=module,
            token_label=str(f.text("token_label")),
            key_label=f.text("key_label", required=False),
            pin_file=f.path("pin_file", base, required=False),
            pin_env=f.text("pin_env", required=False),
            key_per_vtpm=f.flag("key_per_vtpm", True),
        )
        if (config.pin_file is None) == (config.pin_env is None):
            raise f._err("pin_file", "give exactly one of pin_file and pin_env")
        if not config.key_per_vtpm and config.key_label is None:
            raise f._err("key_label", "missing (needed when key_per_vtpm is false)")
    elif kind == "kmip":
        from vtpm_core.keyprovider_kmip import KmipConfig

        port = f.number("port", 5696)
        if port != int(port):
            raise f._err("port", f"expected an integer, got {port}")
        config = KmipProviderConfig(
            host=str(f.text("host")),
            port=int(port),
            ca=f.path("ca", base),  # type: ignore[arg-type]
            cert=f.path("cert", base),  # type: ignore[arg-type]
            key=f.path("key", base),  # type: ignore[arg-type]
            server_name=f.text("server_name", required=False),
            key_id=f.text("key_id", required=False),
            timeout=f.number("timeout", 10.0),
            kmip_version=str(f.text("kmip_version", "1.4")),
            key_per_vtpm=f.flag("key_per_vtpm", True),
        )
        # the same range checks the provider makes, here at the boundary
        KmipConfig(
            config.host,
            config.port,
            config.ca,
            config.cert,
            config.key,
            config.server_name,
            config.timeout,
            config.kmip_version,
        )
        if not config.key_per_vtpm and config.key_id is None:
            raise f._err("key_id", "missing (needed when key_per_vtpm is false)")
    else:
        raise ParseError(
            structure, f"key_providers.{pid}.kind", 0, f"expected one of {KINDS}, got {kind!r}"
        )
    f.done()
    return config


def parse_providers(doc: Mapping[str, Any], *, base: Path) -> tuple[dict[str, ProviderConfig], str]:
    """``store.json`` -> (provider id -> config, default provider id)."""
    raw = doc.get("key_providers")
    if raw is None:  # a store from before issue 15: one local provider
        legacy = doc.get("key_provider")
        if not isinstance(legacy, dict) or legacy.get("kind") != "local":
            raise ConfigError(f"{_S}: unsupported key provider {legacy!r}")
        return {"local": parse_provider("local", legacy, base=base)}, "local"
    if not isinstance(raw, dict) or not raw:
        raise ParseError(_S, "key_providers", 0, "expected a non-empty object")
    configs = {pid: parse_provider(pid, v, base=base) for pid, v in raw.items()}
    default = doc.get("default_key_provider")
    if not isinstance(default, str) or default not in configs:
        raise ParseError(
            _S,
            "default_key_provider",
            0,
            f"expected one of {sorted(configs)}, got {default!r}",
        )
    return configs, default


class Providers:
    """The store's providers, each opened on first use and closed by :meth:`close`.

    Opening is lazy so that a command touching only vTPMs of one provider
    does not need the others to be reachable.
    """

    def __init__(
        self,
        configs: Mapping[str, ProviderConfig],
        default: str,
        *,
        root: Path,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.configs = dict(configs)
        self.default = default
        self._root = root
        self._rng = rng
        self._open: dict[str, KeyProvider] = {}
        self._lock = threading.Lock()  # create_many opens providers from several threads

    def config(self, pid: str) -> ProviderConfig:
        try:
            return self.configs[pid]
        except KeyError:
            have = ", ".join(sorted(self.configs))
            raise KeyProviderError(
                f"this store has no key provider {pid!r} (it has: {have})"
            ) from None

    def get(self, pid: str) -> KeyProvider:
        """The opened provider ``pid``; KeyProviderError naming it if it cannot be opened."""
        with self._lock:
            if pid in self._open:
                return self._open[pid]
            config = self.config(pid)
            try:
                provider = self._make(config)
            except KeyProviderError as exc:
                raise KeyProviderError(f"key provider {pid!r}: {exc}") from None
            self._open[pid] = provider
            return provider

    def _make(self, config: ProviderConfig) -> KeyProvider:
        if isinstance(config, LocalProviderConfig):
            path = config.path if config.path.is_absolute() else self._root / config.path
            return LocalKeyProvider(path, rng=self._rng)
        if isinstance(config, Pkcs11ProviderConfig):
            from vtpm_core.keyprovider_pkcs11 import Pkcs11KeyProvider

            return Pkcs11KeyProvider(
                str(config.module),
                config.token_label,
                config.pin(),
                config.key_label,
                rng=self._rng,
            )
        from vtpm_core.keyprovider_kmip import KmipConfig, KmipKeyProvider

        return KmipKeyProvider(
            KmipConfig(
                config.host,
                config.port,
                config.ca,
                config.cert,
                config.key,
                config.server_name,
                config.timeout,
                config.kmip_version,
            ),
            key_id=config.key_id,
            rng=self._rng,
        )

    def close(self) -> None:
        opened, self._open = self._open, {}
        for provider in opened.values():
            provider.close()
