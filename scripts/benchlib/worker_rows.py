"""Rows about the coordinator and its workers, without Docker: throughput and dispatch latency
with the process runtime, and what 100 idle workers cost the coordinator."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zmq

from benchlib.common import (
    Cluster,
    Context,
    Row,
    cluster,
    connect,
    ms,
    percentile,
    seconds_between,
)
from gpubox import __version__, keys, protocol


def throughput(ctx: Context) -> list[Row]:
    """No-op jobs/s from the first submit to the last FINISHED, with 1 and with 2 workers, and
    where the machine's CPU went in the run with 2."""
    jobs = ctx.size(2000, 150)
    rates = [measure_throughput(ctx, workers, jobs) for workers in (1, 2)]
    rows = [
        Row(
            f"throughput, {n} worker{'s' if n > 1 else ''} (process runtime)",
            f"{rate:,.0f} jobs/s ({jobs:,} no-op jobs, submit → FINISHED)",
            target="≥ 500 jobs/s" if n == 2 else "—",
            met=rate >= 500 if n == 2 else None,
        )
        for n, (rate, _) in zip((1, 2), rates, strict=True)
    ]
    drained = _drain_rate(ctx, 2, jobs)
    rows.append(
        Row(
            "throughput, 2 workers, queue filled first",
            f"{drained:,.0f} jobs/s ({jobs:,} no-op jobs queued, then the workers start: first"
            " start → last FINISHED)",
            "what the dispatch and run path takes without submits sharing the 2 cores",
        )
    )
    rows.append(
        Row(
            "broker thread, 2 workers, submit → FINISHED",
            f"{rates[1][1].broker} of the run's wall time (from its /metrics counters)",
            "busy ≈ 100 %: dispatch waits for the broker; CPU well below busy: it waits inside"
            " its work (commits, the GIL)",
        )
    )
    cost = rates[1][1]
    cores = os.cpu_count() or 1
    rows.append(
        Row(
            "CPU per no-op job, 2 workers",
            f"{cost.total:.2f} CPU-ms, machine {cost.busy:.0%} busy: coordinator"
            f" {cost.coordinator:.2f}, workers {cost.workers:.2f}, the jobs' processes (and"
            " the launch pad)"
            f" {cost.children:.2f}, bench clients {cost.clients:.2f}, rest {cost.rest:.2f}",
            f"{cores} cores at 500 jobs/s: {cores * 1000 / 500:.2f} CPU-ms per job",
        )
    )
    return rows


@dataclasses.dataclass(frozen=True)
class Cost:
    """CPU-milliseconds per job during a throughput run, by who spent them."""

    total: float  # the whole machine (every process and the kernel)
    busy: float  # the machine's busy share of the run's wall time
    coordinator: float
    workers: float  # the worker processes themselves
    children: float  # the jobs' processes, reaped by the workers
    clients: float  # this process: the submitting clients and the waiting
    rest: float  # kernel threads, dockerd, other tenants: total minus the above
    broker: BrokerShare  # the coordinator's broker thread over the run


@dataclasses.dataclass(frozen=True)
class BrokerShare:
    """What the broker thread did over a run, from its /metrics counters: wall seconds
    working (not waiting for a message) and CPU seconds, as shares of the run."""

    busy: float
    cpu: float

    def __str__(self) -> str:
        return f"busy {self.busy:.0%}, on CPU {self.cpu:.0%}"


def broker_seconds(made: Cluster) -> tuple[float, float]:
    """The broker thread's busy and CPU seconds so far (gpubox_broker_*_seconds_total)."""
    headers = {"Authorization": f"Bearer {made.token}"}
    request = urllib.request.Request(f"{made.url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        samples = dict(
            line.split(" ", 1) for line in response.read().decode().splitlines() if line[:1] != "#"
        )
    return (
        float(samples["gpubox_broker_busy_seconds_total"]),
        float(samples["gpubox_broker_cpu_seconds_total"]),
    )


def broker_share_since(made: Cluster, before: tuple[float, float], seconds: float) -> BrokerShare:
    busy, cpu = broker_seconds(made)
    return BrokerShare((busy - before[0]) / seconds, (cpu - before[1]) / seconds)


def measure_throughput(
    ctx: Context,
    workers: int,
    jobs: int,
    slots: int = 16,
    prefetch: int = 0,
    log_level: str = "info",
) -> tuple[float, Cost]:
    """`jobs` no-op jobs (`true`) submitted by 8 clients to a fresh cluster of `workers`
    workers with `slots` job slots and `prefetch` held jobs each, all logging at
    `log_level`: jobs/s from the first submit until none is queued or running, and what the
    CPU was spent on."""
    with cluster(ctx, GPUBOX_LOG_LEVEL=log_level) as made:
        for index in range(workers):
            made.add_worker(
                f"w{index}",
                jobs=str(slots),
                GPUBOX_PREFETCH=str(prefetch),
                GPUBOX_LOG_LEVEL=log_level,
            )
        pids = [proc.pid for proc in made.processes]
        broker_before = broker_seconds(made)
        before = [process_times(pid) for pid in pids], machine_times(), os.times()
        pads_before = [launch_pad_times(pid) for pid in pids[1:]]
        started = time.monotonic()
        submit_many(made, jobs, ["true"])
        made.wait_idle()
        elapsed = time.monotonic() - started
        after = [process_times(pid) for pid in pids], machine_times(), os.times()
        pads_after = [launch_pad_times(pid) for pid in pids[1:]]
        broker = broker_share_since(made, broker_before, elapsed)
        finished = sum(1 for job in made.all_jobs() if job["status"] == "FINISHED")
        if finished != jobs:
            raise RuntimeError(f"{jobs - finished} of {jobs} jobs did not finish")
    per_job = 1000 / jobs
    own = [(a[0] - b[0]) * per_job for a, b in zip(after[0], before[0], strict=True)]
    reaped = sum(a[1] - b[1] for a, b in zip(after[0][1:], before[0][1:], strict=True))
    # A root process worker's jobs are children of its launch pad, which reaps them.
    reaped += sum(a - b for a, b in zip(pads_after, pads_before, strict=True))
    (busy_a, all_a), (busy_b, all_b) = after[1], before[1]
    mine = after[2].user + after[2].system - before[2].user - before[2].system
    total = (busy_a - busy_b) * per_job
    parts = own[0], sum(own[1:]), reaped * per_job, mine * per_job
    busy = (busy_a - busy_b) / max(all_a - all_b, 1e-9)
    cost = Cost(total, busy, *parts, total - sum(parts), broker)
    return jobs / elapsed, cost


def _drain_rate(ctx: Context, workers: int, jobs: int) -> float:
    """No-op jobs/s through the broker and the workers alone: the jobs are queued before any
    worker runs, then the workers start together; from the first job's start to the last
    one's end, as the workers stamped them."""
    with cluster(ctx) as made:
        submit_many(made, jobs, ["true"])
        names = [f"w{index}" for index in range(workers)]
        for name in names:
            made.add_worker(name, jobs="16", wait=False)
        made.wait_connected(*names)
        made.wait_idle()
        done = [job for job in made.all_jobs() if job["status"] == "FINISHED"]
        if len(done) != jobs:
            raise RuntimeError(f"{jobs - len(done)} of {jobs} jobs did not finish")
    first = min(done, key=lambda job: job["result"]["executed_at"])["result"]["executed_at"]
    last = max(done, key=lambda job: job["result"]["finished_at"])["result"]["finished_at"]
    return jobs / seconds_between(first, last)


def process_times(pid: int) -> tuple[float, float]:
    """A process's own CPU-seconds (all its threads) and those of its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, (int(fields[13]) + int(fields[14])) / ticks


def launch_pad_times(worker: int) -> float:
    """CPU-seconds of a worker's live child processes (its launch pad), their own and those
    of the children they reaped (the jobs' processes)."""
    total = 0.0
    for task in Path(f"/proc/{worker}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                total += sum(process_times(int(child)))
    return total


def context_switches(pid: int) -> int:
    """Context switches so far of a process's live threads (voluntary and not)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def machine_times() -> tuple[float, float]:
    """CPU-seconds the whole machine was busy, and in all (busy, idle and I/O wait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / ticks, sum(values) / ticks


def submit_many(made: Cluster, count: int, command: list[str], threads: int = 8) -> None:
    """Submit `count` jobs from `threads` clients at once, each on one keep-alive connection
    (as the submit rate row)."""
    from benchlib.http_rows import post_job

    body = json.dumps(
        {"name": "bench", "docker": {"image": made.ctx.image, "command": command}}
    ).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {made.token}"}

    def submit(share: int) -> None:
        conn = connect(made.url)
        try:
            for _ in range(share):
                post_job(conn, body, headers)
        finally:
            conn.close()

    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(submit, shares))


def dispatch(ctx: Context) -> list[Row]:
    """Submit → STARTED (the process running) for one job at a time on an idle worker."""
    count = ctx.size(200, 30)
    with cluster(ctx) as made:
        made.add_worker("w0")
        delays = []
        for _ in range(count):
            job = made.submit(["true"])
            while (done := made.client.job(job["id"]))["status"] not in ("FINISHED", "ERROR"):
                time.sleep(0.002)
            delays.append(seconds_between(done["created_at"], done["result"]["executed_at"]))
    round_trip = zmq_round_trip(ctx.size(5000, 1000))
    p50 = percentile(delays, 50)
    return [
        Row(
            "dispatch latency (idle worker, process runtime)",
            f"p50 {ms(p50)}, p95 {ms(percentile(delays, 95))}",
            f"ZeroMQ DEALER/ROUTER round trip p50 {round_trip * 1e6:.0f} µs",
            "p50 ≤ 5 ms",
            p50 <= 0.005,
        )
    ]


def zmq_round_trip(count: int) -> float:
    """p50 seconds of one message out and one back over loopback TCP (no CURVE)."""
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")

        def echo() -> None:
            for _ in range(count):
                router.send_multipart(router.recv_multipart())

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            dealer.send(b"x")
            dealer.recv()
            times.append(time.perf_counter() - start)
        thread.join(5)
        return percentile(times, 50)
    finally:
        router.close(0)
        dealer.close(0)
        context.term()


def idle(ctx: Context) -> list[Row]:
    """The coordinator's CPU and memory with 100 connected workers doing nothing but
    heartbeating (simulated: CURVE-authenticated DEALERs in this process)."""
    workers = 100
    window = ctx.size(20, 3)
    with cluster(ctx) as made:
        stop = threading.Event()
        ready = threading.Event()
        thread = threading.Thread(
            target=simulate, args=(made, workers, stop, ready.set), daemon=True
        )
        thread.start()
        if not ready.wait(120):
            raise RuntimeError("the simulated workers did not connect")
        time.sleep(2)  # settle
        pid = made.coordinator.pid
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
        rss = rss_mb(pid)
        connected = sum(w["connected"] for w in made.client.workers()["workers"])
        stop.set()
        thread.join(10)
    if connected < workers:
        raise RuntimeError(f"only {connected} of {workers} simulated workers stayed connected")
    return [
        Row(
            f"idle cost, {workers} connected workers heartbeating",
            f"{cpu * 100:.1f} % of a core, {rss:.0f} MB RSS",
            target="≤ 2 % of a core, ≤ 100 MB",
            met=cpu <= 0.02 and rss <= 100,
        )
    ]


def simulate(made: Cluster, count: int, stop: threading.Event, ready: Callable[[], None]) -> None:
    """`count` workers: HELLO, READY with nothing free, then a HEARTBEAT every 2 s each."""
    state = str(made.state)
    server = keys.load_public(str(keys.coordinator_files(state)[0]))
    context = zmq.Context()
    sockets = []
    try:
        for index in range(count):
            name = f"idle-{index}"
            public, secret = keys.load_secret(keys.add_worker(state, name))
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (
                public,
                secret,
                server,
            )
            sock.connect(made.link)
            session = uuid.uuid4().hex
            hello = protocol.Hello(
                name=name,
                version=__version__,
                session=session,
                gpus=[],
                labels={},
                max_jobs=0,
                running=[],
            )
            sock.send_multipart(protocol.encode(hello))
            ready_msg = protocol.Ready(session=session, free_gpus=[], slots=0, running=[])
            sock.send_multipart(protocol.encode(ready_msg))
            sockets.append((sock, session))
        ready()
        next_beat = time.monotonic()
        while not stop.is_set():
            for sock, session in sockets:
                while sock.poll(0):
                    sock.recv_multipart()  # WELCOME, HEARTBEAT: nothing to do
                if time.monotonic() >= next_beat:
                    sock.send_multipart(protocol.encode(protocol.WorkerHeartbeat(session=session)))
            if time.monotonic() >= next_beat:
                next_beat += 2.0
            stop.wait(0.05)
    finally:
        for sock, _ in sockets:
            sock.close(0)
        context.term()


def cpu_seconds(pid: int) -> float:
    return process_times(pid)[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


ROWS: dict[str, Callable[[Context], list[Row]]] = {
    "throughput": throughput,
    "dispatch": dispatch,
    "idle": idle,
}
