"""HTTP routes of the attestation service: blueprints made by factories that receive services.

Views only decode the request, call a service and encode the answer; errors
go to the one handler in :mod:`verifier.service.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from verifier.dbx import DbxUpdate
from verifier.service.auth import AttesterToken, Authenticator, Principal, Role
from verifier.service.messages import (
    ActivationRequest,
    EvidenceRequest,
    FaultReport,
    PolicyRequest,
    check_name,
    decode_json,
)
from verifier.service.metrics import CONTENT_TYPE_LATEST
from verifier.service.reappraise import ReappraisalRequest
from verifier.service.services import Services
from verifier.service.webhooks import WebhookService
from vtpm_core.errors import ParseError

__all__ = ["attester_blueprint", "ops_blueprint", "policy_blueprint", "webhook_blueprint"]

_READ = (Role.ADMIN, Role.READER)


def _principal(auth: Authenticator) -> Principal:
    return auth.authenticate(request.headers.get("Authorization"))


def _request_bytes() -> bytes:
    """The request body; 413 past ``max_body_bytes`` with or without a Content-Length.

    Werkzeug refuses a Content-Length over the limit, but a chunked body it reads up
    to the limit and stops without a word: the first ``max_body_bytes`` of a longer
    body would be parsed as if they were all of it. A body that fills the limit
    exactly is therefore checked for one more byte on the server's own stream.
    """
    data = request.get_data(cache=False)
    limit = request.max_content_length
    at_limit = limit is not None and request.content_length is None and len(data) >= limit
    if at_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return data


def _body(structure: str) -> dict[str, Any]:
    return decode_json(_request_bytes(), structure)


_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/plain"})


def _text(structure: str) -> str:
    try:
        return _request_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(structure, "body", exc.start, "not UTF-8") from None


def _json(value: Any, status: int = 200) -> Response:
    resp = jsonify(value)
    resp.status_code = status
    return resp


def _limit() -> int:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ParseError("query", "limit", 0, "expected an integer 1..1000")
    return int(raw)


def _page_limit() -> int:
    raw = request.args.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ParseError("query", "limit", 0, f"{raw[:32]!r}: expected an integer 1..1000")
    return int(raw)


def _state_filter() -> str | None:
    from verifier.service.models import ATTESTER_STATES

    raw = request.args.get("state")
    if raw is not None and raw not in ATTESTER_STATES:
        raise ParseError(
            "query", "state", 0, f"{raw[:32]!r}: expected one of {', '.join(ATTESTER_STATES)}"
        )
    return raw


def _cursor(*, numeric: bool) -> str | None:
    """``after``: the ``next`` of the previous page, given back as it was."""
    raw = request.args.get("after")
    if raw is None:
        return None
    ok = raw.isdigit() and len(raw) <= 19 if numeric else _ID_CURSOR.fullmatch(raw)
    if not ok:
        raise ParseError("query", "after", 0, f"{raw[:32]!r}: not a cursor this route gave")
    return raw


_ID_CURSOR = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _ear_profile() -> str | None:
    """The relying party's ``ear_profile`` (verifier.ear.PROFILE_NAMES or a full tag)."""
    from verifier.ear import PROFILE_NAMES, profile_named

    raw = request.args.get("ear_profile")
    if raw is None:
        return None
    profile = profile_named(raw)
    if profile is None:
        raise ParseError(
            "query", "ear_profile", 0, f"{raw[:64]!r}: expected one of {', '.join(PROFILE_NAMES)}"
        )
    return profile


def _in_profile(services: Services, view: dict[str, Any] | None, profile: str | None) -> Any:
    """``view`` with its EAR in ``profile`` (None: the configured default)."""
    if not view or not view.get("ear"):
        return view
    return {**view, "ear": services.appraiser.ear_as(view["ear"], profile)}


@contextmanager
def _authentication_first(auth: Authenticator, attester_id: str, *roles: Role) -> Iterator[None]:
    """On any failure inside, run the full authentication first: a caller without
    the right token gets its 401/403, never what else was wrong (hot routes)."""
    try:
        yield
    except Exception:
        _principal(auth).require(*roles, attester_id=attester_id)
        raise


def attester_blueprint(services: Services, auth: Authenticator) -> Blueprint:
    from verifier.service.messages import RegistrationRequest

    bp = Blueprint("attesters", __name__)

    @bp.post("/v1/attesters")
    def register() -> Response:
        # Open to any caller presenting an EK certificate from a trusted root
        # (the chain plus activation is the proof); a bare EK public is an
        # explicit trust decision and needs the admin token.
        principal = auth.optional(request.headers.get("Authorization"))
        req = RegistrationRequest.parse(_body("RegistrationRequest"))
        admin = principal is not None and principal.role is Role.ADMIN
        return _json(services.attesters.register(req, admin=admin), 201)

    @bp.get("/v1/attesters")
    def list_attesters() -> Response:
        _principal(auth).require(*_READ)
        state, after, limit = _state_filter(), _cursor(numeric=False), _page_limit()
        return _json(services.attesters.list_page(state, after, limit))

    @bp.get("/v1/attesters/<attester_id>/history")
    def history(attester_id: str) -> Response:
        _principal(auth).require(*_READ, Role.ATTESTER, attester_id=attester_id)
        after, limit = _cursor(numeric=True), _page_limit()
        cursor = None if after is None else int(after)
        return _json(services.attesters.history(attester_id, cursor, limit))

    @bp.get("/v1/attesters/<attester_id>")
    def get_attester(attester_id: str) -> Response:
        _principal(auth).require(*_READ, Role.ATTESTER, attester_id=attester_id)
        profile = _ear_profile()
        view = services.attesters.get(attester_id)
        view["latest_result"] = _in_profile(services, view.get("latest_result"), profile)
        return _json(view)

    @bp.delete("/v1/attesters/<attester_id>")
    def delete_attester(attester_id: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        services.attesters.delete(attester_id)
        return Response(status=204)

    @bp.post("/v1/attesters/<attester_id>/activation")
    def activate(attester_id: str) -> Response:
        # no token yet: the secret itself is the credential
        req = ActivationRequest.parse(_body("ActivationRequest"))
        return _json(services.attesters.activate(attester_id, req))

    # The two hot routes: an attester token is checked against the attester's
    # row by the service (auth.py). Any failure (a token mismatch, a bad body,
    # an unknown attester or nonce) is answered after the full authentication,
    # so a caller without the right token learns nothing else (401/403 first).

    @bp.post("/v1/attesters/<attester_id>/challenges")
    def challenge(attester_id: str) -> Response:
        cred = auth.classify(request.headers.get("Authorization"))
        if isinstance(cred, Principal):
            cred.require(Role.ATTESTER, Role.ADMIN, attester_id=attester_id)
        token = cred.sha256 if isinstance(cred, AttesterToken) else None
        with _authentication_first(auth, attester_id, Role.ATTESTER, Role.ADMIN):
            return _json(services.evidence.challenge(attester_id, token_sha256=token), 201)

    @bp.post("/v1/attesters/<attester_id>/evidence")
    def evidence(attester_id: str) -> Response:
        cred = auth.classify(request.headers.get("Authorization"))
        if isinstance(cred, Principal):
            cred.require(Role.ATTESTER, attester_id=attester_id)  # never passes: 403
            raise AssertionError("unreachable")
        with _authentication_first(auth, attester_id, Role.ATTESTER):
            profile = _ear_profile()
            # room for an IMA delta (issue 14) on this route only
            request.max_content_length = services.evidence.config.evidence_max_body_bytes
            req = EvidenceRequest.parse(_body("EvidenceRequest"))
            result = services.evidence.submit(attester_id, req, token_sha256=cred.sha256)
            # just signed in the configured profile: re-signed only when asked for another
            return _json(result if profile is None else _in_profile(services, result, profile))

    @bp.post("/v1/attesters/<attester_id>/faults")
    def fault(attester_id: str) -> Response:
        # the attester's own token only, like evidence (issue 16: a TPM fault reported)
        cred = auth.classify(request.headers.get("Authorization"))
        if isinstance(cred, Principal):
            cred.require(Role.ATTESTER, attester_id=attester_id)  # never passes: 403
            raise AssertionError("unreachable")
        with _authentication_first(auth, attester_id, Role.ATTESTER):
            report = FaultReport.parse(_body("FaultReport"))
            return _json(
                services.evidence.report_fault(attester_id, report, token_sha256=cred.sha256)
            )

    @bp.get("/v1/attesters/<attester_id>/results")
    def results(attester_id: str) -> Response:
        _principal(auth).require(*_READ, Role.ATTESTER, attester_id=attester_id)
        profile = _ear_profile()
        rows = services.attesters.results(attester_id, _limit())
        return _json({"results": [_in_profile(services, r, profile) for r in rows]})

    @bp.put("/v1/attesters/<attester_id>/policy")
    def assign(attester_id: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        body = _body("PolicyAssignment")
        name = body.get("policy")
        if name is not None and not isinstance(name, str):
            raise ParseError("PolicyAssignment", "policy", 0, "expected a policy name or null")
        if name is not None:
            check_name(name, "PolicyAssignment", "policy")
        return _json(services.policies.assign(attester_id, name))

    return bp


def policy_blueprint(services: Services, auth: Authenticator) -> Blueprint:
    bp = Blueprint("policies", __name__)

    @bp.get("/v1/policies")
    def list_policies() -> Response:
        _principal(auth).require(*_READ)
        return _json({"policies": services.policies.list_all()})

    @bp.post("/v1/policies")
    def create_policy() -> Response:
        _principal(auth).require(Role.ADMIN)
        req = PolicyRequest.parse(_body("PolicyRequest"))
        return _json(services.policies.put(req, create_only=True), 201)

    @bp.get("/v1/policies/<name>")
    def get_policy(name: str) -> Response:
        _principal(auth).require(*_READ)
        return _json(services.policies.get(check_name(name, "url", "name")))

    @bp.put("/v1/policies/<name>")
    def put_policy(name: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        name = check_name(name, "url", "name")
        if request.mimetype in _YAML_TYPES:
            # the file `vtpm policy learn` wrote, as-is
            req = PolicyRequest.parse({"policy": _text("PolicyRequest.policy")}, name=name)
        else:
            req = PolicyRequest.parse(_body("PolicyRequest"), name=name)
        return _json(services.policies.put(req, create_only=False))

    @bp.post("/v1/policies/<name>/dry-run")
    def dry_run_policy(name: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        req = ReappraisalRequest.parse(_body("ReappraisalRequest"))
        return _json(services.reappraisal.dry_run(check_name(name, "url", "name"), req))

    @bp.post("/v1/policies/<name>/apply")
    def apply_policy(name: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        req = ReappraisalRequest.parse(_body("ReappraisalRequest"))
        return _json(services.reappraisal.apply(check_name(name, "url", "name"), req))

    @bp.post("/v1/dbx/report")
    def dbx_report() -> Response:
        _principal(auth).require(Role.ADMIN)
        update = DbxUpdate.parse(_request_bytes())
        return _json(services.reappraisal.dbx_report(update))

    @bp.delete("/v1/policies/<name>")
    def delete_policy(name: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        services.policies.delete(check_name(name, "url", "name"))
        return Response(status=204)

    return bp


def webhook_blueprint(webhooks: WebhookService, auth: Authenticator) -> Blueprint:
    """Webhook subscriptions and their deliveries (issue 16): admin only (the secrets)."""
    from verifier.service.webhooks import WebhookRequest

    bp = Blueprint("webhooks", __name__)

    @bp.post("/v1/webhooks")
    def add_webhook() -> Response:
        _principal(auth).require(Role.ADMIN)
        return _json(webhooks.add(WebhookRequest.parse(_body("WebhookRequest"))), 201)

    @bp.get("/v1/webhooks")
    def list_webhooks() -> Response:
        _principal(auth).require(Role.ADMIN)
        return _json({"webhooks": webhooks.list_all()})

    @bp.delete("/v1/webhooks/<subscription_id>")
    def remove_webhook(subscription_id: str) -> Response:
        _principal(auth).require(Role.ADMIN)
        queued = request.args.get("queued", "deliver")
        if queued not in ("deliver", "discard"):
            raise ParseError("query", "queued", 0, f"{queued[:16]!r}: expected deliver or discard")
        return _json(webhooks.remove(subscription_id, discard=queued == "discard"))

    @bp.get("/v1/webhook-deliveries")
    def deliveries() -> Response:
        _principal(auth).require(Role.ADMIN)
        state = request.args.get("state")
        sub = request.args.get("webhook")
        return _json({"deliveries": webhooks.deliveries(state, _limit(), sub)})

    @bp.post("/v1/webhook-deliveries/<int:delivery_id>/redeliver")
    def redeliver(delivery_id: int) -> Response:
        _principal(auth).require(Role.ADMIN)
        return _json(webhooks.redeliver(delivery_id))

    return bp


def ops_blueprint(
    services: Services,
    openapi_spec: dict[str, Any],
    extra_metrics: Callable[[], bytes] | None = None,
) -> Blueprint:
    bp = Blueprint("ops", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        services.attesters.db.ping()  # 503 (retriable) when the database is unreachable
        return _json({"status": "ok"})

    @bp.get("/metrics")
    def metrics() -> Response:
        text = services.metrics.exposition()
        if extra_metrics is not None:  # the webhook outbox's depth, read at scrape time
            text += extra_metrics()
        return Response(text, content_type=CONTENT_TYPE_LATEST)

    @bp.get("/openapi.json")
    def openapi() -> Response:
        return _json(openapi_spec)

    @bp.get("/.well-known/jwks.json")
    def jwks() -> Response:
        return _json(services.appraiser.jwks())

    return bp
