"""The HTTP-processes rows, with the coordinator's HTTP API in 1, 2 and 3 processes
(http_processes), interleaved over rounds so that a slow minute weighs on each alike (the
median and the range of each): the submit rate alone (8 keep-alive clients, no worker:
every submit a durable SQLite write, the processes' writers taking turns on SQLite's lock
where one process shares one commit among its threads), and no-op job throughput (submit →
FINISHED, 2 workers of 16 slots)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from benchlib.common import Context, Row, cluster
from benchlib.http_rows import SUBMIT_BODY, hammer
from benchlib.worker_rows import submit_many

COUNTS = (1, 2, 3)


def rate(ctx: Context, processes: int, jobs: int) -> float:
    with cluster(ctx, GPUBOX_HTTP_PROCESSES=str(processes)) as made:
        for index in range(2):
            made.add_worker(f"w{index}", jobs="16")
        started = time.monotonic()
        submit_many(made, jobs, ["true"])
        made.wait_idle()
        elapsed = time.monotonic() - started
        finished = sum(1 for job in made.all_jobs() if job["status"] == "FINISHED")
        if finished != jobs:
            raise RuntimeError(f"{jobs - finished} of {jobs} jobs did not finish")
    return jobs / elapsed


def submit_rate(ctx: Context, processes: int, seconds: float) -> float:
    body = json.dumps(SUBMIT_BODY).encode()
    with cluster(ctx, GPUBOX_HTTP_PROCESSES=str(processes)) as made:
        load = hammer(made.url, made.token, body, 8, seconds, made.coordinator.pid)
    return load.rate


def http_processes(ctx: Context) -> list[Row]:
    """The submit rate and (but for --quick, which keeps to the submit rate with 1 and 2
    processes) the throughput."""
    jobs, rounds, seconds = ctx.size(2000, 100), ctx.size(3, 1), ctx.size(5, 1)
    counts = COUNTS[:2] if ctx.quick else COUNTS
    rates: dict[int, list[float]] = {count: [] for count in counts}
    submits: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            submits[count].append(submit_rate(ctx, count, seconds))
            if not ctx.quick:
                rates[count].append(rate(ctx, count, jobs))
    rows = _rows("submit rate (8 keep-alive clients, no worker)", "submits/s", submits, rounds)
    if not ctx.quick:
        rows += _rows(f"throughput, 2 workers ({jobs:,} no-op jobs)", "jobs/s", rates, rounds)
    return rows


def _rows(what: str, unit: str, found: dict[int, list[float]], rounds: int) -> list[Row]:
    one = statistics.median(found[1])
    return [
        Row(
            f"{what}, HTTP in {count} process{'es' if count > 1 else ''}",
            f"{statistics.median(values):,.0f} {unit} [{min(values):,.0f}–{max(values):,.0f}]"
            f" (median of {rounds} interleaved rounds)",
            "—" if count == 1 else f"{statistics.median(values) / one:.2f}× one process",
        )
        for count, values in found.items()
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {"http_processes": http_processes}
