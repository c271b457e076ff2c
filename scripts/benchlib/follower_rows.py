"""The follower rows: clients following the logs of running jobs (GET …/logs?follow=1&
format=ndjson), against the target "1,000 concurrent followers of running jobs printing a
line a second, while the submit rate stays ≥ 80 % of what it is with no follower and /healthz
p99 ≤ 100 ms; coordinator RSS ≤ 300 MB for all of it" (quick: 100 followers, one round).

The coordinator is a real `gpubox coordinator` process on SQLite. Its running jobs are held by
simulated workers (benchlib.fleet_workers: workers of SLOTS slots and no GPU, in a process of
their own, speaking the real protocol over ZeroMQ with CURVE), each job printing a line a
second until the bench ends. The followers are read in another process, from one selector
(benchlib.follower_reader), which checks that the lines come in order, none missing. Over
interleaved rounds (the phase with followers first, then last, in turn), each phase:
  with followers  one stream per running job opened, then a quiet window (the coordinator's
                  CPU and the lines received), then the submit rate (benchlib.http_rows'
                  hammer, 8 keep-alive clients; the jobs queue, every slot being taken) while
                  another process asks /healthz HEALTH_GETS times, then the coordinator's RSS;
  without         the same with the streams closed: the same jobs running, the same lines
                  stored, nobody reading them.
After each phase the jobs it submitted are cancelled: a submit costs more the longer the
queue (its answer says the job's place in it), so each phase starts with none queued."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import queue
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from benchlib.common import Cluster, Context, Row, cluster, connect, ms, percentile
from benchlib.fleet_probe import memory_mb, scrape
from benchlib.fleet_sims import Fleet
from benchlib.fleet_workers import Shape, Tally
from benchlib.follower_reader import Received, probe_health, read_streams
from benchlib.http_rows import SUBMIT_BODY, Load, hammer
from benchlib.worker_rows import cpu_seconds, machine_times, submit_many

SLOTS = 100  # jobs a simulated worker holds: 10 workers for 1,000 followers
SHAPE = Shape(gpus=0, slots=SLOTS, run_s=(1e6, 1e6), line_every_s=1.0)
HEALTH_GETS = 200  # /healthz requests spread over each submit window
SETTLE_S, QUICK_SETTLE_S = 2.0, 1.0  # after the streams open (or close), before measuring
RUNNING = 'gpubox_jobs{status="RUNNING"}'

T = TypeVar("T")


@dataclasses.dataclass
class Window:
    """A stretch of wall-clock time (time.time()) and what the coordinator's process spent
    over it (CPU-seconds a second), with the machine's busy share, the simulated workers'
    and the stream reader's CPU (cores)."""

    start: float
    end: float
    cpu: float = 0.0
    machine: float = 0.0
    sims: float = 0.0
    reader: float = 0.0


@dataclasses.dataclass
class Phase:
    """One phase of a round (see the module's docstring)."""

    followers: int
    quiet: Window
    loaded: Window
    submits: Load
    health: list[float]
    rss_mb: float
    received: Received

    def lines_per_s(self, window: Window) -> float:
        """Lines received per second over `window` (from every stream)."""
        arrived = sum(1 for at, _ in self.received.arrivals if window.start <= at < window.end)
        return arrived / (window.end - window.start)

    def delays(self, window: Window) -> list[float]:
        """Seconds from each line's timestamp (the simulated worker's) to its arrival."""
        return [delay for at, delay in self.received.arrivals if window.start <= at < window.end]


def followers(ctx: Context) -> list[Row]:
    count, rounds, window_s = ctx.size(1000, 100), ctx.size(3, 1), ctx.size(5, 2)
    settle_s = QUICK_SETTLE_S if ctx.quick else SETTLE_S
    names = [f"sim-{index:02d}" for index in range(max(1, count // SLOTS))]
    phases: dict[bool, list[Phase]] = {True: [], False: []}
    started = time.monotonic()
    with (
        cluster(ctx, enrol=names) as made,
        Fleet(str(made.state), made.link, names, ramp_s=0.0, shape=SHAPE) as sims,
    ):
        sims.wait_welcomed(timeout_s=60)
        sims.report.set()
        sims.go.set()
        job_ids = run_jobs(made, count)
        _say(f"{count:,} jobs running in {time.monotonic() - started:.1f} s")
        before_mb = memory_mb(made.coordinator.pid)[0]
        for index in range(rounds):
            for followed in (True, False) if index % 2 == 0 else (False, True):
                got = phase(made, sims, job_ids if followed else [], window_s, settle_s)
                phases[followed].append(got)
                _say(_summary(got))
        peak_mb = memory_mb(made.coordinator.pid)[1]
        if made.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited ({made.coordinator.returncode})")
    log = (made.state / "coordinator.log").read_text(errors="replace")
    return rows(count, phases, before_mb, peak_mb, sims.tally, log)


def run_jobs(made: Cluster, count: int) -> list[int]:
    """Submit `count` jobs, wait until the simulated workers run them all; their ids."""
    submit_many(made, count, ["true"])
    deadline = time.monotonic() + 60 + count / 10
    while scrape(made).get(RUNNING, 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{scrape(made).get(RUNNING, 0):.0f} of {count} jobs running")
        time.sleep(0.2)
    return [job["id"] for job in made.all_jobs() if job["status"] == "RUNNING"]


def phase(
    made: Cluster, sims: Fleet, job_ids: list[int], window_s: float, settle_s: float
) -> Phase:
    """Follow `job_ids` (none: no follower), then measure the quiet window and the submits;
    then cancel the jobs submitted."""
    with Followers(made.url, made.token, job_ids) as streams:
        time.sleep(settle_s)
        quiet, _ = measured(made, sims, streams, lambda: time.sleep(window_s))
        loaded, (load, health) = measured(made, sims, streams, lambda: submits(made, window_s))
        rss_mb = memory_mb(made.coordinator.pid)[0]
    cancel_queued(made)
    return Phase(len(job_ids), quiet, loaded, load, health, rss_mb, streams.received)


def measured(
    made: Cluster, sims: Fleet, streams: Followers, run: Callable[[], T]
) -> tuple[Window, T]:
    """The Window `run` takes, and what it returns."""
    pid = made.coordinator.pid
    window = Window(time.time(), 0.0)
    cpu, machine, sims_cpu, reader = (
        cpu_seconds(pid),
        machine_times(),
        sims.cpu_s(),
        streams.cpu_s(),
    )
    began = time.monotonic()
    result = run()
    took = time.monotonic() - began
    window.end = time.time()
    window.cpu = (cpu_seconds(pid) - cpu) / took
    busy, total = machine_times()
    window.machine = (busy - machine[0]) / max(total - machine[1], 1e-9)
    window.sims = (sims.cpu_s() - sims_cpu) / took
    window.reader = (streams.cpu_s() - reader) / took
    return window, result


def submits(made: Cluster, seconds: float) -> tuple[Load, list[float]]:
    """The submit rate from 8 keep-alive clients over `seconds`, and the seconds each of
    HEALTH_GETS requests to /healthz took meanwhile (from a process of its own)."""
    mp = multiprocessing.get_context("spawn")
    ready, go = mp.Event(), mp.Event()
    out: multiprocessing.Queue[list[float]] = mp.Queue()
    probe = mp.Process(
        target=probe_health,
        args=(made.url, HEALTH_GETS, seconds, ready, go, out),
        daemon=True,
    )
    probe.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the /healthz probe did not start")
        go.set()
        body = json.dumps(SUBMIT_BODY).encode()
        load = hammer(made.url, made.token, body, 8, seconds, made.coordinator.pid)
        times = out.get(timeout=seconds + 60)
    finally:
        probe.join(10)
        if probe.is_alive():
            probe.kill()
    if len(times) < HEALTH_GETS:
        raise RuntimeError(f"/healthz answered {len(times)} of {HEALTH_GETS} (see above)")
    return load, times


def cancel_queued(made: Cluster, threads: int = 8) -> None:
    """Cancel every queued job (the submits'), from `threads` keep-alive clients: a submit
    costs more the longer the queue (its answer says the job's place in it), and each phase
    starts with none."""
    queued: list[int] = []
    before = None
    while True:
        page = made.client.jobs("QUEUED", 1000, before)
        queued += [job["id"] for job in page["jobs"]]
        if (before := page["next"]) is None:
            break
    headers = {"Authorization": f"Bearer {made.token}"}

    def cancel(share: list[int]) -> None:
        conn = connect(made.url)
        try:
            for job_id in share:
                conn.request("POST", f"/api/v1/jobs/{job_id}/cancel", b"", headers)
                response = conn.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise RuntimeError(f"cancel {job_id}: HTTP {response.status}: {answer!r}")
        finally:
            conn.close()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(cancel, [queued[i::threads] for i in range(threads)]))


class Followers:
    """Follow streams of these jobs, read by benchlib.follower_reader.read_streams in a
    process of its own (spawned), open within the block; none at all for no job. What the
    reader saw is `received` once the block is left."""

    def __init__(self, url: str, token: str, job_ids: list[int]) -> None:
        self.url, self.token, self.job_ids = url, token, job_ids
        self.received = Received()
        self.process: Any = None
        self.mp = multiprocessing.get_context("spawn")
        self.stop = self.mp.Event()
        self.out: multiprocessing.Queue[tuple[str, Received]] = self.mp.Queue()

    def __enter__(self) -> Followers:
        if not self.job_ids:
            return self
        self.process = self.mp.Process(
            target=read_streams,
            args=(self.url, self.token, self.job_ids, self.stop, self.out),
            daemon=True,
        )
        self.process.start()
        opened = self._next("opened", 60 + len(self.job_ids) / 10)
        if opened.refused:
            _say(f"{opened.refused} follow streams refused: {'; '.join(opened.answers)}")
        if not opened.opened:
            self.__exit__()
            raise RuntimeError(f"no follow stream opened: {'; '.join(opened.answers)}")
        return self

    def cpu_s(self) -> float:
        """The reader's CPU-seconds so far."""
        return cpu_seconds(self.process.pid) if self.process is not None else 0.0

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.stop.set()
        try:
            self.received = self._next("received", 60)
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()

    def _next(self, kind: str, timeout_s: float) -> Received:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                said, got = self.out.get(timeout=0.5)
                if said == kind:
                    return got
            except queue.Empty:
                if time.monotonic() > deadline or not self.process.is_alive():
                    raise RuntimeError(f"the follow stream reader: no {kind!r}") from None


def rows(
    count: int,
    phases: dict[bool, list[Phase]],
    before_mb: float,
    peak_mb: float,
    tally: Tally,
    log: str,
) -> list[Row]:
    ours, bare = phases[True], phases[False]
    rounds = len(ours)
    jobs = f"{count:,} jobs running, a line a second each"
    rate, bare_rate = (
        _median([p.submits.rate for p in ours]),
        _median([p.submits.rate for p in bare]),
    )
    ratios = [a.submits.rate / b.submits.rate for a, b in zip(ours, bare, strict=True)]
    health = [t for p in ours for t in p.health]
    bare_health = [t for p in bare for t in p.health]
    p99s = [percentile(p.health, 99) for p in ours]
    quiet_lines = [p.lines_per_s(p.quiet) for p in ours]
    loaded_lines = [p.lines_per_s(p.loaded) for p in ours]
    delays = [d for p in ours for d in p.delays(p.loaded)]
    quiet_delays = [d for p in ours for d in p.delays(p.quiet)]
    missing = sum(p.received.missing for p in ours)
    cut = sum(p.received.cut + p.received.ended for p in ours)
    refused = sum(p.received.refused for p in ours)
    opened = min(p.received.opened for p in ours)
    wait_max = max(p.received.wait_max_s for p in ours)
    lost = missing or cut or refused or opened < count
    lines = log.splitlines()
    errors = sum(1 for line in lines if " ERROR " in line or "Traceback" in line)
    warnings = sum(1 for line in lines if " WARNING " in line)
    cuts = sum(1 for line in lines if "stream of job" in line and " cut: " in line)
    trouble = f"coordinator log: {errors} errors, {warnings} warnings, {cuts} streams cut"
    if tally.dropped or tally.hellos_again or tally.refused:
        trouble += (
            f"; simulated workers: {tally.dropped} messages dropped, {tally.hellos_again}"
            f" sessions lost, {tally.refused} refused"
        )
    of = f"median of {rounds} interleaved rounds" if rounds > 1 else "one round"
    return [
        Row(
            f"submit rate, {jobs}, no follower (8 keep-alive clients)",
            f"{_range([p.submits.rate for p in bare], 'submits/s')} ({of});"
            f" {_median([p.submits.cpu_ms for p in bare]):.2f} coordinator CPU-ms a submit",
            f"/healthz meanwhile: p50 {_ms(bare_health, 50)}, p99 {_ms(bare_health, 99)}",
        ),
        Row(
            f"submit rate, with {count:,} followers of those jobs (NDJSON follow streams)",
            f"{_range([p.submits.rate for p in ours], 'submits/s')} ({of});"
            f" {_median([p.submits.cpu_ms for p in ours]):.2f} coordinator CPU-ms a submit",
            f"{rate / bare_rate:.0%} of no follower"
            + (f" (rounds {min(ratios):.0%}–{max(ratios):.0%})" if rounds > 1 else ""),
            "≥ 80 % of no follower",
            rate >= 0.8 * bare_rate,
        ),
        Row(
            f"/healthz with {count:,} followers, during the submits",
            f"p50 {_ms(health, 50)}, p99 {_ms(health, 99)}"
            + (f" [rounds' p99 {ms(min(p99s))}–{ms(max(p99s))}]" if rounds > 1 else "")
            + f" ({len(health):,} GETs)",
            f"no follower: p99 {_ms(bare_health, 99)}",
            "p99 ≤ 100 ms",
            percentile(health, 99) <= 0.1,
        ),
        Row(
            f"coordinator RSS with {count:,} followers",
            f"{_range([p.rss_mb for p in ours], 'MB')} after the submits;"
            f" peak {peak_mb:.0f} MB over the whole run",
            f"{before_mb:.0f} MB with the jobs running, before any follower",
            "≤ 300 MB",
            peak_mb <= 300,
        ),
        Row(
            f"log lines received by {count:,} followers ({jobs})",
            f"{_range(quiet_lines, 'lines/s')}, during the submits"
            f" {_range(loaded_lines, 'lines/s')}; line → follower p50"
            f" {_ms(quiet_delays, 50)}, during the submits p50"
            f" {_ms(delays, 50)}, p99 {_ms(delays, 99)}",
            f"{opened:,} of {count:,} streams open; {missing:,} lines missing, {cut} streams"
            f" cut, {refused} refused; longest wait for a line {wait_max:.1f} s; {trouble}",
            f"{count:,} lines/s, none lost",
            not lost and _median(quiet_lines) >= 0.95 * count,
        ),
        Row(
            f"coordinator CPU, {jobs}, no submits",
            f"{_median([p.quiet.cpu for p in ours]):.0%} of a core with {count:,} followers,"
            f" {_median([p.quiet.cpu for p in bare]):.0%} without (during the submits"
            f" {_median([p.loaded.cpu for p in ours]):.0%} and"
            f" {_median([p.loaded.cpu for p in bare]):.0%})",
            f"machine {_median([p.quiet.machine for p in ours]):.0%} busy; simulated workers"
            f" {_median([p.quiet.sims for p in ours]):.0%} of a core, stream reader"
            f" {_median([p.quiet.reader for p in ours]):.0%}",
        ),
    ]


def _ms(values: list[float], p: float) -> str:
    """The p-th percentile in ms, "—" for none."""
    return ms(percentile(values, p)) if values else "—"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _range(values: list[float], unit: str) -> str:
    """The median, and [min–max] where there are several."""
    shown = f"{statistics.median(values):,.0f} {unit}"
    if len(values) > 1:
        shown += f" [{min(values):,.0f}–{max(values):,.0f}]"
    return shown


def _summary(got: Phase) -> str:
    return (
        f"{got.followers:,} followers: {got.lines_per_s(got.quiet):,.0f} lines/s,"
        f" {got.submits.rate:,.0f} submits/s, /healthz p99 {ms(percentile(got.health, 99))},"
        f" RSS {got.rss_mb:.0f} MB, coordinator {got.quiet.cpu:.0%} of a core quiet,"
        f" {got.loaded.cpu:.0%} submitting"
    )


def _say(text: str) -> None:
    print(f"bench: followers: {text}", file=sys.stderr, flush=True)


ROWS: dict[str, Callable[[Context], list[Row]]] = {"followers": followers}
