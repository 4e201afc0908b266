"""The CA's web console (issue 17): issued EK certificates, the revoked ones, the CRL.

Served by the CA's own Flask app (``vtpm ca serve``) at ``/ca-console/``: it owns the
ledger and the tokens. Server-rendered (Jinja2, the shared stylesheet and layout of
``vtpm_core.webconsole``, no JavaScript); every page is also the JSON route it renders
(``/ca-console/api/...``). See docs/console.md.
"""

from ca.console.views import ca_console_blueprint

__all__ = ["ca_console_blueprint"]
