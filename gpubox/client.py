"""The HTTP client the CLI uses: one method per endpoint, and `tail`, which resumes."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gpubox import errors

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


class OutputClosed(errors.GpuboxError):
    """Where `tail` prints cannot be written: a pipe's reader exited (`gpubox tail 42 | head`,
    EPIPE), or a full disk, … (the OSError is its cause)."""


class ApiError(errors.GpuboxError):
    """The coordinator refused the request."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # status is the HTTP status of the answer; code and field come from its JSON body.
        self.status, self.code, self.field = status, code, field


def exit_code_for(job: dict[str, Any]) -> int:
    """What `tail` exits with: 0 FINISHED, the container's code on a non-zero exit, 1 for other
    errors, 130 cancelled."""
    status = job["status"]
    if status == "FINISHED":
        return 0
    if status == "CANCELLED":
        return 130
    code = (job.get("result") or {}).get("exit_code")
    if isinstance(code, int) and 0 < code < 256 and job["result"].get("error") != "timeout":
        return code
    return 1


def local_token(state_dir: str) -> str:
    """The token `gpubox up` wrote for clients on the same box, or ''."""
    try:
        return (Path(state_dir) / "token").read_text().strip()
    except OSError:
        return ""


class Client:
    """Talks to one coordinator's HTTP API."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _open(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
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
            raise errors.GpuboxError(f"cannot reach the coordinator at {self.url}: {exc}") from exc

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """One JSON request; the decoded JSON answer."""
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            path += "?" + urllib.parse.urlencode(params)
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/api/v1/jobs", spec)  # type: ignore[no-any-return]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(
        self, status: str | None = None, limit: int = 50, before: int | None = None
    ) -> dict[str, Any]:
        return self.call("GET", "/api/v1/jobs", status=status, limit=limit, before=before)  # type: ignore[no-any-return]

    def telemetry(self, job_id: int, since: float | None = None) -> dict[str, Any]:
        """The job's GPU telemetry points (those ending after `since`, Unix seconds)."""
        return self.call("GET", f"/api/v1/jobs/{job_id}/telemetry", since=since)  # type: ignore[no-any-return]

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def workers(self) -> dict[str, Any]:
        return self.call("GET", "/api/v1/workers")  # type: ignore[no-any-return]

    def logs(self, job_id: int, since: int = 0) -> Iterator[dict[str, Any]]:
        """The lines stored so far, as NDJSON records."""
        yield from self._records(job_id, since, follow=False)

    def _records(self, job_id: int, since: int, follow: bool) -> Iterator[dict[str, Any]]:
        query = urllib.parse.urlencode({"since": since, "format": "ndjson", "follow": int(follow)})
        timeout = FOLLOW_READ_TIMEOUT_S if follow else self.timeout_s
        with self._open(
            "GET", f"/api/v1/jobs/{job_id}/logs?{query}", timeout_s=timeout
        ) as response:
            for raw in response:
                if raw.strip():  # empty lines are the server's keep-alives
                    yield json.loads(raw)

    def tail(
        self,
        job_id: int,
        since: int = 0,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        retry_for_s: float = 300.0,
    ) -> int:
        """Print a job's lines as they come until it ends, resuming after a dropped connection
        without a gap or a repeat; returns the job's exit code (see exit_code_for).

        A coordinator that cannot be reached at all is an error at once (a wrong URL should
        not look like an outage); once connected, one that goes away is waited for, up to
        `retry_for_s`. OutputClosed when `out` or `err` can no longer be written."""
        out, err = out or sys.stdout, err or sys.stderr

        def show(record: dict[str, Any]) -> None:
            try:
                # stderr, and gpubox's own lines (stream gpubox), go to err
                (out if record["stream"] == "stdout" else err).write(record["line"] + "\n")
            except OSError as exc:  # not the connection: retrying cannot help
                raise OutputClosed(str(exc)) from exc

        self.job(job_id)  # reachable, and the job is there: else an error at once
        failing_since: float | None = None
        noted = 0.0
        while True:
            try:
                for record in self._records(job_id, since, follow=True):
                    show(record)
                    since = record["seq"]
                    failing_since = None
                _flush(out)
                job = self.job(job_id)
                if job["status"] in ("FINISHED", "ERROR", "CANCELLED"):
                    for record in self.logs(job_id, since):  # lines stored after the stream ended
                        show(record)
                        since = record["seq"]
                    _flush(out)
                    if job["status"] != "FINISHED":
                        reason = job["result"]["error"] or job["status"].lower()
                        show(
                            {
                                "stream": "stderr",
                                "line": f"gpubox: job {job_id} {job['status']}: {reason}",
                            }
                        )
                        _flush(err)
                    return exit_code_for(job)
            except OutputClosed:
                raise  # the output, not the connection: retrying cannot help
            except (errors.GpuboxError, *RETRYABLE, ValueError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise  # 4xx: retrying cannot help; 5xx: the coordinator's store is away
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > retry_for_s:
                    raise errors.GpuboxError(f"lost the log stream of job {job_id}: {exc}") from exc
                if now - noted >= RETRY_NOTE_EVERY_S:
                    noted = now
                    print(
                        f"gpubox: connection lost ({exc}); resuming after line {since} once the"
                        f" coordinator answers (for up to {retry_for_s:g} s)",
                        file=sys.stderr,
                    )
                time.sleep(1.0)


def _flush(stream: IO[str]) -> None:
    try:
        stream.flush()
    except OSError as exc:
        raise OutputClosed(str(exc)) from exc
