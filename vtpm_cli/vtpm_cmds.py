"""The vTPM lifecycle: init, create, list, show, start, stop, delete, backup, restore, clone.

Issue 4. The store is ``--store DIR`` (env ``VTPM_STORE``). The CA is wired
here, the one place allowed to: ``--ca-home DIR`` (in-process, passphrase
from ``--ca-passphrase-file`` or ``VTPM_CA_PASSPHRASE``) or ``--ca-url URL
--ca-token-file F`` (HTTP).

``VTPM_CRASH_AT=<point>`` (fault injection for the crash-safety tests) makes
the command print ``paused at <point>`` on stderr and sleep at that point of a
multi-step write, so a test can SIGKILL it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from vtpm_core.errors import ConfigError
from vtpm_core.issuer import DeferredIssuer, EkCertificateIssuer, OpenedIssuer
from vtpm_core.record import EK_KINDS, VtpmRecord
from vtpm_core.store import DEFAULT_EKS, VtpmStore

_DEFAULT_STORE = (
    Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    / "vtpm-trust"
    / "store"
)


def _crash_hook() -> Callable[[str], None]:
    point = os.environ.get("VTPM_CRASH_AT")

    def hook(name: str) -> None:
        if point and name == point:
            sys.stderr.write(f"paused at {name}\n")
            sys.stderr.flush()
            time.sleep(3600)

    return hook


def _open_store(path: Path) -> VtpmStore:
    """Open the store; its provider sessions/connections close when the command ends."""
    store = VtpmStore.open(path, crash_hook=_crash_hook())
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(store.close)
    return store


def _store_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--store",
        "store_path",
        type=click.Path(path_type=Path, file_okay=False),
        envvar="VTPM_STORE",
        default=_DEFAULT_STORE,
        show_default=True,
        help="vTPM store directory (env VTPM_STORE).",
    )(f)


def _ca_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option("--ca-home", type=click.Path(path_type=Path, file_okay=False),
                         help="Issue with the CA in this home directory (in-process)."),
            click.option("--ca-passphrase-file", type=click.Path(path_type=Path, dir_okay=False),
                         help="CA key passphrase file (else env VTPM_CA_PASSPHRASE)."),
            click.option("--ca-url", help="Issue through the CA's HTTP API at this URL."),
            click.option("--ca-token-file", type=click.Path(path_type=Path, dir_okay=False),
                         help="Bearer token file for --ca-url."),
        ]
    ):  # fmt: skip
        f = opt(f)
    return f


@contextlib.contextmanager
def _issuer(
    ca_home: Path | None,
    ca_passphrase_file: Path | None,
    ca_url: str | None,
    ca_token_file: Path | None,
    *,
    required: bool = True,
    deferred: bool = False,
) -> Iterator[EkCertificateIssuer | None]:
    """The issuer the CA options name. ``deferred``: a local CA is opened when first
    used or when its ``open()`` is called (`vtpm create` overlaps it with the TPM's
    key generation); its passphrase file is read at once either way."""
    if ca_home is not None and ca_url is not None:
        raise ConfigError("give either --ca-home or --ca-url, not both")
    if ca_home is not None:
        from ca.keys import read_passphrase

        passphrase = _passphrase(ca_passphrase_file, read_passphrase)

        def open_ca() -> OpenedIssuer:
            from ca.issuer import LocalCaIssuer

            return LocalCaIssuer.open(ca_home, passphrase=passphrase)

        local = DeferredIssuer(open_ca)
        if not deferred:
            local.open()
        try:
            yield local
        finally:
            local.close()
    elif ca_url is not None:
        from ca.client import HttpCaIssuer

        if ca_token_file is None:
            raise ConfigError("--ca-url needs --ca-token-file")
        try:
            token = ca_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {ca_token_file}: {exc.strerror}") from None
        remote = HttpCaIssuer(ca_url, token)
        try:
            yield remote
        finally:
            remote.close()
    elif required:
        raise ConfigError("no CA: give --ca-home DIR or --ca-url URL --ca-token-file FILE")
    else:
        yield None


def _passphrase(path: Path | None, reader: Callable[[Path | None], bytes]) -> bytes | None:
    if path is None and not os.environ.get("VTPM_CA_PASSPHRASE"):
        return None  # a PKCS#11 or unencrypted CA: CaHome.open says what it needs
    return reader(path)


def _ek_kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    for k in kinds:
        if k not in EK_KINDS:
            raise ConfigError(f"--ek: unknown EK kind {k!r} (known: {', '.join(EK_KINDS)})")
    if not kinds:
        raise ConfigError("--ek: at least one EK kind")
    return kinds


def _summary(record: VtpmRecord, store: VtpmStore | None = None) -> dict[str, Any]:
    pid = store.pid(record.name) if store is not None else None
    return {
        "name": record.name,
        "vm_id": str(record.vm_id),
        "vtpm_id": str(record.vtpm_id),
        "created_at": record.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key_provider": record.key.provider,
        "key_id": record.key.key_id,
        "origin": record.origin.kind,
        "ek_cert_mode": record.ek_cert_mode,
        "clone_of": record.origin.source_name,
        "running": pid is not None,
        "pid": pid,
        "eks": [
            {
                "kind": ek.kind,
                "template": ek.template_id,
                "nv_index": f"0x{ek.nv_index:08x}",
                "serial": f"{ek.serial:x}" if ek.serial is not None else None,
            }
            for ek in record.eks
        ],
        "bound_serials": [f"{s:x}" for s in record.bound_serials],
    }


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _echo_created(record: VtpmRecord) -> None:
    serials = " ".join(
        f"{ek.kind}={ek.serial:x}" if ek.serial is not None else f"{ek.kind}=(none)"
        for ek in record.eks
    )
    click.echo(f"{record.name} vm_id={record.vm_id} {serials}")


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""

    @cli.command("init")
    @_store_option
    @click.option("--key-provider", "kind", type=click.Choice(["local", "pkcs11", "kmip"]),
                  default="local", show_default=True,
                  help="Who wraps the vTPMs' data keys.")  # fmt: skip
    @click.option("--provider-id", help="Its id in the store (default: the kind).")
    @click.option("--kmip-config", type=click.Path(path_type=Path, dir_okay=False),
                  help="KMIP settings (YAML/JSON): host, port, ca, cert, key, ...")  # fmt: skip
    @click.option("--pkcs11-config", type=click.Path(path_type=Path, dir_okay=False),
                  help="PKCS#11 settings (YAML/JSON): module, token_label, ...")  # fmt: skip
    @click.option("--key-per-vtpm/--shared-key", default=None,
                  help="A KEK per vTPM (shred-able) or one shared KEK "
                  "(default: per vTPM for pkcs11/kmip, shared for local).")  # fmt: skip
    def init_cmd(store_path: Path, kind: str, provider_id: str | None,
                 kmip_config: Path | None, pkcs11_config: Path | None,
                 key_per_vtpm: bool | None) -> None:  # fmt: skip
        """Create a vTPM store and its key-encryption key (mode 0600)."""
        from vtpm_cli.keyprovider_cmds import provider_from_options

        other = {
            "kmip": pkcs11_config,
            "pkcs11": kmip_config,
            "local": kmip_config or pkcs11_config,
        }
        if other[kind] is not None:
            raise ConfigError(f"--key-provider {kind} takes no settings file of another kind")
        pid = provider_id or kind
        settings = kmip_config if kind == "kmip" else pkcs11_config if kind == "pkcs11" else None
        config = provider_from_options(kind, settings, pid, key_per_vtpm)
        store = VtpmStore.init(store_path, provider_id=pid, provider=config)
        try:
            info = store.info()
        finally:
            store.close()
        click.echo(f"store {info.root} key provider {info.provider} key id {info.key_id}")

    @cli.command("create")
    @click.argument("name")
    @_store_option
    @_ca_options
    @click.option(
        "--ek",
        "ek",
        default=",".join(DEFAULT_EKS),
        show_default=True,
        help="EK kinds, comma-separated (rsa2048, ecc-p256).",
    )
    @click.option(
        "--count",
        type=click.IntRange(1, 100000),
        default=None,
        help="Create COUNT vTPMs named NAME-0001... (NAME is a prefix).",
    )
    @click.option(
        "--ek-cert-mode",
        type=click.Choice(["ours", "external"]),
        default="ours",
        show_default=True,
        help="ours: our CA certifies the EKs; external: leave the NV cert indices empty "
        "and unlocked for `vtpm ek request` / `vtpm ek import` (third-party CA).",
    )
    @click.option(
        "--jobs",
        type=click.IntRange(1, 64),
        default=1,
        show_default=True,
        help="With --count: vTPMs created in parallel (one swtpm each).",
    )
    @click.option("--key-provider", "key_provider",
                  help="Key provider id of the store (default: the store's default).")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def create_cmd(name: str, store_path: Path, ca_home: Path | None,
                   ca_passphrase_file: Path | None, ca_url: str | None,
                   ca_token_file: Path | None, ek: str, count: int | None,
                   ek_cert_mode: str, jobs: int, key_provider: str | None,
                   as_json: bool) -> None:  # fmt: skip
        """Create a vTPM: fresh encrypted state, EKs certified by the CA, certs in NV, locked."""
        kinds = _ek_kinds(ek)
        store = _open_store(store_path)
        if key_provider is not None:
            store.providers.config(key_provider)  # an unknown id fails before any work
        external = ek_cert_mode == "external"
        if external and (ca_home is not None or ca_url is not None):
            raise ConfigError("--ek-cert-mode external takes no CA (--ca-home/--ca-url)")
        with _issuer(ca_home, ca_passphrase_file, ca_url, ca_token_file,
                     required=not external, deferred=count is None) as issuer:  # fmt: skip
            if count is None:
                prepare = issuer.open if isinstance(issuer, DeferredIssuer) else lambda: None
                record = store.create(
                    name, issuer=issuer, ek=kinds, key_provider=key_provider, prepare=prepare
                )
                if as_json:
                    _echo_json(_summary(record))
                else:
                    _echo_created(record)
                return
            width = max(4, len(str(count)))
            names = [f"{name}-{i:0{width}d}" for i in range(1, count + 1)]
            t0 = time.perf_counter()
            with click.progressbar(
                length=count, label=f"creating {count} vTPMs", file=sys.stderr
            ) as bar:
                records = store.create_many(
                    names,
                    issuer=issuer,
                    ek=kinds,
                    jobs=jobs,
                    on_done=lambda _r: bar.update(1),
                    key_provider=key_provider,
                )
            elapsed = time.perf_counter() - t0
        if as_json:
            _echo_json({"created": [_summary(r) for r in records], "seconds": round(elapsed, 3)})
        else:
            for r in records:
                _echo_created(r)
            click.echo(
                f"{count} vTPMs in {elapsed:.2f} s ({count / elapsed:.1f} vTPMs/s)", err=True
            )

    @cli.command("list")
    @_store_option
    @click.option("--json", "as_json", is_flag=True)
    def list_cmd(store_path: Path, as_json: bool) -> None:
        """List the vTPMs of the store."""
        store = _open_store(store_path)
        records = store.list()
        if as_json:
            _echo_json([_summary(r, store) for r in records])
            return
        for r in records:
            state = "running" if store.pid(r.name) is not None else "stopped"
            click.echo(f"{r.name}\t{r.vm_id}\t{state}\t{r.origin.kind}")

    @cli.command("show")
    @click.argument("name")
    @_store_option
    @click.option("--json", "as_json", is_flag=True)
    def show_cmd(name: str, store_path: Path, as_json: bool) -> None:
        """Show one vTPM: ids, key id, EKs and certificate serials, running state."""
        store = _open_store(store_path)
        s = _summary(store.get(name), store)
        if as_json:
            _echo_json(s)
            return
        for k in ("name", "vm_id", "vtpm_id", "created_at", "key_provider", "key_id", "origin"):
            click.echo(f"{k}: {s[k]}")
        if s["clone_of"]:
            click.echo(f"clone_of: {s['clone_of']}")
        click.echo(f"running: {'yes (pid ' + str(s['pid']) + ')' if s['running'] else 'no'}")
        for e in s["eks"]:
            click.echo(f"ek {e['kind']}: template {e['template']} nv {e['nv_index']} "
                       f"serial {e['serial']}")  # fmt: skip
        if s["bound_serials"]:
            click.echo(f"bound_serials: {' '.join(s['bound_serials'])}")

    @cli.command("start")
    @click.argument("name")
    @_store_option
    @click.option(
        "--socket",
        "socket_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="QEMU control socket path (default: in the store's run directory).",
    )
    @click.option(
        "--port",
        type=click.IntRange(1, 65534),
        default=None,
        help="Serve TPM commands on 127.0.0.1:PORT (control PORT+1) for tools.",
    )
    @click.option("--json", "as_json", is_flag=True)
    def start_cmd(name: str, store_path: Path, socket_path: Path | None, port: int | None,
                  as_json: bool) -> None:  # fmt: skip
        """Start the vTPM (swtpm daemon, data key by fd); print how to attach it."""
        if socket_path is not None and port is not None:
            raise ConfigError("give either --socket or --port")
        store = _open_store(store_path)
        d = store.start_detached(name, socket_path=socket_path, port=port)
        out: dict[str, Any] = {"name": name, "pid": d.pid, "transport": d.transport}
        if d.transport == "qemu":
            out["socket"] = str(d.ctrl_path)
            out["qemu_args"] = d.qemu_args()
        else:
            out["port"] = d.port
            out["tcti"] = d.tcti
        if as_json:
            _echo_json(out)
        elif d.transport == "qemu":
            click.echo(" ".join(d.qemu_args()))
        else:
            click.echo(f"TPM2TOOLS_TCTI={d.tcti}")

    @cli.command("stop")
    @click.argument("name")
    @_store_option
    def stop_cmd(name: str, store_path: Path) -> None:
        """Stop the vTPM's swtpm (by its PID file, after checking it is that swtpm)."""
        store = _open_store(store_path)
        click.echo(f"{name}: {'stopped' if store.stop(name) else 'was not running'}")

    @cli.command("delete")
    @click.argument("name")
    @_store_option
    @_ca_options
    @click.option(
        "--keep-certs", is_flag=True, help="Do not revoke the EK certificates (no CA needed)."
    )
    @click.option("--shred", is_flag=True,
                  help="Also destroy the vTPM's key-encryption key in its provider: "
                  "no backup of it can be restored afterwards.")  # fmt: skip
    def delete_cmd(name: str, store_path: Path, ca_home: Path | None,
                   ca_passphrase_file: Path | None, ca_url: str | None,
                   ca_token_file: Path | None, keep_certs: bool, shred: bool) -> None:  # fmt: skip
        """Revoke the EK certificates at the CA, then destroy the state and its wrapped key."""
        store = _open_store(store_path)
        try:
            with _issuer(ca_home, ca_passphrase_file, ca_url, ca_token_file,
                         required=not keep_certs) as issuer:  # fmt: skip
                result = store.delete(name, issuer=None if keep_certs else issuer, shred=shred)
        finally:
            store.close()
        revoked = " ".join(f"{s:x}" for s in result.revoked) or "none"
        click.echo(f"{name}: deleted; revoked {revoked}")
        if result.shredded_key is not None:
            keys = " ".join(f"{k.provider}/{k.key_id}" for k in result.destroyed_keys)
            if result.kept_keys:
                shared = " ".join(f"{k.provider}/{k.key_id}" for k in result.kept_keys)
                click.echo(f"{name}: keys destroyed: {keys}")
                click.echo(
                    f"{name}: WARNING: shared keys kept: {shared}; backups made while the vTPM "
                    "was wrapped under one of them can still be restored"
                )
            else:
                click.echo(f"{name}: keys destroyed: {keys}; its backups cannot be restored")
        if result.kept:
            kept = " ".join(f"{s:x}" for s in result.kept)
            click.echo(f"{name}: not revoked (still used by a copy): {kept}")

    @cli.command("backup")
    @click.argument("name")
    @_store_option
    @click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
                  required=True, help="Backup file to write.")  # fmt: skip
    def backup_cmd(name: str, store_path: Path, output: Path) -> None:
        """Write an integrity-protected backup: encrypted state, metadata, certs, wrapped key."""
        store = _open_store(store_path)
        try:
            key = store.get(name).key
            store.backup(name, output)
        finally:
            store.close()
        click.echo(
            f"{name}: backup written to {output} (needs key {key.key_id} of key provider "
            f"{key.provider} to restore)"
        )

    @cli.command("restore")
    @click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
    @_store_option
    @click.option("--name", "new_name", help="Restore under this name (default: the original).")
    def restore_cmd(file: Path, store_path: Path, new_name: str | None) -> None:
        """Restore a backup (needs the key provider to still hold its key)."""
        store = _open_store(store_path)
        record = store.restore(file, name=new_name)
        click.echo(f"{record.name}: restored (vm_id {record.vm_id})")

    @cli.command("clone")
    @click.argument("source")
    @click.argument("new")
    @_store_option
    @_ca_options
    @click.option(
        "--mode",
        type=click.Choice(["copy", "replace"]),
        required=True,
        help="copy: same TPM (EK, secrets); replace: a new, empty vTPM.",
    )
    @click.option("--json", "as_json", is_flag=True)
    def clone_cmd(source: str, new: str, store_path: Path, ca_home: Path | None,
                  ca_passphrase_file: Path | None, ca_url: str | None,
                  ca_token_file: Path | None, mode: str, as_json: bool) -> None:  # fmt: skip
        """Clone SOURCE as NEW: --mode copy keeps the TPM, --mode replace makes a new one."""
        store = _open_store(store_path)
        with _issuer(ca_home, ca_passphrase_file, ca_url, ca_token_file) as issuer:
            record = store.clone(source, new, mode="copy" if mode == "copy" else "replace",
                                 issuer=issuer)  # fmt: skip
        if as_json:
            _echo_json(_summary(record))
        else:
            _echo_created(record)
