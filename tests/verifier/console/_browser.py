"""Debian's chromium, headless, driven through Debian's chromedriver (Selenium).

No browser or driver is downloaded: both paths are the Debian packages'
(``scripts/setup.sh`` installs ``chromium`` and ``chromium-driver``), and
Selenium Manager is never asked because both are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)


def start_chromium(profile: Path) -> webdriver.Chrome:
    """A headless chromium with its own profile directory and the network log on."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = ChromeService(executable_path=CHROMEDRIVER, log_output=str(profile / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    return driver


def response_headers(driver: webdriver.Chrome, url: str) -> dict[str, str]:
    """The headers chromium received with the last response for ``url`` (lower-case names),
    from the DevTools network events in the performance log."""
    found: dict[str, str] | None = None
    for entry in driver.get_log("performance"):
        message: dict[str, Any] = json.loads(entry["message"])["message"]
        if message.get("method") != "Network.responseReceived":
            continue
        response = message["params"]["response"]
        if response["url"] == url:
            found = {k.lower(): v for k, v in response["headers"].items()}
    assert found is not None, f"no response for {url} in the browser's network log"
    return found


def save_page(driver: webdriver.Chrome, path: Path) -> None:
    """A screenshot of the whole page (the window grown to the page's height, capped)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(WINDOW[0], min(max(height, WINDOW[1]), 2400))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(*WINDOW)


def save_view(driver: webdriver.Chrome, path: Path, top: Any, height: int = 1300) -> None:
    """A screenshot of ``height`` pixels of the page from the element ``top`` down."""
    driver.set_window_size(WINDOW[0], height)
    driver.execute_script("arguments[0].scrollIntoView()", top)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(*WINDOW)
