"""The route that sends a job's GPU telemetry: its points (gpubox.telemetry), all of them or
those that ended after `since`, for polling while the job runs."""

from __future__ import annotations

import math
from typing import Any

import bottle

from gpubox import errors
from gpubox.coordinator.api import context, endpoints

MAX_POINTS = 10_000  # points in one answer; `next` says where the next answer starts


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/jobs/<id>/telemetry to `app`."""
    store = ctx.store

    @app.get("/api/v1/jobs/<job_id:int>/telemetry")
    @endpoints.endpoint(store, query=("since",))
    def job_telemetry(job_id: int) -> dict[str, Any]:
        since = _since(bottle.request.query.get("since"))
        job = store.get_job(job_id)  # 404 for a job that does not exist
        found = store.read_points(job_id, since, MAX_POINTS)
        points = [{"attempt": attempt, **point.to_dict()} for attempt, point in found]
        ends = [point["end"] for point in points]
        bottle.response.set_header("Cache-Control", "no-store")
        return {
            "job_id": job_id,
            "status": job.status.value,
            "points": points,
            # Pass as `since` to get only the points that end after these.
            "next": max(ends) if ends else since,
            "more": len(points) == MAX_POINTS,
        }


def _since(text: str | None) -> float | None:
    """The `since` parameter: Unix seconds (a point's end), or absent."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise errors.BadInput("since must be Unix seconds (a point's end)", "since")
    return value
