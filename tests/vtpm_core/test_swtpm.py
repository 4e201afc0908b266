"""The swtpm harness starts real TPMs, answers over both transports, and cleans up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Tools
from vtpm_core._process import pid_running
from vtpm_core.errors import TpmError
from vtpm_core.swtpm import SwtpmProcess


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_esapi_talks_to_real_swtpm(tmp_path: Path, transport: str) -> None:
    with SwtpmProcess(tmp_path / "st", transport=transport) as tpm:  # type: ignore[arg-type]
        esapi = tpm.esapi()
        a, b = bytes(esapi.get_random(16)), bytes(esapi.get_random(16))
        assert len(a) == 16 and a != b
        pid = tpm.pid
        assert pid is not None
    assert not pid_running(pid)


def test_process_is_stopped_when_body_raises(tmp_path: Path) -> None:
    tpm = SwtpmProcess(tmp_path / "st")
    with pytest.raises(RuntimeError, match="boom"), tpm:
        pid = tpm.pid
        raise RuntimeError("boom")
    assert pid is not None and not pid_running(pid)


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
