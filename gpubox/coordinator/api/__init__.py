"""The HTTP API (v1) as a Bottle app: JSON in and out, bearer tokens, one error model.

make_app builds the app from the package's modules, each with one job:

- context.py: what the routes work with (the store, the broker's LiveView, the settings);
- endpoints.py: the wrapper around every route (token check, errors answered as JSON);
- params.py: reading a request's JSON body and query parameters;
- http_errors.py: the HTTP status of each gpubox error (STATUS) and the error body;
- health.py, jobs.py, logs.py, telemetry.py, admin.py, usage.py: the routes, by what they
  are about;
- openapi.py: the API's reference, an OpenAPI 3.1 document (its schemas in openapi_schemas.py,
  its words in openapi_text.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import bottle

from gpubox.coordinator import sealing, webhooks
from gpubox.coordinator.api import (
    admin,
    context,
    deliveries,
    health,
    http_errors,
    jobs,
    logs,
    openapi,
    telemetry,
    usage,
)
from gpubox.coordinator.api.context import LiveView
from gpubox.coordinator.api.endpoints import TOKEN_KEY
from gpubox.coordinator.api.http_errors import STATUS, status_for
from gpubox.coordinator.api.logs import TOKEN_CHECK_S, _ndjson
from gpubox.coordinator.api.params import MAX_ID
from gpubox.coordinator.events import Changes
from gpubox.coordinator.streams import KEEPALIVE_S, PAGE_BYTES, PAGE_LINES, WAKE_S, Streams
from gpubox.store import Store

# What other modules, tests and scripts import from here, whichever module of the package holds
# it (tests/test_api.py reads _ndjson; scripts/benchlib reads PAGE_LINES).
__all__ = [
    "KEEPALIVE_S",
    "MAX_ID",
    "PAGE_BYTES",
    "PAGE_LINES",
    "STATUS",
    "TOKEN_CHECK_S",
    "TOKEN_KEY",
    "WAKE_S",
    "LiveView",
    "_ndjson",
    "make_app",
    "status_for",
]


def make_app(
    store: Store,
    changes: Changes,
    poke: Callable[[str, int], None],
    sealer: sealing.Sealer,
    state_dir: str,
    max_body_bytes: int = 1_048_576,
    stopping: threading.Event | None = None,
    live: LiveView | None = None,
    streams: Streams | None = None,
    dashboard: bool = True,
    public_url: str = "",
    queue_timeout: float = 0.0,
    webhook_settings: webhooks.Settings | None = None,
) -> bottle.Bottle:
    """The WSGI app. `poke` tells the broker about new jobs and cancels; `sealer` encrypts
    credentials before they are stored; `state_dir` holds the worker allow list; `stopping`
    ends follow streams when the server shuts down; `live` is what only the broker knows
    (why a job waits, GPU usage now); `streams` serves log follow streams and long polls (its
    thread runs apart: see server.make_app; by default one that allows 10,000 and is never
    started, enough for an app that streams nothing);
    `dashboard`: serve the web dashboard at / (coordinator.web); `public_url`: where people
    open it when a proxy stands in front (web.Sessions); `queue_timeout`: the seconds a job
    that names none may stay queued (0: never); `webhook_settings`: which URLs jobs'
    webhooks may call (none: webhooks off) and the coordinator's own."""
    app = bottle.Bottle()
    stopping = stopping or threading.Event()
    app.default_error_handler = http_errors.default_error  # type: ignore[method-assign]
    ctx = context.Context(
        store=store,
        changes=changes,
        poke=poke,
        sealer=sealer,
        state_dir=state_dir,
        max_body_bytes=max_body_bytes,
        stopping=stopping,
        live=live,
        streams=streams or Streams(store, changes, stopping, 10_000),
        queue_timeout=queue_timeout,
        webhooks=webhook_settings or webhooks.Settings(),
    )
    # In the order the routes were always added: Bottle tries the routes of one method in the
    # order they were added.
    for routes in (health, jobs, logs, telemetry, admin, deliveries, usage, openapi):
        routes.add_routes(app, ctx)
    if dashboard:
        from gpubox.coordinator import web

        web.add_routes(app, ctx, web.Sessions(store, public_url=public_url))
    return app
