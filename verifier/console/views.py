"""Console routes: HTML pages and the JSON routes they render, one blueprint."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from verifier.console.fleet import PAGE_SIZES, FleetQuery, fleet_counts, fleet_page
from verifier.console.policies import policy_detail, policy_diff, policy_list
from verifier.console.timeline import build_timeline, load_evidence
from verifier.service.auth import Authenticator, Principal, Role
from verifier.service.errors import AuthenticationError
from verifier.service.models import ATTESTER_STATES
from verifier.service.services import Services
from vtpm_core.errors import ParseError
from vtpm_core.webconsole import (
    SECURITY_HEADERS,
    ConsoleLogin,
    Page,
    SessionSigner,
)
from vtpm_core.webconsole import (
    console_blueprint as make_console_blueprint,
)

__all__ = ["COOKIE", "SECURITY_HEADERS", "console_blueprint"]

HERE = Path(__file__).resolve().parent
COOKIE = "vtpm_console"


def console_blueprint(
    services: Services,
    auth: Authenticator,
    admin_token_sha256: str,
    ca_console_url: str | None = None,
) -> Blueprint:
    """The console at ``/console``; ``ca_console_url`` (the CA's console, another
    service) adds a CA link to the header and each attester's EK certificate."""
    bp = make_console_blueprint("console", __name__, "/console", HERE / "templates")

    def classify(token: str) -> str | None:
        try:
            found = auth.classify(f"Bearer {token}")
        except AuthenticationError:
            return None
        if not isinstance(found, Principal) or found.role not in (Role.ADMIN, Role.READER):
            return None
        return str(found.role.value)

    # the session key: derived from the admin token's digest (every worker has it;
    # rotating the admin token ends every session)
    login = ConsoleLogin(
        SessionSigner(bytes.fromhex(admin_token_sha256)),
        classify,
        COOKIE,
        "/console",
        "console/base.html",
    )
    login.install(bp, "fleet")
    session = login.session

    @bp.context_processor
    def _context() -> dict[str, Any]:
        return {
            "console_name": "verifier",
            "console_home": "fleet",
            "ca_console_url": ca_console_url,
        }

    def api_principal() -> None:
        """The JSON routes: a console session cookie or a reader/admin bearer token."""
        if session() is not None:
            return
        principal: Principal = auth.authenticate(request.headers.get("Authorization"))
        principal.require(Role.ADMIN, Role.READER)

    def now() -> datetime:
        return datetime.now(UTC)

    def fleet_data() -> dict[str, Any]:
        query = FleetQuery.parse(request.args)
        counts = fleet_counts(services.attesters.db)
        data = fleet_page(services.attesters.db, query, now(), counts)
        data["counts"] = counts
        return data

    @bp.get("/api/fleet")
    def api_fleet() -> Response:
        api_principal()
        return jsonify(fleet_data())

    @bp.get("/")
    def fleet() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template(
            "console/fleet.html", s=s, d=fleet_data(), sizes=PAGE_SIZES, states=ATTESTER_STATES
        )

    def attester_data(attester_id: str) -> dict[str, Any]:
        data = services.attesters.get(attester_id)
        results = services.attesters.results(attester_id, 50)
        data["results"] = [{k: v for k, v in r.items() if k != "ear"} for r in results]
        return data

    @bp.get("/api/attesters/<attester_id>")
    def api_attester(attester_id: str) -> Response:
        api_principal()
        return jsonify(attester_data(attester_id))

    @bp.get("/attesters/<attester_id>")
    def attester(attester_id: str) -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template("console/attester.html", s=s, a=attester_data(attester_id))

    def timeline_data(attester_id: str) -> dict[str, Any]:
        attester = services.attesters.get(attester_id)  # NotFoundError: 404
        data = build_timeline(load_evidence(services.attesters.db, attester_id))
        data["attester"] = {k: attester[k] for k in ("id", "vm_id", "state", "policy")}
        return data

    @bp.get("/api/attesters/<attester_id>/timeline")
    def api_timeline(attester_id: str) -> Response:
        api_principal()
        return jsonify(timeline_data(attester_id))

    @bp.get("/attesters/<attester_id>/timeline")
    def timeline(attester_id: str) -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template("console/timeline.html", s=s, t=timeline_data(attester_id))

    # Policies: read-only pages (no form changes state here; the diff form is a GET).
    def diff_names() -> tuple[str, str]:
        a, b = request.args.get("a", ""), request.args.get("b", "")
        for field, value in (("a", a), ("b", b)):
            if not value:
                raise ParseError("query", field, 0, "a policy diff needs ?a=NAME&b=NAME")
        return a, b

    @bp.get("/api/policies")
    def api_policies() -> Response:
        api_principal()
        return jsonify(policy_list(services.policies.db))

    @bp.get("/policies")
    def policies() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template("console/policies.html", s=s, d=policy_list(services.policies.db))

    @bp.get("/api/policies-diff")
    def api_policy_diff() -> Response:
        api_principal()
        return jsonify(policy_diff(services.policies.db, *diff_names()))

    @bp.get("/policies-diff")
    def policy_diff_page() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        d = policy_diff(services.policies.db, *diff_names())
        return render_template("console/policy_diff.html", s=s, d=d)

    @bp.get("/api/policies/<name>")
    def api_policy(name: str) -> Response:
        api_principal()
        return jsonify(policy_detail(services.policies.db, name))

    @bp.get("/policies/<name>")
    def policy(name: str) -> Page:
        s = session()
        if s is None:
            return login.to_login()
        d = policy_detail(services.policies.db, name)
        names = [p["name"] for p in policy_list(services.policies.db)["policies"]]
        return render_template("console/policy.html", s=s, p=d, names=names)

    return bp
