"""The webhook admin API (issue 16) in-process: admin only, bad input named, deliveries
listed by state, redeliver, the outbox gauge on /metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from tests.verifier.service.test_webhooks_outbox import _attester
from verifier.service import create_app, init_home, load_config
from verifier.service.config import add_reader_token
from verifier.service.db import Database
from verifier.service.services import utc_now
from verifier.service.transitions import NewTransition, record
from vtpm_cli.main import cli


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Flask, str, str]]:
    home = tmp_path / "home"
    admin = init_home(home, verifier_id="t")
    reader = add_reader_token(home)
    cfg = home / "verifier.yaml"
    cfg.write_text(cfg.read_text() + "webhook_poll_ms: 600000\n")  # no deliveries here
    app = create_app(load_config(home), migrate=True)
    try:
        yield app, admin, reader
    finally:
        ext = app.extensions["vtpm_verifier"]
        for worker in ("sweeper", "deliverer"):
            ext[worker].stop()
        ext["db"].dispose()


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _call(c: FlaskClient, method: str, path: str, token: str, **kw: Any) -> Any:
    return c.open(path, method=method, headers=_h(token), **kw)


def test_subscriptions_and_deliveries(app: tuple[Flask, str, str]) -> None:
    flask_app, admin, _reader = app
    c = flask_app.test_client()
    r = _call(c, "POST", "/v1/webhooks", admin, json={"url": "http://127.0.0.1:9/h"})
    assert r.status_code == 201, r.get_data(as_text=True)
    sub = r.get_json()
    assert sub["events"] == ["*"] and len(sub["secret"]) >= 32 and sub["enabled"] is True

    listed = _call(c, "GET", "/v1/webhooks", admin).get_json()["webhooks"]
    assert [w["id"] for w in listed] == [sub["id"]] and "secret" not in listed[0]
    assert listed[0]["undelivered"] == 0

    # a transition recorded by the service's one writer queues a delivery
    db: Database = flask_app.extensions["vtpm_verifier"]["db"]
    _attester(db, "a1")
    with db.raw() as conn, conn.write():
        record(conn, [NewTransition("a1", "trusted", "failed", utc_now(), {"verdict": "x"})])
    [d] = _call(c, "GET", "/v1/webhook-deliveries?state=pending", admin).get_json()["deliveries"]
    assert (d["subscription_id"], d["attempts"], d["transition"]["to_state"]) == (
        sub["id"],
        0,
        "failed",
    )
    assert _call(c, "GET", "/v1/webhook-deliveries?state=dead", admin).get_json() == {
        "deliveries": []
    }
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'vtpm_verifier_webhook_outbox{state="pending"} 1' in metrics
    assert 'vtpm_verifier_webhook_outbox{state="dead"} 0' in metrics

    r = _call(c, "POST", f"/v1/webhook-deliveries/{d['id']}/redeliver", admin)
    assert r.status_code == 200 and r.get_json()["state"] == "pending"
    r = _call(c, "DELETE", f"/v1/webhooks/{sub['id']}", admin)
    assert r.status_code == 200 and (r.get_json()["queued"], r.get_json()["discarded"]) == (1, 0)
    # what it was owed is still listed (and delivered: test_webhooks_deletion.py)
    [left] = _call(c, "GET", "/v1/webhook-deliveries", admin).get_json()["deliveries"]
    assert (left["id"], left["state"]) == (d["id"], "pending")
    assert _call(c, "GET", "/v1/webhooks", admin).get_json() == {"webhooks": []}
    assert _call(c, "DELETE", f"/v1/webhooks/{sub['id']}", admin).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        pytest.param("POST", "/v1/webhooks", {"url": "gopher://x"}, 400, "http", id="fail/url"),
        pytest.param(
            "POST",
            "/v1/webhooks",
            {"url": "http://x", "events": ["trusted->nowhere"]},
            400,
            "events[0]",
            id="fail/events",
        ),
        pytest.param(
            "GET", "/v1/webhook-deliveries?state=lost", None, 400, "state", id="fail/state"
        ),
        pytest.param(
            "POST", "/v1/webhook-deliveries/999/redeliver", None, 404, "999", id="fail/unknown"
        ),
    ],
)
def test_bad_requests_are_named(
    app: tuple[Flask, str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    detail: str,
) -> None:
    flask_app, admin, _reader = app
    r = _call(flask_app.test_client(), method, path, admin, json=body)
    assert r.status_code == status, r.get_data(as_text=True)
    assert detail in r.get_json()["detail"]


def test_only_the_admin_sees_webhooks(app: tuple[Flask, str, str]) -> None:
    flask_app, _admin, reader = app
    c = flask_app.test_client()
    assert _call(c, "GET", "/v1/webhooks", reader).status_code == 403
    assert _call(c, "GET", "/v1/webhook-deliveries", reader).status_code == 403
    assert c.get("/v1/webhooks").status_code == 401


def test_the_cli_drives_the_api(app: tuple[Flask, str, str], tmp_path: Path) -> None:
    flask_app, admin, _reader = app
    server = make_server("127.0.0.1", 0, flask_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        token = tmp_path / "admin.token"
        token.write_text(admin + "\n")
        secret = tmp_path / "secret"
        secret.write_text("0123456789abcdef-secret\n")
        run = CliRunner().invoke
        base = ["--verifier", url, "--token-file", str(token)]
        r = run(
            cli,
            [
                "webhooks",
                "add",
                *base,
                "--url",
                "http://127.0.0.1:9/h",
                "--event",
                "failed",
                "--event",
                "trusted->stale",
                "--secret-file",
                str(secret),
            ],
        )
        assert r.exit_code == 0, r.output
        sub = json.loads(r.output)
        assert sub["events"] == ["failed", "trusted->stale"]
        assert sub["secret"] == "0123456789abcdef-secret"
        r = run(cli, ["webhooks", "list", *base])
        assert r.exit_code == 0 and sub["id"] in r.output and "undelivered=0" in r.output

        db: Database = flask_app.extensions["vtpm_verifier"]["db"]
        _attester(db, "a1")
        with db.raw() as conn, conn.write():
            record(conn, [NewTransition("a1", "trusted", "failed", utc_now(), {})])
        r = run(cli, ["webhooks", "deliveries", *base, "--state", "pending"])
        assert r.exit_code == 0 and "a1 trusted->failed" in r.output, r.output
        delivery = r.output.split()[0]
        r = run(cli, ["webhooks", "redeliver", *base, delivery])
        assert r.exit_code == 0 and json.loads(r.output)["state"] == "pending"
        r = run(cli, ["webhooks", "remove", *base, sub["id"], "--discard"])
        assert r.exit_code == 0, r.output
        assert "0 queued deliveries still go out, 1 discarded (dead)" in r.output
        r = run(cli, ["webhooks", "remove", *base, sub["id"]])
        assert r.exit_code == 1 and "404" in r.output and "does not exist" in r.output
        r = run(cli, ["webhooks", "list", "--verifier", url], env={"VTPM_VERIFIER_TOKEN": ""})
        assert r.exit_code == 2 and "admin token is needed" in r.output
    finally:
        server.shutdown()
        server.server_close()
