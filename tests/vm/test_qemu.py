"""QemuVm failure paths with a real QEMU: a VM that dies at once, a VM that hits its time limit."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import GuestImages
from vtpm_core.errors import ConfigError, TpmError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import QemuVm

pytestmark = pytest.mark.vm


@pytest.fixture
def qemu_tpm(tmp_path: Path) -> Iterator[SwtpmProcess]:
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-swtpm-"))
    try:
        with SwtpmProcess(tmp_path / "state", transport="qemu", socket_dir=sock_dir) as tpm:
            yield tpm
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_vm_that_cannot_start_is_reported_at_once(
    tmp_path: Path, guest_images: GuestImages, qemu_tpm: SwtpmProcess
) -> None:
    ctrl = qemu_tpm.endpoint.ctrl_path
    assert ctrl is not None
    os.unlink(ctrl)  # QEMU cannot reach the vTPM and exits
    start = time.monotonic()
    with QemuVm(tmp_path / "vm", esp=guest_images.esp(), tpm=qemu_tpm, timeout_s=60) as vm:
        with pytest.raises(TpmError, match=r"VM exited.*QEMU exited with status 1,"):
            vm.connect(boot_timeout=60)
        art = vm.stop()
    assert time.monotonic() - start < 15
    assert art.returncode not in (0, None) and not art.timed_out
    assert "swtpm.ctrl" in art.qemu_log.read_text()


def test_vm_is_stopped_at_its_time_limit(
    tmp_path: Path, guest_images: GuestImages, qemu_tpm: SwtpmProcess
) -> None:
    with QemuVm(tmp_path / "vm", esp=guest_images.esp(), tpm=qemu_tpm, timeout_s=3) as vm:
        with pytest.raises(TpmError, match=r"QEMU exited with status 124 \(its time limit\)"):
            vm.connect(boot_timeout=60)
        art = vm.stop()
    assert art.timed_out and art.returncode == 124
    assert not vm.is_running()


def test_stop_by_pid_ends_a_running_vm(
    tmp_path: Path, guest_images: GuestImages, qemu_tpm: SwtpmProcess
) -> None:
    vm = QemuVm(tmp_path / "vm", esp=guest_images.esp(), tpm=qemu_tpm, timeout_s=120)
    vm.start()
    pid = vm.pid
    assert pid is not None and vm.is_running()
    time.sleep(1.0)
    art = vm.stop()
    assert art.returncode is None  # it had to be stopped
    assert not vm.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert vm.stop() is art  # idempotent


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout_s": 0}, {"memory_mib": 64}, {"smp": 0}],
    ids=["fail/timeout", "fail/memory", "fail/smp"],
)
def test_bad_vm_settings(
    tmp_path: Path, guest_images: GuestImages, qemu_tpm: SwtpmProcess, kwargs: dict[str, int]
) -> None:
    with pytest.raises(ConfigError, match="VM needs"):
        QemuVm(tmp_path / "vm", esp=guest_images.esp(), tpm=qemu_tpm, **kwargs)  # type: ignore[arg-type]
