"""What the dashboard's pages show, made from the store's records: plain values the templates
print (escaped) as they are. Pure: no I/O, no HTML."""

from __future__ import annotations

import dataclasses
import shlex
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from gpubox import models
from gpubox.store.base import Placed

USAGE_JOBS = 2000  # the ended jobs the history page sums GPU-hours over (the newest)
FILTER_STATUSES = ("", "RUNNING", "QUEUED")


def age(since: datetime | None, now: datetime) -> str:
    """How long ago, in the largest unit that keeps it short: "5 s", "3 min", "2 h", "4 d"."""
    if since is None:
        return "-"
    seconds = max(0.0, (now - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


@dataclasses.dataclass(frozen=True)
class QueueFilters:
    """The queue page's filters, as its query string gives them."""

    status: str = ""  # "", RUNNING or QUEUED
    label: str = ""  # KEY=VALUE, or a KEY
    submitter: str = ""
    name: str = ""  # a part of the name, any case

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> QueueFilters:
        status = (query.get("status") or "").upper()
        return cls(
            status=status if status in FILTER_STATUSES else "",
            label=(query.get("label") or "").strip()[:200],
            submitter=(query.get("submitter") or "").strip()[:200],
            name=(query.get("name") or "").strip()[:200],
        )

    def query(self) -> str:
        """The filters as a query string, for the page's live refresh."""
        return urllib.parse.urlencode({k: v for k, v in dataclasses.asdict(self).items() if v})

    def keeps(self, job: models.Job) -> bool:
        spec = job.spec
        if self.status and job.status.value != self.status:
            return False
        if self.submitter and (spec.submitter or "") != self.submitter:
            return False
        if self.name and self.name.lower() not in spec.name.lower():
            return False
        if self.label:
            key, has_value, value = self.label.partition("=")
            if key not in spec.labels or (has_value and spec.labels[key] != value):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class QueueRow:
    id: int
    name: str
    status: str
    position: int | None  # in the order queued jobs will start (1: next)
    reason: str  # why a queued job waits
    gpus: int
    worker: str
    submitter: str
    age: str
    labels: str


@dataclasses.dataclass(frozen=True)
class Queue:
    running: list[QueueRow]
    queued: list[QueueRow]
    counts: dict[str, int]
    queued_total: int  # every queued job, also those past the rows listed
    queued_read: int  # the queued jobs read (the first in start order), which filters look at
    filtered: bool  # whether filters kept only some of them


def _row(job: models.Job, now: datetime, position: int | None = None, reason: str = "") -> QueueRow:
    return QueueRow(
        id=job.id,
        name=job.spec.name,
        status=job.status.value,
        position=position,
        reason=reason,
        gpus=job.spec.gpus,
        worker=job.worker or "-",
        submitter=job.spec.submitter or "-",
        age=age(job.created_at, now),
        labels=", ".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items())),
    )


def queue(
    running: list[models.Job],
    queued: list[models.Job],
    counts: dict[str, int],
    reason: Callable[[models.Job], str],
    filters: QueueFilters,
    now: datetime,
) -> Queue:
    """The running jobs, then the queued ones in the order they will start, each with its
    position in that order and why it waits (the scheduler's reason), kept by `filters`."""
    return Queue(
        running=[_row(job, now) for job in running if filters.keeps(job)],
        queued=[
            _row(job, now, position, reason(job))
            for position, job in enumerate(queued, 1)
            if filters.keeps(job)
        ],
        counts=counts,
        queued_total=counts.get("QUEUED", 0),
        queued_read=len(queued),
        filtered=filters != QueueFilters(),
    )


def gpu_models(workers: list[models.WorkerInfo]) -> dict[str, str]:
    """Each known GPU's model name, by UUID."""
    return {str(g.get("uuid")): str(g.get("name", "")) for w in workers for g in w.gpus}


@dataclasses.dataclass(frozen=True)
class JobView:
    """A job as its page and the history show it."""

    job: models.Job
    rows: list[tuple[str, str]]  # (what, value), as `gpubox show` prints them
    timeline: list[tuple[str, str]]  # (event, time)
    gpus: list[tuple[str, str]]  # (uuid, model)
    telemetry: dict[str, Any] | None
    gpu_hours: float | None
    live: bool  # its log and telemetry may still grow


def job_view(job: models.Job, models_by_uuid: Mapping[str, str], now: datetime) -> JobView:
    spec = job.spec
    command = shlex.join(spec.command) if spec.command else "(image default)"
    duration = job.duration
    rows = [
        ("status", job.status.value + (" (cancel requested)" if job.cancel_requested else "")),
        ("submitter", spec.submitter or "-"),
        ("image", spec.image),
        ("image id", job.image_id or "-"),
        ("digest", job.image_digest or "-"),
        ("command", command),
        ("GPUs", str(spec.gpus)),
        ("priority", str(spec.priority)),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items())) or "-"),
        ("timeout", f"{spec.timeout:g} s" if spec.timeout else "-"),
        ("idle timeout", "-" if spec.idle_timeout is None else f"{spec.idle_timeout:g} s"),
        ("retries", f"{max(0, job.attempts - 1)} of {spec.max_retries}"),
        ("worker", job.worker or "-"),
        ("attempts", str(job.attempts)),
        ("duration", f"{duration:g} s" if duration is not None else "-"),
        ("exit code", "-" if job.exit_code is None else str(job.exit_code)),
        ("error", job.error or "-"),
        ("log lines", str(job.log_seq)),
    ]
    timeline = [("submitted", models.format_time(job.created_at) or "-")]
    if job.executed_at:
        timeline.append(("started", models.format_time(job.executed_at) or "-"))
    if job.finished_at:
        timeline.append((job.status.value.lower(), models.format_time(job.finished_at) or "-"))
    summary = job.telemetry
    return JobView(
        job=job,
        rows=rows,
        timeline=timeline,
        gpus=[(uuid, models_by_uuid.get(uuid, "")) for uuid in job.gpu_ids],
        telemetry=summary,
        gpu_hours=round(summary["gpu_seconds"] / 3600, 3) if summary else None,
        live=not job.status.terminal,
    )


@dataclasses.dataclass(frozen=True)
class GpuView:
    index: Any
    uuid: str
    model: str
    memory_mb: Any
    memory_used_mb: Any
    utilization: Any
    power_w: Any
    job: int | None


@dataclasses.dataclass(frozen=True)
class WorkerView:
    name: str
    connected: bool
    version: str
    labels: str
    mounts: str
    max_jobs: int
    running: list[int]
    last_heartbeat: str
    gpus: list[GpuView]


def workers(
    found: list[models.WorkerInfo],
    running: list[Placed],
    usage: Callable[[str], dict[str, dict[str, Any]]],
) -> list[WorkerView]:
    """Every worker the store knows, with its GPUs, what each reads now, and which job holds
    each."""
    holders = {uuid: placed.job_id for placed in running for uuid in placed.gpu_ids}
    jobs_of: dict[str, list[int]] = {}
    for placed in running:
        jobs_of.setdefault(placed.worker, []).append(placed.job_id)
    shown = []
    for worker in sorted(found, key=lambda w: (not w.connected, w.name)):
        now = usage(worker.name) if worker.connected else {}
        gpus = []
        for gpu in worker.gpus:
            uuid = str(gpu.get("uuid", ""))
            reading = now.get(uuid, {})
            gpus.append(
                GpuView(
                    index=gpu.get("index", "-"),
                    uuid=uuid,
                    model=str(gpu.get("name", "")),
                    memory_mb=gpu.get("memory_mb", "-"),
                    memory_used_mb=_shown(reading.get("memory_used_mb")),
                    utilization=_shown(reading.get("utilization")),
                    power_w=_shown(reading.get("power_w")),
                    job=holders.get(uuid),
                )
            )
        shown.append(
            WorkerView(
                name=worker.name,
                connected=worker.connected,
                version=worker.version,
                labels=", ".join(f"{k}={v}" for k, v in sorted(worker.labels.items())) or "-",
                mounts=", ".join(worker.mounts) or "-",
                max_jobs=worker.max_jobs,
                running=sorted(jobs_of.get(worker.name, [])),
                last_heartbeat=models.format_time(worker.last_seen) or "-",
                gpus=gpus,
            )
        )
    return shown


def _shown(value: Any) -> Any:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else value


@dataclasses.dataclass(frozen=True)
class Usage:
    by_day: list[tuple[str, float]]  # (YYYY-MM-DD, GPU-hours), newest first
    by_submitter: list[tuple[str, float]]  # (submitter, GPU-hours), most first
    jobs: int  # the ended jobs summed


def usage(ended: list[models.Job]) -> Usage:
    """GPU-hours of ended jobs by the day they ended and by submitter: the seconds their GPUs
    were held (the telemetry summary's gpu_seconds; else GPUs x run time)."""
    by_day: dict[str, float] = {}
    by_submitter: dict[str, float] = {}
    for job in ended:
        hours = _gpu_hours(job)
        if not hours or job.finished_at is None:
            continue
        day = job.finished_at.strftime("%Y-%m-%d")
        by_day[day] = by_day.get(day, 0.0) + hours
        who = job.spec.submitter or "(not recorded)"
        by_submitter[who] = by_submitter.get(who, 0.0) + hours
    return Usage(
        by_day=sorted(((d, round(h, 3)) for d, h in by_day.items()), reverse=True),
        by_submitter=sorted(
            ((s, round(h, 3)) for s, h in by_submitter.items()), key=lambda item: -item[1]
        ),
        jobs=len(ended),
    )


def _gpu_hours(job: models.Job) -> float:
    if job.telemetry:
        return float(job.telemetry.get("gpu_seconds") or 0) / 3600
    if job.duration is None:
        return 0.0
    return job.spec.gpus * job.duration / 3600
