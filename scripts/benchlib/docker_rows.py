"""The Docker rows of scripts/bench: what running jobs as containers costs over the docker SDK
alone, how fast a chatty container's output gets stored, and how late a followed line arrives.
Each reference drives the same image through the docker SDK in this process."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import docker
import docker.errors

from benchlib.common import Cluster, Context, Row, cluster, percentile
from benchlib.worker_rows import cpu_seconds
from gpubox import models
from gpubox.worker.docker_runtime import WORKER_LABEL
from gpubox.worker.lines import ts_ns

LABELS = {"gpubox-bench": "1"}
CONCURRENCY = 4
ENDED = ("FINISHED", "ERROR", "CANCELLED")
TAIL_EVERY_S = 0.02


def sdk() -> docker.DockerClient:
    return docker.from_env()


@contextmanager
def sdk_container(client: docker.DockerClient, image: str, command: list[str]) -> Iterator[Any]:
    """A created (not started) container, labelled for the bench and removed afterwards."""
    container = client.containers.create(image, command, init=True, labels=LABELS)
    try:
        yield container
    finally:
        remove(container)


def remove(container: Any) -> None:
    with suppress(docker.errors.NotFound):
        container.remove(force=True)


def sweep(client: docker.DockerClient, label: str = "gpubox-bench=1") -> None:
    """Remove every container with this label (by default the SDK's bench containers)."""
    for container in client.containers.list(all=True, filters={"label": label}):
        remove(container)


@contextmanager
def docker_cluster(ctx: Context, jobs: int) -> Iterator[Cluster]:
    """A cluster with one docker worker of its own name running `jobs` at a time. A worker
    keeps a finished job's container until the coordinator acknowledges DONE, so one stopped
    right after can leave it behind: those go here too."""
    name = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with cluster(ctx) as box:
            box.add_worker(name, runtime="docker", jobs=str(jobs))
            yield box
    finally:
        sweep(sdk(), f"{WORKER_LABEL}={name}")


def now_s() -> float:
    return time.time()


def job_time(value: str) -> float:
    """One of gpubox's RFC 3339 times as seconds since the epoch."""
    parsed = models.parse_time(value)
    assert parsed is not None
    return parsed.timestamp()


def wait_job(box: Cluster, job_id: int, lines: int = 0, timeout_s: float = 600) -> dict[str, Any]:
    """Poll a job until it ended with at least `lines` lines stored; the job."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = box.client.job(job_id)
        if job["status"] in ENDED and job["log_lines"] >= lines:
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout_s} s")
        time.sleep(0.02)


# Docker overhead


def sdk_true(client: docker.DockerClient, image: str) -> None:
    """One `true` container the way the worker runs it: create, start, wait, logs, remove."""
    with sdk_container(client, image, ["true"]) as container:
        container.start()
        container.wait()
        container.logs(stdout=True, stderr=True, timestamps=True)


def sdk_loop(ctx: Context, count: int) -> float:
    """Seconds to run `count` `true` containers through the SDK, CONCURRENCY at a time."""
    client = sdk()
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: sdk_true(client, ctx.image), range(count)))
    return time.monotonic() - started


def gpubox_loop(ctx: Context, count: int) -> float:
    """Seconds from the first submit to the last job's finished_at, for `count` `true` jobs
    on one docker worker running CONCURRENCY at a time."""
    with docker_cluster(ctx, CONCURRENCY) as box:
        started = now_s()
        for _ in range(count):
            box.submit(["true"])
        box.wait_idle()
        jobs = box.all_jobs()
    failed = [job["id"] for job in jobs if job["status"] != "FINISHED"]
    if failed:
        raise RuntimeError(f"jobs {failed} did not finish")
    return max(job_time(job["result"]["finished_at"]) for job in jobs) - started


def docker_rows(ctx: Context) -> list[Row]:
    count = ctx.size(50, 6)
    client = sdk()
    reference = measured = 0.0
    try:
        sdk_true(client, ctx.image)  # warm the image and the engine's caches for both
        # In two halves, interleaved: this machine's speed drifts from one minute to the
        # next, and one side measured after the other would carry the drift as overhead.
        for part in (count // 2, count - count // 2):
            reference += sdk_loop(ctx, part)
            measured += gpubox_loop(ctx, part)
    finally:
        sweep(client)
    overhead = (measured / reference - 1) * 100
    return [
        Row(
            "Docker overhead",
            f"{overhead:+.0f} % ({measured:.2f} s vs {reference:.2f} s)",
            f"SDK loop {reference:.2f} s",
            "≤ 10 %",
            overhead <= 10,
        )
    ]


# Log throughput


def sdk_read_rate(ctx: Context, lines: int) -> float:
    """Lines/s at which the SDK reads back the stdout of an exited `seq 1 N` container (a
    follow with timestamps, as the worker reads)."""
    client = sdk()
    with sdk_container(client, ctx.image, ["seq", "1", str(lines)]) as container:
        container.start()
        container.wait()
        started = time.monotonic()
        stream = container.logs(
            stream=True, follow=True, timestamps=True, stdout=True, stderr=False
        )
        count = sum(chunk.count(b"\n") for chunk in stream)
        elapsed = time.monotonic() - started
    if count != lines:
        raise RuntimeError(f"the SDK read {count} lines of {lines}")
    return lines / elapsed


def gpubox_store_rate(ctx: Context, lines: int) -> tuple[float, int, float]:
    """Lines/s from the container's start (result.executed_at) until the job is FINISHED with
    all `lines` lines stored, seen by polling; how many lines it stored; and the CPU seconds
    dockerd spent meanwhile (storing the container's output, then sending it to the worker)."""
    dockerd = dockerd_pid()
    with docker_cluster(ctx, 1) as box:
        engine_before = cpu_seconds(dockerd) if dockerd else 0.0
        job = box.submit(["seq", "1", str(lines)])
        job = wait_job(box, job["id"], lines)
        stored = now_s()
        engine = cpu_seconds(dockerd) - engine_before if dockerd else float("nan")
    if job["status"] != "FINISHED":
        raise RuntimeError(f"job ended {job['status']}: {job['result']['error']}")
    elapsed = stored - job_time(job["result"]["executed_at"])
    return lines / elapsed, job["log_lines"], engine


def dockerd_pid() -> int | None:
    """The engine's process, when it runs on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "comm").read_text().strip() == "dockerd":
                    return int(entry.name)
    return None


def log_rows(ctx: Context) -> list[Row]:
    lines = ctx.size(1_000_000, 30_000)
    try:
        reference = sdk_read_rate(ctx, lines)
        rate, stored, engine = gpubox_store_rate(ctx, lines)
    finally:
        sweep(sdk())
    share = rate / reference * 100
    wrong = "" if stored == lines else f"; stored {stored:,} lines, not {lines:,}"
    return [
        Row(
            "log throughput",
            f"{rate:,.0f} lines/s ({share:.0f} % of the SDK's read rate{wrong})",
            f"SDK log read {reference:,.0f} lines/s; dockerd itself spent {engine:.1f} CPU-s"
            f" on these {lines:,} lines ({lines / engine if engine > 0 else 0:,.0f} lines per"
            " CPU-second)",
            "≥ 100,000 lines/s and ≥ 50 % of the SDK",
            rate >= 100_000 and share >= 50 and not wrong,
        )
    ]


# Tail latency


def ticker(lines: int) -> list[str]:
    """A command printing a line every TAIL_EVERY_S seconds, `lines` times."""
    return ["sh", "-c", f"for i in $(seq 1 {lines}); do echo $i; sleep {TAIL_EVERY_S}; done"]


def follow_delays(box: Cluster, job_id: int) -> list[float]:
    """Seconds from each line's Docker timestamp to its arrival at a follow=1 NDJSON client."""
    request = urllib.request.Request(
        f"{box.url}/api/v1/jobs/{job_id}/logs?follow=1&format=ndjson",
        headers={"Authorization": f"Bearer {box.token}"},
    )
    delays = []
    with urllib.request.urlopen(request, timeout=120) as stream:
        for raw in stream:
            if raw.strip():  # empty lines are keep-alives
                received = time.time_ns()
                record = json.loads(raw)
                if not record.get("end"):  # the stream's last record: how the job ended
                    delays.append((received - ts_ns(record["ts"])) / 1e9)
    return delays


def gpubox_tail(ctx: Context, lines: int) -> list[float]:
    with docker_cluster(ctx, 1) as box:
        job = box.submit(ticker(lines))
        delays = follow_delays(box, job["id"])
    if len(delays) != lines:
        raise RuntimeError(f"the follower got {len(delays)} lines of {lines}")
    return delays


def sdk_tail(ctx: Context, lines: int) -> list[float]:
    """The same, for the SDK following the container's stdout itself."""
    client = sdk()
    delays = []
    with sdk_container(client, ctx.image, ticker(lines)) as container:
        container.start()
        for entry in container.logs(stream=True, follow=True, timestamps=True, stderr=False):
            received = time.time_ns()
            delays.append((received - ts_ns(entry.partition(b" ")[0].decode())) / 1e9)
    return delays


def tail_rows(ctx: Context) -> list[Row]:
    lines = ctx.size(200, 50)
    try:
        reference = sdk_tail(ctx, lines)
        delays = gpubox_tail(ctx, lines)
    finally:
        sweep(sdk())
    p50, p95 = percentile(delays, 50) * 1000, percentile(delays, 95) * 1000
    ref50, ref95 = percentile(reference, 50) * 1000, percentile(reference, 95) * 1000
    return [
        Row(
            "tail latency",
            f"p50 {p50:.1f} ms, p95 {p95:.1f} ms",
            f"SDK follow p50 {ref50:.1f} ms, p95 {ref95:.1f} ms",
            "p50 ≤ 50 ms",
            p50 <= 50,
        )
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {
    "docker": docker_rows,
    "logs": log_rows,
    "tail": tail_rows,
}
