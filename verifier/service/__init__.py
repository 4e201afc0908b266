"""The attestation service (issue 6): HTTP API over the appraisal library.

    app = create_app(load_config(home))     # Flask app factory
    vtpm verifier serve --home DIR           # the same under gunicorn

Routes, auth and configuration: docs/service.md.
"""

from verifier.service.app import create_app
from verifier.service.config import ServiceConfig, init_home, load_config

__all__ = ["ServiceConfig", "create_app", "init_home", "load_config"]
