"""The routes that say how the coordinator is: /healthz (no token needed) and /metrics."""

from __future__ import annotations

from typing import Any

import bottle

from gpubox import __version__, errors
from gpubox.coordinator.api import context, endpoints


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /healthz and GET /metrics to `app`."""
    store, live = ctx.store, ctx.live

    @app.get("/healthz")
    @endpoints.endpoint(store, auth=False)
    def healthz() -> dict[str, Any]:
        # Up means the broker turns its loop too: with it dead or stuck, HTTP would take jobs
        # that never run.
        if live is not None and (trouble := live.stalled()):
            bottle.response.status = 503
            return {"status": "unavailable", "reason": trouble, "version": __version__}
        shown: dict[str, Any] = {"status": "ok", "version": __version__}
        if live is not None:
            shown["broker_last_turn_s"] = round(live.last_turn_s(), 3)
        return shown

    @app.get("/metrics")
    @endpoints.endpoint(store)
    def metrics() -> Any:
        if live is None:
            raise errors.NotFound("no metrics without a broker")
        page = live.metrics_page()
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return page
