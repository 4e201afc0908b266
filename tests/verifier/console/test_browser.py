"""The console in a real browser: headless chromium (Debian's) through chromedriver.

An operator logs in, opens the fleet, clicks the failed attester, its timeline and the
failing event, and reads the verdict, the rule and its expected and actual values off
the screen. A hostile VM's ``<script>`` in a boot variable name and a kernel command line
shows as text and never runs; the page's Content-Security-Policy reaches the browser and
is enforced there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.verifier.console._browser import response_headers, save_page, save_view
from tests.verifier.service.conftest import Service
from tests.verifier.service.test_console import HOSTILE, HOSTILE_VAR

pytestmark = [pytest.mark.swtpm, pytest.mark.browser]


def _no_alert(driver: webdriver.Chrome) -> None:
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return
    raise AssertionError(f"a script ran in the console: alert({text!r})")


def _arrive(driver: webdriver.Chrome, url: str) -> None:
    """Wait until the browser shows ``url``, loaded (a click returns before navigating)."""
    WebDriverWait(driver, 10).until(
        lambda d: (
            d.current_url == url and d.execute_script("return document.readyState") == "complete"
        )
    )


def _login(driver: webdriver.Chrome, service: Service) -> None:
    driver.delete_all_cookies()
    driver.get(f"{service.url}/console/")  # no session: the login page
    assert driver.current_url == f"{service.url}/console/login"
    assert driver.find_element(By.TAG_NAME, "h1").text == "Log in"
    driver.find_element(By.ID, "token").send_keys(service.reader)
    driver.find_element(By.ID, "login").click()
    _arrive(driver, f"{service.url}/console/")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Fleet"


def test_operator_clicks_from_the_fleet_to_the_failing_event(
    browser: webdriver.Chrome,
    service: Service,
    fleet: dict[str, Any],
    screenshots: Path | None,
) -> None:
    _login(browser, service)
    bad_id = fleet["bad"]["state"].attester_id
    # 1. the fleet: both VMs with their verdicts, counts by state
    assert browser.find_element(By.ID, "count-failed").text == "1"
    assert browser.find_element(By.ID, "count-trusted").text == "1"
    search = browser.find_element(By.ID, "q")
    search.send_keys("vm-console-")
    browser.find_element(By.ID, "search").click()
    WebDriverWait(browser, 10).until(lambda d: "q=vm-console-" in d.current_url)
    _arrive(browser, browser.current_url)
    rows = {
        r.find_element(By.XPATH, "td[1]").text: r.text
        for r in browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    }
    assert set(rows) == {"vm-console-bad", "vm-console-good"}
    assert "contraindicated" in rows["vm-console-bad"] and "failed" in rows["vm-console-bad"]
    assert "affirming" in rows["vm-console-good"] and "trusted" in rows["vm-console-good"]
    if screenshots:
        save_page(browser, screenshots / "console-fleet.png")
    # 2. the failed attester: verdict and the failing rule, expected vs actual
    bad_row = browser.find_element(By.XPATH, "//tbody/tr[td[1]='vm-console-bad']")
    bad_row.find_element(By.CSS_SELECTOR, "a.attester").click()
    _arrive(browser, f"{service.url}/console/attesters/{bad_id}")
    assert browser.find_element(By.CSS_SELECTOR, "#verdict strong").text == "contraindicated"
    assert browser.find_element(By.ID, "state").text.startswith("failed")
    failure = browser.find_element(By.CSS_SELECTOR, "#failures tr.failure")
    cells = [td.text for td in failure.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "kernel_cmdline" and "EV_IPL" in cells[1]
    assert "root=/dev/vda ro" in cells[2] and HOSTILE in cells[3]
    event_link = failure.find_element(By.CSS_SELECTOR, "a.event-link").get_attribute("href")
    if screenshots:
        save_page(browser, screenshots / "console-attester.png")
    # 3. its timeline: the verdict, phases, the forged event shown untrusted
    browser.find_element(By.ID, "timeline-link").click()
    _arrive(browser, f"{service.url}/console/attesters/{bad_id}/timeline")
    assert "contraindicated" in browser.find_element(By.ID, "verdict").text
    phases = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav.phases a")]
    assert len(phases) == 4
    (forged,) = browser.find_elements(By.CSS_SELECTOR, "tr.trust-row-forged")
    assert "UNTRUSTED: the data does not match its digest" in forged.text
    assert not forged.find_elements(By.CSS_SELECTOR, ".decoded")
    # 4. the failing event: click its number; the page lands on it, rule beside it
    (failed,) = browser.find_elements(By.CSS_SELECTOR, "tr.event.failed")
    index = failed.get_attribute("id")
    assert index is not None and f"{service.url}/console/attesters/{bad_id}/timeline#{index}" == (
        event_link
    )
    failed.find_element(By.CSS_SELECTOR, "td a").click()
    _arrive(browser, event_link)
    top = browser.execute_script("return arguments[0].getBoundingClientRect().top", failed)
    assert 0 <= top < browser.execute_script("return window.innerHeight")
    assert failed.find_element(By.CSS_SELECTOR, "td.mono").text == "EV_IPL"
    assert failed.find_element(By.CSS_SELECTOR, ".rule").text == "kernel_cmdline"
    assert failed.find_element(By.CSS_SELECTOR, ".expected").text == "'root=/dev/vda ro'"
    assert failed.find_element(By.CSS_SELECTOR, ".actual").text == repr(HOSTILE)
    if screenshots:  # the forged event and, below it, the failing one
        save_view(browser, screenshots / "console-timeline.png", forged)
    # the attester page's link to the event lands on the same row
    browser.back()
    browser.back()
    _arrive(browser, f"{service.url}/console/attesters/{bad_id}")
    browser.find_element(By.CSS_SELECTOR, "a.event-link").click()
    _arrive(browser, event_link)
    assert browser.find_element(By.ID, index).find_element(By.CSS_SELECTOR, ".rule").text == (
        "kernel_cmdline"
    )
    _no_alert(browser)


def test_hostile_strings_are_inert_and_the_csp_is_enforced(
    browser: webdriver.Chrome, service: Service, fleet: dict[str, Any]
) -> None:
    _login(browser, service)
    bad_id = fleet["bad"]["state"].attester_id
    for path in (f"/console/attesters/{bad_id}", f"/console/attesters/{bad_id}/timeline"):
        url = f"{service.url}{path}"
        browser.get(url)
        _no_alert(browser)
        # the markup is on screen as text, and the DOM holds no script element
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "<script>alert(1)</script>" in body
        assert browser.execute_script("return document.scripts.length") == 0
        assert browser.execute_script("return document.querySelectorAll('script').length") == 0
        # the headers chromium received
        headers = response_headers(browser, url)
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp  # no script source at all: default-src 'none' rules
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        # and enforced: an inline script added to this page is refused by the browser
        ran = browser.execute_script(
            "window.__ran = false;"
            "const s = document.createElement('script');"
            "s.textContent = 'window.__ran = true';"
            "document.body.appendChild(s);"
            "return window.__ran;"
        )
        assert ran is False
    # the boot variable's name, escaped: shown as its characters on the timeline
    assert HOSTILE_VAR in browser.find_element(By.TAG_NAME, "body").text
    violations = [
        e["message"]
        for e in browser.get_log("browser")
        if "Content Security Policy" in e["message"]
    ]
    assert violations, "the refused inline script left no CSP report in the console log"
    _no_alert(browser)


def test_login_origin_check_follows_fetch_metadata(service: Service) -> None:
    """Chromium's same-origin form post carries ``Origin: null`` under no-referrer (the
    browser test above logs in through it); a cross-site one is refused by Sec-Fetch-Site."""
    url = f"{service.url}/console/login"
    form = {"token": service.reader}
    for headers, status in (
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, 303),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "same-site", "Origin": service.url}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": service.url}, 303),
    ):
        r = requests.post(url, data=form, headers=headers, allow_redirects=False, timeout=30)
        assert r.status_code == status, headers


def test_policies_list_detail_users_and_diff(
    browser: webdriver.Chrome, service: Service, fleet: dict[str, Any]
) -> None:
    _login(browser, service)
    bad_id = fleet["bad"]["state"].attester_id
    browser.find_element(By.ID, "nav-policies").click()
    _arrive(browser, f"{service.url}/console/policies")
    rows = {
        r.find_element(By.CSS_SELECTOR, "a.policy").text: r.find_element(By.CSS_SELECTOR, ".users")
        for r in browser.find_elements(By.CSS_SELECTOR, "#policies tbody tr")
    }
    assert set(rows) == {"c-bad", "c-good"} and {r.text for r in rows.values()} == {"1"}
    browser.find_element(By.LINK_TEXT, "c-bad").click()
    _arrive(browser, f"{service.url}/console/policies/c-bad")
    text = browser.find_element(By.ID, "policy-text").text
    assert "root=/dev/vda ro" in text and "<script>" not in text  # the policy the VM failed
    (user,) = browser.find_elements(By.CSS_SELECTOR, "#users tbody tr")
    assert user.find_element(By.CSS_SELECTOR, "a.attester").text == bad_id
    assert "vm-console-bad" in user.text and "failed" in user.text
    browser.find_element(By.ID, "diff").click()  # against the one other policy, c-good
    _arrive(browser, f"{service.url}/console/policies-diff?a=c-bad&b=c-good")
    added = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".diff-add")]
    removed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".diff-del")]
    assert any("c-good" in t for t in added) and any("c-bad" in t for t in removed)
    # the JSON twins, by reader token
    h = service.headers(service.reader)
    listed = requests.get(f"{service.url}/console/api/policies", headers=h, timeout=30).json()
    assert {(p["name"], p["attesters"]) for p in listed["policies"]} == {
        ("c-bad", 1),
        ("c-good", 1),
    }
    one = requests.get(f"{service.url}/console/api/policies/c-bad", headers=h, timeout=30).json()
    assert one["attesters"] == [{"id": bad_id, "vm_id": "vm-console-bad", "state": "failed"}]
    assert (
        one["attesters_total"] == 1 and one["version"] == 1 and "root=/dev/vda ro" in one["policy"]
    )
    diff = requests.get(
        f"{service.url}/console/api/policies-diff",
        params={"a": "c-bad", "b": "c-good"},
        headers=h,
        timeout=30,
    ).json()
    assert diff["identical"] is False and diff["a"]["name"] == "c-bad"
    assert {"+", "-", "@"} <= {line["op"] for line in diff["lines"]}
    same = requests.get(
        f"{service.url}/console/api/policies-diff",
        params={"a": "c-bad", "b": "c-bad"},
        headers=h,
        timeout=30,
    ).json()
    assert same["identical"] is True and same["lines"] == []
    for params, status in (({"a": "c-bad"}, 400), ({"a": "c-bad", "b": "nope"}, 404)):
        r = requests.get(
            f"{service.url}/console/api/policies-diff", params=params, headers=h, timeout=30
        )
        assert r.status_code == status, (params, r.text)
    assert requests.get(f"{service.url}/console/api/policies", timeout=30).status_code == 401
    r = requests.get(f"{service.url}/console/policies", allow_redirects=False, timeout=30)
    assert r.status_code == 303
