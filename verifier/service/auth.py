"""Bearer-token authentication and the three roles of the attestation service.

- admin: manages policies and attesters (one token, from the verifier home);
- reader: a relying party; reads attesters and results;
- attester: the token issued at activation; it may only ask for challenges and
  submit evidence for its own attester id.

Tokens travel as ``Authorization: Bearer <token>`` (RFC 6750, section 2.1) and
are stored only as SHA-256 digests. A missing or unknown token is 401; a known
token without the right role (or for another attester) is 403.

The two hot routes (challenge, evidence) do not look an attester token up on
its own: :meth:`Authenticator.classify` recognises the admin and reader tokens
from the configuration, and the service compares any other token's digest with
the attester row it reads anyway (constant time). Only a mismatch pays for the
full lookup, which then says 401 or 403 exactly as :meth:`authenticate` does.
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

__all__ = ["AttesterToken", "Authenticator", "Principal", "Role"]

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


@dataclass(frozen=True, slots=True)
class AttesterToken:
    """A token that is neither the admin's nor a reader's: at best one attester's.

    Not yet looked up; whoever reads the attester's row compares ``sha256``
    with its ``token_sha256``.
    """

    sha256: str


class Authenticator:
    """Maps an Authorization header to a :class:`Principal` (or raises 401)."""

    def __init__(self, config: ServiceConfig, db: Database) -> None:
        self._admin = config.admin_token_sha256
        self._readers = config.reader_token_sha256
        self._db = db

    def classify(self, authorization: str | None) -> Principal | AttesterToken:
        """The admin or a reader principal (no database), or the digest of any other token."""
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
        return AttesterToken(digest)

    def authenticate(self, authorization: str | None) -> Principal:
        found = self.classify(authorization)
        if isinstance(found, Principal):
            return found
        with self._db.read_connection() as conn:
            attester_id = conn.execute(_BY_TOKEN, {"t": found.sha256}).scalar()
        if attester_id is None:
            raise AuthenticationError("unknown token")
        return Principal(Role.ATTESTER, attester_id)

    def optional(self, authorization: str | None) -> Principal | None:
        """Like :meth:`authenticate`, but no header means ``None`` (open routes)."""
        return self.authenticate(authorization) if authorization else None
