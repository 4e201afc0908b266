"""The vTPM store: one directory per vTPM, metadata JSON beside swtpm's encrypted state.

Layout::

    ROOT/store.json              {"format": "vtpm-trust/store/1", "key_provider": {...}}
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
provider, with the vTPM id as associated data.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vtpm_core._atomic import atomic_write, fsync_dir, fsync_tree, publish_dir, remove_tree
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
    running_pid,
    start_detached,
    start_swtpm,
    stop_detached,
)
from vtpm_core.issuer import EkCertificateIssuer, EkCertificateRequest, IssuedEkCertificate
from vtpm_core.keyprovider import DATA_KEY_SIZE, KeyProvider, LocalKeyProvider, UnknownKeyError
from vtpm_core.provision import VmIdentityRef, provision_eks
from vtpm_core.record import (
    EK_KINDS,
    KeyRef,
    Origin,
    VtpmRecord,
    check_name,
)
from vtpm_core.swtpm import SwtpmProcess

__all__ = ["DEFAULT_EKS", "CrashHook", "DeleteResult", "StoreInfo", "VtpmStore"]

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


_CREATED = Origin("created")


def _no_hook(_point: str) -> None:
    return None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class StoreInfo:
    root: Path
    provider: str
    key_id: str


@dataclass(frozen=True, slots=True)
class DeleteResult:
    name: str
    revoked: tuple[int, ...]
    kept: tuple[int, ...]  # still used by another vTPM of this store (a copy)


class VtpmStore:
    """The vTPMs under one root directory. Open with :meth:`open`, create with :meth:`init`.

    ``clock`` and ``rng`` are injectable; ``crash_hook`` is called with a
    point name between the steps of a multi-step write (tests use it to kill
    the process there).
    """

    def __init__(
        self,
        root: Path,
        keys: KeyProvider,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[int], bytes] = os.urandom,
        crash_hook: CrashHook = _no_hook,
    ) -> None:
        self.root = Path(root)
        self.keys = keys
        self._clock = clock
        self._rng = rng
        self._hook = crash_hook

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[int], bytes] = os.urandom,
        crash_hook: CrashHook = _no_hook,
    ) -> VtpmStore:
        """Create a store with a local key provider and a fresh key-encryption key."""
        root = Path(root)
        if (root / "store.json").exists():
            raise ConflictError(f"{root} is already a vTPM store")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("vtpms", "run", "tmp"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        LocalKeyProvider.create(root / "keys", rng=rng)
        atomic_write(
            root / "store.json",
            (
                json.dumps(
                    {"format": STORE_FORMAT, "key_provider": {"kind": "local", "path": "keys"}},
                    indent=2,
                )
                + "\n"
            ).encode(),
        )
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
        try:
            doc = json.loads((root / "store.json").read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"{root} is not a vTPM store (no store.json); run `vtpm init`"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ParseError("store.json", "(document)", 0, f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
            raise ParseError("store.json", "format", 0, f"expected {STORE_FORMAT!r}")
        kp = doc.get("key_provider")
        if not isinstance(kp, dict) or kp.get("kind") != "local":
            raise ConfigError(f"{root}/store.json: unsupported key provider {kp!r}")
        keys = LocalKeyProvider(root / str(kp.get("path", "keys")), rng=rng)
        store = cls(root, keys, clock=clock, rng=rng, crash_hook=crash_hook)
        store._clear_dead_staging()
        return store

    def info(self) -> StoreInfo:
        return StoreInfo(self.root, self.keys.kind, self.keys.current_key_id())

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
        """Unwrap the vTPM's data key; StateError naming the vTPM and key id if it cannot."""
        key = record.key
        if key.provider != self.keys.kind:
            raise StateError(
                f"vTPM {record.name!r}: its data key is wrapped by a {key.provider!r} key "
                f"provider (key id {key.key_id!r}); this store has a {self.keys.kind!r} one"
            )
        try:
            return self.keys.unwrap(key.key_id, key.wrapped, str(record.vtpm_id).encode())
        except StateError as exc:
            kind = "missing" if isinstance(exc, UnknownKeyError) else "wrong"
            raise StateError(
                f"vTPM {record.name!r}: {kind} key {key.key_id!r} ({exc}); state untouched"
            ) from None

    def wrap_new(self, vtpm_id: uuid.UUID, data_key: bytes) -> KeyRef:
        key_id = self.keys.current_key_id()
        wrapped = self.keys.wrap(key_id, data_key, str(vtpm_id).encode())
        return KeyRef(self.keys.kind, key_id, wrapped)

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
    ) -> VtpmRecord:
        """A new vTPM: fresh encrypted state, EKs created, certified by ``issuer``, NV locked.

        ``issuer=None`` is the external-CA mode (issue 8): EKs are created but
        their certificate indices stay empty. Crash-safe: nothing appears
        under ``name`` until the vTPM is complete.
        """
        check_name(name)
        if not ek:
            raise ConfigError("at least one EK kind is needed")
        self._require_free(name)
        vtpm_id = uuid.UUID(bytes=self._rng(16), version=4)
        vm_id = vm_id or uuid.UUID(bytes=self._rng(16), version=4)
        data_key = self._rng(DATA_KEY_SIZE)
        key = self.wrap_new(vtpm_id, data_key)
        with self.staging() as stage:
            state_dir = stage / "state"
            state_dir.mkdir()
            ctx = KeyContext(name, key.key_id)
            log = stage / "provision.log"
            with provisioning_tpm(state_dir, data_key, ctx, log_file=log) as esapi:
                info, eks = provision_eks(
                    esapi,
                    kinds=list(ek),
                    identity=VmIdentityRef(vm_id, name, vtpm_id),
                    issuer=issuer,
                )
            log.unlink()
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
                out.append(self.create(n, issuer=issuer, ek=ek))
                if on_done is not None:
                    on_done(out[-1])
            return out
        from concurrent.futures import ThreadPoolExecutor, as_completed

        locked = _LockedIssuer(issuer) if issuer is not None else None
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(self.create, n, issuer=locked, ek=ek): n for n in names}
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

    def delete(self, name: str, *, issuer: EkCertificateIssuer | None) -> DeleteResult:
        """Revoke the vTPM's EK certificates at the CA, then destroy its state and wrapped key.

        Serials another vTPM of this store still uses (a copy) are not revoked.
        With ``issuer=None`` nothing is revoked (the caller chose so).
        The order is revoke first: a crash in between leaves a vTPM with
        revoked certificates, never a destroyed vTPM with live ones.
        """
        record = self.get(name)
        if self.pid(name) is not None:
            raise ConflictError(f"vTPM {name!r} is running; `vtpm stop {name}` first")
        in_use = {s for other in self.list() if other.name != name for s in other.serials}
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
        tmp = self.root / "tmp"
        doomed = tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        os.rename(self._dir(name), doomed)
        fsync_dir(self.root / "vtpms")
        self._hook("delete:unlinked")
        _shred(doomed)
        remove_tree(self.run_dir(name))
        return DeleteResult(name, tuple(revoked), tuple(kept))

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
        data = Backup.build(record, state, self.data_key(record))
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
