"""gpubox's Python client: one method per endpoint of the HTTP API, plus the three a CI step
needs, each of which rides out a coordinator that restarts or is busy: `submit` (retried with
its Idempotency-Key, so a lost answer never makes two jobs), `wait` (a long poll until the job
ends) and `tail` (its output as it comes, resumed without a gap or a repeat).

    from gpubox import Client, exits

    client = Client("http://gpu-head:8470", token)
    job = client.submit({"name": "train", "gpus": 1, "docker": {"image": "my/trainer"}})
    ended = client.wait(job["id"])
    sys.exit(exits.for_job(ended["status"], ended["result"]["exit_code"], ended["result"]["error"]))

Errors: ApiError (the coordinator refused: its HTTP status, code and field), Unreachable (no
answer), GaveUp (waiting or following stopped before the job ended), each a GpuboxError with
the `exit_code` a command exits with (gpubox.exits). The CLI is built on this class.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from gpubox import errors, exits

RETRYABLE = (
    ConnectionError,
    TimeoutError,
    socket.timeout,
    http.client.HTTPException,
    urllib.error.URLError,
    OSError,
)
FOLLOW_READ_TIMEOUT_S = 60.0
RETRY_NOTE_EVERY_S = 30.0  # while a follow retries, how often it says so again
WAIT_POLL_S = 25.0  # the ?wait= of each long poll: under the coordinator's 60 s cap
BUSY_POLL_S = 2.0  # how often tail reads new lines while the coordinator has no stream free
ENDED = ("FINISHED", "ERROR", "CANCELLED")


class OutputClosed(errors.GpuboxError):
    """Where `tail` prints cannot be written: a pipe's reader exited (`gpubox tail 42 | head`,
    EPIPE), or a full disk, … (the OSError is its cause)."""


class ApiError(errors.GpuboxError):
    """The coordinator refused the request."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # status is the HTTP status of the answer; code and field come from its JSON body.
        self.status, self.code, self.field = status, code, field

    @property
    def exit_code(self) -> int:
        return exits.for_http_status(self.status)


class Unreachable(errors.GpuboxError):
    """The coordinator could not be reached."""

    exit_code = exits.UNAVAILABLE


class GaveUp(errors.GpuboxError):
    """Waiting for a job, or following it, stopped before it ended; the job may still run."""

    exit_code = exits.GAVE_UP


def exit_code_for(job: dict[str, Any]) -> int:
    """What a command that saw this job end exits with (gpubox.exits)."""
    result = job.get("result") or {}
    return exits.for_job(job["status"], result.get("exit_code"), result.get("error"))


def local_token(state_dir: str) -> str:
    """The token `gpubox up` wrote for clients on the same box, or ''."""
    try:
        return (Path(state_dir) / "token").read_text().strip()
    except OSError:
        return ""


def _transient(exc: BaseException) -> bool:
    """Whether asking again may get another answer: no answer at all, or a 5xx (the
    coordinator's store is away, or it is busy)."""
    if isinstance(exc, ApiError):
        return exc.status >= 500
    return isinstance(exc, (Unreachable, ValueError, *RETRYABLE))


class Client:
    """Talks to a coordinator's HTTP API. Safe to share between threads.

    `url` may name several coordinators, comma-separated (they share one PostgreSQL store,
    and any of them answers): a request that cannot connect to one goes to the next at
    once. A GET also moves on when the answer does not come (a coordinator frozen, or its
    machine gone); any other request only when it could not be sent, so a submit is never
    sent twice by this."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0) -> None:
        self.urls = [part.strip().rstrip("/") for part in url.split(",") if part.strip()]
        self.url = self.urls[0] if self.urls else url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    # --- requests ------------------------------------------------------------------------

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        for _ in range(len(self.urls) - 1):
            url = self.url
            try:
                return self._open_at(url, method, path, body, timeout_s, headers)
            except Unreachable as exc:
                if method != "GET" and not isinstance(exc.__cause__, urllib.error.URLError):
                    raise  # the request may have reached it: not sent again here
                index = self.urls.index(url) if url in self.urls else -1
                self.url = self.urls[(index + 1) % len(self.urls)]
        return self._open_at(self.url, method, path, body, timeout_s, headers)

    def _open_at(
        self,
        url: str,
        method: str,
        path: str,
        body: Any,
        timeout_s: float | None,
        headers: Mapping[str, str] | None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
                raise ApiError(
                    exc.code, error["code"], error["message"], error.get("field")
                ) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(exc.code, "http", f"HTTP {exc.code}: {raw[:200]!r}") from None
        except RETRYABLE as exc:
            raise Unreachable(f"cannot reach the coordinator at {url}: {exc}") from exc

    def call(
        self, method: str, path: str, body: Any = None, query: Any = None, **params: Any
    ) -> Any:
        """One JSON request; the decoded JSON answer. `query`: (name, value) pairs, for names
        given more than once; `params`: more of them (None values left out)."""
        pairs = list(query or []) + [(k, v) for k, v in params.items() if v is not None]
        if pairs:
            path += "?" + urllib.parse.urlencode(pairs)
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    # --- jobs ----------------------------------------------------------------------------

    def submit(
        self,
        spec: dict[str, Any],
        idempotency_key: str | None = None,
        retry_for_s: float = 60.0,
    ) -> dict[str, Any]:
        """Queue a job; the job as stored. Sent with an Idempotency-Key (a new one unless
        given), so that a request whose answer was lost (a connection cut, a coordinator
        restarting, its store away) is sent again, for up to `retry_for_s`, without ever
        making a second job."""
        key = idempotency_key or f"gpubox-{uuid.uuid4()}"
        deadline = time.monotonic() + retry_for_s
        pause = 0.5
        while True:
            try:
                with self._open(
                    "POST", "/api/v1/jobs", spec, headers={"Idempotency-Key": key}
                ) as response:
                    return json.loads(response.read())  # type: ignore[no-any-return]
            except (errors.GpuboxError, ValueError) as exc:
                if not _transient(exc) or time.monotonic() + pause > deadline:
                    raise
                if pause == 0.5:
                    print(
                        f"gpubox: {exc}; sending the job again (the same Idempotency-Key:"
                        f" never twice) for up to {retry_for_s:g} s",
                        file=sys.stderr,
                    )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def job(self, job_id: int, wait: float | None = None) -> dict[str, Any]:
        """The job. With `wait` (seconds, at most 60), the coordinator answers once the job has
        ended or the time is up, whichever is first."""
        return self.call("GET", f"/api/v1/jobs/{job_id}", wait=wait)  # type: ignore[no-any-return]

    def jobs(
        self,
        status: str | Sequence[str] | None = None,
        limit: int = 50,
        before: int | None = None,
        *,
        name: str | None = None,
        submitter: str | None = None,
        labels: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: {"jobs": [...], "next": the `before` of the next page,
        or None}. Every filter given must match: `status` one of these, `name` a prefix,
        `labels` each KEY=VALUE, `metadata` each top-level key's value, `created_after` and
        `created_before` RFC 3339 times."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        query = [("status", ",".join(statuses))] if statuses else []
        query += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        query += [(f"metadata.{k}", str(v)) for k, v in (metadata or {}).items()]
        return self.call(  # type: ignore[no-any-return]
            "GET",
            "/api/v1/jobs",
            query=query,
            limit=limit,
            before=before,
            name=name,
            submitter=submitter,
            created_after=created_after,
            created_before=created_before,
        )

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def telemetry(self, job_id: int, since: float | None = None) -> dict[str, Any]:
        """The job's GPU telemetry points (those ending after `since`, Unix seconds)."""
        return self.call("GET", f"/api/v1/jobs/{job_id}/telemetry", since=since)  # type: ignore[no-any-return]

    def workers(self) -> dict[str, Any]:
        return self.call("GET", "/api/v1/workers")  # type: ignore[no-any-return]

    def coordinators(self) -> dict[str, Any]:
        """The coordinators sharing the store, and which one leads."""
        return self.call("GET", "/api/v1/coordinators")  # type: ignore[no-any-return]

    def usage(
        self, since: str | None = None, until: str | None = None, by: str | None = None
    ) -> dict[str, Any]:
        """The usage report of the jobs that ended in [since, until), grouped `by` submitter,
        label or worker (gpubox.usage). since and until: a relative age before now (7d), an
        RFC 3339 time or a date; None: the coordinator's defaults, 7 days ago and now."""
        return self.call("GET", "/api/v1/usage", since=since, until=until, by=by)  # type: ignore[no-any-return]

    def logs(self, job_id: int, since: int = 0) -> Iterator[dict[str, Any]]:
        """The lines stored so far, as NDJSON records ({"seq", "ts", "stream", "line"})."""
        for record in self._records(job_id, since, follow=False):
            if not record.get("end"):
                yield record

    def _records(self, job_id: int, since: int, follow: bool) -> Iterator[dict[str, Any]]:
        """A log's records; a follow stream's last one is {"end": true, "status", …}."""
        query = urllib.parse.urlencode({"since": since, "format": "ndjson", "follow": int(follow)})
        timeout = FOLLOW_READ_TIMEOUT_S if follow else self.timeout_s
        with self._open(
            "GET", f"/api/v1/jobs/{job_id}/logs?{query}", timeout_s=timeout
        ) as response:
            for raw in response:
                if raw.strip():  # empty lines are the server's keep-alives
                    yield json.loads(raw)

    # --- waiting ---------------------------------------------------------------------------

    def wait(
        self, job_id: int, timeout_s: float | None = None, retry_for_s: float = 300.0
    ) -> dict[str, Any]:
        """The job once it has ended. It asks with long polls, so the wait costs a request
        every WAIT_POLL_S; a coordinator with no place free for one answers at once and says
        when to ask again (Retry-After). A coordinator that cannot be reached, or answers 5xx,
        is asked again for up to `retry_for_s`. GaveUp past `timeout_s`, or past that."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failing_since: float | None = None
        while True:
            left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise GaveUp(f"job {job_id} had not ended after {timeout_s:g} s")
            asked = time.monotonic()
            try:
                path = f"/api/v1/jobs/{job_id}?wait={min(left, WAIT_POLL_S):.3f}"
                with self._open("GET", path, timeout_s=WAIT_POLL_S + 30) as response:
                    job = json.loads(response.read())
                    retry_after = response.headers.get("Retry-After")
            except (errors.GpuboxError, ValueError) as exc:
                if not _transient(exc):
                    raise
                failing_since = failing_since or asked
                if time.monotonic() - failing_since > retry_for_s:
                    raise GaveUp(f"stopped waiting for job {job_id}: {exc}") from exc
                time.sleep(1.0)
                continue
            failing_since = None
            if job["status"] in ENDED:
                return job  # type: ignore[no-any-return]
            if retry_after and retry_after.isdigit():
                time.sleep(max(0.0, int(retry_after) - (time.monotonic() - asked)))

    # --- following -------------------------------------------------------------------------

    def tail(
        self,
        job_id: int,
        since: int = 0,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        retry_for_s: float = 300.0,
    ) -> int:
        """Print a job's lines as they come until it ends, resuming after a dropped
        connection without a gap or a repeat; returns the exit code for how it ended
        (gpubox.exits: the job's own code, or gpubox's).

        A coordinator that cannot be reached at all is an error at once (a wrong URL should
        not look like an outage). Once connected, one that goes away is waited for, up to
        `retry_for_s` (then GaveUp); one with no stream free (503 busy) is read from a page at
        a time instead, for as long as the job runs. OutputClosed when `out` or `err` can no
        longer be written."""
        out, err = out or sys.stdout, err or sys.stderr
        follower = _Follower(self, job_id, since, out, err)
        self.job(job_id)  # reachable, and the job is there: else an error at once
        failing_since: float | None = None
        noted = 0.0
        while True:
            try:
                ended = follower.follow()
                if ended is None:
                    continue  # the stream ended without a word of the job's end: resume
                return follower.finish(ended)
            except OutputClosed:
                raise  # the output, not the connection: retrying cannot help
            except ApiError as exc:
                if exc.code != "busy":
                    if not _transient(exc):
                        raise  # 4xx: retrying cannot help
                else:
                    # No stream free: read what is stored, then look again shortly.
                    ended = follower.poll()
                    if ended is not None:
                        return follower.finish(ended)
                    failing_since = None
                    time.sleep(BUSY_POLL_S)
                    continue
                failure: BaseException = exc
            except (errors.GpuboxError, *RETRYABLE, ValueError) as exc:
                failure = exc
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > retry_for_s:
                raise GaveUp(
                    f"lost the log stream of job {job_id} for {retry_for_s:g} s: {failure}"
                ) from failure
            if now - noted >= RETRY_NOTE_EVERY_S:
                noted = now
                print(
                    f"gpubox: connection lost ({failure}); resuming after line"
                    f" {follower.since} once the coordinator answers (for up to"
                    f" {retry_for_s:g} s)",
                    file=sys.stderr,
                )
            time.sleep(1.0)


class _Follower:
    """One tail's progress: the last line printed, and where lines go."""

    def __init__(self, client: Client, job_id: int, since: int, out: IO[str], err: IO[str]):
        self.client, self.job_id, self.since, self.out, self.err = client, job_id, since, out, err

    def show(self, record: dict[str, Any]) -> None:
        try:
            # stderr, and gpubox's own lines (stream gpubox), go to err
            (self.out if record["stream"] == "stdout" else self.err).write(record["line"] + "\n")
        except OSError as exc:  # not the connection: retrying cannot help
            raise OutputClosed(str(exc)) from exc
        self.since = record["seq"]

    def follow(self) -> dict[str, Any] | None:
        """One follow stream: its lines printed; the job's end (status, exit_code, error) if
        the stream said it, else None (a coordinator older than the end record: asked)."""
        for record in self.client._records(self.job_id, self.since, follow=True):
            if record.get("end"):
                return record
            self.show(record)
        _flush(self.out)
        job = self.client.job(self.job_id)
        return _end_of(job) if job["status"] in ENDED else None

    def poll(self) -> dict[str, Any] | None:
        """The stored lines after the last printed, then the job's end if it has ended."""
        job = self.client.job(self.job_id)
        for record in self.client.logs(self.job_id, self.since):
            self.show(record)
        _flush(self.out)
        return _end_of(job) if job["status"] in ENDED else None

    def finish(self, ended: dict[str, Any]) -> int:
        """Print the lines stored after the stream ended and how the job ended; its code."""
        for record in self.client.logs(self.job_id, self.since):
            self.show(record)
        _flush(self.out)
        if ended["status"] != "FINISHED":
            reason = ended.get("error") or ended["status"].lower()
            line = f"gpubox: job {self.job_id} {ended['status']}: {reason}"
            self.show({"stream": "stderr", "line": line, "seq": self.since})
            _flush(self.err)
        return exits.for_job(ended["status"], ended.get("exit_code"), ended.get("error"))


def _end_of(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the record a follow stream ends with."""
    result = job.get("result") or {}
    return {
        "end": True,
        "id": job["id"],
        "status": job["status"],
        "exit_code": result.get("exit_code"),
        "error": result.get("error"),
    }


def _flush(stream: IO[str]) -> None:
    try:
        stream.flush()
    except OSError as exc:
        raise OutputClosed(str(exc)) from exc
