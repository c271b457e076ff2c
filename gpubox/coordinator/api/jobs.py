"""The routes for jobs: submit one, read one, list them, cancel one (a job's log is in logs.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import bottle

from gpubox import errors, models, validate
from gpubox.coordinator.api import context, endpoints, params


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add POST and GET /api/v1/jobs, GET /api/v1/jobs/<id> and its /cancel to `app`."""
    store, poke, sealer, live = ctx.store, ctx.poke, ctx.sealer, ctx.live
    max_body_bytes = ctx.max_body_bytes

    @app.post("/api/v1/jobs")
    @endpoints.endpoint(store)
    def create_job() -> dict[str, Any]:
        token = endpoints.current_token()
        spec = dataclasses.replace(
            sealer.seal(validate.parse_spec(params.json_body(max_body_bytes))),
            submitter=token.name,
            allow_process=token.may_use_process,
        )
        if spec.container.mounts:
            _check_mounts(spec.container.mounts, store.list_workers())
        job = store.create_job(spec, models.utcnow())
        poke("schedule", job.id)
        bottle.response.status = 201
        bottle.response.set_header("Location", f"/api/v1/jobs/{job.id}")
        return job.to_dict()

    @app.get("/api/v1/jobs/<job_id:int>")
    @endpoints.endpoint(store)
    def get_job(job_id: int) -> dict[str, Any]:
        job = store.get_job(job_id)
        shown = job.to_dict()
        if job.status is models.Status.QUEUED and live is not None:
            shown["queue_reason"] = live.queue_reason(job.id)
        return shown

    @app.get("/api/v1/jobs")
    @endpoints.endpoint(store)
    def list_jobs() -> dict[str, Any]:
        raw_status = bottle.request.query.get("status")
        status = validate.parse_status(raw_status) if raw_status else None
        limit = params.int_param("limit", 50, 1, 1000) or 50
        before = params.int_param("before", None, 1, params.MAX_ID)
        jobs = store.list_jobs(status, limit + 1, before)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {"jobs": [job.to_dict() for job in jobs], "next": jobs[-1].id if more else None}

    @app.post("/api/v1/jobs/<job_id:int>/cancel")
    @endpoints.endpoint(store)
    def cancel_job(job_id: int) -> dict[str, Any]:
        return cancel(ctx, endpoints.current_token(), job_id).to_dict()


def cancel(ctx: context.Context, token: models.Token, job_id: int) -> models.Job:
    """Cancel a job on behalf of `token` (the API's route and the dashboard's button): at
    once while QUEUED, through its worker while RUNNING."""
    _check_owner(token, ctx.store.get_job(job_id))
    job = ctx.store.cancel_job(job_id, models.utcnow())
    if job.status is models.Status.RUNNING:
        ctx.poke("cancel", job.id)
    ctx.changes.notify(job.id)
    if job.status.terminal:
        ctx.changes.forget(job.id)
    return job


def may_cancel(token: models.Token, job: models.Job) -> bool:
    """Whether `token` may cancel `job` now (what the dashboard offers)."""
    if job.status.terminal or token.role == "view":
        return False
    try:
        _check_owner(token, job)
    except errors.NotYourJob:
        return False
    return True


def _check_owner(token: models.Token, job: models.Job) -> None:
    """errors.NotYourJob unless this token may cancel the job: an admin token any job, a
    submit token only those it submitted. A job stored before gpubox recorded submitters
    has none, so only an admin token may cancel it."""
    if token.role == "admin" or (job.spec.submitter and job.spec.submitter == token.name):
        return
    if job.spec.submitter is None:
        raise errors.NotYourJob(
            f"job {job.id} was submitted before gpubox recorded who submits a job: only an"
            " admin token can cancel it"
        )
    raise errors.NotYourJob(
        f"job {job.id} was submitted by token {job.spec.submitter!r}, not by this one"
        f" ({token.name!r}): a submit token cancels only its own jobs, an admin token any"
    )


def _check_mounts(wanted: list[str], workers: list[models.WorkerInfo]) -> None:
    """400 for a mount name that no worker known to the coordinator declares."""
    declared = {name for worker in workers for name in worker.mounts}
    missing = [name for name in wanted if name not in declared]
    if missing:
        known = ", ".join(sorted(declared)) or "none"
        raise errors.BadInput(
            f"no worker declares a mount named {', '.join(missing)} (declared: {known})",
            "docker.mounts",
        )
