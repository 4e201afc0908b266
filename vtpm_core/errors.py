"""The one error hierarchy of vtpm-trust.

Every error the project raises on purpose derives from :class:`VtpmTrustError`.
The CLI turns them into one-line messages and exit codes; the HTTP apps turn
them into a status and a JSON problem body, in exactly one error handler each.

- :class:`ParseError`: the input is malformed. It names the structure, the
  field and the byte offset where parsing stopped.
- :class:`VerificationError`: the input is well formed but does not pass a
  check. It names the check.
- the rest describe operational failures (configuration, state, conflicts).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "ConstraintError",
    "NotFoundError",
    "ParseError",
    "PermissionDeniedError",
    "StateError",
    "TpmError",
    "UnavailableError",
    "VerificationError",
    "VtpmTrustError",
]


class VtpmTrustError(Exception):
    """Root of every error vtpm-trust raises on purpose."""


class ParseError(VtpmTrustError):
    """Malformed input: what structure, which field, at which byte offset."""

    def __init__(self, structure: str, field: str, offset: int, message: str) -> None:
        self.structure = structure
        self.field = field
        self.offset = offset
        self.message = message
        super().__init__(f"{structure}.{field} at byte {offset}: {message}")


class VerificationError(VtpmTrustError):
    """Well-formed but untrusted input: names the check that failed."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        self.message = message
        super().__init__(f"{check}: {message}")


class ConfigError(VtpmTrustError):
    """A configuration or command-line value is missing or invalid."""


class NotFoundError(VtpmTrustError):
    """A named object (vTPM, certificate, attester, policy) does not exist."""


class ConflictError(VtpmTrustError):
    """The request contradicts what is already recorded."""


class ConstraintError(ConflictError):
    """A database constraint refused a write (a UNIQUE key taken, a foreign key gone)."""


class PermissionDeniedError(VtpmTrustError):
    """The caller is not allowed to do this."""


class StateError(VtpmTrustError):
    """Stored state is missing, locked, or cannot be decrypted."""


class UnavailableError(StateError):
    """A database or service could not be reached or lost the connection: retriable."""


class TpmError(VtpmTrustError):
    """A TPM (or swtpm process) failed or answered with an error code."""
