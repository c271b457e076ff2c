"""What the fleet rows read off a running coordinator: its /metrics, the percentiles of its
scheduling rounds there, and its process's CPU and memory from /proc."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from pathlib import Path

from benchlib.common import Cluster
from benchlib.worker_rows import cpu_seconds, machine_times

ROUNDS = "gpubox_schedule_round_seconds"
DECISIONS = "gpubox_schedule_decision_seconds"  # the rounds' plans alone
DECISIONS_CPU = "gpubox_schedule_decision_cpu_seconds"  # the same, the broker thread's CPU
Samples = dict[str, float]


@dataclasses.dataclass
class Share:
    """What the coordinator spent over a window, in shares of a core: its process's CPU, its
    broker thread's CPU, the time of its scheduling rounds (wall seconds a second); and the
    whole machine's busy share (1.0: every core busy)."""

    cpu: float
    broker: float
    rounds: float
    machine: float


def share(made: Cluster, window_s: float) -> tuple[Share, Samples, Samples]:
    """The coordinator's Share over the next window_s, and its samples at both ends."""
    pid = made.coordinator.pid
    before, cpu_before, busy_before = scrape(made), cpu_seconds(pid), machine_times()
    at = time.monotonic()
    time.sleep(window_s)
    after, cpu_after, busy_after = scrape(made), cpu_seconds(pid), machine_times()
    took = time.monotonic() - at
    measured = Share(
        cpu=(cpu_after - cpu_before) / took,
        broker=delta(before, after, "gpubox_broker_cpu_seconds_total") / took,
        rounds=delta(before, after, f"{ROUNDS}_sum") / took,
        machine=(busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1e-9),
    )
    return measured, before, after


def scrape(made: Cluster) -> Samples:
    """Every sample of the coordinator's /metrics, by name{labels}."""
    headers = {"Authorization": f"Bearer {made.token}"}
    request = urllib.request.Request(f"{made.url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    }


def delta(before: Samples, after: Samples, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """The scheduling rounds between two scrapes: how many, p50 and p99 (each placed within
    its bucket as if evenly spread there, as Prometheus's histogram_quantile does; one past
    the last bound is that bound), and the upper bound of the slowest one's bucket (inf:
    past the last bound)."""

    count: int = 0
    p50: float = 0.0
    p99: float = 0.0
    slowest: float = 0.0


def rounds(before: Samples, after: Samples, name: str = ROUNDS) -> Rounds:
    prefix = f"{name}_bucket"
    bounds = sorted((float(key.split('"')[1]), key) for key in after if key.startswith(prefix))
    cumulative = [after[key] - before.get(key, 0.0) for _, key in bounds]
    total = int(cumulative[-1]) if cumulative else 0
    if not total:
        return Rounds()

    def at(fraction: float) -> float:
        rank = fraction * total
        low, below = 0.0, 0.0
        for (bound, _), count in zip(bounds, cumulative, strict=True):
            if count >= rank:
                if bound == float("inf"):
                    return low
                return low + (bound - low) * (rank - below) / max(count - below, 1)
            low, below = bound, count
        return low

    slowest = next(b for (b, _), count in zip(bounds, cumulative, strict=True) if count == total)
    return Rounds(total, at(0.5), at(0.99), slowest)


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's RSS now and its highest so far (VmRSS, VmHWM), in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)
