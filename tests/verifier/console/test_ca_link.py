"""verifier.yaml ``ca_console_url``: checked at start-up, and the console links the CA's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from verifier.service.app import create_app
from verifier.service.config import CONFIG_FILE, init_home, load_config
from vtpm_core.errors import ConfigError


def _home(tmp_path: Path, url: object) -> tuple[Path, str]:
    home = tmp_path / "home"
    token = init_home(home)
    raw = yaml.safe_load((home / CONFIG_FILE).read_text())
    raw["ca_console_url"] = url
    (home / CONFIG_FILE).write_text(yaml.safe_dump(raw))
    return home, token


def test_the_console_links_the_ca_console(tmp_path: Path) -> None:
    home, token = _home(tmp_path, "https://ca.example/ca-console/")
    config = load_config(home)
    assert config.ca_console_url == "https://ca.example/ca-console"
    client = create_app(config, migrate=True).test_client()
    assert client.post("/console/login", data={"token": token}).status_code == 303
    page = client.get("/console/").get_data(as_text=True)
    assert '<a href="https://ca.example/ca-console/" id="nav-ca">CA</a>' in page


@pytest.mark.parametrize(
    "url",
    ["ftp://ca.example/", "ca.example/ca-console", "https://ca.example/?a=1", "javascript:x", 7],
    ids=lambda u: f"fail/ca_console_url/{u}",
)
def test_a_bad_ca_console_url_is_refused(tmp_path: Path, url: object) -> None:
    home, _ = _home(tmp_path, url)
    with pytest.raises(ConfigError, match="ca_console_url must be an http"):
        load_config(home)
