"""Crash safety: SIGKILL `vtpm create/backup/clone/restore/delete` mid-way: old or new, never lost.

Two ways to hit the middle: ``VTPM_CRASH_AT=<point>`` pauses the command at a
named point between two steps of a multi-step write (then the test kills it),
and kills at random moments of a `vtpm create`. After each kill the store
must open, list, and hold either no vTPM of that name or a complete one that
starts and serves its EK certificates; the source of a clone and an older
backup file are untouched.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli._vtpm_env import VtpmEnv
from vtpm_core.backup import Backup
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).parent / "vtpm")


@pytest.fixture
def env(tmp_path: Path) -> VtpmEnv:
    return VtpmEnv.make(tmp_path)


def _spawn(env: VtpmEnv, args: list[str], crash_at: str | None) -> subprocess.Popen[bytes]:
    e = dict(os.environ, VTPM_STORE=str(env.store))
    e.pop("VTPM_CRASH_AT", None)
    if crash_at:
        e["VTPM_CRASH_AT"] = crash_at
    return subprocess.Popen([VTPM, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_until_paused(env: VtpmEnv, args: list[str], point: str) -> None:
    proc = _spawn(env, args, point)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert line.strip() == f"paused at {point}", line + proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def _complete(store: VtpmStore, name: str) -> None:
    """The vTPM starts with its key and serves exactly the recorded EK certificates."""
    from vtpm_core.provision import read_nv

    rec = store.get(name)
    with store.running(name) as tpm:
        esapi = tpm.esapi()
        for ek in rec.eks:
            assert read_nv(esapi, ek.nv_index) == ek.certificate_der


def _no_leftovers(store: VtpmStore) -> None:
    assert not list((store.root / "tmp").iterdir())
    needle = str(store.root).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert not (cmd.startswith(b"swtpm") and needle in cmd), cmd


@pytest.mark.parametrize(
    ("point", "exists_after"),
    [
        pytest.param("create:staged", False, id="create/before-rename"),
        pytest.param("create:published", True, id="create/after-rename"),
    ],
)
def test_create_killed(env: VtpmEnv, point: str, exists_after: bool) -> None:
    _run_until_paused(env, ["create", "vm1", *env.ca_args], point)
    store = VtpmStore.open(env.store)  # clears the dead process's staging
    assert store.exists("vm1") is exists_after
    if exists_after:
        _complete(store, "vm1")
    _no_leftovers(store)


def test_clone_backup_restore_delete_killed(env: VtpmEnv, tmp_path: Path) -> None:
    assert env.run("create", "src", "--ek", "ecc-p256", ca=True).exit_code == 0
    store = VtpmStore.open(env.store)
    src_state = hashlib.sha256((store.state_dir("src") / "tpm2-00.permall").read_bytes()).digest()

    for point, exists in (("clone:staged", False), ("clone:published", True)):
        _run_until_paused(env, ["clone", "src", "cp", "--mode", "copy", *env.ca_args], point)
        store = VtpmStore.open(env.store)
        assert store.exists("cp") is exists
        if exists:
            _complete(store, "cp")
            store.delete("cp", issuer=None)
        _no_leftovers(store)
    _run_until_paused(
        env, ["clone", "src", "rp", "--mode", "replace", *env.ca_args], "create:staged"
    )
    assert not VtpmStore.open(env.store).exists("rp")

    # backup: an older backup file stays intact until the new one is complete
    bak = tmp_path / "src.bak"
    assert env.run("backup", "src", "-o", str(bak)).exit_code == 0
    old = bak.read_bytes()
    _run_until_paused(env, ["backup", "src", "-o", str(bak)], "backup:written")
    assert bak.read_bytes() == old
    Backup.parse(bak.read_bytes())
    _run_until_paused(env, ["backup", "src", "-o", str(bak)], "backup:published")
    Backup.parse(bak.read_bytes()).require_state(str(bak))

    # restore under a new name
    for point, exists in (("restore:staged", False), ("restore:published", True)):
        _run_until_paused(env, ["restore", str(bak), "--name", "back"], point)
        store = VtpmStore.open(env.store)
        assert store.exists("back") is exists
        if exists:
            _complete(store, "back")
        _no_leftovers(store)

    # delete: killed after revocation, before the unlink -> still there, complete
    _run_until_paused(env, ["delete", "back", "--keep-certs"], "delete:revoked")
    store = VtpmStore.open(env.store)
    _complete(store, "back")
    _run_until_paused(env, ["delete", "back", "--keep-certs"], "delete:unlinked")
    store = VtpmStore.open(env.store)
    assert not store.exists("back")
    _no_leftovers(store)

    # the source never changed (checked before starting it: a TPM2_Startup writes NV)
    now = hashlib.sha256((store.state_dir("src") / "tpm2-00.permall").read_bytes()).digest()
    assert now == src_state
    _complete(store, "src")


def test_create_killed_at_random_moments(env: VtpmEnv) -> None:
    rng = random.Random(4)  # pinned: the same moments each run
    assert env.run("create", "warm", ca=True).exit_code == 0
    t0 = time.monotonic()
    proc = _spawn(env, ["create", "timed", *env.ca_args], None)
    proc.communicate(timeout=60)
    full = time.monotonic() - t0
    outcomes = []
    for i in range(8):
        proc = _spawn(env, ["create", f"r{i}", *env.ca_args], None)
        # most of a CLI run is start-up (imports); aim at its last part, where the work is
        time.sleep(rng.uniform(0.6, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        store = VtpmStore.open(env.store)
        outcomes.append(store.exists(f"r{i}"))
        if outcomes[-1]:
            _complete(store, f"r{i}")
        _no_leftovers(store)
    print("vTPM present after kill:", outcomes)
    assert "warm" in VtpmStore.open(env.store).names()
