"""Shared fixtures: real swtpm processes, tpm2-tools runs, database URLs.

Every TPM here is real: each fixture that hands out a TPM starts a real swtpm and
stops it (by PID) when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vtpm_core.swtpm import SwtpmProcess

# softhsm (a fresh SoftHSM2 token) and kmip (a PyKMIP server with mutual TLS)
pytest_plugins = ["tests._keyproviders"]

REPO = Path(__file__).resolve().parent.parent
# The corpus of real-world TPM data lives beside the repository (../shared).
CORPUS = Path(os.environ.get("VTPM_CORPUS", REPO.parent / "shared" / "corpus"))
POSTGRES_URL = os.environ.get(
    "VTPM_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass
class Tools:
    """Runs tpm2-tools against one swtpm."""

    tpm: SwtpmProcess
    cwd: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # without a resource manager swtpm keeps transient objects: flush them
        # after every tool so long tests do not run out of object slots
        result = subprocess.run(
            list(args),
            env=self.tpm.tool_env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        subprocess.run(
            ["tpm2_flushcontext", "-t"], env=self.tpm.tool_env, capture_output=True, timeout=30
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwtpmProcess]:
    """A fresh swtpm (TPM 2.0) on a free loopback port, stopped after the test."""
    with SwtpmProcess(tmp_path / "swtpm-state") as tpm:
        yield tpm


@pytest.fixture
def tools(swtpm: SwtpmProcess, tmp_path: Path) -> Tools:
    """tpm2-tools bound to the ``swtpm`` fixture, working in ``tmp_path``."""
    return Tools(swtpm, tmp_path)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """../shared/corpus: real event logs, quotes and EK certificates."""
    if not CORPUS.is_dir():
        pytest.fail(f"corpus not found at {CORPUS} (set VTPM_CORPUS)")
    return CORPUS


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the PostgreSQL test database; failing (not skipping) when it is down."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    finally:
        engine.dispose()
    return POSTGRES_URL
