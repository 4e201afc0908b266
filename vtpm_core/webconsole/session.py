"""Console sessions: a reader/admin token exchanged for a signed, HttpOnly cookie.

The cookie holds the role and a CSRF token, signed with a key derived from a secret
the console's service names (the verifier: its admin token's digest; the CA: its
session key file and its token digests), the same in every gunicorn worker; it
expires after ``MAX_AGE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

__all__ = ["MAX_AGE_S", "ROLES", "ConsoleSession", "SessionSigner"]

MAX_AGE_S = 8 * 3600
ROLES = ("admin", "reader")


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    role: str  # "admin" or "reader"
    csrf: str

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf, presented)


class SessionSigner:
    """Signs and reads session cookies; ``secret`` changes end every session."""

    def __init__(self, secret: bytes, context: bytes = b"vtpm-console-session") -> None:
        key = hmac.new(secret, context, hashlib.sha256).digest()
        self._s = URLSafeTimedSerializer(key, salt="console")

    def issue(self, role: str) -> tuple[str, ConsoleSession]:
        session = ConsoleSession(role, secrets.token_urlsafe(24))
        return self._s.dumps({"r": session.role, "c": session.csrf}), session

    def read(self, cookie: str | None) -> ConsoleSession | None:
        if not cookie:
            return None
        try:
            data = self._s.loads(cookie, max_age=MAX_AGE_S)
        except BadSignature:
            return None
        if not isinstance(data, dict) or data.get("r") not in ROLES:
            return None
        csrf = data.get("c")
        return ConsoleSession(str(data["r"]), csrf) if isinstance(csrf, str) else None
