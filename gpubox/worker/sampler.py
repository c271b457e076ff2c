"""The worker's GPU sampler: one thread that, while jobs hold GPUs, reads the GPUs every
`telemetry_interval` and folds each GPU's samples into a point every `telemetry_point`
(gpubox.telemetry.Point), for the agent to send; and that applies the idle-GPU policy.

A job is tracked from the moment its container (or process) starts to the moment its runner
reports it done; its points follow each other without gaps over that time. With no job
tracked, the GPUs are not read at all.

The idle-GPU policy: a job with an idle_timeout whose GPUs all read under its idle_threshold
(%) for that long is stopped, an ERROR ("idle: its GPUs stayed under 5 % for 30 min"). A
line in the job's log warns of it a fifth of the timeout (at most five minutes) before; the
warning is given again if the GPUs were busy in between. A job whose GPUs give no readings
(NVML failing) is never taken for idle.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gpubox import telemetry
from gpubox.logfmt import fields
from gpubox.telemetry import Point
from gpubox.worker.stopping import JobStop

log = logging.getLogger(__name__)

WARN_BEFORE_S = 300.0  # the idle warning comes at most this long before the stop


@dataclasses.dataclass
class _Fold:
    """One GPU's samples since its current point began."""

    start: float
    samples: int = 0
    util_sum: float = 0.0
    util_max: float = 0.0
    memory_max_mb: int = 0
    power_sum: float = 0.0
    power_samples: int = 0
    temperature_max_c: float | None = None

    def add(self, reading: dict[str, Any]) -> None:
        util = float(reading.get("utilization") or 0)
        self.samples += 1
        self.util_sum += util
        self.util_max = max(self.util_max, util)
        self.memory_max_mb = max(self.memory_max_mb, int(reading.get("memory_used_mb") or 0))
        power = reading.get("power_w")
        if power is not None:
            self.power_sum += power
            self.power_samples += 1
        temperature = reading.get("temperature_c")
        if temperature is not None and (
            self.temperature_max_c is None or temperature > self.temperature_max_c
        ):
            self.temperature_max_c = temperature

    def point(self, gpu: str, end: float, memory_total_mb: int) -> Point:
        return Point(
            gpu=gpu,
            start=round(self.start, 3),
            end=round(max(end, self.start), 3),
            samples=self.samples,
            util_mean=round(self.util_sum / self.samples, 2) if self.samples else 0.0,
            util_max=self.util_max,
            memory_max_mb=self.memory_max_mb,
            memory_total_mb=memory_total_mb,
            power_mean_w=round(self.power_sum / self.power_samples, 2)
            if self.power_samples
            else None,
            temperature_max_c=self.temperature_max_c,
        )


@dataclasses.dataclass
class Tracked:
    """A job whose GPUs are being sampled."""

    job_id: int
    attempt: int
    gpus: list[str]
    stop: JobStop | None
    idle_timeout: float | None
    idle_threshold: float
    folds: dict[str, _Fold]
    point_start: float  # time.time() when the current points began
    busy_at: float  # time.monotonic() when a GPU of it last read at or above the threshold
    warned: bool = False
    stopped: bool = False


class Sampler:
    """Samples the GPUs of the jobs it tracks. run() in one thread; track(), finish(),
    take() and stop() from the agent's."""

    def __init__(
        self,
        usage: Callable[[], list[dict[str, Any]]],
        memory_mb: dict[str, int],
        interval_s: float = 1.0,
        point_s: float = 10.0,
    ) -> None:
        """`usage`: the GPUs' readings now (worker.gpu's GpuSource.usage); `memory_mb`: each
        GPU's total memory, by UUID."""
        self.usage = usage
        self.memory_mb = memory_mb
        self.interval_s = interval_s
        self.point_s = point_s
        self._jobs: dict[int, Tracked] = {}
        self._lock = threading.Lock()
        self._ready: collections.deque[tuple[int, int, list[Point]]] = collections.deque()
        self._stop = threading.Event()
        self.busy_s = 0.0  # CPU seconds this thread spent sampling (scripts/bench)
        self.samples = 0  # readings taken, all GPUs

    def track(
        self,
        job_id: int,
        attempt: int,
        gpus: list[str],
        stop: JobStop | None = None,
        idle_timeout: float | None = None,
        idle_threshold: float = 5.0,
    ) -> None:
        """Sample `gpus` for this job from now on (again: a restart of its points)."""
        if not gpus:
            return  # nothing to sample, and a job without GPUs is never idle
        now = time.time()
        with self._lock:
            self._jobs[job_id] = Tracked(
                job_id,
                attempt,
                list(gpus),
                stop,
                idle_timeout or None,
                idle_threshold,
                {gpu: _Fold(now) for gpu in gpus},
                now,
                time.monotonic(),
            )

    def finish(self, job_id: int) -> tuple[int, list[Point]] | None:
        """Stop sampling the job: (its attempt, its last points, up to now), or None when it
        was not tracked."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        return job.attempt, self._points(job, time.time())

    def take(self) -> list[tuple[int, int, list[Point]]]:
        """The points made since the last take: (job id, attempt, points) each."""
        taken = []
        while self._ready:
            taken.append(self._ready.popleft())
        return taken

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += self.interval_s
            try:
                self.sample()
            except Exception:  # one bad reading must not end the sampling
                log.exception("sampling the GPUs failed")
            # On schedule, not drifting; after a stall (a slow NVML), start afresh from now.
            wait = next_at - time.monotonic()
            if wait < 0:
                next_at, wait = time.monotonic(), 0.0
            self._stop.wait(wait)

    def sample(self) -> None:
        """Read the tracked jobs' GPUs once; close points that are due; apply the policy."""
        with self._lock:
            jobs = list(self._jobs.values())
        if not jobs:
            return
        cpu = time.thread_time()
        readings = {reading["uuid"]: reading for reading in self.usage()}
        now, mono = time.time(), time.monotonic()
        for job in jobs:
            seen = False
            for gpu, fold in job.folds.items():
                reading = readings.get(gpu)
                if reading is not None:
                    fold.add(reading)
                    self.samples += 1
                    seen = True
                    if (reading.get("utilization") or 0) >= job.idle_threshold:
                        job.busy_at = mono
            if not seen:
                job.busy_at = mono  # no readings: never taken for idle
            if now - job.point_start >= self.point_s:
                with self._lock:
                    if self._jobs.get(job.job_id) is not job:
                        continue  # finished meanwhile: finish() made its last points
                    self._ready.append((job.job_id, job.attempt, self._points(job, now)))
            self._idle(job, mono)
        self.busy_s += time.thread_time() - cpu

    def _points(self, job: Tracked, end: float) -> list[Point]:
        """The job's current points, closed at `end`; the next ones begin there."""
        points = [
            fold.point(gpu, end, self.memory_mb.get(gpu, 0)) for gpu, fold in job.folds.items()
        ]
        job.folds = {gpu: _Fold(end) for gpu in job.folds}
        job.point_start = end
        return points

    def _idle(self, job: Tracked, mono: float) -> None:
        """The idle-GPU policy for one job, after a sample."""
        if job.idle_timeout is None or job.stopped or job.stop is None or job.stop.is_set():
            return  # (a job being cancelled gets no idle warning nor idle stop in its log)
        idle_for = mono - job.busy_at
        if idle_for < 1e-9:
            job.warned = False
            return
        threshold = f"{job.idle_threshold:g} %"
        if idle_for >= job.idle_timeout:
            job.stopped = True
            error = telemetry.idle_error(job.idle_threshold, job.idle_timeout)
            log.info("job %d: stopping it, %s", job.job_id, error, extra=fields(job=job.job_id))
            job.stop.note(f"stopped: {error} (idle_timeout)")
            job.stop.because(error)
        elif not job.warned and idle_for >= job.idle_timeout - warn_before(job.idle_timeout):
            job.warned = job.stop.note(
                f"warning: this job's GPUs have stayed under {threshold} for"
                f" {telemetry.duration_text(idle_for)}; it will be stopped if they stay so for"
                f" {telemetry.duration_text(job.idle_timeout - idle_for)} more (idle_timeout)"
            )


def warn_before(idle_timeout: float) -> float:
    """How long before an idle stop its warning comes: a fifth of the timeout, at most
    WARN_BEFORE_S."""
    return min(WARN_BEFORE_S, idle_timeout / 5)
