"""The web console of the attestation service (issue 17): fleet and attester pages.

Server-rendered (Jinja2, plain CSS, no JavaScript); every page is also the JSON
route it renders (``/console/api/...``). See docs/console.md.
"""

from verifier.console.views import console_blueprint

__all__ = ["console_blueprint"]
