"""The Flask app factory of the attestation service (issue 6).

``create_app(config=None)`` builds everything from a checked
:class:`ServiceConfig` (default: the home named by ``VTPM_VERIFIER_HOME``, with
``VTPM_VERIFIER_DB`` overriding the database URL — how gunicorn workers get
their configuration). There is no module-level app, engine or registry.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from verifier.console import console_blueprint
from verifier.service.auth import Authenticator
from verifier.service.config import ServiceConfig, load_config
from verifier.service.db import Database, schema_is_current, upgrade
from verifier.service.delivery import Deliverer, delivery_policy
from verifier.service.errors import install_error_handler
from verifier.service.fleetstats import FleetCollector, FleetStats
from verifier.service.metrics import Metrics
from verifier.service.openapi import openapi_spec
from verifier.service.ports import Appraiser
from verifier.service.retention import Pruner, RetentionPolicy
from verifier.service.routes import (
    attester_blueprint,
    ops_blueprint,
    policy_blueprint,
    webhook_blueprint,
)
from verifier.service.services import Clock, Random, make_services, utc_now
from verifier.service.sweeper import Sweeper
from verifier.service.webhooks import JwsSigner, WebhookService
from vtpm_core.errors import ConfigError

__all__ = ["create_app"]


def create_app(
    config: ServiceConfig | None = None,
    *,
    appraiser: Appraiser | None = None,
    migrate: bool = False,
    clock: Clock | None = None,
    random: Random | None = None,
) -> Flask:
    """Build the app. The database must be at the latest migration (or ``migrate=True``).

    ``clock`` and ``random`` are injectable for tests; ``appraiser`` defaults to
    the library-backed one loaded from the configuration.
    """
    if config is None:
        home = os.environ.get("VTPM_VERIFIER_HOME")
        if not home:
            raise ConfigError("no configuration given and VTPM_VERIFIER_HOME is not set")
        config = load_config(Path(home), database_url=os.environ.get("VTPM_VERIFIER_DB") or None)
    db = Database(config.database_url)
    if migrate:
        upgrade(db.engine)
    elif not schema_is_current(db.engine):
        db.dispose()
        raise ConfigError(
            "database schema is not at the latest migration (run `vtpm verifier init` "
            "or start with `vtpm verifier serve`, which migrates)"
        )
    if appraiser is None:
        from verifier.service.appraiser import LibraryAppraiser

        appraiser = LibraryAppraiser.from_config(config)
    # attesters per state and evidence age, read at most once per sweep (issue 16)
    fleet = FleetStats(db, float(config.sweep_interval_s), **({"now": clock} if clock else {}))
    metrics = Metrics.create(FleetCollector(fleet))
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs["clock"] = clock
    if random is not None:
        kwargs["random"] = random
    services = make_services(db, config, appraiser, metrics, **kwargs)
    auth = Authenticator(config, db)

    # Explicit paths: Flask would otherwise look the package up on sys.path,
    # where a directory named "verifier" in the working directory shadows it.
    here = str(Path(__file__).resolve().parent)
    app = Flask("verifier.service", root_path=here, instance_path=here)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["vtpm_verifier"] = {"db": db, "services": services, "config": config}

    def days(n: int) -> timedelta | None:
        return timedelta(days=n) if n else None

    if config.retention_days or config.webhook_keep_delivered_days or config.webhook_keep_dead_days:
        policy = RetentionPolicy(
            keep_results=days(config.retention_days),
            keep_delivered=days(config.webhook_keep_delivered_days),
            keep_dead=days(config.webhook_keep_dead_days),
            batch=config.retention_batch,
            interval_s=float(config.retention_interval_s),
        )
        app.extensions["vtpm_verifier"]["pruner"] = Pruner(
            db, policy, **({"now": clock} if clock else {})
        ).start()
    # trusted attesters whose deadline passed become stale (issue 16); every worker
    # runs one, and one transition per attester is recorded (sweeper.py)
    app.extensions["vtpm_verifier"]["sweeper"] = Sweeper(
        db, float(config.sweep_interval_s), config.sweep_batch, **({"now": clock} if clock else {})
    ).start()
    # webhook deliveries (issue 16): every worker drains the outbox (delivery.py);
    # evidence that changed a state wakes this process's deliverer at once
    deliverer = Deliverer(
        db,
        delivery_policy(config),
        config.webhook_poll_ms / 1000,
        jws=JwsSigner(config.signing_key_path.read_bytes())
        if config.webhook_jws and config.signing_key_path is not None
        else None,
        **({"now": clock} if clock else {}),
    ).start()
    app.extensions["vtpm_verifier"]["deliverer"] = deliverer
    services.evidence.on_transition = deliverer.wake
    webhooks = WebhookService(db, clock or utc_now)
    install_error_handler(app)
    app.register_blueprint(attester_blueprint(services, auth))
    app.register_blueprint(policy_blueprint(services, auth))
    app.register_blueprint(webhook_blueprint(webhooks, auth))
    app.register_blueprint(ops_blueprint(services, openapi_spec(), webhooks.metrics_text))
    app.register_blueprint(
        console_blueprint(services, auth, config.admin_token_sha256, config.ca_console_url)
    )

    @app.before_request
    def _start_timer() -> None:
        g.vtpm_t0 = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(route=route, method=request.method, status=resp.status_code).inc()
        t0 = g.get("vtpm_t0")
        if t0 is not None:
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - t0)
        return resp

    return app
