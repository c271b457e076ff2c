"""The route that shows a job's webhook deliveries and what each attempt gave."""

from __future__ import annotations

from typing import Any

import bottle

from gpubox.coordinator.api import context, endpoints


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/jobs/<id>/webhooks to `app`."""
    store = ctx.store

    @app.get("/api/v1/jobs/<job_id:int>/webhooks")
    @endpoints.endpoint(store)
    def job_webhooks(job_id: int) -> dict[str, Any]:
        job = store.get_job(job_id)  # 404 for a job that does not exist
        return {
            "webhooks": job.spec.webhooks,
            "deliveries": [d.to_dict() for d in store.job_deliveries(job_id)],
        }
