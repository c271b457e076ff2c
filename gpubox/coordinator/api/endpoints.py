"""The wrapper around every route: it checks the request's token and answers gpubox errors (and
unexpected ones) as JSON error responses."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import bottle

from gpubox import errors, models
from gpubox.coordinator import tokens
from gpubox.coordinator.api import http_errors, params
from gpubox.store import Store

log = logging.getLogger(__name__)

TOKEN_KEY = "gpubox.token"  # where a request's checked token waits for its handler
# Where a dashboard session's token waits when it makes an API read (web.guard sets it).
SESSION_TOKEN_KEY = "gpubox.session_token"


def current_token() -> models.Token:
    """The token of the request being served, as its endpoint checked it."""
    checked: models.Token = bottle.request.environ[TOKEN_KEY]
    return checked


def endpoint(
    store: Store, auth: bool = True, admin: bool = False, query: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a route: check the token against `store` (and its role, for `admin` routes), refuse
    a query parameter not in `query` (a misspelt filter must not act on every job), turn
    gpubox errors into JSON error responses."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if auth:
                    environ = bottle.request.environ
                    # A dashboard session's token, for reads (web.guard); else the raw WSGI
                    # value (latin-1): Bottle's get_header re-decodes it as UTF-8 and fails
                    # on other bytes.
                    token = environ.get(SESSION_TOKEN_KEY) or tokens.check(
                        store, environ.get("HTTP_AUTHORIZATION")
                    )
                    if admin and token.role != "admin":
                        raise errors.Forbidden("this needs an admin token")
                    if token.role == "view" and bottle.request.method not in ("GET", "HEAD"):
                        raise errors.Forbidden("a view token may only read")
                    environ[TOKEN_KEY] = token
                params.only(query)
                job_id = kwargs.get("job_id")
                if job_id is not None and not 0 < job_id <= params.MAX_ID:
                    raise errors.JobNotFound(job_id)
                return fn(*args, **kwargs)
            except errors.GpuboxError as exc:
                status = http_errors.status_for(exc)
                bottle.response.status = status
                bottle.response.content_type = "application/json"
                if status == 401:
                    bottle.response.set_header("WWW-Authenticate", 'Bearer realm="gpubox"')
                if isinstance(exc, errors.OverCap):
                    bottle.response.set_header("Retry-After", str(exc.retry_after_s))
                if status >= 500:
                    log.warning("%s %s: %s", bottle.request.method, bottle.request.path, exc)
                return http_errors.error_body(exc.code, exc.message, getattr(exc, "field", None))
            except Exception:
                log.exception(
                    "unexpected error on %s %s", bottle.request.method, bottle.request.path
                )
                bottle.response.status = 500
                bottle.response.content_type = "application/json"
                return http_errors.error_body(
                    "internal", "internal error; see the coordinator's log"
                )

        return wrapper

    return wrap
