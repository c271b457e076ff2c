"""The telemetry rows' store half: what storing TELEMETRY batches of 8 points costs the
coordinator, per point, on SQLite and on PostgreSQL, next to the same rows put in a bare
table."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from benchlib.common import Context, Row, ms
from gpubox import models, protocol, validate
from gpubox.coordinator import reports
from gpubox.coordinator.peers import Peer
from gpubox.store import Store, open_store
from gpubox.telemetry import Point

GPUS = 8
ANALYZE_AT = 100  # batches stored before PostgreSQL's statistics are taken (see _analyze)
SPEC = validate.parse_spec({"name": "bench", "docker": {"image": "busybox"}, "gpus": GPUS})


def points_batch(index: int, start: float = 1.7e9) -> list[Point]:
    """Batch `index` of a busy 8-GPU job: each GPU's 10 s point, following the last."""
    t0 = start + 10 * index
    return [
        Point(
            gpu=f"GPU-bench-{gpu:04d}",
            start=t0,
            end=t0 + 10,
            samples=10,
            util_mean=90.0 + (index + gpu) % 10,
            util_max=100.0,
            memory_max_mb=60_000 + 10 * gpu,
            memory_total_mb=81_920,
            power_mean_w=400.0 + gpu,
            temperature_max_c=70.0,
        )
        for gpu in range(GPUS)
    ]


def store_rows(ctx: Context) -> list[Row]:
    """Store.add_points with TELEMETRY batches of 8 points (a busy 8-GPU worker's every 10 s)
    on SQLite and, where one is named, PostgreSQL: under the merge bound, past it, with a
    small bound that merges often, and through the broker's reports.store_burst."""
    path = ctx.tmp / "telemetry.db"
    rows = [
        _store_row(ctx, "SQLite (file, WAL, synchronous=FULL)", f"sqlite:///{path}", _bare_sqlite)
    ]
    pg = _pg_url(ctx)
    if pg is None:
        rows.append(
            Row(
                "telemetry store cost per point, PostgreSQL",
                "not measured: name one with --db postgresql://… or GPUBOX_BENCH_PG",
            )
        )
        return rows
    with _pg_schema(pg) as url:
        rows.append(_store_row(ctx, "PostgreSQL", url, _bare_pg))
    return rows


def _store_row(ctx: Context, name: str, url: str, bare: Callable[[str, int], float]) -> Row:
    """One backend's row; `bare` measures the reference on the same database afterwards."""
    bound, small = ctx.size(2000, 120), 100
    batches = bound + bound // 4
    store = open_store(url)
    try:
        below, past = _add_points(store, batches, bound, split=bound)
        often, _ = _add_points(store, ctx.size(1000, 150), small, split=batches)
        bursts = ctx.size(1000, 100)
        burst = _store_burst(store, bursts)
    finally:
        store.close()
    reference = bare(url, ctx.size(1000, 100))
    under, over = below.per_point(), past.per_point()
    return Row(
        f"telemetry store cost per point, {name}",
        f"add_points, batches of {GPUS}: {under:.0f} µs a point for {bound:,} batches under the"
        f" bound of {bound:,} points per GPU (a batch: {ms(below.mean(0, 100))} over the first"
        f" 100, {ms(below.mean(-100))} over the last 100); {over:.0f} µs a point past it"
        f" ({batches - bound} batches, slowest {ms(past.slowest)}: a merge); bound {small}:"
        f" {often.per_point():.0f} µs a point, slowest {ms(often.slowest)};"
        f" reports.store_burst, a burst a batch: {burst.per_point():.0f} µs a point over"
        f" {bursts:,} batches (add_points over its first {bursts:,}:"
        f" {below.mean(0, bursts) / GPUS * 1e6:.0f})",
        f"the same rows into a bare table, executemany + commit a batch: {reference:.0f} µs a"
        f" point. A busy {GPUS}-GPU worker sends a batch every 10 s: 100 of them at"
        f" {under:.0f} µs a point take {100 * GPUS / 10 * under / 1e6:.1%} of the broker",
    )


class Timings:
    """Seconds each stored batch took."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def per_point(self) -> float:
        return sum(self.seconds) / max(1, len(self.seconds) * GPUS) * 1e6

    def mean(self, start: int, end: int | None = None) -> float:
        """Mean seconds of the batches seconds[start:end]."""
        chosen = self.seconds[start:end]
        return sum(chosen) / max(1, len(chosen))

    @property
    def slowest(self) -> float:
        return max(self.seconds, default=0.0)


def _running_job(store: Store) -> tuple[int, int]:
    """A new job RUNNING on 8 GPUs: (its id, its attempt)."""
    now = models.utcnow()
    job = store.create_job(SPEC, now)
    gpus = [f"GPU-bench-{gpu:04d}" for gpu in range(GPUS)]
    # Each job on a worker of its own: the earlier ones still hold their GPUs.
    claimed = store.claim_job(job.id, f"bench-{job.id}", gpus, now)
    if claimed is None:
        raise RuntimeError(f"job {job.id} could not be claimed")
    return claimed.id, claimed.attempts


def _add_points(store: Store, batches: int, bound: int, split: int) -> tuple[Timings, Timings]:
    """Store `batches` batches of one fresh job through add_points with this bound; the
    timings of the batches before `split` and of those from it on."""
    job_id, attempt = _running_job(store)
    made = [points_batch(i) for i in range(batches)]
    before, after = Timings(), Timings()
    for seq, points in enumerate(made):
        if seq == ANALYZE_AT:
            _analyze(store)
        started = time.perf_counter()
        stored = store.add_points(job_id, attempt, seq, seq, points, bound)
        (before if seq < split else after).seconds.append(time.perf_counter() - started)
        if stored != seq:
            raise RuntimeError(f"batch {seq} of job {job_id} not stored ({stored})")
    return before, after


def _analyze(store: Store) -> None:
    """Give PostgreSQL's planner statistics of the telemetry table, as autovacuum does within
    a minute of a burst of inserts. Without them it counts a GPU's points and finds the last
    batch by reading every point of the job: 16 ms a batch near 1,900 points per GPU, where
    4 ms with them (measured on a 2-core VM, PostgreSQL 15)."""
    url = getattr(store, "url", None)
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE telemetry")


def _store_burst(store: Store, batches: int) -> Timings:
    """Store `batches` TELEMETRY messages of one fresh job through reports.store_burst, one
    message a burst (the broker under light load), as decoded from the wire."""
    job_id, attempt = _running_job(store)
    peer = Peer("bench", b"bench", "0" * 32, "", "", [], {}, 1, 0.0)
    limits = reports.LogLimits()
    messages = [
        protocol.Telemetry(
            session=peer.session,
            job_id=job_id,
            attempt=attempt,
            seq=seq,
            points=[point.to_row() for point in points_batch(seq)],
        )
        for seq in range(batches)
    ]
    timings = Timings()
    for seq, message in enumerate(messages):
        if seq == ANALYZE_AT:
            _analyze(store)
        started = time.perf_counter()
        stored = reports.store_burst(store, [(peer, message)], limits)
        timings.seconds.append(time.perf_counter() - started)
        if len(stored) != 1:
            raise RuntimeError(f"TELEMETRY {message.seq} of job {job_id} not stored")
    return timings


# The reference: the same 8 rows in a bare table like the store's, one transaction a batch.
_BARE_TABLE = """CREATE TABLE bare_points (
    job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, seq INTEGER NOT NULL, gpu TEXT NOT NULL,
    t_start REAL NOT NULL, t_end REAL NOT NULL, samples INTEGER NOT NULL,
    util_mean REAL NOT NULL, util_max REAL NOT NULL, memory_max_mb INTEGER NOT NULL,
    memory_total_mb INTEGER NOT NULL, power_mean_w REAL, temperature_max_c REAL,
    PRIMARY KEY (job_id, attempt, gpu, t_start))"""
_BARE_INSERT = "INSERT INTO bare_points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _bare_rows(batches: int) -> list[list[tuple[object, ...]]]:
    return [[(1, 1, seq, *point.to_row()) for point in points_batch(seq)] for seq in range(batches)]


def _bare_sqlite(url: str, batches: int) -> float:
    """µs per point of bare batches in the store's SQLite file, as the store sets it up."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(_BARE_TABLE)
        return _per_point(batches, lambda rows: _sqlite_batch(conn, rows))
    finally:
        conn.close()


def _sqlite_batch(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(_BARE_INSERT, rows)
    conn.execute("COMMIT")


def _bare_pg(url: str, batches: int) -> float:
    """µs per point of bare batches in the schema the store used."""
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(_BARE_TABLE.replace("REAL", "DOUBLE PRECISION"))  # type: ignore[arg-type]
        conn.commit()
        insert = _BARE_INSERT.replace("?", "%s")

        def batch(rows: list[tuple[object, ...]]) -> None:
            with conn.cursor() as cur:
                cur.executemany(insert, rows)  # type: ignore[arg-type]
            conn.commit()

        return _per_point(batches, batch)


def _per_point(batches: int, store_batch: Callable[[list[tuple[object, ...]]], None]) -> float:
    made = _bare_rows(batches)
    started = time.perf_counter()
    for rows in made:
        store_batch(rows)
    return (time.perf_counter() - started) / (batches * GPUS) * 1e6


def _pg_url(ctx: Context) -> str | None:
    """The PostgreSQL to measure: --db when it names one, else GPUBOX_BENCH_PG, else
    GPUBOX_TEST_PG (as the tests use it); None when none is named."""
    if ctx.db and ctx.db.startswith("postgresql"):
        return ctx.db
    url = os.environ.get("GPUBOX_BENCH_PG") or os.environ.get("GPUBOX_TEST_PG")
    return None if not url or url == "skip" else url


@contextmanager
def _pg_schema(base: str) -> Iterator[str]:
    """A throwaway schema in that database, as a store URL; dropped afterwards."""
    import psycopg

    schema = f"bench_telemetry_{os.getpid()}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]
