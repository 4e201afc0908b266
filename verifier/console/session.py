"""Console sessions: a reader/admin token exchanged for a signed, HttpOnly cookie.

The cookie holds the role and a CSRF token, signed with a key derived from the
admin token's digest (the same in every gunicorn worker, changed with the
admin token); it expires after ``MAX_AGE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

__all__ = ["COOKIE", "MAX_AGE_S", "ConsoleSession", "SessionSigner"]

COOKIE = "vtpm_console"
MAX_AGE_S = 8 * 3600


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    role: str  # "admin" or "reader"
    csrf: str

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf, presented)


class SessionSigner:
    def __init__(self, admin_token_sha256: str) -> None:
        key = hmac.new(
            bytes.fromhex(admin_token_sha256), b"vtpm-console-session", hashlib.sha256
        ).digest()
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
        if not isinstance(data, dict) or data.get("r") not in ("admin", "reader"):
            return None
        csrf = data.get("c")
        return ConsoleSession(str(data["r"]), csrf) if isinstance(csrf, str) else None
