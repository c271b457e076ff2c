"""Rows that put gpubox next to two other job queues doing the same work on this machine, in
the same minutes: Celery 5 with a Redis broker and result backend, and task-spooler.

Each system runs jobs that run `true` on 2 slots: gpubox with 1 worker of 2 job slots and 2
prefetched jobs (the process runtime), Celery with one worker `--pool prefork --concurrency
2`, task-spooler with `tsp -S 2`; gpubox and Celery log at warning. A round starts each
system fresh and measures it twice:

  throughput   2,000 jobs submitted by 8 clients at once (Celery: 1, see _celery_round);
               jobs/s from the first submit until the last job is known to be done;
  start p50    100 jobs one at a time on the idle system, each running `date +%s.%N`: from
               the client's clock just before it submits to the clock the job's process read
               (gpubox's submits on one keep-alive HTTP connection, as Celery's client keeps
               its connection to Redis).
               Under the 2,000-job flood, submit → start would be the time spent queued
               behind the other jobs (half the run at the median): a figure of throughput.

Rounds go gpubox, Celery, task-spooler, three times over; each row gives the median and
[min–max] of the rounds (--quick: 100 jobs, 10 single jobs, 1 round). Celery and
task-spooler are benchmark extras that scripts/setup-host installs; without them their column
says how to install them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from benchlib.common import ROOT, Context, Row, cluster, connect, free_port, percentile
from benchlib.worker_rows import Cost, measure_throughput

SLOTS = 2
# gpubox's worker holds this many jobs beyond its slots (--prefetch), as Celery's worker
# holds tasks it fetched ahead (4 per process by default): neither waits a round trip to
# its broker between short jobs.
PREFETCH = SLOTS
# gpubox logs at warning, as Celery's worker here (--loglevel WARNING): at info each logs a
# line or two per job (about 0.14 CPU-ms a job of 4.6 on this 2-core VM).
LOG_LEVEL = "warning"
CLIENTS = 8  # submitting threads, as worker_rows.submit_many
STAMP = ["date", "+%s.%N"]  # the latency jobs' command: prints the time it started
SETUP = "scripts/setup-host"
CELERY, TSP = "Celery + Redis", "task-spooler"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One round of one system."""

    rate: float  # jobs/s, first submit to last done
    start_p50_s: float  # submit → the job's process reads the clock, one job at a time
    task_p50_s: float | None = None  # Celery only: submit → the task's function starts
    cost: Cost | None = None  # gpubox only: CPU-ms per job in its throughput run, by who


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    missing: Callable[[], str | None]  # why it cannot be measured here, or None
    round: Callable[[Context, int, int], Sample]  # (ctx, jobs, samples)


def references(ctx: Context) -> list[Row]:
    """gpubox, Celery + Redis and task-spooler: throughput and submit → start p50, interleaved
    rounds."""
    jobs, samples, rounds = ctx.size(2000, 100), ctx.size(100, 10), ctx.size(3, 1)
    systems = [
        System("gpubox", lambda: None, _gpubox_round),
        System(CELERY, _celery_missing, _celery_round),
        System(TSP, _tsp_missing, _tsp_round),
    ]
    missing = {s.name: why for s in systems if (why := s.missing()) is not None}
    got: dict[str, list[Sample]] = {s.name: [] for s in systems if s.name not in missing}
    for _ in range(rounds):
        for system in systems:
            if system.name not in missing:
                got[system.name].append(system.round(ctx, jobs, samples))
    ours = got.pop("gpubox")
    size = f"{jobs:,} `true` jobs, {SLOTS} slots, {rounds} round{'s' if rounds > 1 else ''}"
    rate = statistics.median(s.rate for s in ours)
    rows = []
    for name, need in ((CELERY, 1.0), (TSP, 0.8)):
        reference, met = missing.get(name), None
        if name in got:
            theirs = statistics.median(s.rate for s in got[name])
            reference = f"{_rate([s.rate for s in got[name]])}: gpubox {rate / theirs:.2f}×"
            met = rate >= need * theirs
        target = f"≥ {need:.1f}× {name}'s"
        rows.append(
            Row(
                f"same work as {name}: throughput",
                f"{_rate([s.rate for s in ours])} ({size})",
                reference or "",
                target,
                met,
            )
        )
    # Where gpubox's CPU goes, in its round of median throughput: the machine's 2 cores
    # over the reference's jobs/s is what each job may cost to keep up.
    middle = sorted(ours, key=lambda s: s.rate)[len(ours) // 2]
    if middle.cost is not None:
        medians = [statistics.median(s.rate for s in samples) for samples in got.values()]
        cost, fastest = middle.cost, max(medians or [rate])
        rows.append(
            Row(
                "same work: CPU per job (gpubox, its median round)",
                f"{cost.total:.2f} CPU-ms, machine {cost.busy:.0%} busy: coordinator"
                f" {cost.coordinator:.2f} (broker thread busy {cost.broker.busy:.0%}, on CPU"
                f" {cost.broker.cpu:.0%}), worker {cost.workers:.2f}, the jobs' processes and"
                f" the launch pad {cost.children:.2f}, clients {cost.clients:.2f},"
                f" rest {cost.rest:.2f}",
                f"{os.cpu_count() or 1} cores at {fastest:,.0f} jobs/s (the faster reference):"
                f" {(os.cpu_count() or 1) * 1000 / fastest:.2f} CPU-ms per job",
            )
        )
    p50 = statistics.median(s.start_p50_s for s in ours)
    starts = f"{_ms([s.start_p50_s for s in ours])} ({samples} single jobs a round)"
    for name in (CELERY, TSP):
        reference, met = missing.get(name), None
        if name in got:
            reference = _ms([s.start_p50_s for s in got[name]])
            tasks = [s.task_p50_s for s in got[name] if s.task_p50_s is not None]
            if tasks:
                reference += f" (its task function starts at {_ms(tasks)})"
            if name == CELERY:
                met = p50 <= 0.003 and p50 < statistics.median(s.start_p50_s for s in got[name])
        target = "≤ 3 ms and below Celery's" if name == CELERY else "—"
        figure = f"same work as {name}: submit → process start p50"
        rows.append(Row(figure, starts, reference or "", target, met))
    return rows


def _rate(values: list[float]) -> str:
    return _spread(values, "{:,.0f}") + " jobs/s"


def _ms(seconds: list[float]) -> str:
    return _spread([s * 1000 for s in seconds], "{:.1f}") + " ms"


def _spread(values: list[float], number: str) -> str:
    """The median, then [min–max] when there are several."""
    median = number.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} [{number.format(min(values))}–{number.format(max(values))}]"


# --- gpubox --------------------------------------------------------------------------------


def _gpubox_round(ctx: Context, jobs: int, samples: int) -> Sample:
    rate, cost = measure_throughput(
        ctx, 1, jobs, slots=SLOTS, prefetch=PREFETCH, log_level=LOG_LEVEL
    )
    with cluster(ctx, GPUBOX_LOG_LEVEL=LOG_LEVEL) as made:
        made.add_worker(
            "w0", jobs=str(SLOTS), GPUBOX_PREFETCH=str(PREFETCH), GPUBOX_LOG_LEVEL=LOG_LEVEL
        )
        # Submitted on one keep-alive connection, as the throughput's clients do and as
        # Celery's client holds its connection to Redis (gpubox's own Client opens one per
        # request: ~1 ms more here).
        conn = connect(made.url)
        body = json.dumps({"name": "bench", "docker": {"image": ctx.image, "command": STAMP}})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {made.token}"}
        delays = []
        for index in range(samples + 1):  # the first one warms up and is left out
            submitted = time.time()
            conn.request("POST", "/api/v1/jobs", body, headers)
            answer = conn.getresponse()
            job = json.loads(answer.read())
            if answer.status != 201:
                raise RuntimeError(f"submit: HTTP {answer.status}: {job}")
            done = made.client.job(job["id"], wait=30)
            if done["status"] != "FINISHED":
                raise RuntimeError(f"job {job['id']} ended {done['status']}: {done}")
            line = next(made.client.logs(job["id"]))["line"]
            if index:
                delays.append(float(line) - submitted)
        conn.close()
    return Sample(rate, percentile(delays, 50), cost=cost)


# --- Celery + Redis ------------------------------------------------------------------------


def _celery_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return f"not measured: no redis-server (apt-get install redis-server, or {SETUP})"
    if not all(importlib.util.find_spec(name) for name in ("celery", "redis")):
        return f"not measured: no Celery (pip install -e '.[bench]', or {SETUP})"
    return None


def _celery_round(ctx: Context, jobs: int, samples: int) -> Sample:
    """A fresh Redis and Celery worker. The tasks are sent from one thread: sending is Python
    under the GIL, and 8 threads were no faster (384-423 jobs/s either way). Done is counted
    with DBSIZE on the result database every 50 ms (one key per result), as gpubox's wait_idle
    asks the coordinator every 50 ms."""
    import redis
    from celery import Celery

    tmp = Path(tempfile.mkdtemp(prefix="celery-", dir=ctx.tmp))
    with _redis_server(tmp) as url, _celery_worker(tmp, url):
        app = Celery("gpubox_bench", broker=f"{url}/0", backend=f"{url}/1")
        results = redis.Redis.from_url(f"{url}/1")
        try:
            warm = [app.send_task("bench.true") for _ in range(SLOTS)]
            for result in warm:
                result.get(timeout=60)  # the worker is up
            before = results.dbsize()
            started = time.monotonic()
            sent = [app.send_task("bench.true") for _ in range(jobs)]
            deadline = started + 600
            while results.dbsize() < before + jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Celery tasks still not done after 600 s: see {tmp}")
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            stored = results.mget([f"celery-task-meta-{r.id}" for r in sent])
            bad = [s for s in stored if s is None or json.loads(s)["status"] != "SUCCESS"]
            if bad:
                raise RuntimeError(f"{len(bad)} of {jobs} Celery tasks did not succeed: {bad[0]!r}")
            starts, tasks = [], []
            for index in range(samples + 1):
                submitted = time.time()
                task_at, stamp = app.send_task("bench.stamp").get(timeout=30)
                if index:
                    starts.append(stamp - submitted)
                    tasks.append(task_at - submitted)
        finally:
            results.close()
            app.close()
    return Sample(jobs / elapsed, percentile(starts, 50), percentile(tasks, 50))


@contextmanager
def _redis_server(tmp: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port, with its default settings and its files
    in `tmp`; yields its redis:// URL."""
    import redis

    port = free_port()
    log = tmp / "redis.log"
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    proc = subprocess.Popen([*command, "--logfile", str(log)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: see {log}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        client.close()
        _stop(proc)


@contextmanager
def _celery_worker(tmp: Path, url: str) -> Iterator[None]:
    """`celery worker --pool prefork --concurrency 2` of benchlib.celery_tasks. Gossip and
    mingle (talk between workers) are off: with one worker they only delay its start."""
    scripts = str(ROOT / "scripts")
    env = {
        **os.environ,
        "GPUBOX_BENCH_REDIS": url,
        "PYTHONPATH": os.pathsep.join(filter(None, [scripts, str(ROOT), os.getenv("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "celery", "-A", "benchlib.celery_tasks", "worker"]
    command += ["--pool", "prefork", "--concurrency", str(SLOTS), "--loglevel", "WARNING"]
    command += ["--without-gossip", "--without-mingle", "--hostname", "bench@%h"]
    with open(tmp / "celery.log", "ab") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        _stop(proc, group=True)


def _stop(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    """SIGTERM, then SIGKILL (to its process group, with `group`) after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


# --- task-spooler --------------------------------------------------------------------------


def _tsp_missing() -> str | None:
    if shutil.which("tsp") is None:
        return f"not measured: no tsp (apt-get install task-spooler, or {SETUP})"
    return None


def _tsp_round(ctx: Context, jobs: int, samples: int) -> Sample:
    """A fresh task-spooler server (TS_SOCKET and the jobs' output files in a temporary
    folder). Each `tsp CMD` queues a job and forks a client that waits for its turn and runs
    CMD, storing its output in a file; `tsp -w ID` waits for a job's end."""
    tmp = Path(tempfile.mkdtemp(prefix="tsp-", dir=ctx.tmp))
    env = {**os.environ, "TS_SOCKET": str(tmp / "socket"), "TMPDIR": str(tmp)}

    def tsp(*args: str) -> str:
        done = subprocess.run(["tsp", *args], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"tsp {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout.strip()

    tsp("-S", str(SLOTS))  # starts the server
    try:
        tsp("-w", tsp("true"))
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            ids = list(pool.map(lambda _: int(tsp("true")), range(jobs)))
        # Jobs start in the order queued, so when the last one has ended only another that
        # ran beside it can still be running.
        tsp("-w", str(max(ids)))
        for line in tsp("-l").splitlines()[1:]:
            if line.split()[1] in ("running", "queued"):
                tsp("-w", line.split()[0])
        elapsed = time.monotonic() - started
        delays = []
        for index in range(samples + 1):
            submitted = time.time()
            job = tsp(*STAMP)
            tsp("-w", job)
            if index:
                delays.append(float(Path(tsp("-o", job)).read_text()) - submitted)
    finally:
        tsp("-K")
    return Sample(jobs / elapsed, percentile(delays, 50))


ROWS: dict[str, Callable[[Context], list[Row]]] = {"references": references}
