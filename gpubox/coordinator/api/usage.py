"""The route of the usage report (gpubox.usage says what each figure means): GPU-hours, jobs,
GPU utilization and queue waits of the jobs that ended in a window, per submitter, label or
worker. Any token may read it."""

from __future__ import annotations

from typing import Any

import bottle

from gpubox import errors, models, usage
from gpubox.coordinator.api import context, endpoints

QUERY = ("since", "until", "by")


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/usage to `app`."""
    store = ctx.store

    @app.get("/api/v1/usage")
    @endpoints.endpoint(store, query=QUERY)
    def usage_report() -> dict[str, Any]:
        # Not decoded as UTF-8, which fails on other bytes: every valid value is ASCII.
        given = _once(bottle.request.query)
        by = usage.grouping(given.get("by"))
        since, until = usage.window(given.get("since"), given.get("until"), models.utcnow())
        return usage.report(store.ended_jobs(since, until), since, until, by)


def _once(query: bottle.FormsDict) -> dict[str, str]:
    """The query's parameters, each given at most once (errors.BadInput naming one given
    twice: which of the two was meant cannot be told)."""
    given: dict[str, str] = {}
    for name, value in query.allitems():
        if name in given:
            raise errors.BadInput(f"{name} is given more than once", name)
        given[name] = value
    return given
