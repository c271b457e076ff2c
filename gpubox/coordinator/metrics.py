"""What GET /metrics shows, in Prometheus's text format (version 0.0.4), in a few lines of our
own rather than a dependency: counters and a histogram kept by the broker thread, gauges read
from the store and the broker when scraped."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# Seconds from JOB sent to STARTED received: a container start is ~0.1-1 s, a pull far more.
DISPATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds of one scheduling round (Broker._schedule): fine from 0.5 ms to 100 ms, where the
# targets are (p50 ≤ 5 ms, p99 ≤ 50 ms at 1,000 workers: each is a bound, so whether a
# target is met reads exactly off the counts), then coarse up to 2.5 s for rounds gone wrong.
ROUND_BUCKETS = (
    *(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1),
    *(0.25, 0.5, 1.0, 2.5),
)


@dataclasses.dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


@dataclasses.dataclass
class BrokerCounters:
    """Kept by the broker thread; read (never written) by HTTP threads."""

    dispatch: Histogram = dataclasses.field(default_factory=lambda: Histogram(DISPATCH_BUCKETS))
    rounds: Histogram = dataclasses.field(default_factory=lambda: Histogram(ROUND_BUCKETS))
    decisions: Histogram = dataclasses.field(default_factory=lambda: Histogram(ROUND_BUCKETS))
    # The same decisions in the broker thread's CPU time: apart from its wall time, what it
    # waited for (a core, on a busy machine; the GIL, taken by the coordinator's other threads).
    decisions_cpu: Histogram = dataclasses.field(default_factory=lambda: Histogram(ROUND_BUCKETS))
    log_lines: int = 0
    jobs_sent: int = 0
    # Wall seconds the broker thread spent working (anything but waiting for a message),
    # and its CPU seconds: busy near the wall clock means the broker is what dispatch waits
    # for; CPU far below busy means it waits inside its work (the store's commits, the GIL).
    busy_s: float = 0.0
    cpu_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Submitter:
    """One submitter's line in the metrics ("" for jobs stored before submitters were)."""

    name: str
    queued: int
    running: int
    gpus: int
    use_gpu_hours: float


def metric(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def render(
    jobs_by_status: dict[str, int],
    oldest_queued_s: float,
    counters: BrokerCounters,
    workers: int,
    gpus_busy: int,
    gpus_free: int,
    dropped_messages: int,
    gpu_usage: Sequence[tuple[str, str, dict[str, Any]]] = (),
    gpu_jobs: Mapping[str, int] | None = None,
    submitters: Sequence[Submitter] = (),
) -> str:
    """The whole /metrics page. `gpu_usage`: (worker, uuid, NVML's memory_used_mb,
    utilization and power_w at its last heartbeat) for each GPU of a connected worker;
    `gpu_jobs`: the id of the job holding each busy GPU, by uuid; `submitters`: what each
    submitter has queued, running and used (fair share)."""
    lines = [
        *metric(
            "gpubox_jobs",
            "gauge",
            "Jobs in the store by status.",
            (f'gpubox_jobs{{status="{s}"}} {n}' for s, n in sorted(jobs_by_status.items())),
        ),
        *metric(
            "gpubox_oldest_queued_job_wait_seconds",
            "gauge",
            "How long the oldest QUEUED job has waited (0 when none waits).",
            [f"gpubox_oldest_queued_job_wait_seconds {oldest_queued_s:.3f}"],
        ),
        *metric(
            "gpubox_dispatch_latency_seconds",
            "histogram",
            "From a job sent to a worker to its container started.",
            counters.dispatch.lines("gpubox_dispatch_latency_seconds"),
        ),
        *metric(
            "gpubox_schedule_round_seconds",
            "histogram",
            "Scheduling rounds that planned the queue: from the ready workers read to the"
            " round's jobs claimed and sent.",
            counters.rounds.lines("gpubox_schedule_round_seconds"),
        ),
        *metric(
            "gpubox_schedule_decision_seconds",
            "histogram",
            "The decision of each of those rounds alone: which queued jobs go where, and why"
            " the rest wait (without the claims' store writes and the sends).",
            counters.decisions.lines("gpubox_schedule_decision_seconds"),
        ),
        *metric(
            "gpubox_schedule_decision_cpu_seconds",
            "histogram",
            "The CPU time the broker thread spent on each of those decisions; below their"
            " wall time by what it waited for (a core, or the GIL).",
            counters.decisions_cpu.lines("gpubox_schedule_decision_cpu_seconds"),
        ),
        *metric(
            "gpubox_jobs_dispatched_total",
            "counter",
            "Job attempts sent to workers.",
            [f"gpubox_jobs_dispatched_total {counters.jobs_sent}"],
        ),
        *metric(
            "gpubox_broker_busy_seconds_total",
            "counter",
            "Seconds the broker thread spent working rather than waiting for work: a rate"
            " near 1 means it is saturated, and dispatch waits for it.",
            [f"gpubox_broker_busy_seconds_total {counters.busy_s:.3f}"],
        ),
        *metric(
            "gpubox_broker_cpu_seconds_total",
            "counter",
            "CPU seconds of the broker thread: far below its busy seconds, it waits inside"
            " its work (the store's commits, other threads holding the interpreter).",
            [f"gpubox_broker_cpu_seconds_total {counters.cpu_s:.3f}"],
        ),
        *metric(
            "gpubox_log_lines_stored_total",
            "counter",
            "Log lines stored since the coordinator started.",
            [f"gpubox_log_lines_stored_total {counters.log_lines}"],
        ),
        *metric(
            "gpubox_workers_connected",
            "gauge",
            "Workers connected now.",
            [f"gpubox_workers_connected {workers}"],
        ),
        *metric(
            "gpubox_gpus",
            "gauge",
            "GPUs of connected workers, busy or free.",
            [
                f'gpubox_gpus{{state="busy"}} {gpus_busy}',
                f'gpubox_gpus{{state="free"}} {gpus_free}',
            ],
        ),
        *metric(
            "gpubox_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use, as NVML said at the worker's last heartbeat.",
            _gpu_samples(
                "gpubox_gpu_memory_used_bytes",
                gpu_usage,
                gpu_jobs,
                "memory_used_mb",
                lambda mb: f"{int(mb) * 2**20}",
            ),
        ),
        *metric(
            "gpubox_gpu_utilization_ratio",
            "gauge",
            "GPU utilization (0-1), as NVML said at the worker's last heartbeat.",
            _gpu_samples(
                "gpubox_gpu_utilization_ratio",
                gpu_usage,
                gpu_jobs,
                "utilization",
                lambda pct: f"{int(pct) / 100:g}",
            ),
        ),
        *metric(
            "gpubox_gpu_power_watts",
            "gauge",
            "GPU power draw, as NVML said at the worker's last heartbeat.",
            _gpu_samples(
                "gpubox_gpu_power_watts", gpu_usage, gpu_jobs, "power_w", lambda w: f"{w:g}"
            ),
        ),
        *metric(
            "gpubox_submitter_jobs",
            "gauge",
            "Jobs of each submitter (API token) queued and running.",
            (
                f'gpubox_submitter_jobs{{submitter="{label(s.name)}",status="{status}"}} {n}'
                for s in submitters
                for status, n in (("QUEUED", s.queued), ("RUNNING", s.running))
            ),
        ),
        *metric(
            "gpubox_submitter_gpus",
            "gauge",
            "GPUs the running jobs of each submitter hold.",
            (f'gpubox_submitter_gpus{{submitter="{label(s.name)}"}} {s.gpus}' for s in submitters),
        ),
        *metric(
            "gpubox_submitter_use_gpu_hours",
            "gauge",
            "Each submitter's use of the GPUs lately, as fair share orders the queue by:"
            " GPU-hours, decayed with fair_share_half_life (0 when fair share is off).",
            (
                f'gpubox_submitter_use_gpu_hours{{submitter="{label(s.name)}"}} {s.use_gpu_hours:g}'
                for s in submitters
            ),
        ),
        *metric(
            "gpubox_dropped_messages_total",
            "counter",
            "Worker messages refused: malformed, unauthorised, or about another's job.",
            [f"gpubox_dropped_messages_total {dropped_messages}"],
        ),
    ]
    return "\n".join(lines) + "\n"


def label(value: str) -> str:
    """A label value as the text format writes it: backslash, quote and newline escaped
    (a GPU's uuid is what its worker says it is)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _gpu_samples(
    name: str,
    gpu_usage: Sequence[tuple[str, str, dict[str, Any]]],
    gpu_jobs: Mapping[str, int] | None,
    reading: str,
    value: Callable[[Any], str],
) -> list[str]:
    """One sample per GPU that has the reading, labelled with its worker, its uuid and the
    job holding it ("" when none does)."""
    jobs = gpu_jobs or {}
    return [
        f'{name}{{worker="{label(w)}",uuid="{label(u)}",job="{jobs.get(u, "")}"}} '
        + value(now[reading])
        for w, u, now in gpu_usage
        if now.get(reading) is not None
    ]
