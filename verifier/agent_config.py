"""`vtpm agent` configuration: a TOML file, then the environment (issue 16).

The environment wins over the file, so a unit file can keep secrets out of a
world-readable config (``VTPM_AGENT_TOKEN`` from a credential). Only the
verifier URL is required; the CA bundle and a pre-issued token are optional
(without a token the agent registers and activates on first start).

| key | environment | default |
|---|---|---|
| ``url`` | ``VTPM_AGENT_URL`` | (required) |
| ``ca_bundle`` | ``VTPM_AGENT_CA_BUNDLE`` | system trust store |
| ``token``, ``attester_id`` | ``VTPM_AGENT_TOKEN``, ``..._ATTESTER_ID`` | the state file's |
| ``tpm`` | ``VTPM_AGENT_TPM`` | ``device:/dev/tpmrm0`` |
| ``state_file`` | ``VTPM_AGENT_STATE`` | ``$STATE_DIRECTORY/attester.json`` |
| ``event_log`` | ``VTPM_AGENT_EVENTLOG`` | the kernel's, if readable; ``none``: send no log |
| ``ima_list`` | ``VTPM_AGENT_IMA_LIST`` | the kernel's IMA list, if readable; ``none``: none |
| ``vm_id``, ``backoff_base_s``, ``backoff_cap_s``, ``tpm_retries`` | | |
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from verifier.agent import AgentConfig
from verifier.attester import DEFAULT_EVENTLOG, DEFAULT_IMA_LIST
from vtpm_core.errors import ConfigError

__all__ = ["load_config"]

_ENV = {
    "url": "VTPM_AGENT_URL",
    "ca_bundle": "VTPM_AGENT_CA_BUNDLE",
    "token": "VTPM_AGENT_TOKEN",
    "attester_id": "VTPM_AGENT_ATTESTER_ID",
    "tpm": "VTPM_AGENT_TPM",
    "state_file": "VTPM_AGENT_STATE",
    "event_log": "VTPM_AGENT_EVENTLOG",
    "ima_list": "VTPM_AGENT_IMA_LIST",
}
_STR_KEYS = {*_ENV, "vm_id"}
_FLOAT_KEYS = {"backoff_base_s": (0.01, 3600.0), "backoff_cap_s": (0.01, 86400.0)}
_INT_KEYS = {"tpm_retries": (1, 1000)}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read agent config: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path | None, env: Mapping[str, str]) -> AgentConfig:
    """The agent's configuration; a ConfigError naming the key and its source otherwise."""
    raw: dict[str, Any] = _read_file(path) if path is not None else {}
    where = {key: f"{path}: {key}" for key in raw}
    unknown = sorted(set(raw) - _STR_KEYS - set(_FLOAT_KEYS) - set(_INT_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    for key, var in _ENV.items():
        if env.get(var):
            raw[key], where[key] = env[var], var
    for key in _STR_KEYS & set(raw):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ConfigError(f"{where[key]}: expected a non-empty string")
    url = str(raw.get("url", "")).rstrip("/")
    if not url:
        raise ConfigError("no verifier URL: set url in the config file or VTPM_AGENT_URL")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where['url']}: {url!r} is not an http(s) URL")
    if bool(raw.get("token")) != bool(raw.get("attester_id")):
        raise ConfigError("token and attester_id go together (set both or neither)")
    ca = Path(raw["ca_bundle"]) if "ca_bundle" in raw else None
    if ca is not None and not ca.is_file():
        raise ConfigError(f"{where['ca_bundle']}: CA bundle {ca} not found")
    numbers: dict[str, Any] = {}
    for key, (lo, hi) in {**_FLOAT_KEYS, **_INT_KEYS}.items():
        if key not in raw:
            continue
        value = raw[key]
        kind = int if key in _INT_KEYS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
            raise ConfigError(f"{where[key]}: expected a number in [{lo}, {hi}], got {value!r}")
        numbers[key] = value
    state_dir = env.get("STATE_DIRECTORY", "/var/lib/vtpm-agent").split(":")[0]
    if "event_log" in raw:
        log: Path | None = None if raw["event_log"] == "none" else Path(raw["event_log"])
    else:
        log = DEFAULT_EVENTLOG if os.access(DEFAULT_EVENTLOG, os.R_OK) else None
    if "ima_list" in raw:
        ima: Path | None = None if raw["ima_list"] == "none" else Path(raw["ima_list"])
    else:
        ima = DEFAULT_IMA_LIST if os.access(DEFAULT_IMA_LIST, os.R_OK) else None
    return AgentConfig(
        url=url,
        tcti=str(raw.get("tpm", "device:/dev/tpmrm0")),
        state_file=Path(raw.get("state_file", f"{state_dir}/attester.json")),
        ca_bundle=ca,
        token=raw.get("token"),
        attester_id=raw.get("attester_id"),
        event_log=log,
        ima_list=ima,
        vm_id=raw.get("vm_id"),
        **numbers,
    )
