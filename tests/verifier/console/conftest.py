"""Fixtures for the console's browser tests: one verifier (gunicorn, SQLite) with the same
two swtpm attestations as tests/verifier/service/test_console.py, and one headless
chromium per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver

from tests.verifier.console._browser import start_chromium
from tests.verifier.service.conftest import (  # noqa: F401 (fixtures)
    EkCa,
    Server,
    Service,
    ek_ca,
    make_home,
    provision_tpm,
    tpm_factory,
)
from tests.verifier.service.test_console import fleet  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa) -> Iterator[Service]:  # noqa: F811
    """The verifier on SQLite only: the pages' SQL is the JSON routes', tested on both
    backends in tests/verifier/service/test_console.py."""
    home = tmp_path_factory.mktemp("home-console")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, nonce_lifetime_s=3)
    server = Server(home, None).start()
    try:
        yield Service("sqlite", home, None, admin, reader, server, ek_ca)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots() -> Path | None:
    """Where to save the pages' screenshots: docs/img when VTPM_CONSOLE_SCREENSHOTS=1."""
    import os

    if os.environ.get("VTPM_CONSOLE_SCREENSHOTS") != "1":
        return None
    return Path(__file__).resolve().parents[3] / "docs" / "img"
