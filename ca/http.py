"""The CA's HTTP API: a Flask blueprint made by a factory, served by gunicorn.

Routes (stable; see docs/ca.md):

- ``POST /v1/ek-certificates`` (provisioner, admin): JSON request -> PEM + chain
- ``GET  /v1/ek-certificates/<serial>`` (provisioner, admin): the ledger row + PEM
- ``POST /v1/ek-certificates/<serial>/revoke`` (admin): ``{"reason": ...}``
- ``GET  /v1/ca/chain``: the CA chain (PEM); ``GET /v1/crl``: the CRL (DER)
- ``POST /v1/ocsp`` and ``GET /v1/ocsp/<base64>``: RFC 6960 (appendix A.1)
- ``/ca-console/``: the console (ca.console; reader or admin), pages and their JSON

Bearer tokens (RFC 6750) come from the CA config, stored as SHA-256. No token:
unknown token: 401 with ``WWW-Authenticate``; a token without the role: 403. Errors become an
RFC 9457 problem body in exactly one place (:func:`_problem`); internal errors
show no internals.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_der_x509_certificate
from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ca.ek import CertifiableEk
from ca.home import CaHome, OpenedCa
from ca.issuance import IssueRequest, IssueResult
from ca.ledger import CertRecord
from ca.profile import render_tpm_id
from vtpm_core.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ParseError,
    PermissionDeniedError,
    StateError,
    VerificationError,
    VtpmTrustError,
)

__all__ = [
    "CaServerConfig",
    "create_app",
    "make_blueprint",
    "parse_issue_request",
    "require_role",
    "serve",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CaServerConfig:
    """How a server process opens its CA (each gunicorn worker opens its own)."""

    home: Path
    passphrase: bytes | None = None
    pin: str | None = None
    database: str | None = None
    ledger_prefix: str = "ca_"

    def open(self) -> OpenedCa:
        return CaHome(self.home).open(
            passphrase=self.passphrase,
            pin=self.pin,
            database=self.database,
            ledger_prefix=self.ledger_prefix,
        )


class _UnauthenticatedError(VtpmTrustError):
    """No bearer token at all (401, unlike a wrong role: 403)."""


class _FieldError(VtpmTrustError):
    """A request field is missing or unusable; ``field`` names it in the problem body."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        self.field = field
        self.status = status
        super().__init__(f"{field}: {message}")


def _text(body: dict[str, Any], name: str, *, required: bool = False, limit: int = 1024) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise _FieldError(name, "required")
        return ""
    if not isinstance(value, str):
        raise _FieldError(name, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise _FieldError(name, f"longer than {limit} characters")
    return value


def _uuid(body: dict[str, Any], name: str, *, required: bool) -> uuid.UUID | None:
    text = _text(body, name, required=required, limit=64)
    if not text:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _FieldError(name, f"not a UUID: {text!r}") from None


def _tpm_id(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _FieldError(name, 'expected an integer or "id:XXXXXXXX"')
    try:
        return render_tpm_id(value, name)
    except ConfigError as exc:
        raise _FieldError(name, str(exc)) from None


_KNOWN_FIELDS = {
    "ek_public",
    "ek_public_pem",
    "allow_bare_key",
    "vm_id",
    "vm_name",
    "vtpm_instance_id",
    "tpm_manufacturer",
    "tpm_model",
    "tpm_version",
    "clone_of",
}


def parse_issue_request(body: object, *, allow_bare_keys: bool) -> IssueRequest:
    """Decode the JSON body of ``POST /v1/ek-certificates``; errors name the field."""
    if not isinstance(body, dict):
        raise _FieldError("body", "expected a JSON object")
    unknown = set(body) - _KNOWN_FIELDS
    if unknown:
        raise _FieldError(sorted(unknown)[0], "unknown field")
    allow = body.get("allow_bare_key", False)
    if not isinstance(allow, bool):
        raise _FieldError("allow_bare_key", "expected true or false")
    if "ek_public" in body:
        text = _text(body, "ek_public", limit=4096)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _FieldError("ek_public", "not base64") from None
    elif "ek_public_pem" in body:
        data = _text(body, "ek_public_pem", limit=4096).encode()
        if not allow:
            raise _FieldError(
                "allow_bare_key",
                "a bare PEM key is certified only with allow_bare_key: true",
                422,
            )
        if not allow_bare_keys:
            raise _FieldError("ek_public_pem", "this CA does not certify bare keys", 422)
    else:
        raise _FieldError("ek_public", "required (base64 TPM2B_PUBLIC)")
    try:
        ek = CertifiableEk.load(data, allow_bare_key=allow)
    except ParseError as exc:
        raise _FieldError("ek_public", str(exc)) from None
    except VerificationError as exc:
        raise _FieldError("ek_public", str(exc), 422) from None
    vm_id = _uuid(body, "vm_id", required=True)
    assert vm_id is not None
    return IssueRequest(
        ek=ek,
        vm_id=vm_id,
        vm_name=_text(body, "vm_name"),
        vtpm_instance_id=_text(body, "vtpm_instance_id"),
        tpm_manufacturer=_tpm_id(body, "tpm_manufacturer"),
        tpm_model=_text(body, "tpm_model", limit=64) or None,
        tpm_version=_tpm_id(body, "tpm_version"),
        clone_of=_uuid(body, "clone_of", required=False),
    )


def _pem(der: bytes) -> str:
    return load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def _record_json(record: CertRecord) -> dict[str, Any]:
    return {
        "serial": f"{record.serial:x}",
        "status": record.status,
        "ek_name": record.ek_name,
        "ek_public_sha256": record.ek_public_sha256,
        "ek_template": record.ek_template,
        "key_type": record.key_type,
        "vm_id": record.vm_id,
        "vm_name": record.vm_name,
        "vtpm_instance_id": record.vtpm_instance_id,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "revocation_reason": record.revocation_reason,
    }


def _serial(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise _FieldError("serial", f"not a hex serial: {text!r}") from None
    return value


def require_role(ca: OpenedCa, roles: tuple[str, ...]) -> str:
    """The role of this request's bearer token, one of ``roles``: else 401 (no token,
    unknown token) or 403 (a token of another role)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _UnauthenticatedError("a bearer token is required")
    try:
        role = ca.role_of(token.strip())
    except PermissionDeniedError:
        raise _UnauthenticatedError("unknown bearer token") from None
    if role not in roles:
        raise PermissionDeniedError(f"role {role!r} may not do this")
    return role


def make_blueprint(ca: OpenedCa) -> Blueprint:
    """The API over one opened CA. Views decode, call one service, encode."""
    bp = Blueprint("ca", __name__)

    def require(*roles: str) -> Callable[[], None]:
        def check() -> None:
            g.role = require_role(ca, roles)

        return check

    may_issue = require("provisioner", "admin")
    may_revoke = require("admin")

    @bp.post("/v1/ek-certificates")
    def issue() -> tuple[Response, int]:
        may_issue()
        body = request.get_json(silent=True)
        if body is None:
            raise _FieldError("body", "not JSON (Content-Type: application/json)")
        result: IssueResult = ca.issuance.issue(
            parse_issue_request(body, allow_bare_keys=ca.profile.allow_bare_keys)
        )
        answer = _record_json(result.record)
        answer.update(
            certificate_pem=_pem(result.certificate_der),
            chain_pem=result.chain_pem.decode(),
            reissued=result.reissued,
            binding=result.binding,
        )
        return jsonify(answer), 200 if result.reissued else 201

    @bp.get("/v1/ek-certificates/<serial>")
    def show(serial: str) -> Response:
        may_issue()
        record = ca.ledger.get(_serial(serial))
        answer = _record_json(record)
        if record.certificate_der:
            answer["certificate_pem"] = _pem(record.certificate_der)
        return jsonify(answer)

    @bp.post("/v1/ek-certificates/<serial>/revoke")
    def revoke(serial: str) -> Response:
        may_revoke()
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise _FieldError("body", "expected a JSON object with reason")
        reason = _text(body, "reason", required=True, limit=32)
        from ca.ledger import REASONS

        if reason not in REASONS:
            raise _FieldError("reason", f"one of {', '.join(REASONS)}")
        return jsonify(_record_json(ca.revocation.revoke(_serial(serial), reason)))

    @bp.get("/v1/ca/chain")
    def chain() -> Response:
        return Response(ca.material.chain_pem, mimetype="application/pem-certificate-chain")

    @bp.get("/v1/crl")
    def crl() -> Response:
        return Response(ca.revocation.crl(), mimetype="application/pkix-crl")

    @bp.post("/v1/ocsp")
    def ocsp_post() -> Response:
        return Response(
            ca.revocation.ocsp(request.get_data(cache=False)), mimetype="application/ocsp-response"
        )

    @bp.get("/v1/ocsp/<path:encoded>")
    def ocsp_get(encoded: str) -> Response:
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _FieldError("ocsp", "the GET path is not base64") from None
        return Response(ca.revocation.ocsp(der), mimetype="application/ocsp-response")

    return bp


_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (_UnauthenticatedError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (ParseError, 400, "malformed"),
    (ConfigError, 400, "bad-request"),
    (VerificationError, 422, "not-certifiable"),
    (NotFoundError, 404, "not-found"),
    (ConflictError, 409, "conflict"),
    (StateError, 503, "unavailable"),
)


def _problem(exc: Exception) -> tuple[Response, int]:
    """The one place errors become HTTP (RFC 9457 application/problem+json)."""
    body: dict[str, Any]
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        body = {"type": "about:blank", "title": exc.name, "status": status}
    elif isinstance(exc, _FieldError):
        status = exc.status
        kind = "bad-request" if status == 400 else "not-certifiable"
        body = {
            "type": f"urn:vtpm-trust:problem:{kind}",
            "title": kind,
            "status": status,
            "detail": str(exc),
            "field": exc.field,
        }
    else:
        for cls, status, kind in _STATUS:
            if isinstance(exc, cls):
                body = {
                    "type": f"urn:vtpm-trust:problem:{kind}",
                    "title": kind,
                    "status": status,
                    "detail": str(exc),
                }
                break
        else:
            log.exception("internal error")
            status = 500
            body = {"type": "about:blank", "title": "internal error", "status": 500}
    response = jsonify(body)
    response.mimetype = "application/problem+json"
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="vtpm-ca"'
    return response, status


def create_app(config: CaServerConfig | None = None, *, ca: OpenedCa | None = None) -> Flask:
    """A Flask app over one CA: given opened (tests, in-process) or opened from ``config``.

    Without either, the home comes from ``VTPM_CA_HOME`` and the passphrase from
    ``VTPM_CA_PASSPHRASE`` (the PIN from ``VTPM_CA_PKCS11_PIN``).
    """
    if ca is None:
        if config is None:
            import os

            home = os.environ.get("VTPM_CA_HOME")
            if not home:
                raise ConfigError("no CA: pass a config or set VTPM_CA_HOME")
            passphrase = os.environ.get("VTPM_CA_PASSPHRASE")
            config = CaServerConfig(
                Path(home),
                passphrase.encode() if passphrase else None,
                os.environ.get("VTPM_CA_PKCS11_PIN"),
            )
        ca = config.open()
    app = Flask("vtpm_ca")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["vtpm_ca"] = ca
    app.register_blueprint(make_blueprint(ca))
    from ca.console import ca_console_blueprint

    app.register_blueprint(ca_console_blueprint(ca))
    app.register_error_handler(Exception, _problem)
    return app


def serve(config: CaServerConfig, bind: str, workers: int = 2) -> None:
    """Run the API under gunicorn in the foreground (each worker opens the CA itself)."""
    from gunicorn.app.base import BaseApplication

    host = bind.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]") and not host.startswith("127."):
        log.warning("binding to %s: make sure a TLS proxy fronts this service", host)
    config.open().close()  # fail fast (wrong passphrase, missing home) before forking

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", [bind])
            self.cfg.set("workers", workers)
            self.cfg.set("accesslog", None)

        def load(self) -> Flask:
            return create_app(config)

    _App().run()
