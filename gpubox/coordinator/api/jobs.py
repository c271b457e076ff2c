"""The routes for jobs: submit one, read one, list them, cancel one (a job's log is in logs.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import bottle

from gpubox import errors, jobfilter, models, validate
from gpubox.coordinator import streams
from gpubox.coordinator.api import context, endpoints, params

MAX_WAIT_S = 60.0  # the longest ?wait= a GET of a job may wait
RETRY_AFTER_S = 5  # when no place is free for a long poll: when to ask again
LIST_LIMIT = (50, 1000)  # the jobs a list gives when it names no limit, and the most it may
MAX_IDEMPOTENCY_KEY = 255  # the longest Idempotency-Key, in printable ASCII characters


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add POST and GET /api/v1/jobs, GET /api/v1/jobs/<id> and its /cancel to `app`."""
    store, poke, sealer, live = ctx.store, ctx.poke, ctx.sealer, ctx.live
    max_body_bytes = ctx.max_body_bytes

    def shown(job: models.Job, place: bool = True, recent: bool = False) -> dict[str, Any]:
        """The job as the API shows it, with why it waits when it is QUEUED, and (with
        `place`: one job, not a list) where it stands in the queue (`recent`: a submit's
        answer, which may count the queue as it was up to 0.1 s before)."""
        answer = job.to_dict()
        if job.status is models.Status.QUEUED and live is not None:
            # Not `place` in a list: its two reads that count the queue made a list of 50
            # queued jobs ask for 100, and a client polling a list slowed every submit.
            answer.update(live.queue_state(job, place, recent))
        return answer

    @app.post("/api/v1/jobs")
    @endpoints.endpoint(store)
    def create_job() -> dict[str, Any]:
        token = endpoints.current_token()
        key = _idempotency_key()
        body = params.json_body(max_body_bytes)
        spec = dataclasses.replace(
            sealer.seal(ctx.webhooks.add_to(validate.parse_spec(body))),
            submitter=token.name,
            allow_process=token.may_use_process,
        )
        if spec.container.mounts:
            _check_mounts(spec.container.mounts, store.list_workers())
        if spec.queue_timeout is None and ctx.queue_timeout > 0:
            spec = dataclasses.replace(spec, queue_timeout=ctx.queue_timeout)
        cap = token.caps.max_queued
        if key is None:
            job, created = store.create_job(spec, models.utcnow(), cap), True
        else:
            # The same request is the same JSON, whatever its spacing or key order.
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            job, created = store.create_job_once(
                spec, models.utcnow(), token.name, key, digest, cap
            )
        bottle.response.set_header("Location", f"/api/v1/jobs/{job.id}")
        if created:
            poke("schedule", job.id)
            bottle.response.status = 201
        else:
            bottle.response.set_header("Idempotent-Replayed", "true")
        return shown(job, recent=True)

    @app.get("/api/v1/jobs/<job_id:int>")
    @endpoints.endpoint(store, query=("wait",))
    def get_job(job_id: int) -> dict[str, Any] | str:
        wait = params.float_param("wait", 0.0, 0.0, MAX_WAIT_S)
        job = store.get_job(job_id)
        if not wait or job.status.terminal:
            return shown(job)
        # A long poll: the job once it has ended, or as it is after `wait` s, served by
        # ctx.streams without a thread. With no place free for one, the job as it is now and
        # a Retry-After header saying when to ask again.
        try:
            ctx.streams.reserve("wait")
        except errors.Busy:
            bottle.response.set_header("Retry-After", str(RETRY_AFTER_S))
            return shown(job)
        bottle.response.content_type = "application/json"
        ctx.streams.detach(streams.Wait(job.id, wait, lambda job: json.dumps(shown(job)).encode()))
        return ""

    @app.get("/api/v1/jobs")
    @endpoints.endpoint(store, query=("limit", "before", *jobfilter.QUERY))
    def list_jobs() -> dict[str, Any]:
        where = jobfilter.JobFilter.from_query(params.text_query())
        default, most = LIST_LIMIT
        limit = params.int_param("limit", default, 1, most) or default
        before = params.int_param("before", None, 1, params.MAX_ID)
        jobs = store.list_jobs(None, limit + 1, before, where)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        shown_jobs = [shown(job, place=False) for job in jobs]
        return {"jobs": shown_jobs, "next": jobs[-1].id if more else None}

    @app.post("/api/v1/jobs/<job_id:int>/cancel")
    @endpoints.endpoint(store)
    def cancel_job(job_id: int) -> dict[str, Any]:
        return cancel(ctx, endpoints.current_token(), job_id).to_dict()


def _idempotency_key() -> str | None:
    """The request's Idempotency-Key header: 1-255 printable ASCII characters, or None."""
    raw = bottle.request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in raw):
        raise errors.BadInput(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            "Idempotency-Key",
        )
    return str(raw)


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
