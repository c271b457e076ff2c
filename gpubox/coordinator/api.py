"""The HTTP API (v1) as a Bottle app: JSON in and out, bearer tokens, one error model."""

from __future__ import annotations

import dataclasses
import functools
import json
import json.encoder
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

import bottle

from gpubox import __version__, errors, keys, models, validate
from gpubox.coordinator import sealing, tokens
from gpubox.coordinator.events import Changes
from gpubox.store import Store

log = logging.getLogger(__name__)

PAGE_LINES = 5000
# A page of a job's log also stops at about this many bytes of text: each open log request
# holds one page at a time (its rows and their rendering), whatever the lines' length. Pages of
# 5,000 lines of 60 KB made 6 requests that never read their answer hold 10 GB.
PAGE_BYTES = 1024 * 1024
MAX_ID = 2**63 - 1
KEEPALIVE_S = 15.0
WAKE_S = 1.0
TOKEN_CHECK_S = 1.0  # how often a follow stream checks that its token still holds


# The HTTP status of each gpubox error. An error takes the status of the first class here that
# it is an instance of, so a subclass must come before its parent class. Any other error (a
# StoreError, a ProtocolError, a ConfigError or a plain GpuboxError) is a fault of gpubox, not
# of the request, and is a 500.
STATUS: dict[type[errors.GpuboxError], int] = {
    errors.BadInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,  # NotYourJob too
    errors.NotFound: 404,  # JobNotFound too
    errors.WrongState: 409,
    errors.TooLarge: 413,
    errors.StoreUnavailable: 503,  # a StoreError, but the client may try again
    errors.Busy: 503,
}


def status_for(exc: errors.GpuboxError) -> int:
    """The HTTP status that the API answers `exc` with (see STATUS)."""
    return next((status for cls, status in STATUS.items() if isinstance(exc, cls)), 500)


def _error_body(code: str, message: str, field: str | None = None) -> str:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return json.dumps({"error": error})


def _no_constant(name: str) -> Any:
    raise errors.BadInput(f"{name} is not valid JSON")


def _int_param(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.BadInput(f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise errors.BadInput(f"{name} must be between {low} and {high}", name)
    return value


def _flag(name: str) -> bool:
    raw = bottle.request.query.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise errors.BadInput(f"{name} must be 0 or 1", name)
    return raw in ("1", "true", "yes")


class LiveView(Protocol):
    """What the broker knows that the store does not (coordinator.broker.Broker)."""

    def queue_reason(self, job_id: int) -> str: ...

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]: ...

    def metrics_page(self) -> str: ...

    def last_heard(self, worker: str) -> datetime | None: ...

    def quarantine(self, worker: str) -> str: ...

    def stalled(self) -> str: ...

    def last_turn_s(self) -> float: ...


TOKEN_KEY = "gpubox.token"  # where a request's checked token waits for its handler


def _token() -> models.Token:
    """The token of the request being served, as its endpoint checked it."""
    token: models.Token = bottle.request.environ[TOKEN_KEY]
    return token


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


def make_app(
    store: Store,
    changes: Changes,
    poke: Callable[[str, int], None],
    sealer: sealing.Sealer,
    state_dir: str,
    max_body_bytes: int = 1_048_576,
    stopping: threading.Event | None = None,
    live: LiveView | None = None,
    max_followers: int = 1_000_000,
) -> bottle.Bottle:
    """The WSGI app. `poke` tells the broker about new jobs and cancels; `sealer` encrypts
    credentials before they are stored; `state_dir` holds the worker allow list; `stopping`
    ends follow streams when the server shuts down; `live` is what only the broker knows
    (why a job waits, GPU usage now); `max_followers` caps the follow streams open at once,
    each of which holds an HTTP thread, so that threads stay for every other request."""
    app = bottle.Bottle()
    stopping = stopping or threading.Event()
    followers = Followers(max_followers)

    def default_error(res: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        message = {404: "no such endpoint", 405: "method not allowed"}.get(res.status_code)
        return _error_body(codes.get(res.status_code, "error"), message or str(res.body))

    app.default_error_handler = default_error  # type: ignore[method-assign]

    def endpoint(
        auth: bool = True, admin: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Wrap a route: check the token (and its role, for `admin` routes), turn gpubox
        errors into JSON error responses."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    if auth:
                        # The raw WSGI value (latin-1): Bottle's get_header re-decodes it as
                        # UTF-8 and fails on other bytes.
                        token = tokens.check(
                            store, bottle.request.environ.get("HTTP_AUTHORIZATION")
                        )
                        if admin and token.role != "admin":
                            raise errors.Forbidden("this needs an admin token")
                        bottle.request.environ[TOKEN_KEY] = token
                    job_id = kwargs.get("job_id")
                    if job_id is not None and not 0 < job_id <= MAX_ID:
                        raise errors.JobNotFound(job_id)
                    return fn(*args, **kwargs)
                except errors.GpuboxError as exc:
                    status = status_for(exc)
                    bottle.response.status = status
                    bottle.response.content_type = "application/json"
                    if status == 401:
                        bottle.response.set_header("WWW-Authenticate", 'Bearer realm="gpubox"')
                    if status >= 500:
                        log.warning("%s %s: %s", bottle.request.method, bottle.request.path, exc)
                    return _error_body(exc.code, exc.message, getattr(exc, "field", None))
                except Exception:
                    log.exception(
                        "unexpected error on %s %s", bottle.request.method, bottle.request.path
                    )
                    bottle.response.status = 500
                    bottle.response.content_type = "application/json"
                    return _error_body("internal", "internal error; see the coordinator's log")

            return wrapper

        return wrap

    def json_body() -> Any:
        length = bottle.request.content_length
        if length > max_body_bytes:
            raise errors.TooLarge(f"the body is larger than {max_body_bytes} bytes")
        raw = bottle.request.body.read(max_body_bytes + 1)
        if len(raw) > max_body_bytes:
            raise errors.TooLarge(f"the body is larger than {max_body_bytes} bytes")
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise errors.BadInput(f"the body is not valid JSON: {exc}") from None
        except ValueError as exc:  # an integer of more than 4,300 digits (int's own limit)
            raise errors.BadInput(f"the body holds a number too long to read: {exc}") from None
        except RecursionError:
            raise errors.BadInput("the body is nested too deeply") from None

    @app.get("/healthz")
    @endpoint(auth=False)
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
    @endpoint()
    def metrics() -> Any:
        if live is None:
            raise errors.NotFound("no metrics without a broker")
        page = live.metrics_page()
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return page

    @app.post("/api/v1/jobs")
    @endpoint()
    def create_job() -> dict[str, Any]:
        token = _token()
        spec = dataclasses.replace(
            sealer.seal(validate.parse_spec(json_body())),
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
    @endpoint()
    def get_job(job_id: int) -> dict[str, Any]:
        job = store.get_job(job_id)
        shown = job.to_dict()
        if job.status is models.Status.QUEUED and live is not None:
            shown["queue_reason"] = live.queue_reason(job.id)
        return shown

    @app.get("/api/v1/jobs")
    @endpoint()
    def list_jobs() -> dict[str, Any]:
        raw_status = bottle.request.query.get("status")
        status = validate.parse_status(raw_status) if raw_status else None
        limit = _int_param("limit", 50, 1, 1000) or 50
        before = _int_param("before", None, 1, MAX_ID)
        jobs = store.list_jobs(status, limit + 1, before)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {"jobs": [job.to_dict() for job in jobs], "next": jobs[-1].id if more else None}

    @app.post("/api/v1/jobs/<job_id:int>/cancel")
    @endpoint()
    def cancel_job(job_id: int) -> dict[str, Any]:
        _check_owner(_token(), store.get_job(job_id))
        job = store.cancel_job(job_id, models.utcnow())
        if job.status is models.Status.RUNNING:
            poke("cancel", job.id)
        changes.notify(job.id)
        if job.status.terminal:
            changes.forget(job.id)
        return job.to_dict()

    @app.get("/api/v1/jobs/<job_id:int>/logs")
    @endpoint()
    def job_logs(job_id: int) -> Any:
        since = _int_param("since", 0, 0, MAX_ID) or 0
        limit = _int_param("limit", None, 1, PAGE_LINES)
        follow = _flag("follow")
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
        revoked = _Revoked(store, bottle.request.environ.get("HTTP_AUTHORIZATION"))

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

    @app.get("/api/v1/workers")
    @endpoint()
    def list_workers() -> dict[str, Any]:
        running: dict[str, list[int]] = {}
        for job in store.running_jobs():
            running.setdefault(job.worker or "", []).append(job.id)
        shown = []
        for worker in store.list_workers():
            quarantine = ""
            if live is not None and worker.connected:
                heard = live.last_heard(worker.name)
                if heard is not None:
                    worker = dataclasses.replace(worker, last_seen=heard)
                usage = live.gpu_usage(worker.name)
                quarantine = live.quarantine(worker.name)
            else:
                usage = None
            # Why it gets no jobs now, if it does not (see Broker._unconfirmed).
            item = {**worker.to_dict(running.get(worker.name, []), usage)}
            item["quarantined"] = quarantine or None
            shown.append(item)
        return {"workers": shown}

    @app.post("/api/v1/workers/<name>/revoke")
    @endpoint(admin=True)
    def revoke_worker(name: str) -> dict[str, Any]:
        try:
            revoked = keys.revoke(state_dir, name)
        except errors.ConfigError as exc:
            raise errors.BadInput(str(exc), "name") from None
        if not revoked:
            raise errors.NotFound(f"worker {name!r} is not on the allow list")
        return {"name": name, "revoked": True}

    @app.get("/api/v1/tokens")
    @endpoint(admin=True)
    def list_tokens() -> dict[str, Any]:
        return {
            "tokens": [
                {
                    "name": t.name,
                    "role": t.role,
                    "allow_process": t.allow_process,
                    "created_at": models.format_time(t.created_at),
                }
                for t in store.list_tokens()
            ]
        }

    @app.post("/api/v1/tokens")
    @endpoint(admin=True)
    def create_token() -> dict[str, Any]:
        body = json_body()
        if not isinstance(body, dict):
            raise errors.BadInput("the body must be a JSON object")
        for key in body:
            if key not in ("name", "role", "allow_process"):
                raise errors.BadInput(f"unknown field {key!r}", key)
        name, role = body.get("name"), body.get("role", "submit")
        allow_process = body.get("allow_process", False)
        if not isinstance(name, str):
            raise errors.BadInput("name is required and must be a string", "name")
        if not isinstance(role, str):
            raise errors.BadInput("role must be a string", "role")
        if not isinstance(allow_process, bool):
            raise errors.BadInput("allow_process must be true or false", "allow_process")
        value = tokens.create(store, name, role, allow_process)
        bottle.response.status = 201
        return {"name": name, "role": role, "allow_process": allow_process, "token": value}

    @app.delete("/api/v1/tokens/<name>")
    @endpoint(admin=True)
    def revoke_token(name: str) -> dict[str, Any]:
        if not store.revoke_token(name):
            raise errors.NotFound(f"no token named {name!r}")
        return {"name": name, "revoked": True}

    return app


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

    def __init__(self, store: Store, header: str | None) -> None:
        self.store = store
        self.header = header
        self.checked = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.checked < TOKEN_CHECK_S:
            return False
        self.checked = now
        try:
            tokens.check(self.store, self.header)
        except errors.Unauthorized:
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
