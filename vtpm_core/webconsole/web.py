"""The consoles' common web parts: blueprint, security headers, login, logout.

A console (the verifier's ``verifier.console``, the CA's ``ca.console``) is one Flask
blueprint made by :func:`console_blueprint`: its own templates first, then the shared
ones (``webconsole/layout.html``, ``webconsole/login.html``), the shared stylesheet at
``<prefix>/static/console.css`` and the security headers on every response.
:class:`ConsoleLogin` adds the login form, the token exchange for the session cookie
and the logout form (the one state-changing form, so it carries the CSRF token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Response, redirect, render_template, request, url_for
from jinja2 import BaseLoader, ChoiceLoader, FileSystemLoader
from werkzeug.wrappers import Response as BaseResponse

from vtpm_core.webconsole.session import MAX_AGE_S, ROLES, ConsoleSession, SessionSigner

__all__ = [
    "SECURITY_HEADERS",
    "ConsoleLogin",
    "Page",
    "console_blueprint",
    "same_origin",
]

Page = BaseResponse | str | tuple[str, int]

HERE = Path(__file__).resolve().parent

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class _ConsoleBlueprint(Blueprint):
    """A blueprint whose templates are its own folder, then the shared ones."""

    @cached_property
    def jinja_loader(self) -> BaseLoader | None:
        own = FileSystemLoader(os.path.join(self.root_path, str(self.template_folder)))
        return ChoiceLoader([own, FileSystemLoader(str(HERE / "templates"))])


def _pretty_json(value: Any) -> str:
    # plain text: Jinja's autoescape then escapes it like any other value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def console_blueprint(name: str, import_name: str, url_prefix: str, templates: Path) -> Blueprint:
    """A console's blueprint: ``templates`` (then the shared ones), the shared CSS, the
    security headers on every response it makes, the ``pretty_json`` and ``age`` filters."""
    bp = _ConsoleBlueprint(
        name,
        import_name,
        url_prefix=url_prefix,
        template_folder=str(templates),
        static_folder=str(HERE / "static"),
        static_url_path="/static",
    )
    bp.add_app_template_filter(_pretty_json, "pretty_json")
    bp.add_app_template_filter(_age, "age")

    @bp.after_request
    def _headers(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    return bp


def same_origin() -> bool:
    """A form post from this origin, or from a client that is not a browser.

    Browsers send Fetch Metadata (``Sec-Fetch-Site``); it decides when present. Under
    ``Referrer-Policy: no-referrer`` chromium sends ``Origin: null`` even for a
    same-origin form, so ``Origin`` is only the fallback, and ``null`` there is refused.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


@dataclass(frozen=True, slots=True)
class ConsoleLogin:
    """Login and logout of one console.

    ``classify`` maps a presented token to its role, ``"admin"`` or ``"reader"``, or
    ``None`` (unknown, or a role that may not use the console). The cookie ``cookie``
    is scoped to ``path`` (the console's URL prefix): two consoles on one host (ports
    do not separate cookies) keep their sessions apart.
    """

    signer: SessionSigner
    classify: Callable[[str], str | None]
    cookie: str
    path: str
    base_template: str  # the console's base.html, which the login page extends

    def session(self) -> ConsoleSession | None:
        return self.signer.read(request.cookies.get(self.cookie))

    def to_login(self) -> BaseResponse:
        """The redirect of a page asked for without a session: back here after login."""
        target = request.full_path.rstrip("?")
        query = "" if target == self.path + "/" else "?" + urlencode({"next": target})
        return redirect(url_for(f"{request.blueprint}.login_form") + query, code=303)

    def _next(self, home: str) -> str:
        """The page to land on after login: ``next`` only when it is one of this console's
        own paths (never another host, scheme or path: no open redirect)."""
        target = request.form.get("next", "")
        parts = urlsplit(target)
        if (
            parts.scheme
            or parts.netloc
            or not target.startswith(self.path + "/")
            or "\\" in target
            or "//" in target
        ):
            return home
        return target

    def install(self, bp: Blueprint, home_endpoint: str) -> None:
        """Add ``GET/POST /login`` and ``POST /logout`` to ``bp``."""
        base = self.base_template

        def form(error: str | None, status: int = 200) -> tuple[str, int]:
            nxt = request.values.get("next", "")
            page = render_template(
                "webconsole/login.html", base=base, error=error, s=None, next=nxt
            )
            return page, status

        @bp.get("/login")
        def login_form() -> Page:
            return form(None)

        @bp.post("/login")
        def login() -> Page:
            if not same_origin():
                return form("cross-origin login refused", 403)
            token = request.form.get("token", "").strip()
            role = self.classify(token) if token else None
            if role not in ROLES:
                return form("not a reader or admin token", 401)
            assert role is not None
            cookie, _ = self.signer.issue(role)
            resp = redirect(self._next(url_for(f"{bp.name}.{home_endpoint}")), code=303)
            resp.set_cookie(
                self.cookie,
                cookie,
                max_age=MAX_AGE_S,
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
                path=self.path,
            )
            return resp

        @bp.post("/logout")
        def logout() -> Page:
            s = self.session()
            if s is None or not s.csrf_ok(request.form.get("csrf")) or not same_origin():
                return "CSRF check failed", 403
            resp = redirect(url_for(f"{bp.name}.login_form"), code=303)
            resp.delete_cookie(self.cookie, path=self.path)
            return resp
