"""What a job's GPUs did, as points: each point is one GPU's readings folded over a stretch
of time (telemetry_point, 10 s by default, of samples taken every telemetry_interval). The
worker makes them, the coordinator stores them; both merge old points into coarser ones to
stay within a bound, and the coordinator sums a job's points up when it ends. Pure: no I/O.

A point's stretches follow each other without gaps while the worker samples: a point starts
where the last one of its GPU ended. So the seconds its points cover are the seconds the job
held that GPU (less any time the worker was stopped), and merging two neighbours keeps
every sum and maximum the job's summary is made of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# The point fields as the API shows them and the store's columns hold them, in order.
POINT_FIELDS = (
    "gpu",
    "start",
    "end",
    "samples",
    "util_mean",
    "util_max",
    "memory_max_mb",
    "memory_total_mb",
    "power_mean_w",
    "temperature_max_c",
)


@dataclasses.dataclass(frozen=True)
class Point:
    """One GPU's readings from `start` to `end` (Unix seconds): `samples` readings, their
    mean and highest utilization (%), the most memory in use (MB) of the card's
    `memory_total_mb`, the mean power draw (W) and the highest temperature (°C); power and
    temperature are None where NVML has no reading."""

    gpu: str
    start: float
    end: float
    samples: int
    util_mean: float
    util_max: float
    memory_max_mb: int
    memory_total_mb: int
    power_mean_w: float | None = None
    temperature_max_c: float | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in POINT_FIELDS}

    def to_row(self) -> list[Any]:
        """The point as a list, in POINT_FIELDS order (the wire's and the store's form)."""
        return [getattr(self, name) for name in POINT_FIELDS]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Point:
        return cls(*row)


def _weighted(a: float | None, wa: float, b: float | None, wb: float) -> float | None:
    """The mean of two means, weighted; a side without a value leaves the other's."""
    if a is None or b is None:
        return a if b is None else b
    total = wa + wb
    return (a * wa + b * wb) / total if total else (a + b) / 2


def _top(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return max(a, b)


def _power(a: Point, b: Point) -> float | None:
    """The mean power of two points together: their energy over their seconds. A side without
    a reading adds no energy, as summarize counts it, so the energy of the two stays the same
    (taking the other side's mean for both would count it again over the missing seconds)."""
    known = [p for p in (a, b) if p.power_mean_w is not None]
    if not known:
        return None
    seconds = a.seconds + b.seconds
    if not seconds:
        return sum(p.power_mean_w or 0.0 for p in known) / len(known)
    return sum((p.power_mean_w or 0.0) * p.seconds for p in known) / seconds


def merge(a: Point, b: Point) -> Point:
    """Two points of one GPU as one covering both: means weighted by samples, maxima kept.
    Power is weighted by seconds, so that the energy of the two stays the same."""
    return Point(
        gpu=a.gpu,
        start=min(a.start, b.start),
        end=max(a.end, b.end),
        samples=a.samples + b.samples,
        util_mean=_weighted(a.util_mean, a.samples, b.util_mean, b.samples) or 0.0,
        util_max=max(a.util_max, b.util_max),
        memory_max_mb=max(a.memory_max_mb, b.memory_max_mb),
        memory_total_mb=max(a.memory_total_mb, b.memory_total_mb),
        power_mean_w=_power(a, b),
        temperature_max_c=_top(a.temperature_max_c, b.temperature_max_c),
    )


def coarsen(items: Sequence[T], bound: int, pair: Callable[[T, T], T]) -> list[T]:
    """`items` (oldest first) again, if there are more than `bound`: the older half merged in
    pairs by `pair`. Called at every addition, it keeps a series under bound + 1 items while
    its oldest part grows ever coarser (each merge halves the resolution of what it touches),
    so a week-long series still spans the whole week."""
    if len(items) <= bound or bound < 2:
        return list(items)
    older = (len(items) // 2) & ~1  # an even count: merged two by two
    merged = [pair(items[i], items[i + 1]) for i in range(0, older, 2)]
    return merged + list(items[older:])


@dataclasses.dataclass(frozen=True)
class Usage:
    """A summary of points: of one GPU, or of a job's GPUs together."""

    gpu_seconds: float
    util_mean: float
    util_max: float
    memory_max_mb: int
    memory_max_pct: float
    energy_wh: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_seconds": round(self.gpu_seconds, 1),
            "util_mean": round(self.util_mean, 1),
            "util_max": round(self.util_max, 1),
            "memory_max_mb": self.memory_max_mb,
            "memory_max_pct": round(self.memory_max_pct, 1),
            "energy_wh": None if self.energy_wh is None else round(self.energy_wh, 3),
        }


def _usage(points: Sequence[Point]) -> Usage:
    seconds = sum(p.seconds for p in points)
    samples = sum(p.samples for p in points)
    energy = [p.power_mean_w * p.seconds for p in points if p.power_mean_w is not None]
    peak = max(points, key=lambda p: p.memory_max_mb)
    return Usage(
        gpu_seconds=seconds,
        util_mean=sum(p.util_mean * p.samples for p in points) / samples if samples else 0.0,
        util_max=max(p.util_max for p in points),
        memory_max_mb=peak.memory_max_mb,
        memory_max_pct=100.0 * peak.memory_max_mb / peak.memory_total_mb
        if peak.memory_total_mb
        else 0.0,
        energy_wh=sum(energy) / 3600 if energy else None,
    )


def summarize(points: Iterable[Point]) -> dict[str, Any] | None:
    """A job's summary (its result's `telemetry`): the job's totals, and each GPU's under
    `gpus`. For the job: gpu_seconds and energy are sums over its GPUs, util_mean is weighted
    by samples, the maxima are the highest of any GPU. None when there are no points."""
    by_gpu: dict[str, list[Point]] = {}
    for point in points:
        by_gpu.setdefault(point.gpu, []).append(point)
    if not by_gpu:
        return None
    each = {gpu: _usage(found) for gpu, found in sorted(by_gpu.items())}
    whole = _usage([p for found in by_gpu.values() for p in found])
    energies = [u.energy_wh for u in each.values() if u.energy_wh is not None]
    job = dataclasses.replace(
        whole,
        memory_max_pct=max(u.memory_max_pct for u in each.values()),
        energy_wh=sum(energies) if energies else None,
    )
    return {**job.to_dict(), "gpus": {gpu: u.to_dict() for gpu, u in each.items()}}


def duration_text(seconds: float) -> str:
    """A duration in the largest unit that keeps it short: "45 s", "30 min", "2 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def idle_error(threshold: float, seconds: float) -> str:
    """The error of a job stopped by the idle-GPU policy."""
    return f"idle: its GPUs stayed under {threshold:g} % for {duration_text(seconds)}"
