"""Bearer-token authentication and the three roles of the attestation service.

- admin: manages policies and attesters (one token, from the verifier home);
- reader: a relying party; reads attesters and results;
- attester: the token issued at activation; it may only ask for challenges and
  submit evidence for its own attester id.

Tokens travel as ``Authorization: Bearer <token>`` (RFC 6750, section 2.1) and
are stored only as SHA-256 digests. A missing or unknown token is 401; a known
token without the right role (or for another attester) is 403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import bindparam, select

from verifier.service.config import ServiceConfig, hash_token
from verifier.service.db import Database
from verifier.service.errors import AuthenticationError
from verifier.service.models import Attester
from vtpm_core.errors import PermissionDeniedError

__all__ = ["Authenticator", "Principal", "Role"]

_BY_TOKEN = select(Attester.id).where(Attester.token_sha256 == bindparam("t"))


class Role(Enum):
    ADMIN = "admin"
    READER = "reader"
    ATTESTER = "attester"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    attester_id: str | None = None

    def require(self, *roles: Role, attester_id: str | None = None) -> None:
        """Raise 403 unless this principal has one of ``roles``.

        An attester principal passes only for its own ``attester_id``.
        """
        if self.role not in roles:
            wanted = "/".join(r.value for r in roles)
            raise PermissionDeniedError(
                f"this needs a {wanted} token, got a {self.role.value} token"
            )
        if (
            self.role is Role.ATTESTER
            and attester_id is not None
            and not hmac.compare_digest(self.attester_id or "", attester_id)
        ):
            raise PermissionDeniedError("an attester token only acts for its own attester")


class Authenticator:
    """Maps an Authorization header to a :class:`Principal` (or raises 401)."""

    def __init__(self, config: ServiceConfig, db: Database) -> None:
        self._admin = config.admin_token_sha256
        self._readers = config.reader_token_sha256
        self._db = db

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError("missing Authorization: Bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Authorization must be 'Bearer <token>'")
        digest = hash_token(token)
        if hmac.compare_digest(digest, self._admin):
            return Principal(Role.ADMIN)
        # compare against every reader token, so timing does not say which matched
        if sum(hmac.compare_digest(digest, r) for r in self._readers):
            return Principal(Role.READER)
        with self._db.read_connection() as conn:
            attester_id = conn.execute(_BY_TOKEN, {"t": digest}).scalar()
        if attester_id is None:
            raise AuthenticationError("unknown token")
        return Principal(Role.ATTESTER, attester_id)

    def optional(self, authorization: str | None) -> Principal | None:
        """Like :meth:`authenticate`, but no header means ``None`` (open routes)."""
        return self.authenticate(authorization) if authorization else None
