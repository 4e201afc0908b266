"""Console routes: HTML pages and the JSON routes they render, one blueprint."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, jsonify, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from verifier.console.fleet import PAGE_SIZES, FleetQuery, fleet_counts, fleet_page
from verifier.console.policies import policy_detail, policy_diff, policy_list
from verifier.console.session import COOKIE, MAX_AGE_S, ConsoleSession, SessionSigner
from verifier.console.timeline import build_timeline, load_evidence
from verifier.service.auth import Authenticator, Principal, Role
from verifier.service.errors import AuthenticationError
from verifier.service.models import ATTESTER_STATES
from verifier.service.services import Services
from vtpm_core.errors import ParseError

__all__ = ["SECURITY_HEADERS", "console_blueprint"]

Page = BaseResponse | str | tuple[str, int]

HERE = Path(__file__).resolve().parent

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def console_blueprint(
    services: Services, auth: Authenticator, admin_token_sha256: str
) -> Blueprint:
    bp = Blueprint(
        "console",
        __name__,
        url_prefix="/console",
        template_folder=str(HERE / "templates"),
        static_folder=str(HERE / "static"),
        static_url_path="/static",
    )
    signer = SessionSigner(admin_token_sha256)

    @bp.app_template_filter("pretty_json")
    def _pretty_json(value: Any) -> str:
        # plain text: Jinja's autoescape then escapes it like any other value
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)

    @bp.app_template_filter("age")
    def _age(seconds: int) -> str:
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{seconds // size} {unit}"
        return f"{seconds} s"

    def session() -> ConsoleSession | None:
        return signer.read(request.cookies.get(COOKIE))

    def api_principal() -> None:
        """The JSON routes: a console session cookie or a reader/admin bearer token."""
        if session() is not None:
            return
        principal: Principal = auth.authenticate(request.headers.get("Authorization"))
        principal.require(Role.ADMIN, Role.READER)

    def same_origin() -> bool:
        """A form post from this origin, or from a client that is not a browser.

        Browsers send Fetch Metadata (``Sec-Fetch-Site``); it decides when present. Under
        ``Referrer-Policy: no-referrer`` chromium sends ``Origin: null`` even for a
        same-origin form, so ``Origin`` is only the fallback, and ``null`` there is refused.
        """
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:
            return site == "same-origin"
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == request.host

    @bp.after_request
    def _headers(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    @bp.get("/login")
    def login_form() -> str:
        return render_template("console/login.html", error=None, s=None)

    @bp.post("/login")
    def login() -> Page:
        if not same_origin():
            return render_template(
                "console/login.html", error="cross-origin login refused", s=None
            ), 403
        token = request.form.get("token", "").strip()
        try:
            found = auth.classify(f"Bearer {token}") if token else None
        except AuthenticationError:
            found = None
        if not isinstance(found, Principal) or found.role not in (Role.ADMIN, Role.READER):
            return render_template(
                "console/login.html", error="not a reader or admin token", s=None
            ), 401
        cookie, _ = signer.issue(found.role.value)
        resp = redirect(url_for("console.fleet"), code=303)
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=MAX_AGE_S,
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
            path="/console",
        )
        return resp

    @bp.post("/logout")
    def logout() -> Page:
        s = session()
        if s is None or not s.csrf_ok(request.form.get("csrf")) or not same_origin():
            return "CSRF check failed", 403
        resp = redirect(url_for("console.login_form"), code=303)
        resp.delete_cookie(COOKIE, path="/console")
        return resp

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
            return redirect(url_for("console.login_form"), code=303)
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
            return redirect(url_for("console.login_form"), code=303)
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
            return redirect(url_for("console.login_form"), code=303)
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
            return redirect(url_for("console.login_form"), code=303)
        return render_template("console/policies.html", s=s, d=policy_list(services.policies.db))

    @bp.get("/api/policies-diff")
    def api_policy_diff() -> Response:
        api_principal()
        return jsonify(policy_diff(services.policies.db, *diff_names()))

    @bp.get("/policies-diff")
    def policy_diff_page() -> Page:
        s = session()
        if s is None:
            return redirect(url_for("console.login_form"), code=303)
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
            return redirect(url_for("console.login_form"), code=303)
        d = policy_detail(services.policies.db, name)
        names = [p["name"] for p in policy_list(services.policies.db)["policies"]]
        return render_template("console/policy.html", s=s, p=d, names=names)

    return bp
