"""What every dashboard request passes through: the security headers, the session (else the
sign-in page), the role a page needs, and for anything that changes state the session's CSRF
token and the request's origin."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import bottle

from gpubox import errors, models
from gpubox.coordinator.api import http_errors
from gpubox.coordinator.api.endpoints import SESSION_TOKEN_KEY
from gpubox.coordinator.web.sessions import COOKIE, Session, Sessions, csrf_ok

log = logging.getLogger(__name__)

SESSION_KEY = "gpubox.session"  # where a request's session and token wait for its handler

# No script or style but the coordinator's own files, nothing from another origin, no
# framing: a job name or a log line that got into the page as markup could still do nothing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
ROLES = {"view": 0, "submit": 1, "admin": 2}


def secure_headers() -> None:
    for name, value in HEADERS.items():
        bottle.response.set_header(name, value)


def current() -> tuple[Session, models.Token]:
    """The session and token of the page being served, as its guard found them."""
    found: tuple[Session, models.Token] = bottle.request.environ[SESSION_KEY]
    return found


def same_origin(public_origin: str = "") -> bool:
    """Whether a state-changing request comes from a page of this coordinator: its Origin
    (or, without one, its Referer) names this host as the request reached it, or
    `public_origin` (the address in front of a proxy). Browsers send Origin with every POST."""
    origin = bottle.request.get_header("Origin") or bottle.request.get_header("Referer")
    if not origin:
        return False
    own = f"{bottle.request.urlparts.scheme}://{bottle.request.urlparts.netloc}"
    return any(
        origin == allowed or origin.startswith(allowed + "/")
        for allowed in (own, public_origin)
        if allowed
    )


def page(
    sessions: Sessions, role: str = "view", fragment: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a dashboard route: security headers; the session (without one: the sign-in
    page, or 401 for a fragment); at least `role`; for POST, the CSRF token and the origin.
    gpubox errors become an error page with their status."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            secure_headers()
            found = sessions.find(bottle.request.get_cookie(COOKIE))
            if found is None:
                if fragment or bottle.request.method != "GET":
                    bottle.response.status = 401
                    # A page refreshing itself (htmx) goes to the sign-in page, not blank.
                    bottle.response.set_header("HX-Redirect", "/login")
                    return "signed out: sign in again"
                target = quote(bottle.request.fullpath, safe="/")
                bottle.redirect(f"/login?next={target}", 303)
            session, token = found  # type: ignore[misc]
            if ROLES.get(token.role, -1) < ROLES[role]:
                bottle.response.status = 403
                return error_page(403, f"this needs a {role} token")
            sent_csrf = bottle.request.forms.get("csrf")
            if bottle.request.method == "POST" and not (
                same_origin(sessions.public_origin) and csrf_ok(session, sent_csrf)
            ):
                bottle.response.status = 403
                return error_page(403, "refused: the form did not come from this dashboard")
            bottle.request.environ[SESSION_KEY] = (session, token)
            try:
                return fn(*args, **kwargs)
            except errors.GpuboxError as exc:
                bottle.response.status = http_errors.status_for(exc)
                return error_page(bottle.response.status_code, exc.message)

        return wrapper

    return wrap


def error_page(status: int, message: str) -> str:
    return str(bottle.template("error", status=status, message=message))


def install_api_sessions(app: bottle.Bottle, sessions: Sessions) -> None:
    """Let the API's reads (GET, HEAD) be made with a session cookie instead of a bearer
    token: the dashboard's scripts read a job's log and telemetry so. Writes still need a
    bearer token (a cookie rides along with cross-site requests a page cannot stop)."""

    @app.hook("before_request")
    def session_token() -> None:
        environ = bottle.request.environ
        if (
            environ.get("REQUEST_METHOD") in ("GET", "HEAD")
            and environ.get("PATH_INFO", "").startswith("/api/")
            and "HTTP_AUTHORIZATION" not in environ
            and COOKIE in environ.get("HTTP_COOKIE", "")
        ):
            found = sessions.find(bottle.request.get_cookie(COOKIE))
            if found is not None:
                environ[SESSION_TOKEN_KEY] = found[1]
