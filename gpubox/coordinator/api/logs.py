"""The route that sends a job's log: one page, every stored line, or a stream that follows
the job until it ends (`?follow=1`), as text or NDJSON."""

from __future__ import annotations

import json
import json.encoder
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import bottle

from gpubox import errors, models
from gpubox.coordinator import streams
from gpubox.coordinator.api import context, endpoints, params
from gpubox.coordinator.streams import PAGE_BYTES, PAGE_LINES
from gpubox.store import Store

log = logging.getLogger(__name__)

TOKEN_CHECK_S = 1.0  # how often a follow stream checks that its token still holds


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/jobs/<id>/logs to `app`."""
    store = ctx.store

    @app.get("/api/v1/jobs/<job_id:int>/logs")
    @endpoints.endpoint(store, query=("since", "limit", "follow", "format"))
    def job_logs(job_id: int) -> Any:
        since = params.int_param("since", 0, 0, params.MAX_ID) or 0
        limit = params.int_param("limit", None, 1, PAGE_LINES)
        follow = params.flag("follow")
        if limit is not None and follow:
            raise errors.BadInput("limit and follow do not go together", "limit")
        fmt = bottle.request.query.get("format", "text")
        if fmt not in ("text", "ndjson"):
            raise errors.BadInput("format must be text or ndjson", "format")
        store.get_job(job_id)  # 404 before any streaming starts
        ndjson = fmt == "ndjson"
        bottle.response.content_type = (
            "application/x-ndjson" if ndjson else "text/plain; charset=utf-8"
        )
        bottle.response.set_header("Cache-Control", "no-store")
        bottle.response.set_header("X-Accel-Buffering", "no")
        render = _ndjson if ndjson else _text
        if limit is not None:  # one page: at most `limit` lines after `since`
            return render(store.read_log_rows(job_id, since, limit, PAGE_BYTES))
        if not follow:
            return _pages(store, job_id, since, render)
        # Served by ctx.streams from here, without a thread: see streams.Follow. Only the job's
        # end ends the response as HTTP means it (its last chunk); an NDJSON stream then sends
        # one last record (end_record). Any other reason (the coordinator stopping, the token
        # revoked, the store failing) cuts it, so that the client sees an error and resumes
        # with ?since=. NDJSON streams start with, and every KEEPALIVE_S of silence send, an
        # empty line: the client tells a quiet job from a dead connection by them.
        ctx.streams.reserve("follow")  # before the stream starts: a refusal is still a 503
        revoked = _Revoked(store, endpoints.current_token())
        end = end_record if ndjson else (lambda job: "")
        ctx.streams.detach(streams.Follow(job_id, since, render, end, revoked, ndjson))
        return ""


def _text(lines: list[models.LogRow]) -> str:
    return "".join([f"{line}\n" for _, _, _, line in lines])


def _ndjson(lines: list[models.LogRow]) -> str:
    # As json.dumps(line.to_dict()) would write it, four times faster: only the line's text
    # needs escaping (seq is an integer; ts and stream are ASCII the worker wrote), by the
    # json module's own C escaper (what JSONEncoder(ensure_ascii=False) calls for a str).
    text = json.encoder.encode_basestring
    return "".join(
        [
            f'{{"seq": {seq}, "ts": "{ts}", "stream": "{stream}", "line": {text(line)}}}\n'
            for seq, ts, stream, line in lines
        ]
    )


def _pages(
    store: Store, job_id: int, since: int, render: Callable[[list[models.LogRow]], str]
) -> Iterator[str]:
    """Every stored line after `since`, read and sent a page at a time."""
    while lines := store.read_log_rows(job_id, since, PAGE_LINES, PAGE_BYTES):
        since = lines[-1][0]
        yield render(lines)


class _Revoked:
    """Whether the token of a follow stream has been revoked since the stream began: asked
    at most every TOKEN_CHECK_S, so that a stream ends soon after its token does (the store
    takes a revoke by another process into account within a second: store.tokens.TOKEN_CACHE_S)."""

    def __init__(self, store: Store, token: models.Token) -> None:
        """`token`: the one the request was made with (a bearer token, or a dashboard
        session's)."""
        self.store = store
        self.token = token
        self.checked = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.checked < TOKEN_CHECK_S:
            return False
        self.checked = now
        if self.store.find_token(self.token.digest) is None:
            log.info("a log stream ended: its token was revoked")
            return True
        return False


def end_record(job: models.Job) -> str:
    """The last record of an NDJSON follow stream: how the job ended."""
    record = {
        "end": True,
        "id": job.id,
        "status": job.status.value,
        "exit_code": job.exit_code,
        "error": job.error,
    }
    return json.dumps(record) + "\n"
