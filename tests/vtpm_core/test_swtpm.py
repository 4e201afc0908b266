"""The swtpm harness starts real TPMs, answers over both transports, and cleans up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Tools
from vtpm_core.errors import TpmError
from vtpm_core.swtpm import SwtpmProcess


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_esapi_talks_to_real_swtpm(tmp_path: Path, transport: str) -> None:
    with SwtpmProcess(tmp_path / "st", transport=transport) as tpm:  # type: ignore[arg-type]
        esapi = tpm.esapi()
        a, b = bytes(esapi.get_random(16)), bytes(esapi.get_random(16))
        assert len(a) == 16 and a != b
        pid = tpm.pid
        assert pid is not None
    assert not _alive(pid)


def test_process_is_stopped_when_body_raises(tmp_path: Path) -> None:
    tpm = SwtpmProcess(tmp_path / "st")
    with pytest.raises(RuntimeError, match="boom"), tpm:
        pid = tpm.pid
        raise RuntimeError("boom")
    assert pid is not None and not _alive(pid)


def test_tpm2_tools_reach_the_fixture(tools: Tools) -> None:
    out = tools.run("tpm2_getrandom", "--hex", "8").stdout
    assert len(bytes.fromhex(out.strip())) == 8


def test_state_persists_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with SwtpmProcess(state) as tpm:
        tpm.esapi()  # first start creates the state file
    assert (state / "tpm2-00.permall").exists()


def test_bad_extra_argument_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TpmError, match=r"swtpm (exited|did not)"):
        SwtpmProcess(tmp_path / "st", extra_args=["--no-such-option"]).start()


def test_unix_endpoint_has_no_tcti_string(tmp_path: Path) -> None:
    with (
        SwtpmProcess(tmp_path / "st", transport="unix") as tpm,
        pytest.raises(TpmError, match="TCP"),
    ):
        _ = tpm.endpoint.tcti
