"""The scheduling rows: what the broker thread spends deciding which queued job goes where,
with 10,000 queued jobs from 50 submitters and 100 workers of 8 GPUs each (800 jobs
running), on SQLite and, where one is named, PostgreSQL.

The decision is the broker's own round (Planner.plan: fair share's refresh from the running
jobs, the queue's groups when they may have changed, the reads of each shape's first jobs in
fair order, the plan), on views of the workers as the broker makes them; it claims nothing,
so every round sees the same queue. Cases:
  a job ended    one GPU of one worker free (a different worker each round): the round
                 that follows each DONE, the common one;
  timer          every worker full: the round the timer runs once a second, which lists the
                 queue's groups and reads the running jobs again whatever happened.
The reference is the same round with fair share off (fair_share_half_life 0)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchlib.common import Context, Row, ms, percentile
from benchlib.telemetry_store import _pg_schema, _pg_url
from gpubox import models, validate
from gpubox.coordinator import fairshare, planner, scheduler
from gpubox.store import Store, open_store

QUEUED, SUBMITTERS, WORKERS, GPUS = 10_000, 50, 100, 8
A100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81559}


def _spec(fields: dict[str, object], submitter: str, priority: int) -> models.JobSpec:
    spec = validate.parse_spec({"name": "bench", "docker": {"image": "busybox"}, **fields})
    return models.dataclasses.replace(spec, submitter=submitter, priority=priority)


ONE_GPU: dict[str, object] = {"gpus": 1}
KINDS: list[dict[str, object]] = [
    *[ONE_GPU] * 6,
    {"gpus": 2},
    {"gpus": 4},
    {},
    {"gpus": 1, "labels": {"zone": "eu"}},
]


def fill(store: Store, queued: int, ended: int, rng: random.Random) -> None:
    """History (`ended` jobs of the last days), 800 running jobs filling every GPU,
    `queued` queued jobs, and caps on a fifth of the submitters."""
    now = models.utcnow()
    names = [f"user{n:02d}" for n in range(SUBMITTERS)]
    for name in names[::5]:
        store.add_token(
            models.Token(name, f"{name:0<64}", "submit", now, caps=models.Caps(max_gpus=64))
        )
    with store.batch():
        for index in range(ended):
            end = now - timedelta(hours=rng.uniform(0, 72))
            started = end - timedelta(seconds=rng.uniform(60, 7200))
            job = store.create_job(_spec({"gpus": 1}, rng.choice(names), 0), started)
            store.claim_job(job.id, "old", [f"old-{index}"], started)
            store.mark_started(job.id, 1, started)
            store.finish_job(job.id, 1, models.Status.FINISHED, 0, None, started, end, 0)
    with store.batch():
        for worker in range(WORKERS):
            for gpu in range(GPUS):
                job = store.create_job(_spec({"gpus": 1}, rng.choice(names), 0), now)
                store.claim_job(job.id, f"w{worker}", [f"w{worker}-{gpu}"], now)
                store.mark_started(job.id, 1, now - timedelta(seconds=rng.uniform(0, 3600)))
    for first in range(0, queued, 5000):
        with store.batch():
            for _ in range(first, min(queued, first + 5000)):
                fields = rng.choice(KINDS)
                store.create_job(_spec(fields, rng.choice(names), rng.choice([0, 0, 0, 1])), now)


def all_gpus() -> list[list[dict[str, Any]]]:
    return [
        [{"uuid": f"w{n}-{i}", "index": i, **A100} for i in range(GPUS)] for n in range(WORKERS)
    ]


def views(
    free_on: int | None, gpus: list[list[dict[str, Any]]], offers: dict[str, tuple[Any, ...]]
) -> list[scheduler.WorkerView]:
    """The workers as the broker sees them each round, all full but one GPU of worker
    `free_on`. As the broker does, each worker's offer (what it can ever run) is worked out
    once and passed along from one round to the next."""
    result = []
    for n in range(WORKERS):
        free = [gpus[n][0]["uuid"]] if n == free_on else []
        labels = {"zone": "eu"} if n % 2 else {}
        name = f"w{n}"
        view = scheduler.WorkerView(
            name, gpus[n], free, len(free), labels, offer_key=offers.get(name)
        )
        offers[name] = view.offer()
        result.append(view)
    return result


def timed_plan(plans: planner.Planner, seen: list[scheduler.WorkerView]) -> float:
    started = time.perf_counter()
    plans.plan(seen)
    return time.perf_counter() - started


def measure(store: Store, half_life: float, rounds: int) -> tuple[list[float], list[float], int]:
    """(rounds after a job ended, timer rounds, jobs the last round read one by one)."""
    plans = planner.Planner(store, half_life)
    gpus, offers = all_gpus(), dict[str, tuple[Any, ...]]()
    plans.plan(views(None, gpus, offers))  # the first round: reads what ended, lists the queue
    ended = []
    for index in range(rounds):
        seen = views(index % WORKERS, gpus, offers)  # the broker makes them before it plans
        ended.append(timed_plan(plans, seen))
    timer = []
    for _ in range(max(5, rounds // 10)):
        seen = views(None, gpus, offers)
        plans._groups_listed -= planner.GROUPS_EVERY_S  # as a second later
        plans.tracker._read_at -= fairshare.READ_EVERY_S
        timer.append(timed_plan(plans, seen))
    return ended, timer, len(plans.reasons)


def backend_rows(name: str, url: str, ctx: Context) -> list[Row]:
    store = open_store(url)
    try:
        fill(store, ctx.size(QUEUED, 2000), ctx.size(5000, 500), random.Random(24))
        _analyze(url)
        rounds = ctx.size(200, 30)
        ended, timer, read = measure(store, 86400.0, rounds)
        off, _, _ = measure(store, 0.0, rounds)
    finally:
        store.close()
    p50 = statistics.median(ended)
    queued = ctx.size(QUEUED, 2000)
    return [
        Row(
            f"scheduling decision, {name}: {queued:,} queued jobs of {SUBMITTERS} submitters,"
            f" {WORKERS} workers × {GPUS} GPUs",
            f"p50 {ms(p50)}, p99 {ms(percentile(ended, 99))} as a job ends (one GPU free);"
            f" timer round p50 {ms(statistics.median(timer))} (lists the queue's groups);"
            f" {read} jobs planned one by one",
            f"fair share off: p50 {ms(statistics.median(off))}",
            "p50 ≤ 5 ms",
            p50 <= 0.005,
        )
    ]


def scheduling(ctx: Context) -> list[Row]:
    rows = backend_rows("SQLite", f"sqlite:///{ctx.tmp / 'scheduling.db'}", ctx)
    pg = _pg_url(ctx)
    if pg is None:
        return [*rows, Row("scheduling decision, PostgreSQL", "not measured: name one")]
    with _pg_schema(pg) as url:
        return [*rows, *backend_rows("PostgreSQL", url, ctx)]


def _analyze(url: str) -> None:
    """Statistics for PostgreSQL's planner, as autovacuum takes them within a minute."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE jobs")


ROWS: dict[str, Callable[[Context], list[Row]]] = {"scheduling": scheduling}
