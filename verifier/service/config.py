"""The verifier service's configuration: read once from the verifier home, checked, frozen.

Layout of a verifier home (``vtpm verifier init --home DIR`` writes it)::

    DIR/verifier.yaml      this configuration (YAML, schema version 1)
    DIR/verifier.db        the SQLite database (WAL) unless ``database_url`` says otherwise
    DIR/ear-signing-key.pem  the key that signs attestation results (PKCS#8, P-256)
    DIR/admin.token        the admin token in clear, written once at init (mode 0600)
    DIR/roots/             trusted EK certificate roots (PEM/DER), one file each
    DIR/intermediates/     untrusted intermediates offered for path building

Tokens are stored as SHA-256 hex digests only; a token is 32 random bytes, so a
plain digest is as strong as a salted one (RFC 6750 bearer tokens, section 5.2:
the verifier must not store what would let an attacker present a token).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vtpm_core.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_IMA_MAX_DELTA_BYTES",
    "DEFAULT_IMA_MAX_DELTA_ENTRIES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_NONCE_LIFETIME_S",
    "ServiceConfig",
    "hash_token",
    "init_home",
    "load_config",
    "new_token",
]

CONFIG_FILE = "verifier.yaml"
SCHEMA_VERSION = 1
DEFAULT_NONCE_LIFETIME_S = 120
DEFAULT_ACTIVATION_LIFETIME_S = 600
# An evidence body holds a quote (~150 B), a signature (~270 B), 24 PCR values
# per bank and an event log; real firmware logs stay under 64 KiB, large
# IMA-free logs under 256 KiB. 1 MiB (base64 overhead included) is ample.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# The IMA delta in evidence (issue 14), on top of max_body_bytes on that route only:
# a binary entry is ~100-300 bytes, so 16 MiB holds a first delta of ~60,000 entries
# (a booted distribution measures a few thousand); later deltas are tiny.
DEFAULT_IMA_MAX_DELTA_BYTES = 16 << 20
DEFAULT_IMA_MAX_DELTA_ENTRIES = 200_000
_TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of a token (SHA-256, lower-case hex)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything the service needs, checked once at start-up.

    ``database_url`` is a SQLAlchemy URL; the default is SQLite under ``home``.
    """

    home: Path
    database_url: str
    verifier_id: str
    admin_token_sha256: str
    reader_token_sha256: tuple[str, ...] = ()
    trust_roots: tuple[Path, ...] = ()
    intermediates: tuple[Path, ...] = ()
    signing_key_path: Path | None = None
    nonce_lifetime_s: int = DEFAULT_NONCE_LIFETIME_S
    activation_lifetime_s: int = DEFAULT_ACTIVATION_LIFETIME_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # limits on one evidence's IMA delta (issue 14): its decoded bytes and entries;
    # the evidence route accepts max_body_bytes plus the delta's base64 size
    ima_max_delta_bytes: int = DEFAULT_IMA_MAX_DELTA_BYTES
    ima_max_delta_entries: int = DEFAULT_IMA_MAX_DELTA_ENTRIES
    # SHA-1 signed chains and expired vendor intermediates are only accepted
    # by explicit policy (issue 5, "EK certificates").
    allow_sha1_chains: bool = False
    allow_expired_intermediates: bool = False
    default_pcr_selection: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"sha256": tuple(range(8))}
    )
    # retention (verifier/service/retention.py): results older than this many
    # days are pruned in the background; 0 keeps everything
    retention_days: int = 0
    retention_interval_s: int = 300
    retention_batch: int = 1000
    # the EAR profile results are signed in and, when a relying party names none
    # (the ``ear_profile`` request parameter), served in (verifier.ear)
    ear_profile: str = "tag:github.com,2023:veraison/ear"
    # continuous attestation (issue 16): attesters are asked to attest every
    # attest_cadence_s seconds; a trusted attester with no accepted evidence for
    # attest_cadence_s * stale_grace seconds goes stale. The sweeper that marks
    # them runs every sweep_interval_s seconds, sweep_batch rows per transaction.
    attest_cadence_s: int = 60
    stale_grace: int = 3
    sweep_interval_s: int = 5
    sweep_batch: int = 500
    # webhooks (verifier/service/delivery.py): a delivery is tried webhook_max_attempts
    # times, each send waits webhook_timeout_s, a claim lasts webhook_lease_s (then
    # another worker retries it); retry n waits min(cap, base * 2**(n-1)) with jitter;
    # every worker polls the outbox each webhook_poll_ms; webhook_jws adds X-Vtpm-Jws
    webhook_max_attempts: int = 10
    webhook_timeout_s: int = 5
    webhook_lease_s: int = 30
    webhook_backoff_base_ms: int = 1000
    webhook_backoff_cap_s: int = 300
    webhook_poll_ms: int = 500
    webhook_jws: bool = True
    # outbox retention (retention.py): delivered rows are pruned after
    # webhook_keep_delivered_days, dead letters after webhook_keep_dead_days (at least
    # as long: an operator must still see them); 0 keeps them for ever
    webhook_keep_delivered_days: int = 7
    webhook_keep_dead_days: int = 30
    # the CA's console (ca/console, another service), linked from this console's pages
    # when set: an http(s) URL of its /ca-console prefix, e.g. https://ca.example/ca-console
    ca_console_url: str | None = None
    # Bodies of the raw config (for `vtpm verifier token`): not used at run time.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def evidence_max_body_bytes(self) -> int:
        """The evidence route's body limit: the usual one plus a full IMA delta in base64."""
        return self.max_body_bytes + 4 * ((self.ima_max_delta_bytes + 2) // 3)

    def with_database(self, url: str | None) -> ServiceConfig:
        """The same configuration with another database URL (``--db``)."""
        if not url:
            return self
        return _build(self.home, {**self.raw, "database_url": url})


def _check_hex_digest(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64:
        raise ConfigError(f"{where}: expected a SHA-256 hex digest (64 characters)")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{where}: not hexadecimal") from None
    return value.lower()


def _positive_int(raw: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{CONFIG_FILE}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _paths(home: Path, raw: dict[str, Any], key: str, default_dir: str) -> tuple[Path, ...]:
    entries = raw.get(key)
    if entries is None:
        d = home / default_dir
        return tuple(sorted(p for p in d.iterdir() if p.is_file())) if d.is_dir() else ()
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{CONFIG_FILE}: {key} must be a list of paths")
    out: list[Path] = []
    for entry in entries:
        p = Path(entry) if Path(entry).is_absolute() else home / entry
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{CONFIG_FILE}: {key}: {p} does not exist")
    return tuple(out)


def _ear_profile(raw: dict[str, Any]) -> str:
    """``ear_profile``: a short name (``veraison-2023``, ``ietf-ear-04``) or a full tag.
    Veraison's 2023 profile stays the default until draft-ietf-rats-ear is final."""
    from verifier.ear import EAR_PROFILE, PROFILE_NAMES, profile_named

    value = raw.get("ear_profile", EAR_PROFILE)
    profile = profile_named(value) if isinstance(value, str) else None
    if profile is None:
        raise ConfigError(
            f"{CONFIG_FILE}: ear_profile must be one of {', '.join(PROFILE_NAMES)} "
            f"(or its full eat_profile tag), got {value!r}"
        )
    return profile


def _webhook_settings(raw: dict[str, Any]) -> dict[str, Any]:
    timeout = _positive_int(raw, "webhook_timeout_s", 5, 1, 300)
    lease = _positive_int(raw, "webhook_lease_s", 30, 2, 3600)
    if lease <= timeout:
        raise ConfigError(
            f"{CONFIG_FILE}: webhook_lease_s ({lease}) must exceed webhook_timeout_s ({timeout}):"
            " a claim must outlast the send it covers"
        )
    jws = raw.get("webhook_jws", True)
    if not isinstance(jws, bool):
        raise ConfigError(f"{CONFIG_FILE}: webhook_jws must be true or false, got {jws!r}")
    delivered = _positive_int(raw, "webhook_keep_delivered_days", 7, 0, 36500)
    dead = _positive_int(raw, "webhook_keep_dead_days", 30, 0, 36500)
    if dead and (not delivered or dead < delivered):
        raise ConfigError(
            f"{CONFIG_FILE}: webhook_keep_dead_days ({dead}) must be at least"
            f" webhook_keep_delivered_days ({delivered}; 0 keeps for ever): dead letters"
            " are kept at least as long as delivered rows"
        )
    return {
        "webhook_keep_delivered_days": delivered,
        "webhook_keep_dead_days": dead,
        "webhook_max_attempts": _positive_int(raw, "webhook_max_attempts", 10, 1, 100),
        "webhook_timeout_s": timeout,
        "webhook_lease_s": lease,
        "webhook_backoff_base_ms": _positive_int(raw, "webhook_backoff_base_ms", 1000, 1, 600000),
        "webhook_backoff_cap_s": _positive_int(raw, "webhook_backoff_cap_s", 300, 1, 86400),
        "webhook_poll_ms": _positive_int(raw, "webhook_poll_ms", 500, 10, 600000),
        "webhook_jws": jws,
    }


def _console_url(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(value) if isinstance(value, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"{CONFIG_FILE}: {key} must be an http(s) URL without query or fragment, got {value!r}"
        )
    return str(value).rstrip("/")


def _build(home: Path, raw: dict[str, Any]) -> ServiceConfig:
    if raw.get("schema") != SCHEMA_VERSION:
        raise ConfigError(
            f"{home / CONFIG_FILE}: schema must be {SCHEMA_VERSION}, got {raw.get('schema')!r}"
        )
    url = raw.get("database_url") or f"sqlite:///{home / 'verifier.db'}"
    if not isinstance(url, str) or not url.startswith(("sqlite", "postgresql")):
        raise ConfigError(f"{CONFIG_FILE}: database_url must be a sqlite or postgresql URL")
    verifier_id = raw.get("verifier_id")
    if not isinstance(verifier_id, str) or not verifier_id:
        raise ConfigError(f"{CONFIG_FILE}: verifier_id missing")
    admin = _check_hex_digest(raw.get("admin_token_sha256"), f"{CONFIG_FILE}: admin_token_sha256")
    readers_raw = raw.get("reader_token_sha256", [])
    if not isinstance(readers_raw, list):
        raise ConfigError(f"{CONFIG_FILE}: reader_token_sha256 must be a list")
    readers = tuple(
        _check_hex_digest(r, f"{CONFIG_FILE}: reader_token_sha256[{i}]")
        for i, r in enumerate(readers_raw)
    )
    key = home / str(raw.get("signing_key", "ear-signing-key.pem"))
    if not key.is_file():
        raise ConfigError(f"{CONFIG_FILE}: signing key {key} does not exist")
    selection_raw = raw.get("default_pcr_selection", {"sha256": list(range(8))})
    selection: dict[str, tuple[int, ...]] = {}
    if not isinstance(selection_raw, dict) or not selection_raw:
        raise ConfigError(f"{CONFIG_FILE}: default_pcr_selection must map bank -> PCR list")
    for bank, pcrs in selection_raw.items():
        if bank not in ("sha1", "sha256", "sha384", "sha512") or not isinstance(pcrs, list):
            raise ConfigError(f"{CONFIG_FILE}: default_pcr_selection: bad bank {bank!r}")
        if not all(isinstance(p, int) and 0 <= p < 24 for p in pcrs):
            raise ConfigError(f"{CONFIG_FILE}: default_pcr_selection[{bank}]: PCRs are 0..23")
        selection[bank] = tuple(sorted(set(pcrs)))
    return ServiceConfig(
        ear_profile=_ear_profile(raw),
        home=home,
        database_url=url,
        verifier_id=verifier_id,
        admin_token_sha256=admin,
        reader_token_sha256=readers,
        trust_roots=_paths(home, raw, "trust_roots", "roots"),
        intermediates=_paths(home, raw, "intermediates", "intermediates"),
        signing_key_path=key,
        nonce_lifetime_s=_positive_int(raw, "nonce_lifetime_s", DEFAULT_NONCE_LIFETIME_S, 1, 3600),
        activation_lifetime_s=_positive_int(
            raw, "activation_lifetime_s", DEFAULT_ACTIVATION_LIFETIME_S, 1, 86400
        ),
        max_body_bytes=_positive_int(raw, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, 1024, 64 << 20),
        ima_max_delta_bytes=_positive_int(
            raw, "ima_max_delta_bytes", DEFAULT_IMA_MAX_DELTA_BYTES, 1024, 512 << 20
        ),
        ima_max_delta_entries=_positive_int(
            raw, "ima_max_delta_entries", DEFAULT_IMA_MAX_DELTA_ENTRIES, 1, 4 << 20
        ),
        allow_sha1_chains=bool(raw.get("allow_sha1_chains", False)),
        allow_expired_intermediates=bool(raw.get("allow_expired_intermediates", False)),
        default_pcr_selection=selection,
        retention_days=_positive_int(raw, "retention_days", 0, 0, 36500),
        retention_interval_s=_positive_int(raw, "retention_interval_s", 300, 1, 86400),
        retention_batch=_positive_int(raw, "retention_batch", 1000, 1, 100000),
        attest_cadence_s=_positive_int(raw, "attest_cadence_s", 60, 1, 86400),
        stale_grace=_positive_int(raw, "stale_grace", 3, 1, 100),
        sweep_interval_s=_positive_int(raw, "sweep_interval_s", 5, 1, 3600),
        sweep_batch=_positive_int(raw, "sweep_batch", 500, 1, 100000),
        **_webhook_settings(raw),
        ca_console_url=_console_url(raw, "ca_console_url"),
        raw=dict(raw),
    )


def load_config(home: Path, *, database_url: str | None = None) -> ServiceConfig:
    """Read and check ``home/verifier.yaml``; ``database_url`` overrides the file's."""
    home = Path(home).resolve()
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found (run `vtpm verifier init --home {home}`)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if database_url:
        raw["database_url"] = database_url
    return _build(home, raw)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_home(
    home: Path, *, verifier_id: str | None = None, database_url: str | None = None
) -> str:
    """Create a verifier home: config, signing key, admin token. Returns the admin token.

    Refuses to overwrite an existing configuration (ConfigError).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    home = Path(home).resolve()
    if (home / CONFIG_FILE).exists():
        raise ConfigError(f"{home / CONFIG_FILE} already exists; refusing to overwrite")
    home.mkdir(parents=True, exist_ok=True)
    (home / "roots").mkdir(exist_ok=True)
    (home / "intermediates").mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(
        home / "ear-signing-key.pem",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    token = new_token()
    _write_private(home / "admin.token", (token + "\n").encode())
    raw = {
        "schema": SCHEMA_VERSION,
        "verifier_id": verifier_id or f"vtpm-verifier-{secrets.token_hex(4)}",
        "admin_token_sha256": hash_token(token),
        "reader_token_sha256": [],
        "signing_key": "ear-signing-key.pem",
        "nonce_lifetime_s": DEFAULT_NONCE_LIFETIME_S,
        "max_body_bytes": DEFAULT_MAX_BODY_BYTES,
        "default_pcr_selection": {"sha256": list(range(8))},
    }
    if database_url:
        raw["database_url"] = database_url
    (home / CONFIG_FILE).write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return token


def add_reader_token(home: Path) -> str:
    """Add a relying-party read token to the home's config; returns the token (shown once).

    Running services pick it up at their next start (configuration is read once).
    """
    home = Path(home).resolve()
    cfg = load_config(home)
    token = new_token()
    raw = dict(cfg.raw)
    raw["reader_token_sha256"] = [*cfg.reader_token_sha256, hash_token(token)]
    (home / CONFIG_FILE).write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return token
