"""Crash-safe file system steps for the vTPM store.

POSIX rename(2) replaces a directory entry atomically; durability needs the
file's data and the directory entry on disk, hence fsync of the file before
the rename and of the parent directory after it. A reader (or a process that
restarts after SIGKILL or power loss) sees either the old or the new content,
never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

__all__ = [
    "atomic_write",
    "exchange_dirs",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "publish_dir",
    "remove_tree",
]


def fsync_dir(path: Path) -> None:
    """fsync a directory, making renames and creations inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (and ``root`` itself)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: write a temporary file beside it, fsync, rename, fsync dir.

    The temporary name is unique per call, so concurrent writers never share
    a half-written file; the last rename wins.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def publish_dir(staging: Path, target: Path) -> None:
    """Atomically move a fully written (and fsynced) directory to ``target``.

    Raises FileExistsError when ``target`` already exists; ``staging`` is left
    in place then, for the caller to remove.
    """
    # rename(2) onto an existing *empty* directory would succeed: refuse first.
    # Both live in one store, whose writers all go through here, so the
    # window between the check and the rename is only another publisher's.
    if target.exists():
        raise FileExistsError(str(target))
    try:
        os.rename(staging, target)
    except OSError as exc:
        if target.exists():
            raise FileExistsError(str(target)) from exc
        raise
    fsync_dir(target.parent)
    fsync_dir(staging.parent)


def remove_tree(path: Path) -> None:
    """Remove a directory tree, ignoring a tree that is already gone."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap two directory entries in one step: renameat2(2) with RENAME_EXCHANGE (Linux 3.15+).

    ``rename`` cannot replace a non-empty directory; the exchange can, and a
    crash leaves one of the two trees at each name, never neither. Both
    parents are fsynced after. Raises OSError (EINVAL: the file system does
    not support the exchange) without changing anything.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, os.strerror(err), str(b))
    fsync_dir(Path(a).parent)
    fsync_dir(Path(b).parent)
