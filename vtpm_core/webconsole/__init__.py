"""What the web consoles share (issue 17): the verifier's (``verifier.console``) and the
CA's (``ca.console``) are two Flask blueprints in two services, made the same way.

:func:`console_blueprint` (templates, the one stylesheet, security headers),
:class:`ConsoleLogin` (a reader/admin token exchanged for an HttpOnly, SameSite=Strict
session cookie; logout with a CSRF token) and :class:`SessionSigner`. The shared
templates are ``webconsole/layout.html`` (each console's ``base.html`` extends it) and
``webconsole/login.html``. See docs/console.md.
"""

from vtpm_core.webconsole.session import MAX_AGE_S, ConsoleSession, SessionSigner
from vtpm_core.webconsole.web import (
    SECURITY_HEADERS,
    ConsoleLogin,
    Page,
    console_blueprint,
    same_origin,
)

__all__ = [
    "MAX_AGE_S",
    "SECURITY_HEADERS",
    "ConsoleLogin",
    "ConsoleSession",
    "Page",
    "SessionSigner",
    "console_blueprint",
    "same_origin",
]
