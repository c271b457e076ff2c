"""The HTTP-processes rows: no-op job throughput (submit → FINISHED, 2 workers of 16 slots)
with the coordinator's HTTP API in 1, 2 and 3 processes (http_processes), interleaved over
rounds so that a slow minute weighs on each alike; the median and the range of each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from benchlib.common import Context, Row, cluster
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


def http_processes(ctx: Context) -> list[Row]:
    jobs, rounds = ctx.size(2000, 100), ctx.size(3, 1)
    rates: dict[int, list[float]] = {count: [] for count in COUNTS}
    for _ in range(rounds):
        for count in COUNTS:
            rates[count].append(rate(ctx, count, jobs))
    one = statistics.median(rates[1])
    return [
        Row(
            f"throughput, 2 workers, HTTP in {count} process{'es' if count > 1 else ''}",
            f"{statistics.median(rates[count]):,.0f} jobs/s [{min(rates[count]):,.0f}–"
            f"{max(rates[count]):,.0f}] ({jobs:,} no-op jobs, submit → FINISHED, median of"
            f" {rounds} interleaved rounds)",
            "—" if count == 1 else f"{statistics.median(rates[count]) / one:.2f}× one process",
        )
        for count in COUNTS
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {"http_processes": http_processes}
