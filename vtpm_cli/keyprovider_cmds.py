"""Key providers of a vTPM store: ``vtpm key-providers list|check|add`` and ``vtpm rekey``.

Issue 15. A provider's settings come from a small YAML/JSON file with the
fields of its ``store.json`` entry (vtpm_core.keyconfig); relative paths in
it are relative to that file and are recorded absolute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from vtpm_core.errors import ConfigError, ParseError
from vtpm_core.keyconfig import KINDS, LocalProviderConfig, ProviderConfig, parse_provider
from vtpm_core.store import ProviderCheck

__all__ = ["load_provider_file", "register"]


def load_provider_file(kind: str, path: Path, provider_id: str) -> ProviderConfig:
    """Parse a provider settings file for ``kind``; errors name the file and field."""
    if kind not in KINDS:
        raise ConfigError(f"unknown key provider kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ParseError(str(path), "(document)", 0, f"not YAML/JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ParseError(str(path), "(document)", 0, "expected a mapping of settings")
    if doc.get("kind", kind) != kind:
        raise ParseError(str(path), "kind", 0, f"{doc['kind']!r} contradicts --kind {kind}")
    doc = {**doc, "kind": kind}
    return parse_provider(provider_id, doc, base=path.resolve().parent, structure=str(path))


def provider_from_options(
    kind: str, config_file: Path | None, provider_id: str, key_per_vtpm: bool | None
) -> ProviderConfig:
    """The provider ``vtpm init`` / ``key-providers add`` was asked for."""
    import dataclasses

    if kind == "local":
        if config_file is not None:
            config = load_provider_file("local", config_file, provider_id)
        else:
            config = LocalProviderConfig(Path("keys"))
    elif config_file is None:
        raise ConfigError(f"--key-provider {kind} needs its settings file (--{kind}-config FILE)")
    else:
        config = load_provider_file(kind, config_file, provider_id)
    if key_per_vtpm is not None:
        config = dataclasses.replace(config, key_per_vtpm=key_per_vtpm)
    return config


def _check_json(c: ProviderCheck) -> dict[str, Any]:
    return {
        "id": c.provider,
        "kind": c.kind,
        "where": c.where,
        "ok": c.ok,
        "detail": c.detail,
        "vtpms": c.vtpms,
        "missing_keys": list(c.missing_keys),
    }


def register(cli: click.Group) -> None:
    """Add ``key-providers`` and ``rekey`` to the root ``vtpm`` group."""
    from vtpm_cli.vtpm_cmds import _open_store, _store_option

    @cli.group("key-providers")
    def key_providers() -> None:
        """The store's key providers (local, PKCS#11, KMIP): list, check, add."""

    @key_providers.command("list")
    @_store_option
    @click.option("--json", "as_json", is_flag=True)
    def list_cmd(store_path: Path, as_json: bool) -> None:
        """Each provider: id, kind, where, per-vTPM keys, vTPMs under it (no connection made)."""
        store = _open_store(store_path)
        counts: dict[str, int] = {}
        for r in store.list():
            counts[r.key.provider] = counts.get(r.key.provider, 0) + 1
        rows = [
            {
                "id": pid,
                "kind": c.kind,
                "where": c.describe(),
                "default": pid == store.providers.default,
                "key_per_vtpm": c.key_per_vtpm,
                "vtpms": counts.get(pid, 0),
            }
            for pid, c in store.providers.configs.items()
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            mark = " (default)" if row["default"] else ""
            keys = "key per vTPM" if row["key_per_vtpm"] else "shared key"
            click.echo(
                f"{row['id']}{mark}\t{row['kind']}\t{row['where']}\t{keys}\t{row['vtpms']} vTPMs"
            )

    @key_providers.command("check")
    @click.argument("ids", nargs=-1)
    @_store_option
    @click.option("--json", "as_json", is_flag=True)
    def check_cmd(ids: tuple[str, ...], store_path: Path, as_json: bool) -> None:
        """Reach each provider, wrap and unwrap a test key, find every vTPM's key. Exit 1 if not."""
        store = _open_store(store_path)
        try:
            wanted = list(ids) or list(store.providers.configs)
            for pid in wanted:
                store.providers.config(pid)  # an unknown id is an error, not a failed check
            results = [store.check_provider(pid) for pid in wanted]
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps([_check_json(c) for c in results], indent=2))
        else:
            for c in results:
                status = "ok" if c.ok else "FAILED"
                click.echo(f"{c.provider}: {status} ({c.kind}, {c.where}): {c.detail}")
                for name in c.missing_keys:
                    click.echo(f"{c.provider}: vTPM {name}: its key is not in the provider")
        if not all(c.ok for c in results):
            raise click.exceptions.Exit(1)

    @key_providers.command("add")
    @click.argument("provider_id")
    @_store_option
    @click.option("--kind", type=click.Choice(KINDS), required=True)
    @click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="Provider settings (YAML/JSON: its store.json fields).")  # fmt: skip
    @click.option("--key-per-vtpm/--shared-key", default=None,
                  help="A KEK per vTPM (shred-able) or one shared KEK.")  # fmt: skip
    @click.option("--default", "make_default", is_flag=True,
                  help="New vTPMs use this provider.")  # fmt: skip
    def add_cmd(provider_id: str, store_path: Path, kind: str, config_file: Path | None,
                key_per_vtpm: bool | None, make_default: bool) -> None:  # fmt: skip
        """Add a provider after checking it wraps and unwraps; --default makes new vTPMs use it."""
        store = _open_store(store_path)
        try:
            config = provider_from_options(kind, config_file, provider_id, key_per_vtpm)
            store.add_provider(provider_id, config, default=make_default)
        finally:
            store.close()
        click.echo(f"key provider {provider_id} ({config.describe()}) added")

    @cli.command("rekey")
    @click.argument("name", required=False)
    @_store_option
    @click.option("--all", "all_", is_flag=True, help="Every vTPM of the store.")
    @click.option("--to", "to", help="Rewrap under this provider (default: each vTPM's own).")
    @click.option("--data", is_flag=True,
                  help="Also a new data key: swtpm re-encrypts the state.")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True)
    def rekey_cmd(name: str | None, store_path: Path, all_: bool, to: str | None,
                  data: bool, as_json: bool) -> None:  # fmt: skip
        """Rewrap a vTPM's data key under a new key-encryption key (--to another provider).

        With --data the data key itself is replaced and swtpm re-encrypts the
        state with it; a crash leaves the old or the new vTPM, never neither.
        """
        if (name is None) == (not all_):
            raise ConfigError("give a vTPM NAME or --all")
        store = _open_store(store_path)
        out = []
        try:
            names = store.names() if all_ else [name or ""]
            if to is not None:
                store.providers.config(to)
            for n in names:
                old = store.get(n).key
                new = store.rekey(n, to=to, data=data).key
                out.append(
                    {
                        "name": n,
                        "data_key": "new" if data else "kept",
                        "from": {"provider": old.provider, "key_id": old.key_id},
                        "to": {"provider": new.provider, "key_id": new.key_id},
                    }
                )
                if not as_json:
                    click.echo(
                        f"{n}: {'new data key, state re-encrypted' if data else 'rewrapped'}"
                        f" from {old.provider}/{old.key_id} to {new.provider}/{new.key_id}"
                    )
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps(out, indent=2))
