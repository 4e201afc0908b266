"""Errors become an HTTP status and an RFC 9457 problem body, in exactly one handler.

Problem bodies: ``{"type": "urn:vtpm-trust:problem:<slug>", "title": ...,
"status": ..., "detail": ...}`` with ``Content-Type: application/problem+json``
(RFC 9457, sections 3 and 3.1). ``detail`` names what was wrong (the structure,
field and offset of a parse error; the check of a verification error).
Unexpected exceptions answer 500 with a fixed text: no internals leak. A lost
database connection (PostgreSQL restarting, a backend terminated) or a database
that cannot write for now (SQLite's disk full, its lock held past busy_timeout)
answers 503 with ``Retry-After: 1`` and a fixed text: the client may retry; the
next request reconnects (pool pre-ping, the fast path's reconnect).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass

from flask import Flask, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from vtpm_core.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ParseError,
    PermissionDeniedError,
    StateError,
    UnavailableError,
    VerificationError,
    VtpmTrustError,
)

__all__ = [
    "AuthenticationError",
    "ExpiredError",
    "Problem",
    "TokenMismatchError",
    "install_error_handler",
    "problem_for",
]

_log = logging.getLogger("verifier.service")


class AuthenticationError(PermissionDeniedError):
    """No credentials, or credentials that match nobody (401, not 403)."""


class TokenMismatchError(AuthenticationError):
    """A hot path found that the presented token is not the attester's own.

    The route answers it by authenticating the token in full (401 unknown, 403
    another attester's); left uncaught it is a 401: fail closed.
    """


class ExpiredError(ConflictError):
    """A nonce or activation challenge outlived its lifetime (410)."""


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    slug: str
    title: str
    detail: str

    def response(self) -> Response:
        body = {
            "type": f"urn:vtpm-trust:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        resp = Response(json.dumps(body), status=self.status)
        resp.content_type = "application/problem+json"
        if self.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="vtpm-verifier"'
        if self.status == 503:
            resp.headers["Retry-After"] = "1"
        return resp


# Most specific first: the first isinstance match wins.
_MAPPING: tuple[tuple[type[VtpmTrustError], int, str, str], ...] = (
    (AuthenticationError, 401, "unauthenticated", "Missing or unknown token"),
    (PermissionDeniedError, 403, "forbidden", "Not allowed"),
    (ParseError, 400, "malformed", "Malformed request"),
    (NotFoundError, 404, "not-found", "Not found"),
    (ExpiredError, 410, "expired", "Expired"),
    (ConflictError, 409, "conflict", "Conflict"),
    (StateError, 409, "wrong-state", "Wrong state"),
    (VerificationError, 422, "verification-failed", "Verification failed"),
)


_UNAVAILABLE = Problem(
    503, "unavailable", "Temporarily unavailable", "database connection lost; retry"
)


# SQLite's retriable primary result codes (https://sqlite.org/rescode.html): the disk
# is full (SQLITE_FULL, until space is freed: the soak's full file system answered 500
# on the ORM's writes) or the database stayed locked past busy_timeout (SQLITE_BUSY).
_SQLITE_RETRIABLE = frozenset({5, 13})


def _connection_lost(exc: BaseException) -> bool:
    """The database could not be reached, dropped the connection or cannot write for
    now (retriable), as opposed to a broken schema or query (a 500). PostgreSQL's
    OperationalError is the connection class (psycopg: lost, refused, server shutting
    down); SQLite's also covers "no such table", which is not retriable: only its full
    disk and busy database are."""
    if isinstance(exc, UnavailableError | PoolTimeoutError):
        return True  # a pool checkout that waited pool_timeout: overloaded, retriable
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if isinstance(orig, sqlite3.OperationalError):
        return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_RETRIABLE
    return type(orig).__module__.startswith("psycopg")


def problem_for(exc: BaseException) -> Problem:
    """The problem a given exception becomes (internal errors hide their text)."""
    if _connection_lost(exc):
        return _UNAVAILABLE
    if isinstance(exc, HTTPException):
        code = exc.code or 500
        slug = {413: "too-large", 404: "not-found", 405: "method-not-allowed"}.get(
            code, "http-error"
        )
        return Problem(code, slug, exc.name, exc.description or exc.name)
    if isinstance(exc, VtpmTrustError) and not isinstance(exc, ConfigError):
        for cls, status, slug, title in _MAPPING:
            if isinstance(exc, cls):
                return Problem(status, slug, title, str(exc))
    return Problem(500, "internal", "Internal error", "internal error; see the verifier's log")


def install_error_handler(app: Flask) -> None:
    """Register THE error handler (every exception goes through it)."""

    def handle(exc: Exception) -> Response:
        problem = problem_for(exc)
        if problem.status == 503:
            _log.warning("database unavailable while serving a request: %s", exc)
        elif problem.status >= 500:
            _log.exception("internal error while serving a request")
        return problem.response()

    app.register_error_handler(Exception, handle)
