"""The route that sends a job's log: one page, every stored line, or a stream that follows
the job until it ends (`?follow=1`), as text or NDJSON."""

from __future__ import annotations

import json
import json.encoder
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bottle

from gpubox import errors, models
from gpubox.coordinator.api import context, endpoints, params
from gpubox.coordinator.events import Changes
from gpubox.store import Store

log = logging.getLogger(__name__)

PAGE_LINES = 5000
# A page of a job's log also stops at about this many bytes of text: each open log request
# holds one page at a time (its rows and their rendering), whatever the lines' length. Pages of
# 5,000 lines of 60 KB made 6 requests that never read their answer hold 10 GB.
PAGE_BYTES = 1024 * 1024
KEEPALIVE_S = 15.0
WAKE_S = 1.0
TOKEN_CHECK_S = 1.0  # how often a follow stream checks that its token still holds


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/jobs/<id>/logs to `app`."""
    store, changes, stopping = ctx.store, ctx.changes, ctx.stopping
    followers = Followers(ctx.max_followers)

    @app.get("/api/v1/jobs/<job_id:int>/logs")
    @endpoints.endpoint(store)
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
        gone = bottle.request.environ.get("waitress.client_disconnected", lambda: False)
        revoked = _Revoked(store, endpoints.current_token())

        def disconnected() -> bool:
            return stopping.is_set() or gone() or revoked()

        render = _ndjson if ndjson else _text
        if limit is not None:  # one page: at most `limit` lines after `since`
            return render(store.read_log_rows(job_id, since, limit, PAGE_BYTES))
        if not follow:
            return _pages(store, job_id, since, render)
        followers.take()  # before the stream starts: a refusal is still a 503
        return followers.releasing(
            _follow(store, changes, job_id, since, render, ndjson, disconnected)
        )


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


class Followers:
    """How many follow streams are open, and a limit on it (see make_app)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.open >= self.limit:
                raise errors.Busy(
                    f"{self.open} log followers are connected, as many as this coordinator"
                    " serves (each holds an HTTP thread; --http-threads sets how many there"
                    " are): retry later"
                )
            self.open += 1

    def releasing(self, stream: Iterator[str]) -> Iterator[str]:
        """The stream, giving its place back when it ends or is closed (Bottle starts a
        generator at once, to send the headers, so this `finally` always runs)."""
        try:
            yield from stream
        finally:
            with self._lock:
                self.open -= 1


def _follow(
    store: Store,
    changes: Changes,
    job_id: int,
    since: int,
    render: Callable[[list[models.LogRow]], str],
    keepalive: bool,
    disconnected: Callable[[], bool],
) -> Iterator[str]:
    """Stored lines, then new ones as they are stored, until the job ends or the client goes.

    NDJSON streams start with, and every KEEPALIVE_S of silence send, an empty line: Bottle sends
    no headers before the first non-empty chunk, and the client uses them to tell a quiet job
    from a dead connection.
    """
    if keepalive:
        yield "\n"
    last_sent = time.monotonic()
    try:
        while not disconnected():
            seen = changes.version(job_id)
            lines = store.read_log_rows(job_id, since, PAGE_LINES, PAGE_BYTES)
            if lines:
                since = lines[-1][0]
                last_sent = time.monotonic()
                yield render(lines)
                continue
            if store.get_job(job_id).status.terminal:
                # Lines stored between our read and the status check come before the end.
                tail = store.read_log_rows(job_id, since, PAGE_LINES, PAGE_BYTES)
                if not tail:
                    return
                since = tail[-1][0]
                yield render(tail)
                continue
            changes.wait(job_id, seen, WAKE_S)
            if keepalive and time.monotonic() - last_sent > KEEPALIVE_S:
                last_sent = time.monotonic()
                yield "\n"
    except errors.GpuboxError as exc:
        # Headers are gone already: end the stream; the client resumes with ?since=.
        log.warning("log stream of job %d ended early: %s", job_id, exc)
