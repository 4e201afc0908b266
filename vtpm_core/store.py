"""The vTPM store: one directory per vTPM, metadata JSON beside swtpm's encrypted state.

Layout::

    ROOT/store.json              {"format": "vtpm-trust/store/1", "key_providers": {id: {...}},
                                  "default_key_provider": id}  (vtpm_core.keyconfig)
    ROOT/keys/                   local key provider: <key id>.kek (0600), current
    ROOT/vtpms/<name>/vtpm.json  the VtpmRecord (vtpm_core.record)
    ROOT/vtpms/<name>/state/     swtpm --tpmstate dir: tpm2-00.permall, encrypted
    ROOT/run/<name>/             PID file, log and sockets of a running vTPM
    ROOT/tmp/<pid>-<random>/     staging; a vTPM appears in vtpms/ only by rename

Crash safety: every new vTPM (create, restore, clone) is built completely in
``tmp/``, fsynced, then renamed into ``vtpms/`` and the directory fsynced
(see vtpm_core._atomic). A process killed at any point leaves either no
vTPM of that name or the complete one. Deletion renames out of ``vtpms/``
first. Staging left by a dead process is removed (and its swtpm stopped)
when the store is next opened.

The plaintext data key exists only in memory and in the pipe swtpm reads
it from (vtpm_core.instance); on disk it is always wrapped by the key
provider, with the vTPM id as associated data. Each vTPM records the id of
the provider that wraps its key (``key.provider``) and the key id there.

Rekey (:meth:`VtpmStore.rekey`) rewraps the data key under a new KEK (same
or another provider): the new wrapping is made and read back before the one
``vtpm.json`` rename that commits it, so a crash leaves the old record (and
the old key, which is never destroyed by a rekey) or the new one.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vtpm_core._atomic import (
    atomic_write,
    exchange_dirs,
    fsync_dir,
    fsync_tree,
    publish_dir,
    remove_tree,
)
from vtpm_core._process import pid_exists, stop_pid
from vtpm_core.backup import STATE_FILES, Backup
from vtpm_core.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ParseError,
    StateError,
)
from vtpm_core.instance import (
    STATE_FILE,
    DetachedSwtpm,
    KeyContext,
    preflight,
    provisioning_tpm,
    reencrypt_state,
    running_pid,
    start_detached,
    start_swtpm,
    stop_detached,
)
from vtpm_core.issuer import EkCertificateIssuer, EkCertificateRequest, IssuedEkCertificate
from vtpm_core.keyconfig import (
    LocalProviderConfig,
    ProviderConfig,
    Providers,
    check_provider_id,
    parse_providers,
)
from vtpm_core.keyprovider import (
    DATA_KEY_SIZE,
    KeyProviderError,
    LocalKeyProvider,
    UnknownKeyError,
    UnwrapError,
)
from vtpm_core.provision import VmIdentityRef, provision_eks
from vtpm_core.record import (
    EK_KINDS,
    KeyRef,
    Origin,
    RetiredKey,
    VtpmRecord,
    check_name,
)
from vtpm_core.swtpm import SwtpmProcess

__all__ = ["DEFAULT_EKS", "CrashHook", "DeleteResult", "ProviderCheck", "StoreInfo", "VtpmStore"]

STORE_FORMAT = "vtpm-trust/store/1"
DEFAULT_EKS: tuple[str, ...] = tuple(EK_KINDS)  # ("rsa2048", "ecc-p256")
RECORD_FILE = "vtpm.json"
# the reason `vtpm delete` gives the CA (the CA's spelling of RFC 5280 cessationOfOperation)
REVOCATION_REASON = "cessation-of-operation"
# a named point in a multi-step write; tests pause there to SIGKILL the process
CrashHook = Callable[[str], None]
_STAGING = re.compile(r"^(\d+)-[0-9a-f]+$")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux
_STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL (as vtpm_core.instance stops swtpm)
_CHECK_AAD = b"vtpm-trust key-providers check"


_CREATED = Origin("created")


def _no_hook(_point: str) -> None:
    return None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class StoreInfo:
    root: Path
    provider: str  # the default provider's id
    key_id: str  # its shared key id, or "(one per vTPM)"


@dataclass(frozen=True, slots=True)
class DeleteResult:
    name: str
    revoked: tuple[int, ...]
    kept: tuple[int, ...]  # still used by another vTPM of this store (a copy)
    shredded_key: str | None = None  # the current KEK destroyed by --shred
    destroyed_keys: tuple[RetiredKey, ...] = ()  # every KEK --shred destroyed (current + retired)
    # retired KEKs --shred had to keep (shared with another vTPM or a provider's current key):
    # backups made while the vTPM was wrapped under one of them can still be restored
    kept_keys: tuple[RetiredKey, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderCheck:
    """What ``vtpm key-providers check`` found for one provider."""

    provider: str
    kind: str
    where: str
    ok: bool
    detail: str  # "wrap+unwrap with key K" or the error
    vtpms: int  # vTPMs of this store under this provider
    missing_keys: tuple[str, ...] = ()  # vTPMs whose key the provider does not hold


class VtpmStore:
    """The vTPMs under one root directory. Open with :meth:`open`, create with :meth:`init`.

    ``clock`` and ``rng`` are injectable; ``crash_hook`` is called with a
    point name between the steps of a multi-step write (tests use it to kill
    the process there).
    """

    def __init__(
        self,
        root: Path,
        providers: Providers,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[int], bytes] = os.urandom,
        crash_hook: CrashHook = _no_hook,
    ) -> None:
        self.root = Path(root)
        self.providers = providers
        self._clock = clock
        self._rng = rng
        self._hook = crash_hook

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        provider_id: str = "local",
        provider: ProviderConfig | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[int], bytes] = os.urandom,
        crash_hook: CrashHook = _no_hook,
    ) -> VtpmStore:
        """Create a store whose default key provider is ``provider`` (a local one by default).

        The provider is opened and made to wrap and unwrap a test key before
        ``store.json`` is written; a provider without a shared key and without
        ``key_per_vtpm`` gets one created. Nothing is written if that fails.
        """
        root = Path(root)
        if (root / "store.json").exists():
            raise ConflictError(f"{root} is already a vTPM store")
        check_provider_id(provider_id)
        config: ProviderConfig = provider or LocalProviderConfig(Path("keys"))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("vtpms", "run", "tmp"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        if isinstance(config, LocalProviderConfig):
            path = config.path if config.path.is_absolute() else root / config.path
            if not (path / "current").exists():
                LocalKeyProvider.create(path, rng=rng)
        providers = Providers({provider_id: config}, provider_id, root=root, rng=rng)
        try:
            config = _ensure_shared_key(providers, provider_id)
            providers.configs[provider_id] = config
            cls(root, providers, clock=clock, rng=rng).check_provider(provider_id, strict=True)
        finally:
            providers.close()
        _write_store_json(root, {provider_id: config}, provider_id)
        return cls.open(root, clock=clock, rng=rng, crash_hook=crash_hook)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[int], bytes] = os.urandom,
        crash_hook: CrashHook = _no_hook,
    ) -> VtpmStore:
        """Open an existing store (ConfigError if ``root`` is not one); clears dead staging."""
        root = Path(root)
        doc = _read_store_json(root)
        configs, default = parse_providers(doc, base=root)
        providers = Providers(configs, default, root=root, rng=rng)
        store = cls(root, providers, clock=clock, rng=rng, crash_hook=crash_hook)
        store._clear_dead_staging()
        return store

    def close(self) -> None:
        """Close the providers' sessions and connections."""
        self.providers.close()

    def __enter__(self) -> VtpmStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- key providers -------------------------------------------------------------------

    def add_provider(
        self, provider_id: str, config: ProviderConfig, *, default: bool = False
    ) -> None:
        """Add a provider to ``store.json`` after checking it wraps and unwraps."""
        check_provider_id(provider_id)
        if provider_id in self.providers.configs:
            raise ConflictError(f"{self.root} already has a key provider {provider_id!r}")
        self.providers.configs[provider_id] = config
        try:
            config = _ensure_shared_key(self.providers, provider_id)
            self.providers.configs[provider_id] = config
            self.check_provider(provider_id, strict=True)
        except BaseException:
            del self.providers.configs[provider_id]
            raise
        if default:
            self.providers.default = provider_id
        _write_store_json(self.root, self.providers.configs, self.providers.default)

    def check_provider(self, provider_id: str, *, strict: bool = False) -> ProviderCheck:
        """Open the provider, wrap and unwrap a random key, and look up each vTPM's key.

        With a per-vTPM provider and no shared key, a scratch KEK is created
        and destroyed for the test. ``strict`` raises instead of reporting.
        """
        config = self.providers.config(provider_id)
        records = (
            [r for r in self.list() if r.key.provider == provider_id]
            if (self.root / "vtpms").is_dir()
            else []
        )
        try:
            provider = self.providers.get(provider_id)
            scratch = None
            try:
                key_id = provider.current_key_id()
            except ConfigError:
                key_id = scratch = provider.create_key(f"vtpm-check-{self._rng(6).hex()}")
            try:
                probe = self._rng(DATA_KEY_SIZE)
                wrapped = provider.wrap(key_id, probe, _CHECK_AAD)
                if provider.unwrap(key_id, wrapped, _CHECK_AAD) != probe:
                    raise KeyProviderError(f"key {key_id!r} unwrapped to other bytes")
            finally:
                if scratch is not None:
                    provider.destroy_key(scratch)
            missing = tuple(r.name for r in records if not provider.has_key(r.key.key_id))
        except (KeyProviderError, StateError, ConfigError) as exc:
            if strict:
                raise
            return ProviderCheck(
                provider_id, config.kind, config.describe(), False, str(exc), len(records)
            )
        detail = "wrap+unwrap with " + (
            "a scratch key (keys are per vTPM)" if scratch else f"key {key_id!r}"
        )
        return ProviderCheck(
            provider_id, config.kind, config.describe(), not missing, detail, len(records), missing
        )

    def info(self) -> StoreInfo:
        pid = self.providers.default
        config = self.providers.config(pid)
        if config.key_per_vtpm:
            return StoreInfo(self.root, pid, "(one per vTPM)")
        return StoreInfo(self.root, pid, self.providers.get(pid).current_key_id())

    # -- paths ---------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / "vtpms" / check_name(name)

    def state_dir(self, name: str) -> Path:
        return self._dir(name) / "state"

    def run_dir(self, name: str) -> Path:
        return self.root / "run" / check_name(name)

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        d = self.root / "vtpms"
        return sorted(p.name for p in d.iterdir() if (p / RECORD_FILE).is_file())

    def get(self, name: str) -> VtpmRecord:
        path = self._dir(name) / RECORD_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no vTPM named {name!r} in {self.root}") from None
        return VtpmRecord.parse(data)

    def list(self) -> list[VtpmRecord]:
        return [self.get(n) for n in self.names()]

    def exists(self, name: str) -> bool:
        return (self._dir(name) / RECORD_FILE).is_file()

    def read_state(self, name: str) -> dict[str, bytes]:
        """The swtpm state files of a vTPM (encrypted, as on disk)."""
        out = {}
        for f in STATE_FILES:
            p = self.state_dir(name) / f
            if p.is_file():
                out[f] = p.read_bytes()
        return out

    def pid(self, name: str) -> int | None:
        """PID of the detached swtpm serving this vTPM (``vtpm start``), or None."""
        return running_pid(self.run_dir(name), self.state_dir(name))

    # -- keys ----------------------------------------------------------------------------

    def key_context(self, record: VtpmRecord) -> KeyContext:
        return KeyContext(record.name, record.key.key_id)

    def data_key(self, record: VtpmRecord) -> bytes:
        """Unwrap the vTPM's data key; StateError naming the vTPM, provider and key if it cannot."""
        key = record.key
        vtpm, at = f"vTPM {record.name!r}", f"{key.key_id!r} of key provider {key.provider!r}"
        try:
            provider = self.providers.get(key.provider)
            return provider.unwrap(key.key_id, key.wrapped, str(record.vtpm_id).encode())
        except UnknownKeyError as exc:
            raise StateError(f"{vtpm}: missing key {at} ({exc}); state untouched") from None
        except UnwrapError as exc:
            raise StateError(f"{vtpm}: wrong key {at} ({exc}); state untouched") from None
        except KeyProviderError as exc:
            raise KeyProviderError(f"{vtpm}: key {at}: {exc}; state untouched") from None

    def wrap_new(
        self, vtpm_id: uuid.UUID, data_key: bytes, provider_id: str | None = None
    ) -> KeyRef:
        """Wrap a data key for vTPM ``vtpm_id`` under ``provider_id`` (default: the store's).

        A ``key_per_vtpm`` provider first creates the vTPM's own KEK. The
        wrapping is unwrapped again before it is returned: a provider that
        answers with bytes it cannot open would otherwise lock the vTPM out.
        """
        pid = provider_id or self.providers.default
        config = self.providers.config(pid)
        provider = self.providers.get(pid)
        aad = str(vtpm_id).encode()
        try:
            if config.key_per_vtpm:
                key_id = provider.create_key(f"vtpm-{vtpm_id}-{self._rng(6).hex()}")
            else:
                key_id = provider.current_key_id()
            wrapped = provider.wrap(key_id, data_key, aad)
            back = provider.unwrap(key_id, wrapped, aad)
        except (KeyProviderError, StateError) as exc:
            raise KeyProviderError(
                f"key provider {pid!r} cannot wrap a new data key: {exc}; nothing was written"
            ) from None
        if back != data_key:
            raise KeyProviderError(
                f"key provider {pid!r}: key {key_id!r} does not give back the data key it wrapped"
            )
        return KeyRef(pid, key_id, wrapped)

    # -- rekey ---------------------------------------------------------------------------

    def rekey(self, name: str, *, to: str | None = None, data: bool = False) -> VtpmRecord:
        """Rewrap the data key of ``name`` under a new KEK (of ``to``, default its own provider).

        Without ``data`` the state is not rewritten. Steps: (1) the current
        key unwraps (else nothing happens); (2) a new KEK: a fresh one for
        ``key_per_vtpm`` providers, else the provider's shared key - for the
        local provider, rekeying under its own current key first makes a new
        current key; (3) wrap and read back; (4) one atomic rename of
        ``vtpm.json`` commits. The old KEK is kept: backups made before still
        need it.

        ``data``: also a new data key, and the state re-encrypted with it
        (see :meth:`_rekey_data`); a stopped vTPM only.
        """
        record = self.get(name)
        if data and self.pid(name) is not None:
            raise ConflictError(f"vTPM {name!r} is running; `vtpm stop {name}` first")
        data_key = self.data_key(record)
        pid = to or record.key.provider
        config = self.providers.config(pid)
        provider = self.providers.get(pid)
        if not config.key_per_vtpm:
            current = provider.current_key_id()
            if pid == record.key.provider and current == record.key.key_id:
                if isinstance(provider, LocalKeyProvider):
                    provider.new_key()
                elif not data:  # a new data key under the same shared KEK is a rekey too
                    raise ConfigError(
                        f"vTPM {name!r} is already wrapped under the shared key {current!r} "
                        f"of key provider {pid!r}; configure a new shared key for it first"
                    )
        self._hook("rekey:unwrapped")
        if data:
            return self._rekey_data(record, data_key, pid)
        key = self.wrap_new(record.vtpm_id, data_key, pid)
        self._hook("rekey:wrapped")
        atomic_write(self._dir(name) / RECORD_FILE, record.rekeyed(key).to_json())
        self._hook("rekey:committed")
        return self.get(name)

    def _rekey_data(self, record: VtpmRecord, old_key: bytes, pid: str) -> VtpmRecord:
        """A new data key wrapped under provider ``pid``, the state re-encrypted with it.

        Steps (crash points in brackets): (1) new data key, wrapped and read
        back [rekey-data:wrapped]; (2) in a staging directory, the state is
        re-encrypted by swtpm (vtpm_core.instance.reencrypt_state) and the
        new state opened with the new key; the new ``vtpm.json`` beside it,
        the tree fsynced [rekey-data:staged]; (3) one renameat2 exchange
        swaps the staged vTPM directory with the live one
        [rekey-data:committed]; (4) the old tree is overwritten and removed.
        Before (3) a crash leaves the old vTPM (its staging is cleared at the
        next open); after it, the new one. The old KEK is kept, so backups
        made before still restore with their own (old) data key.
        """
        name = record.name
        state = self.read_state(name)
        extra = sorted(set(state) - {STATE_FILE})
        if STATE_FILE not in state or extra:
            raise StateError(
                f"vTPM {name!r}: `rekey --data` carries only the permanent state "
                f"({STATE_FILE}); found {', '.join(extra) or 'no state file'}"
            )
        new_key = self._rng(DATA_KEY_SIZE)
        key = self.wrap_new(record.vtpm_id, new_key, pid)
        self._hook("rekey-data:wrapped")
        new_record = record.rekeyed(key)
        with self.staging() as stage:
            old_dir, new_dir = stage / "old-state", stage / "state"
            old_dir.mkdir()
            new_dir.mkdir()
            (old_dir / STATE_FILE).write_bytes(state[STATE_FILE])
            with self.socket_dir(stage / "run") as run:
                reencrypt_state(
                    old_dir,
                    old_key,
                    new_dir,
                    new_key,
                    run,
                    self.key_context(record),
                    migration_key=self._rng(DATA_KEY_SIZE),
                )
                preflight(new_dir, new_key, run, self.key_context(new_record))
            remove_tree(stage / "run")
            remove_tree(old_dir)
            for leftover in new_dir.iterdir():
                if leftover.name != STATE_FILE:
                    leftover.unlink()
            self._stage_record(stage, new_record)
            fsync_tree(stage)
            self._hook("rekey-data:staged")
            if self.pid(name) is not None:
                raise ConflictError(f"vTPM {name!r} was started during the rekey; nothing changed")
            try:
                exchange_dirs(stage, self._dir(name))
            except OSError as exc:
                raise StateError(
                    f"vTPM {name!r}: cannot swap in the re-encrypted state ({exc}); nothing changed"
                ) from None
            self._hook("rekey-data:committed")
            _shred(stage)  # the old tree: state under the old data key
        return self.get(name)

    # -- staging and publishing (used by create, restore, clone) -----------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory, removed unless it was published."""
        tmp = self.root / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        path = tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            remove_tree(path)

    def write_record(self, directory: Path, record: VtpmRecord) -> None:
        """Write vtpm.json atomically (in a staging directory publish() fsyncs it again)."""
        atomic_write(directory / RECORD_FILE, record.to_json())

    def _stage_record(self, directory: Path, record: VtpmRecord) -> None:
        # the staging directory is private until publish(), which fsyncs the tree
        fd = os.open(directory / RECORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(record.to_json())

    def publish(self, staging: Path, name: str, point: str) -> None:
        """fsync the staged vTPM and rename it into place (ConflictError if the name exists)."""
        fsync_tree(staging)
        self._hook(f"{point}:staged")
        try:
            publish_dir(staging, self._dir(name))
        except FileExistsError:
            raise ConflictError(f"a vTPM named {name!r} already exists in {self.root}") from None
        self._hook(f"{point}:published")

    def now(self) -> dt.datetime:
        return self._clock()

    def _require_free(self, name: str) -> None:
        if self._dir(name).exists():
            raise ConflictError(f"a vTPM named {name!r} already exists in {self.root}")

    # -- create --------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        issuer: EkCertificateIssuer | None,
        ek: Sequence[str] = DEFAULT_EKS,
        vm_id: uuid.UUID | None = None,
        origin: Origin = _CREATED,
        key_provider: str | None = None,
        prepare: Callable[[], object] = lambda: None,
    ) -> VtpmRecord:
        """A new vTPM: fresh encrypted state, EKs created, certified by ``issuer``, NV locked.

        ``issuer=None`` is the external-CA mode (issue 8): EKs are created but
        their certificate indices stay empty. ``key_provider`` is a provider
        id of this store (default: the store's default). Crash-safe: nothing
        appears under ``name`` until the vTPM is complete (a per-vTPM KEK made
        for a creation that then died stays in the provider, named by the
        vTPM id, unused).

        While the TPM generates the first EK, ``prepare`` runs (`vtpm create`
        opens the CA there: :class:`vtpm_core.issuer.DeferredIssuer`) and then
        the data key is wrapped. In that order, a CA that cannot be opened
        leaves no KEK in a key provider, and a provider that cannot wrap
        leaves no certificate issued.
        """
        check_name(name)
        if not ek:
            raise ConfigError("at least one EK kind is needed")
        self._require_free(name)
        self.providers.config(key_provider or self.providers.default)  # unknown id: before work
        vtpm_id = uuid.UUID(bytes=self._rng(16), version=4)
        vm_id = vm_id or uuid.UUID(bytes=self._rng(16), version=4)
        data_key = self._rng(DATA_KEY_SIZE)
        wrapped: list[KeyRef] = []

        def meanwhile() -> None:
            prepare()
            wrapped.append(self.wrap_new(vtpm_id, data_key, key_provider))

        with self.staging() as stage:
            state_dir = stage / "state"
            state_dir.mkdir()
            ctx = KeyContext(name, "(the new data key)")
            log = stage / "provision.log"
            with provisioning_tpm(state_dir, data_key, ctx, log_file=log) as tpm:
                info, eks = provision_eks(
                    tpm,
                    kinds=list(ek),
                    identity=VmIdentityRef(vm_id, name, vtpm_id),
                    issuer=issuer,
                    meanwhile=meanwhile,
                )
            log.unlink()
            (key,) = wrapped
            record = VtpmRecord(
                name=name,
                vtpm_id=vtpm_id,
                vm_id=vm_id,
                created_at=self._clock(),
                key=key,
                tpm=info,
                eks=eks,
                ek_cert_mode="ca" if issuer is not None else "external",
                origin=origin,
            )
            self._stage_record(stage, record)
            self.publish(stage, name, "create")
        return self.get(name)

    def create_many(
        self,
        names: Sequence[str],
        *,
        issuer: EkCertificateIssuer | None,
        ek: Sequence[str] = DEFAULT_EKS,
        jobs: int = 1,
        on_done: Callable[[VtpmRecord], None] | None = None,
        key_provider: str | None = None,
    ) -> builtins.list[VtpmRecord]:
        """``create`` for each name, ``jobs`` at a time (each in its own swtpm).

        The TPM work runs in the swtpm processes, so threads overlap it; calls
        to ``issuer`` are serialised (an issuer need not be thread-safe).
        Returns the records in the order of ``names``; the first failure is
        raised after the running creations finish (those stay created).
        """
        for n in names:
            check_name(n)
        if len(set(names)) != len(names):
            raise ConfigError("a name is given twice")
        if jobs <= 1:
            out = []
            for n in names:
                out.append(self.create(n, issuer=issuer, ek=ek, key_provider=key_provider))
                if on_done is not None:
                    on_done(out[-1])
            return out
        from concurrent.futures import ThreadPoolExecutor, as_completed

        locked = _LockedIssuer(issuer) if issuer is not None else None
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(self.create, n, issuer=locked, ek=ek, key_provider=key_provider): n
                for n in names
            }
            done: dict[str, VtpmRecord] = {}
            for fut in as_completed(futures):
                rec = fut.result()
                done[rec.name] = rec
                if on_done is not None:
                    on_done(rec)
        return [done[n] for n in names]

    @contextlib.contextmanager
    def socket_dir(self, preferred: Path) -> Iterator[Path]:
        """``preferred`` if a socket path there fits sun_path, else a short private temp dir."""
        if len(str(preferred / "swtpm.ctrl")) <= _SOCKET_PATH_MAX:
            yield preferred
            return
        short = Path(tempfile.mkdtemp(prefix="vtpm-"))
        try:
            yield short
        finally:
            shutil.rmtree(short, ignore_errors=True)

    # -- run -----------------------------------------------------------------------------

    def start(
        self,
        name: str,
        *,
        transport: Literal["tcp", "unix", "qemu"] = "tcp",
        socket_dir: Path | None = None,
    ) -> SwtpmProcess:
        """A started swtpm serving vTPM ``name``, the data key passed by fd. The caller stops it.

        ``socket_dir`` holds the unix sockets (unix/qemu) and the log; by
        default ``ROOT/run/<name>`` (or a short temp dir when that path is too
        long for a socket). Raises StateError naming the vTPM and key id when
        the key does not open the state, ConflictError when it is running.
        """
        record = self.get(name)
        data_key = self.data_key(record)
        sockets = socket_dir or self.run_dir(name)
        if len(str(sockets / "swtpm.ctrl")) > _SOCKET_PATH_MAX and transport != "tcp":
            sockets = Path(tempfile.mkdtemp(prefix="vtpm-"))
        sockets.mkdir(parents=True, exist_ok=True)
        return start_swtpm(
            self.state_dir(name),
            data_key,
            self.key_context(record),
            transport=transport,
            socket_dir=sockets,
        )

    @contextlib.contextmanager
    def running(
        self,
        name: str,
        *,
        transport: Literal["tcp", "unix", "qemu"] = "tcp",
        socket_dir: Path | None = None,
    ) -> Iterator[SwtpmProcess]:
        """``with store.running(name) as tpm:`` - start, yield, stop (by PID)."""
        tpm = self.start(name, transport=transport, socket_dir=socket_dir)
        try:
            yield tpm
        finally:
            tpm.stop()

    def start_detached(
        self, name: str, *, socket_path: Path | None = None, port: int | None = None
    ) -> DetachedSwtpm:
        """Start the vTPM as a daemon (``vtpm start``): QEMU control socket, or TCP ``port``."""
        record = self.get(name)
        data_key = self.data_key(record)
        if socket_path is None and port is None:
            socket_path = self.run_dir(name) / "swtpm.ctrl"
            if len(str(socket_path)) > _SOCKET_PATH_MAX:
                raise ConfigError(
                    f"socket path {socket_path} is too long for a unix socket; pass --socket"
                )
        return start_detached(
            self.state_dir(name),
            data_key,
            self.run_dir(name),
            self.key_context(record),
            socket_path=socket_path,
            port=port,
        )

    def stop(self, name: str) -> bool:
        """Stop the detached swtpm of ``name``; False when it was not running."""
        self.get(name)
        return stop_detached(self.run_dir(name), self.state_dir(name))

    # -- delete --------------------------------------------------------------------------

    def delete(
        self, name: str, *, issuer: EkCertificateIssuer | None, shred: bool = False
    ) -> DeleteResult:
        """Revoke the vTPM's EK certificates at the CA, then destroy its state and wrapped key.

        Serials another vTPM of this store still uses (a copy) are not revoked.
        With ``issuer=None`` nothing is revoked (the caller chose so).
        The order is revoke first: a crash in between leaves a vTPM with
        revoked certificates, never a destroyed vTPM with live ones.

        ``shred``: also destroy the KEK that wraps this vTPM's data key in its
        provider (KMIP: Revoke + Destroy; PKCS#11: C_DestroyObject; local:
        overwrite + unlink), so no backup of this vTPM can be restored. Only
        a key of this vTPM alone can be shredded: a shared key (the
        provider's current key, or one another vTPM of this store uses) is
        refused before anything happens. The KEK goes before the files: a
        crash in between leaves a vTPM that cannot start, which deleting
        again removes.
        """
        record = self.get(name)
        if self.pid(name) is not None:
            raise ConflictError(f"vTPM {name!r} is running; `vtpm stop {name}` first")
        others = [other for other in self.list() if other.name != name]
        doomed_keys: builtins.list[RetiredKey] = []
        kept_keys: builtins.list[RetiredKey] = []
        if shred:
            doomed_keys, kept_keys = self._check_shreddable(record, others)
        in_use = {s for other in others for s in other.serials}
        revoked: list[int] = []
        kept: list[int] = []
        for serial in record.serials:
            if serial in in_use:
                kept.append(serial)
                continue
            if issuer is not None:
                try:
                    issuer.revoke_ek_certificate(serial, REVOCATION_REASON)
                except ConflictError as exc:
                    if "already revoked" not in str(exc):
                        raise  # anything else stops the deletion: the vTPM stays
                revoked.append(serial)
        self._hook("delete:revoked")
        for key in doomed_keys:
            try:
                self.providers.get(key.provider).destroy_key(key.key_id)
            except (KeyProviderError, StateError) as exc:
                raise KeyProviderError(
                    f"vTPM {name!r}: key provider {key.provider!r} did not destroy key "
                    f"{key.key_id!r} ({exc}); the vTPM was not deleted"
                ) from None
            self._hook("delete:key-destroyed")
        shredded = record.key.key_id if shred else None
        tmp = self.root / "tmp"
        doomed = tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        os.rename(self._dir(name), doomed)
        fsync_dir(self.root / "vtpms")
        self._hook("delete:unlinked")
        _shred(doomed)
        remove_tree(self.run_dir(name))
        return DeleteResult(
            name, tuple(revoked), tuple(kept), shredded, tuple(doomed_keys), tuple(kept_keys)
        )

    def _check_shreddable(
        self, record: VtpmRecord, others: Sequence[VtpmRecord]
    ) -> tuple[builtins.list[RetiredKey], builtins.list[RetiredKey]]:
        """(keys to destroy, retired keys to keep) for ``delete --shred``; raises before anything.

        The current KEK must be this vTPM's alone (else ConflictError). A
        retired KEK is destroyed too unless another vTPM of the store uses it
        (now or as one of its own retired keys) or it is its provider's
        current shared key: then it is kept and reported. Every provider
        involved is reached first, so a provider that is down fails the
        command before the CA revocation.
        """
        key = record.key
        used = {k for o in others for k in o.all_keys()}
        current_of: dict[str, str | None] = {}
        for k in record.all_keys():
            if k.provider in current_of:
                continue
            try:
                provider = self.providers.get(k.provider)
                try:
                    current_of[k.provider] = provider.current_key_id()
                except ConfigError:
                    current_of[k.provider] = None
                provider.has_key(k.key_id)
            except (KeyProviderError, StateError) as exc:
                raise KeyProviderError(
                    f"vTPM {record.name!r}: key {k.key_id!r} of key provider {k.provider!r} "
                    f"cannot be shredded ({exc}); nothing was revoked or deleted"
                ) from None
        mine = RetiredKey(key.provider, key.key_id)
        sharing = [o.name for o in others if mine in o.all_keys()]
        if sharing or current_of[key.provider] == key.key_id:
            users = f"vTPMs {', '.join(sharing)}" if sharing else "new vTPMs"
            raise ConflictError(
                f"vTPM {record.name!r}: key {key.key_id!r} of key provider {key.provider!r} "
                f"is shared (also used by {users}); `vtpm rekey {record.name} --to PROVIDER` "
                "onto a provider with key_per_vtpm first, or delete without --shred"
            )
        doomed: builtins.list[RetiredKey] = []
        kept: builtins.list[RetiredKey] = []
        for k in record.all_keys():
            if k.provider not in self.providers.configs:
                kept.append(k)  # a provider since removed from store.json: not ours to reach
            elif k in used or current_of.get(k.provider) == k.key_id:
                kept.append(k)
            else:
                doomed.append(k)
        return doomed, kept

    # -- backup / restore / clone ----------------------------------------------------------

    def backup(self, name: str, out: Path) -> Path:
        """Write a backup of ``name`` to ``out`` (atomically). See vtpm_core.backup."""
        record = self.get(name)
        state = self.read_state(name)
        if STATE_FILE not in state:
            raise StateError(
                f"vTPM {name!r} has no state file ({self.state_dir(name) / STATE_FILE}); "
                "a backup without the state could not be restored"
            )
        data = Backup.build(
            record, state, self.data_key(record), provider=self._provider_note(record.key.provider)
        )
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._hook("backup:written")
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(out.parent)
        self._hook("backup:published")
        return out

    def _provider_note(self, pid: str) -> dict[str, str]:
        config = self.providers.config(pid)
        return {"id": pid, "kind": config.kind, "where": config.describe()}

    def restore(self, source: Path, *, name: str | None = None) -> VtpmRecord:
        """Restore a backup as ``name`` (default: its own name): same EK, NV and secrets.

        Steps: (1) framing + SHA-256; (2) the state must be there; (3) the key
        provider must hold the key id and unwrap the data key (bound to the
        vTPM id); (4) the MAC under that key; (5) swtpm must open the state
        with that key (no TPM2_Startup, no write); (6) publish atomically.
        """
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read backup {source}: {exc.strerror}") from None
        backup = Backup.parse(data)
        backup.require_state(str(source))
        record = backup.record.renamed(check_name(name or backup.record.name))
        self._require_free(record.name)
        key = record.key
        if key.provider not in self.providers.configs:
            named = backup.provider or {}
            seen = f" ({named['kind']}, {named['where']})" if "where" in named else ""
            raise KeyProviderError(
                f"backup {source} of vTPM {backup.record.name!r} needs key {key.key_id!r} of key "
                f"provider {key.provider!r}{seen}; this store has no such provider "
                f"(it has: {', '.join(sorted(self.providers.configs))}); nothing was written"
            )
        data_key = self.data_key(record)
        backup.verify_mac(data_key)
        with self.staging() as stage:
            state_dir = stage / "state"
            state_dir.mkdir()
            for fname, content in backup.state.items():
                (state_dir / fname).write_bytes(content)
            with self.socket_dir(stage / "run") as run:
                preflight(state_dir, data_key, run, self.key_context(record))
            remove_tree(stage / "run")
            self.write_record(stage, record)
            self.publish(stage, record.name, "restore")
        return self.get(record.name)

    def clone(
        self,
        source: str,
        new: str,
        *,
        mode: Literal["copy", "replace"],
        issuer: EkCertificateIssuer | None,
    ) -> VtpmRecord:
        """Clone ``source`` as ``new``; see vtpm_core.clone."""
        from vtpm_core.clone import clone

        return clone(self, source, new, mode=mode, issuer=issuer)

    # -- housekeeping ----------------------------------------------------------------------

    def _clear_dead_staging(self) -> None:
        """Remove staging dirs of processes that died (and stop swtpms they left behind)."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        for entry in tmp.iterdir():
            m = _STAGING.match(entry.name)
            if m is None or pid_exists(int(m.group(1))):
                continue
            _stop_swtpms_under(entry)
            remove_tree(entry)


class _LockedIssuer:
    """Serialises calls to an issuer shared by creation threads."""

    def __init__(self, inner: EkCertificateIssuer) -> None:
        import threading

        self._inner = inner
        self._lock = threading.Lock()

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        with self._lock:
            return self._inner.issue_ek_certificate(request)

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        with self._lock:
            self._inner.revoke_ek_certificate(serial, reason)


def _stop_swtpms_under(directory: Path) -> None:
    """Stop swtpm processes whose --tpmstate lies under ``directory`` (orphans of a crash)."""
    needle = f"dir={directory}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and os.path.basename(argv[0]) == b"swtpm"
            and any(a.startswith(needle) for a in argv)
        ):
            stop_pid(int(proc.name), _STOP_GRACE_S)


def _shred(directory: Path) -> None:
    """Overwrite the wrapped key and state files before unlinking (best effort on COW/SSD)."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
    remove_tree(directory)


def _read_store_json(root: Path) -> dict[str, object]:
    try:
        doc = json.loads((root / "store.json").read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a vTPM store (no store.json); run `vtpm init`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParseError("store.json", "(document)", 0, f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise ParseError("store.json", "format", 0, f"expected {STORE_FORMAT!r}")
    return doc


def _write_store_json(root: Path, configs: Mapping[str, ProviderConfig], default: str) -> None:
    doc = {
        "format": STORE_FORMAT,
        "key_providers": {pid: c.to_dict() for pid, c in configs.items()},
        "default_key_provider": default,
    }
    atomic_write(root / "store.json", (json.dumps(doc, indent=2) + "\n").encode())


def _ensure_shared_key(providers: Providers, pid: str) -> ProviderConfig:
    """Check a provider's shared key exists; a PKCS#11 one is created if missing.

    A KMIP shared key is the KMS's to create (its Unique Identifier is the
    server's choice): a missing one is an error naming it.
    """
    config = providers.config(pid)
    if config.key_per_vtpm or isinstance(config, LocalProviderConfig):
        return config
    provider = providers.get(pid)
    key_id = provider.current_key_id()
    if not provider.has_key(key_id):
        if config.kind != "pkcs11":
            raise KeyProviderError(
                f"key provider {pid!r}: {config.describe()} has no key {key_id!r}"
            )
        provider.create_key(key_id)
    return config
