"""`vtpm webhooks add|list|remove|deliveries|redeliver`: the verifier's webhook admin API
(issue 16; docs/continuous.md "Webhooks"). Every subcommand needs the admin token:
``--token-file`` (e.g. the verifier home's ``admin.token``) or ``$VTPM_VERIFIER_TOKEN``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vtpm_core.errors import ConfigError, VtpmTrustError

F = TypeVar("F", bound=Callable[..., Any])


class WebhookApiError(VtpmTrustError):
    """The verifier could not be reached, or answered with a problem."""


def _token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc}") from None
    else:
        token = os.environ.get("VTPM_VERIFIER_TOKEN", "")
    if not token:
        raise ConfigError("the admin token is needed: --token-file FILE or $VTPM_VERIFIER_TOKEN")
    return token


def _call(verifier: str, token_file: Path | None, method: str, path: str, body: Any = None) -> Any:
    import requests

    url = verifier.rstrip("/") + path
    try:
        resp = requests.request(
            method,
            url,
            headers={"Authorization": f"Bearer {_token(token_file)}"},
            json=body,
            timeout=30,
        )
    except requests.RequestException as exc:
        raise WebhookApiError(f"cannot reach the verifier at {verifier}: {exc}") from None
    if resp.status_code == 204:
        return None
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if resp.status_code >= 400:
        detail = doc.get("detail") if isinstance(doc, dict) else resp.reason
        raise WebhookApiError(f"verifier answered {resp.status_code} for {path}: {detail}")
    return doc


def _common(f: F) -> F:
    f = click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        help="admin token (default: $VTPM_VERIFIER_TOKEN)",
    )(f)
    return click.option("--verifier", "verifier_url", required=True, help="http://HOST:PORT")(f)


def register(cli: click.Group) -> None:
    @cli.group("webhooks")
    def webhooks() -> None:
        """Webhook subscriptions to attester transitions, and their deliveries."""

    @webhooks.command("add")
    @_common
    @click.option("--url", "receiver", required=True, help="the receiver: http(s)://...")
    @click.option(
        "--event",
        "events",
        multiple=True,
        help="'*', a state (failed), or FROM->TO with '*' either side; repeatable [default: *]",
    )
    @click.option(
        "--secret-file",
        type=click.Path(path_type=Path),
        help="HMAC secret (16..128 characters) [default: generated and printed once]",
    )
    @click.option("--disabled", is_flag=True, help="create it disabled")
    def add(
        verifier_url: str,
        token_file: Path | None,
        receiver: str,
        events: tuple[str, ...],
        secret_file: Path | None,
        disabled: bool,
    ) -> None:
        """Subscribe a receiver; prints the subscription with its secret (shown only now)."""
        body: dict[str, Any] = {"url": receiver, "enabled": not disabled}
        if events:
            body["events"] = list(events)
        if secret_file is not None:
            try:
                body["secret"] = secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"--secret-file {secret_file}: {exc}") from None
        click.echo(json.dumps(_call(verifier_url, token_file, "POST", "/v1/webhooks", body)))

    @webhooks.command("list")
    @_common
    @click.option("--json", "as_json", is_flag=True)
    def list_(verifier_url: str, token_file: Path | None, as_json: bool) -> None:
        """The subscriptions, with how many deliveries each has not delivered yet."""
        doc = _call(verifier_url, token_file, "GET", "/v1/webhooks")
        if as_json:
            click.echo(json.dumps(doc))
            return
        for w in doc["webhooks"]:
            state = "enabled" if w["enabled"] else "disabled"
            click.echo(
                f"{w['id']}  {state}  undelivered={w['undelivered']}  "
                f"events={','.join(w['events'])}  {w['url']}"
            )

    @webhooks.command("remove")
    @_common
    @click.argument("subscription_id")
    @click.option(
        "--discard",
        is_flag=True,
        help="mark its queued deliveries dead instead of still delivering them",
    )
    def remove(
        verifier_url: str, token_file: Path | None, subscription_id: str, discard: bool
    ) -> None:
        """Delete a subscription: no new deliveries; the queued ones still go out (or,
        with --discard, are marked dead with the reason)."""
        queued = "discard" if discard else "deliver"
        path = f"/v1/webhooks/{subscription_id}?queued={queued}"
        doc = _call(verifier_url, token_file, "DELETE", path)
        click.echo(
            f"removed {subscription_id}: {doc['queued']} queued deliveries still go out,"
            f" {doc['discarded']} discarded (dead)"
        )

    @webhooks.command("deliveries")
    @_common
    @click.option(
        "--state", type=click.Choice(["pending", "delivering", "delivered", "dead"]), default=None
    )
    @click.option("--webhook", "subscription_id", help="only this subscription's")
    @click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
    @click.option("--json", "as_json", is_flag=True)
    def deliveries(
        verifier_url: str,
        token_file: Path | None,
        state: str | None,
        subscription_id: str | None,
        limit: int,
        as_json: bool,
    ) -> None:
        """Deliveries, newest first (--state dead: the dead letters)."""
        from urllib.parse import urlencode

        query: dict[str, Any] = {"limit": limit}
        if state:
            query["state"] = state
        if subscription_id:
            query["webhook"] = subscription_id
        path = f"/v1/webhook-deliveries?{urlencode(query)}"
        doc = _call(verifier_url, token_file, "GET", path)
        if as_json:
            click.echo(json.dumps(doc))
            return
        for d in doc["deliveries"]:
            t = d["transition"]
            click.echo(
                f"{d['id']}  {d['state']}  attempts={d['attempts']}  "
                f"{t['attester_id']} {t['from_state']}->{t['to_state']} at {t['at']}"
                + (f"  last_error={d['last_error']}" if d["last_error"] else "")
            )

    @webhooks.command("redeliver")
    @_common
    @click.argument("delivery_id", type=int)
    def redeliver(verifier_url: str, token_file: Path | None, delivery_id: int) -> None:
        """Queue a delivery again now (a dead letter once the receiver is fixed)."""
        path = f"/v1/webhook-deliveries/{delivery_id}/redeliver"
        click.echo(json.dumps(_call(verifier_url, token_file, "POST", path)))
