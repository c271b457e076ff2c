"""The usage report, for the people who pay for the GPUs: over the jobs that ended in a window
of time, the GPU-hours, the jobs by how they ended, how busy their GPUs were and how long
they waited, per submitter, label or worker. GET /api/v1/usage serves it and `gpubox usage`
prints it. Pure: no I/O (the store reads the jobs: Store.ended_jobs).

Each figure of a group, over the jobs of the group that ended (finished_at) in [since, until):

- gpu_hours: the sum of gpus × duration / 3600, where duration is the job's result.duration
  (finished_at − executed_at, in seconds rounded to the millisecond, as models.Job has it);
  a job that never started, or asked for no GPUs, adds 0. The store keeps when a job's last
  attempt started, so an earlier attempt lost with its worker is not counted.
- jobs: how many ended FINISHED (exit code 0), ERROR (a non-zero exit code, a timeout, a lost
  worker, …) and CANCELLED, and their total.
- util_mean: the mean GPU utilization (%) over the GPU time that telemetry measured: each
  job's result.telemetry.util_mean weighted by its telemetry gpu_seconds; None when no job of
  the group has telemetry.
- wait_p50_s, wait_p95_s: the median and 95th percentile of executed_at − created_at (from
  submit to the start of the last attempt, in seconds), over the jobs that started (linear
  between the two nearest ranks, as numpy.percentile does by default); None when none
  started.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from gpubox import errors, models

BY = ("submitter", "label", "worker")  # how the report may group the jobs
DEFAULT_SINCE = "7d"  # the window a report covers when it names no since
STATUSES = ("FINISHED", "ERROR", "CANCELLED")  # how a job can end, as jobs counts them
# The keys of the groups of jobs that have no submitter (stored before gpubox recorded it),
# no labels, or no worker (cancelled before any ran them).
NOT_RECORDED = "(not recorded)"
NO_LABELS = "(no labels)"
NEVER_RAN = "(never ran)"

# A relative age: a number and its unit (seconds, minutes, hours, days, weeks).
_AGE = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_when(text: str, name: str, now: datetime) -> datetime:
    """A time where a report's window starts or ends, UTC: a relative age meaning that long
    before `now` (30m, 12h, 7d, 2w), an RFC 3339 time with a time zone, or a date (YYYY-MM-DD,
    its midnight UTC). errors.BadInput naming `name` for anything else."""
    text = text.strip()
    try:
        age = _AGE.fullmatch(text)
        if age:
            return now - timedelta(seconds=float(age[1]) * _UNIT_S[age[2]])
        if _DATE.fullmatch(text):
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        when = datetime.fromisoformat(text.upper())  # Python 3.11 reads a Z as UTC
        if when.tzinfo is not None:
            return when.astimezone(UTC)
    except (ValueError, OverflowError):
        pass
    raise errors.BadInput(
        f"{name} {text[:40]!r} is not a relative age (30m, 12h, 7d, 2w), an RFC 3339 time"
        " with a time zone (2026-12-01T00:00:00Z) or a date (2026-12-01)",
        name,
    )


def grouping(by: str | None) -> str:
    """How a request groups the report (one of BY; submitter when it names none)."""
    if not by:
        return BY[0]
    if by not in BY:
        raise errors.BadInput(f"by {by[:40]!r} is not one of {', '.join(BY)}", "by")
    return by


def window(since: str | None, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """The report's window [since, until) from the texts a request gives (see parse_when);
    since defaults to DEFAULT_SINCE before `now`, until to `now`."""
    start = parse_when(since or DEFAULT_SINCE, "since", now)
    end = now if not until else parse_when(until, "until", now)
    if start > end:
        raise errors.BadInput(
            f"since ({models.format_time(start)}) is after until ({models.format_time(end)})",
            "since",
        )
    return start, end


class EndedJob(NamedTuple):
    """A job that ended, as the report reads it (Store.ended_jobs reads only these columns).
    A tuple, not a dataclass: a report may read a few hundred thousand of them."""

    status: str  # FINISHED, ERROR or CANCELLED
    gpus: int  # how many GPUs it asked for (and held while it ran)
    submitter: str | None
    worker: str | None  # the worker of its last attempt
    labels: dict[str, str]
    created_at: datetime
    executed_at: datetime | None  # when its last attempt started; None: it never started
    finished_at: datetime
    util_mean: float | None  # its telemetry summary's; None without telemetry
    measured_gpu_s: float | None  # the GPU-seconds its telemetry covers (the summary's)


def duration_s(executed_at: datetime, finished_at: datetime) -> float:
    """A job's run time in seconds, rounded as models.Job.duration (result.duration) is."""
    return round((finished_at - executed_at).total_seconds(), 3)


def group_keys(job: EndedJob, by: str) -> list[str]:
    """The groups a job is counted in: its submitter, each of its labels as KEY=VALUE, or
    its worker; a placeholder in parentheses where it has none."""
    if by == "submitter":
        return [job.submitter or NOT_RECORDED]
    if by == "worker":
        return [job.worker or NEVER_RAN]
    return [f"{key}={value}" for key, value in sorted(job.labels.items())] or [NO_LABELS]


@dataclasses.dataclass
class _Sums:
    """What the report adds up for one group of jobs."""

    gpu_ms: int = 0  # GPU-milliseconds: an integer, so the sum is exact in any order
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    waits_s: list[float] = dataclasses.field(default_factory=list)
    util_weighted: float = 0.0  # Σ util_mean × measured GPU-seconds
    util_weight: float = 0.0  # Σ measured GPU-seconds
    utils: list[float] = dataclasses.field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """The group's figures as the report shows them."""
        waits = sorted(self.waits_s)
        if self.util_weight > 0:
            util: float | None = round(self.util_weighted / self.util_weight, 1)
        else:  # telemetry that covers no time (points of zero length): the plain mean
            util = round(sum(self.utils) / len(self.utils), 1) if self.utils else None
        return {
            "gpu_hours": self.gpu_ms / 3_600_000,
            "jobs": {**self.counts, "total": sum(self.counts.values())},
            "util_mean": util,
            "wait_p50_s": _percentile(waits, 0.50),
            "wait_p95_s": _percentile(waits, 0.95),
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """The q-quantile of sorted values, linear between the two nearest ranks."""
    if not ordered:
        return None
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def report(jobs: Iterable[EndedJob], since: datetime, until: datetime, by: str) -> dict[str, Any]:
    """The report over `jobs` (those that ended in [since, until)), grouped `by` submitter,
    label or worker: the groups by GPU-hours, most first, then by key; and the total over
    every job (not the sum of the groups: by label, a job counts in each of its labels)."""
    by = grouping(by)
    total = _Sums()
    groups: dict[str, _Sums] = {}
    for job in jobs:
        gpu_ms = 0
        wait_s = None
        if job.executed_at is not None:
            # As GPU-milliseconds: round(duration × 1000) is exactly the integer that
            # result.duration (rounded to the millisecond) stands for.
            gpu_ms = job.gpus * round(duration_s(job.executed_at, job.finished_at) * 1000)
            # Never below 0: created_at is the coordinator's clock, executed_at the worker's.
            wait_s = max(0.0, (job.executed_at - job.created_at).total_seconds())
        util, weight = job.util_mean, job.measured_gpu_s or 0.0
        for sums in (total, *(_get(groups, key) for key in group_keys(job, by))):
            sums.gpu_ms += gpu_ms
            sums.counts[job.status] += 1
            if wait_s is not None:
                sums.waits_s.append(wait_s)
            if util is not None:
                sums.utils.append(util)
                sums.util_weighted += util * weight
                sums.util_weight += weight
    shown = [{"key": key, **sums.figures()} for key, sums in groups.items()]
    shown.sort(key=lambda group: (-group["gpu_hours"], group["key"]))
    return {
        "since": models.format_time(since),
        "until": models.format_time(until),
        "by": by,
        "groups": shown,
        "total": total.figures(),
    }


def _get(groups: dict[str, _Sums], key: str) -> _Sums:
    found = groups.get(key)
    if found is None:
        found = groups[key] = _Sums()
    return found
