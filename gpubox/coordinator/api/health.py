"""The routes that say how the coordinator is: /healthz (no token needed), /metrics, and
/api/v1/coordinators (the coordinators sharing the store, and which one leads)."""

from __future__ import annotations

from typing import Any

import bottle

from gpubox import __version__, errors, models
from gpubox.coordinator import leader
from gpubox.coordinator.api import context, endpoints
from gpubox.store import leases


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /healthz, GET /metrics and GET /api/v1/coordinators to `app`."""
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

    @app.get("/api/v1/coordinators")
    @endpoints.endpoint(store)
    def list_coordinators() -> dict[str, Any]:
        if not isinstance(store, leases.LeaseStore):
            return {"store": "sqlite", "leader": None, "coordinators": []}
        lead = store.leader()
        rows = store.coordinators(leader.SEEN_WITHIN_S)
        shown_lead = None
        if lead.live:
            shown_lead = {
                "id": lead.holder,
                "epoch": lead.epoch,
                "since": models.format_time(lead.since),
            }
        return {
            "store": "postgresql",
            "leader": shown_lead,
            "coordinators": [
                {
                    "id": row.id,
                    "host": row.host,
                    "pid": row.pid,
                    "http": row.http,
                    "link": row.link,
                    "started_at": models.format_time(row.started_at),
                    "seen_at": models.format_time(row.seen_at),
                    "takeovers": row.takeovers,
                    "leader": lead.live and row.id == lead.holder,
                }
                for row in rows
            ],
        }
