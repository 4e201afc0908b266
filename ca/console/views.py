"""CA console routes: HTML pages and the JSON routes they render, one blueprint."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from ca.console.details import certificate_detail, crl_state, record_row
from ca.home import OpenedCa
from ca.http import require_role
from ca.ledger import CERT_STATUSES, SEARCH_FIELDS, CertQuery, normal_serial
from vtpm_core.errors import ParseError, PermissionDeniedError, StateError
from vtpm_core.webconsole import ConsoleLogin, Page, SessionSigner
from vtpm_core.webconsole import console_blueprint as make_console_blueprint

__all__ = ["COOKIE", "PREFIX", "ca_console_blueprint", "parse_cert_query"]

HERE = Path(__file__).resolve().parent
PREFIX = "/ca-console"
# not the verifier console's cookie: ports do not separate cookies, and the two
# consoles may share a host
COOKIE = "vtpm_ca_console"
SESSION_KEY_FILE = "console-session.key"
PAGE_SIZES = (25, 50, 100)
MAX_PAGE = 100_000
CONSOLE_ROLES = ("admin", "reader")


def _choice(args: Any, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = str(args.get(name, default))
    if value not in allowed:
        raise ParseError("query", name, 0, f"expected one of {', '.join(allowed)}")
    return value


def _int(args: Any, name: str, default: str, low: int, high: int) -> int:
    raw = str(args.get(name, default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ParseError("query", name, 0, f"expected an integer {low}..{high}")
    return int(raw)


def parse_cert_query(args: Any, *, revoked: bool = False) -> CertQuery:
    """A certificate search from query parameters; ``revoked``: the revoked page (only
    revoked certificates, newest revocation first unless ``sort=created``)."""
    q = str(args.get("q", "")).strip()
    if len(q) > 255:
        raise ParseError("query", "q", 0, "search text longer than 255 characters")
    field = _choice(args, "field", "any", SEARCH_FIELDS)
    if revoked:
        status = "revoked"
        sort = _choice(args, "sort", "revoked", ("revoked", "created"))
    else:
        status = _choice(args, "status", "", ("", *CERT_STATUSES))
        sort = _choice(args, "sort", "created", ("created",))
    order = _choice(args, "order", "desc", ("asc", "desc"))
    page = _int(args, "page", "1", 1, MAX_PAGE)
    size = _int(args, "size", "50", min(PAGE_SIZES), max(PAGE_SIZES))
    if size not in PAGE_SIZES:
        raise ParseError("query", "size", 0, f"expected one of {PAGE_SIZES}")
    return CertQuery(q, field, status, sort, order == "desc", page, size)


def _session_secret(ca: OpenedCa) -> bytes:
    """The session key: a random file in the CA home (made once, 0600; delete it to end
    every session) bound to the digests of the tokens that may log in, so that removing
    or adding such a token from ca.yaml also ends every session."""
    path = ca.home / SESSION_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:  # the first process to start; the others read what it wrote
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read the console session key {path}: {exc}") from exc
    if len(key) != 32:
        raise StateError(f"{path}: expected 32 bytes, found {len(key)} (delete it to renew)")
    digests = sorted(f"{t.role}:{t.sha256}" for t in ca.tokens if t.role in CONSOLE_ROLES)
    return hmac.new(key, "\n".join(digests).encode(), hashlib.sha256).digest()


def ca_console_blueprint(ca: OpenedCa) -> Blueprint:
    """The CA console at ``/ca-console``: issued certificates (search by VM id, serial,
    EK name or VM name), one certificate, the revoked ones, the CRL's state."""
    bp = make_console_blueprint("ca_console", __name__, PREFIX, HERE / "templates")

    def classify(token: str) -> str | None:
        try:
            role = ca.role_of(token)
        except PermissionDeniedError:
            return None
        return role if role in CONSOLE_ROLES else None  # a provisioner may not

    login = ConsoleLogin(
        SessionSigner(_session_secret(ca), b"vtpm-ca-console-session"),
        classify,
        COOKIE,
        PREFIX,
        "ca_console/base.html",
    )
    login.install(bp, "certificates")
    session = login.session

    @bp.context_processor
    def _context() -> dict[str, Any]:
        return {"console_name": "CA", "console_home": "certificates"}

    def api_principal() -> None:
        """The JSON routes: a console session cookie or a reader/admin bearer token."""
        if session() is not None:
            return
        require_role(ca, CONSOLE_ROLES)

    def list_data(revoked: bool) -> dict[str, Any]:
        query = parse_cert_query(request.args, revoked=revoked)
        counts = ca.ledger.status_counts()
        rows, total = ca.ledger.search(query, counts)
        return {
            "q": query.q,
            "field": query.field,
            "status": query.status,
            "sort": query.sort,
            "order": "desc" if query.descending else "asc",
            "page": query.page,
            "size": query.size,
            "total": total,
            "pages": max(1, -(-total // query.size)),
            "counts": counts,
            "certificates": [record_row(r) for r in rows],
        }

    @bp.get("/api/certificates")
    def api_certificates() -> Response:
        api_principal()
        return jsonify(list_data(False))

    @bp.get("/")
    def certificates() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template(
            "ca_console/certificates.html",
            s=s,
            d=list_data(False),
            revoked_page=False,
            sizes=PAGE_SIZES,
            fields=SEARCH_FIELDS,
            statuses=CERT_STATUSES,
        )

    @bp.get("/api/revoked")
    def api_revoked() -> Response:
        api_principal()
        return jsonify(list_data(True))

    @bp.get("/revoked")
    def revoked() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template(
            "ca_console/certificates.html",
            s=s,
            d=list_data(True),
            revoked_page=True,
            sizes=PAGE_SIZES,
            fields=SEARCH_FIELDS,
            statuses=CERT_STATUSES,
        )

    def detail_data(serial: str) -> dict[str, Any]:
        text = normal_serial(serial)
        try:
            value = int(text, 16)
        except ValueError:
            raise ParseError("path", "serial", 0, f"not a hex serial: {serial!r}") from None
        return certificate_detail(ca, ca.ledger.get(value))  # NotFoundError: 404

    @bp.get("/api/certificates/<serial>")
    def api_certificate(serial: str) -> Response:
        api_principal()
        return jsonify(detail_data(serial))

    @bp.get("/certificates/<serial>")
    def certificate(serial: str) -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template("ca_console/certificate.html", s=s, c=detail_data(serial))

    @bp.get("/api/crl")
    def api_crl() -> Response:
        api_principal()
        return jsonify(crl_state(ca))

    @bp.get("/crl")
    def crl() -> Page:
        s = session()
        if s is None:
            return login.to_login()
        return render_template("ca_console/crl.html", s=s, c=crl_state(ca))

    return bp
