"""Fixtures for the vTPM store tests: a fresh store and a small real issuer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtpm_core._issuer import SmallIssuer
from vtpm_core.store import VtpmStore


@pytest.fixture
def issuer() -> SmallIssuer:
    return SmallIssuer()


@pytest.fixture
def store(tmp_path: Path) -> VtpmStore:
    return VtpmStore.init(tmp_path / "store")
