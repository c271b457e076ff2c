"""Rows about the HTTP API: the submit rate next to a bare Bottle app on the same Waitress
settings, and request latencies with a big store behind the coordinator."""

from __future__ import annotations

import dataclasses
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from benchlib.common import Context, Row, cluster, connect, free_port, ms, percentile
from benchlib.worker_rows import context_switches, process_times
from gpubox import models, validate
from gpubox.coordinator.api import PAGE_LINES
from gpubox.store import Store, open_store

SUBMIT_BODY = {"name": "b", "docker": {"image": "x", "command": ["true"]}}
LOG_BATCH = 1000
JOB_BATCH = 5000

# A bare Bottle app on Waitress, configured as gpubox.coordinator.server configures the
# coordinator's, with one POST endpoint that parses a JSON body and answers a small object.
BARE_APP = """
import itertools, json, sys
import bottle, waitress

app = bottle.Bottle()
ids = itertools.count(1)

@app.post("/api/v1/jobs")
def create():
    body = json.loads(bottle.request.body.read())
    bottle.response.status = 201
    return {"id": next(ids), "name": body["name"], "status": "QUEUED"}

@app.get("/healthz")
def healthz():
    return {"status": "ok"}

waitress.create_server(
    app,
    host="127.0.0.1",
    port=int(sys.argv[1]),
    threads=64,
    channel_request_lookahead=1,
    max_request_body_size=16 * 1024 * 1024,
    ident="bare",
    clear_untrusted_proxy_headers=True,
    max_request_header_size=16 * 1024,
    channel_timeout=60,
    connection_limit=64 + 100,
).run()
"""


# --- submit rate ------------------------------------------------------------------------------


def submit(ctx: Context) -> list[Row]:
    """Jobs/s accepted by POST /api/v1/jobs from 8 keep-alive clients (no worker: the jobs
    queue), next to requests/s of a bare Bottle + Waitress app driven the same way; and one
    client's submit p50 with the queue empty, then as long as those clients left it (a
    submit's answer says where the job stands, which counts the queue)."""
    seconds = 1.5 if ctx.quick else 5.0
    count = ctx.size(200, 30)
    body = json.dumps(SUBMIT_BODY).encode()
    with cluster(ctx) as made:
        headers = {"Authorization": f"Bearer {made.token}"}
        empty = timed(count, made.url, headers, "POST", "/api/v1/jobs", SUBMIT_BODY)
        ours = hammer(
            made.url, made.token, body, threads=8, seconds=seconds, server=made.coordinator.pid
        )
        queued = made.client.jobs("QUEUED", 1)["jobs"][0]["id"]  # no worker: every job waits
        long = timed(count, made.url, headers, "POST", "/api/v1/jobs", SUBMIT_BODY)
    with bare_app() as (url, pid):
        bare = hammer(url, "", body, threads=8, seconds=seconds, server=pid)
    return [
        Row(
            "submit rate (POST /api/v1/jobs, 8 keep-alive clients, no worker)",
            f"{ours.rate:,.0f} jobs/s; the coordinator spent {ours.cpu_ms:.2f} CPU-ms and"
            f" {ours.switches:.0f} context switches per request",
            f"{bare.rate:,.0f} req/s bare (Bottle + Waitress, JSON in and out):"
            f" {bare.cpu_ms:.2f} CPU-ms and {bare.switches:.0f} context switches per request",
        ),
        Row(
            "submit p50 as the queue grows (one keep-alive client, no worker)",
            f"{ms(percentile(empty, 50))} with the queue empty, {ms(percentile(long, 50))}"
            f" with {queued:,} queued",
        ),
    ]


@contextmanager
def bare_app() -> Iterator[tuple[str, int]]:
    """BARE_APP in its own process (its own GIL, like the coordinator); yields its URL and
    process id."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_APP, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare Bottle app did not start") from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclasses.dataclass(frozen=True)
class Load:
    """What hammer() measured: requests answered per second, and what each cost the server
    process (CPU-milliseconds, context switches of all its threads)."""

    rate: float
    cpu_ms: float
    switches: float


def hammer(url: str, token: str, body: bytes, threads: int, seconds: float, server: int) -> Load:
    """POST /api/v1/jobs answered 201 per second, from `threads` threads with one keep-alive
    connection each, for about `seconds` (after a short warm-up); `server` is the process id
    of the server, whose cost per request is measured over the same time."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    counts = [0] * threads
    failures: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    end = [0.0]

    def client(index: int) -> None:
        conn = connect(url, timeout=30)
        try:
            for _ in range(5):  # warm-up: connection, server threads, caches
                post_job(conn, body, headers)
            start.wait()
            while time.monotonic() < end[0]:
                post_job(conn, body, headers)
                counts[index] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            start.abort()
        finally:
            conn.close()

    pool = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    end[0] = time.monotonic() + 3600  # until the barrier opens
    with suppress(threading.BrokenBarrierError):  # a client failed: reported below
        start.wait()
    began = time.monotonic()
    cpu, switches = process_times(server)[0], context_switches(server)
    end[0] = began + seconds
    for thread in pool:
        thread.join()
    if failures:
        raise RuntimeError(f"a client failed: {failures[0]!r}") from failures[0]
    elapsed, answered = time.monotonic() - began, max(1, sum(counts))
    cpu, switches = process_times(server)[0] - cpu, context_switches(server) - switches
    return Load(answered / elapsed, cpu * 1000 / answered, switches / answered)


def post_job(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> None:
    """One POST /api/v1/jobs on a keep-alive connection; raises unless it answered 201."""
    conn.request("POST", "/api/v1/jobs", body, headers)
    response = conn.getresponse()
    answer = response.read()
    if response.status != 201:
        raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")


# --- a big store ------------------------------------------------------------------------------


def bigstore(ctx: Context) -> list[Row]:
    """p50 of a submit, of the newest page of the job list, and of one page of log lines
    from the middle of a long log, with many jobs and one very long log in the store."""
    jobs, lines = ctx.size(100_000, 2_000), ctx.size(1_000_000, 20_000)
    count = ctx.size(200, 50)
    with (
        big_store(ctx, jobs, lines) as (url, log_job),
        cluster(ctx, **({} if ctx.db else {"GPUBOX_DB": url})) as made,
    ):
        headers = {"Authorization": f"Bearer {made.token}"}
        timings = {
            "submit": timed(count, made.url, headers, "POST", "/api/v1/jobs", SUBMIT_BODY),
            "list": timed(count, made.url, headers, "GET", "/api/v1/jobs?limit=50"),
            "logs": log_page_times(count, made.url, headers, log_job, lines // 2),
        }
        session = {"Cookie": sign_in(made.url, made.token)}
        timings["queue"] = timed(count, made.url, session, "GET", "/")
        timings["job"] = timed(count, made.url, session, "GET", f"/jobs/{log_job}")
    size = f"{jobs:,} jobs, a {lines:,}-line log"
    # Each figure with its target, in seconds (the API's 20 ms, the dashboard's pages 50 ms).
    figures = {
        "submit": (f"big store ({size}): POST /api/v1/jobs p50", 0.020),
        "list": ("big store: GET /api/v1/jobs?limit=50 p50", 0.020),
        "logs": (
            f"big store: GET …/logs, one page ({PAGE_LINES:,} lines, ndjson) mid-log p50",
            0.020,
        ),
        "queue": (
            "big store: the dashboard's queue page (GET /, signed in), server time p50",
            0.050,
        ),
        "job": (
            "big store: the dashboard's page of the job with the long log, server time p50",
            0.050,
        ),
    }
    return [
        Row(
            figure,
            f"{ms(percentile(timings[key], 50))} (p95 {ms(percentile(timings[key], 95))})",
            target=f"≤ {target * 1000:.0f} ms",
            met=percentile(timings[key], 50) <= target,
        )
        for key, (figure, target) in figures.items()
    ]


def sign_in(url: str, token: str) -> str:
    """A dashboard session for `token`: the cookie to send."""
    conn = connect(url)
    try:
        body = urllib.parse.urlencode({"token": token, "next": "/"})
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": url}
        conn.request("POST", "/login", body, headers)
        with conn.getresponse() as response:
            response.read()
            cookie = response.getheader("Set-Cookie") or ""
            if response.status != 303 or not cookie:
                raise RuntimeError(f"POST /login: HTTP {response.status}")
        return cookie.split(";")[0]
    finally:
        conn.close()


@contextmanager
def big_store(ctx: Context, jobs: int, lines: int) -> Iterator[tuple[str, int]]:
    """A store (ctx.db, or a new SQLite file) holding `jobs` jobs, one of them with `lines`
    log lines; yields its URL and that job's id. Afterwards the file is deleted, or the rows
    added to ctx.db are."""
    path = ctx.tmp / "bigstore.db"
    url = ctx.db or f"sqlite:///{path}"
    log_job = 0
    try:
        store = open_store(url)
        try:
            log_job = store.create_job(validate.parse_spec(SUBMIT_BODY), models.utcnow()).id
            started = time.monotonic()
            fill(store, log_job, jobs, lines)
            _say(f"store filled in {time.monotonic() - started:.1f} s")
        finally:
            store.close()
        yield url, log_job
    finally:
        if ctx.db and log_job:
            _forget(ctx.db, log_job)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def fill(store: Store, log_job: int, jobs: int, lines: int) -> None:
    """Give QUEUED job `log_job` `lines` log lines and finish it, then store `jobs - 1`
    FINISHED jobs after it (in bulk, as `gpubox db copy` does)."""
    now = models.utcnow()
    if store.claim_job(log_job, "w", [], now) is None:
        raise RuntimeError(f"could not claim job {log_job}")
    stamp = models.format_time(now) or ""
    for first in range(1, lines + 1, LOG_BATCH):
        batch = [
            (stamp, "stdout", f"step {seq}: loss {1 / seq:.6f}, lr 3.0e-4, {seq % 977} img/s")
            for seq in range(first, min(first + LOG_BATCH, lines + 1))
        ]
        store.append_logs(log_job, 1, first, batch)
        _progress("log lines", first - 1, len(batch), lines)
    store.finish_job(log_job, 1, models.Status.FINISHED, 0, None, now, now, lines)
    for first in range(log_job + 1, log_job + jobs, JOB_BATCH):
        last = min(first + JOB_BATCH, log_job + jobs)
        store.import_rows("jobs", [_job_row(i, stamp) for i in range(first, last)])
        _progress("jobs", first - log_job, last - first, jobs)
    store.finish_import()
    _analyze(store)


def _job_row(job_id: int, stamp: str) -> dict[str, Any]:
    """A finished no-op job as a `jobs` row."""
    return {
        "id": job_id,
        "name": f"filler {job_id}",
        "description": "",
        "priority": 0,
        "image": "x",
        "command": '["python","train.py","--epochs","10"]',
        "env": '{"SEED":"1"}',
        "sealed": None,
        "gpus": 0,
        "labels": "{}",
        "timeout": None,
        "max_retries": 0,
        "metadata": "{}",
        "status": "FINISHED",
        "cancel_requested": 0,
        "worker": "w",
        "attempts": 1,
        "executed_at": stamp,
        "finished_at": stamp,
        "exit_code": 0,
        "error": None,
        "gpu_ids": "[]",
        "log_seq": 0,
        "created_at": stamp,
        "updated_at": stamp,
        "gpu_model": None,
        "gpu_memory_gb": None,
        "container": "{}",
    }


def _analyze(store: Store) -> None:
    """Planner statistics for PostgreSQL, as autovacuum would gather soon after a burst."""
    url = getattr(store, "url", None)
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE jobs")
            conn.execute("ANALYZE logs")


def _forget(url: str, log_job: int) -> None:
    """Take the jobs and lines big_store added (ids from `log_job` on) out of PostgreSQL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM logs WHERE job_id >= %s", (log_job,))
        conn.execute("DELETE FROM job_labels WHERE job_id >= %s", (log_job,))
        conn.execute("DELETE FROM jobs WHERE id >= %s", (log_job,))


def timed(
    count: int, url: str, headers: dict[str, str], method: str, path: str, body: Any = None
) -> list[float]:
    """Seconds each of `count` requests took, one after another on one keep-alive
    connection (after a few untimed ones)."""
    data = None if body is None else json.dumps(body).encode()
    sent = {**headers, "Content-Type": "application/json"} if data else headers
    conn = connect(url)
    times = []
    try:
        for index in range(count + 5):
            began = time.perf_counter()
            conn.request(method, path, data, sent)
            response = conn.getresponse()
            answer = response.read()
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {answer[:200]!r}")
            if index >= 5:
                times.append(time.perf_counter() - began)
    finally:
        conn.close()
    return times


def log_page_times(
    count: int, url: str, headers: dict[str, str], job_id: int, since: int
) -> list[float]:
    """Seconds for one page: GET …/logs?since=…&limit=PAGE_LINES&format=ndjson, read whole,
    on one keep-alive connection."""
    path = f"/api/v1/jobs/{job_id}/logs?since={since}&limit={PAGE_LINES}&format=ndjson"
    conn = connect(url)
    times = []
    try:
        for index in range(count + 2):
            began = time.perf_counter()
            conn.request("GET", path, headers=headers)
            with conn.getresponse() as response:
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {response.status}")
            lines = body.count(b"\n")
            if lines != PAGE_LINES:
                raise RuntimeError(f"GET {path}: {lines} lines, not {PAGE_LINES}")
            if index >= 2:
                times.append(time.perf_counter() - began)
    finally:
        conn.close()
    return times


def _say(text: str) -> None:
    print(f"bench: bigstore: {text}", file=sys.stderr, flush=True)


def _progress(what: str, before: int, added: int, total: int) -> None:
    """A line on stderr each time another tenth of `total` is stored."""
    step = max(1, total // 10)
    if (before + added) // step != before // step or before + added == total:
        _say(f"{before + added:,} of {total:,} {what} stored")


ROWS: dict[str, Callable[[Context], list[Row]]] = {"submit": submit, "bigstore": bigstore}
