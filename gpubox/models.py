"""Job records and statuses, and the other records the coordinator keeps. Pure: no I/O.
The checks of what clients submit are in validate."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import operator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from gpubox import fields
from gpubox.fields import BIGINT, FLAG, INT, JSON, KEY, REAL, TEXT, Field, Kind

MIN_SECRET = 4  # shorter secrets cannot be masked in output without mangling it
GB = 10**9  # gpu_memory_gb counts in GB as GPU makers do: an "80 GB" card has 81,559 MiB


class Status(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.FINISHED, Status.ERROR, Status.CANCELLED})

# The only status changes the store applies; anything else is refused.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.FINISHED, Status.ERROR, Status.CANCELLED, Status.QUEUED}),
    Status.FINISHED: frozenset(),
    Status.ERROR: frozenset(),
    Status.CANCELLED: frozenset(),
}


def can_move(old: Status, new: Status) -> bool:
    """Whether a job may go from `old` to `new`."""
    return new in TRANSITIONS[old]


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with microseconds, sortable as text."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # As strftime("%Y-%m-%dT%H:%M:%S.%fZ") writes it, several times faster.
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(value: str | None) -> datetime | None:
    """The inverse of format_time; also takes Docker's nanosecond timestamps."""
    if not value:
        return None
    if len(value) == 27 and value[19] == "." and value[26] == "Z":  # as format_time writes
        return datetime.fromisoformat(value[:26]).replace(tzinfo=UTC)
    text = value.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a client asks for: everything of a job that it chooses."""

    name: str
    image: str
    command: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Write-only, as submitted; the coordinator seals both into `sealed` before storing.
    auth: dict[str, str] | None = None
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    priority: int = 0
    gpus: int = 0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float | None = None
    # Seconds its GPUs may all stay idle before it is stopped (the idle-GPU policy); 0:
    # never; None: the coordinator's idle_timeout.
    idle_timeout: float | None = None
    # Seconds it may stay QUEUED before it ends ERROR ("queue timeout: <why it waited>");
    # None: never. The coordinator fills in its queue_timeout setting when a job names none.
    queue_timeout: float | None = None
    # Where to tell of its start or end: [{"url": …, "events": ["start", "end"]}]; each
    # one's signing secret (write-only, like `secrets`) is sealed into `webhooks_sealed`.
    webhooks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    webhooks_sealed: str | None = None
    max_retries: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    # auth and secrets, encrypted by the coordinator (coordinator.sealing); erased at the end.
    sealed: str | None = None
    # Which GPUs: a model (a part of the NVML name, any case) and a least memory in GB.
    gpu_model: str | None = None
    gpu_memory_gb: float | None = None
    container: ContainerOptions = dataclasses.field(default_factory=lambda: ContainerOptions())
    # Set by the coordinator at submit, never by the client: the name of the token that
    # submitted the job (None for jobs stored before gpubox recorded it), and whether that
    # token may have its jobs run on process-runtime workers, which run them on the host.
    submitter: str | None = None
    allow_process: bool = False

    @functools.cached_property
    def needs(self) -> Needs:
        """What of this job decides which workers and GPUs can run it."""
        return Needs(
            gpus=self.gpus,
            gpu_model=self.gpu_model,
            gpu_memory_gb=None if self.gpu_memory_gb is None else float(self.gpu_memory_gb),
            labels=dict(self.labels),
            mounts=tuple(self.container.mounts),
            docker_only=tuple(self.container.needs_docker()),
            command=bool(self.command),
            allow_process=self.allow_process,
        )

    def runs_on(self, runtime: str) -> bool:
        """Whether a worker of this runtime can run the job (see Needs.runs_on)."""
        return self.needs.runs_on(runtime)

    def wants_gpu(self, gpu: dict[str, Any]) -> bool:
        """Whether a GPU (as a worker describes it: name, memory_mb) suits this job."""
        return self.needs.wants_gpu(gpu)


@dataclasses.dataclass(frozen=True)
class Needs:
    """What decides which workers and GPUs can run a job. Jobs with equal needs can run on
    exactly the same workers, so the scheduler treats them as one group; the store keeps
    each job's needs as one text, its `shape`, and indexes the queue by it."""

    gpus: int = 0
    gpu_model: str | None = None
    gpu_memory_gb: float | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    mounts: tuple[str, ...] = ()  # in the order the job lists them
    docker_only: tuple[str, ...] = ()  # the Docker-only options it sets (ContainerOptions)
    command: bool = False  # whether it has a command
    allow_process: bool = False  # whether its token may use process-runtime workers

    def runs_on(self, runtime: str) -> bool:
        """Whether a worker of this runtime can run the job: the process runtime needs a
        command (it has no image to take one from), none of the Docker-only options, and a
        job whose token may use process workers."""
        return runtime != "process" or self.process_refusal() is None

    def process_refusal(self) -> str | None:
        """Why a process-runtime worker cannot run this job, in words; None if it can."""
        if self.docker_only:
            return f"it sets {', '.join(f'docker.{name}' for name in self.docker_only)}"
        if not self.command:
            return "it has no docker.command"
        if not self.allow_process:
            return (
                "its token may not use process workers (an admin makes one that may with"
                " gpubox token create NAME --allow-process)"
            )
        return None

    def wants_gpu(self, gpu: dict[str, Any]) -> bool:
        """Whether a GPU (as a worker describes it: name, memory_mb) suits this job."""
        if self.gpu_model and self.gpu_model.lower() not in str(gpu.get("name", "")).lower():
            return False
        return not (
            self.gpu_memory_gb and gpu.get("memory_mb", 0) * 1024**2 < self.gpu_memory_gb * GB
        )

    @functools.cached_property
    def shape(self) -> str:
        """These needs as one JSON text: equal needs give the same text, and from_shape
        reads it back. Worked out once per Needs (the scheduler asks often). Its fields are
        numbers, texts, a map and lists of texts, which JSON takes as they are:
        dataclasses.asdict's deep copy of them was a tenth of a submit's CPU time."""
        fields = {name: getattr(self, name) for name in _NEEDS_FIELDS}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_shape(cls, text: str) -> Needs:
        data = json.loads(text)
        return cls(
            gpus=data["gpus"],
            gpu_model=data["gpu_model"],
            gpu_memory_gb=data["gpu_memory_gb"],
            labels=data["labels"],
            mounts=tuple(data["mounts"]),
            docker_only=tuple(data["docker_only"]),
            command=data["command"],
            # shapes stored before tokens had the permission lack it: no
            allow_process=data.get("allow_process", False),
        )


# The fields of Needs, in the order they are declared (Needs.shape writes them all).
_NEEDS_FIELDS = tuple(field.name for field in dataclasses.fields(Needs))

DOCKER_ONLY = ("user", "mounts", "shm_size", "memory")  # options the process runtime lacks
RUNTIMES = ("docker", "process")  # how a worker runs jobs (worker setting `runtime`)


@dataclasses.dataclass(frozen=True)
class ContainerOptions:
    """What an ML job needs from its container besides image and command (docker.*)."""

    shm_size: int | None = None  # bytes of /dev/shm (Docker's default is 64 MiB)
    workdir: str | None = None
    user: str | None = None
    memory: int | None = None  # bytes: the container's memory limit
    mounts: list[str] = dataclasses.field(default_factory=list)  # names the worker declares

    def needs_docker(self) -> list[str]:
        """The options set that only the Docker runtime can apply (docker.NAME)."""
        return [name for name in DOCKER_ONLY if getattr(self, name)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shm_size": self.shm_size,
            "workdir": self.workdir,
            "user": self.user,
            "memory": self.memory,
            "mounts": list(self.mounts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ContainerOptions:
        data = data or {}
        return cls(
            shm_size=data.get("shm_size"),
            workdir=data.get("workdir"),
            user=data.get("user"),
            memory=data.get("memory"),
            mounts=list(data.get("mounts") or []),
        )


@dataclasses.dataclass(frozen=True)
class Job:
    """A job as stored: its spec, where it is in its life, and its result."""

    id: int
    spec: JobSpec
    status: Status
    created_at: datetime
    updated_at: datetime
    worker: str | None = None
    attempts: int = 0
    executed_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    gpu_ids: list[str] = dataclasses.field(default_factory=list)
    log_seq: int = 0
    cancel_requested: bool = False
    # The image the attempt's container was created from, as the engine names it: its ID
    # (sha256:…) and, where the engine has one, its repo digest (name@sha256:…). None: not
    # started yet, or the process runtime, which runs no image.
    image_id: str | None = None
    image_digest: str | None = None
    # What its GPUs did, summed up when it ended (gpubox.telemetry.summarize); None: it held
    # no GPUs, or has not ended.
    telemetry: dict[str, Any] | None = None

    @property
    def hooks_due(self) -> int:
        """The webhook events still to deliver when the job is first stored: bit 1 its
        start, bit 2 its end (see coordinator.webhooks); 0 without webhooks."""
        due = 0
        for hook in self.spec.webhooks:
            for event in hook.get("events", ()):
                due |= 1 if event == "start" else 2
        return due

    @property
    def queue_deadline(self) -> datetime | None:
        """When it ends ERROR if it is still QUEUED then (its queue_timeout), or None."""
        if self.spec.queue_timeout is None:
            return None
        return self.created_at + timedelta(seconds=self.spec.queue_timeout)

    @property
    def duration(self) -> float | None:
        if self.executed_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.executed_at).total_seconds(), 3)

    def to_dict(self) -> dict[str, Any]:
        """The job as the HTTP API shows it (JOB_FIELDS says what, and where). Write-only
        fields (docker.auth, docker.secrets) are not among them."""
        return _job_api(self)


_STATUS = {status.value: status for status in Status}
_value = operator.attrgetter("value")
STATUS = Kind("text", dump=_value, load=_STATUS.__getitem__, show=_value)
TIME = Kind("text", dump=format_time, load=parse_time, show=format_time)  # RFC 3339
CONTAINER = Kind(  # ContainerOptions as a JSON object; the API merges it into docker
    "text",
    dump=lambda options: fields.dump_json(options.to_dict()),
    load=lambda text: ContainerOptions.from_dict(fields.load_json(text)),
    show=ContainerOptions.to_dict,
)
# Every field of a job, declared once. From this table come the store's jobs table (each
# backend's CREATE TABLE, and an ALTER TABLE for each field added by a later schema version:
# its `since`), its insert and its row reader, Job.to_dict (the fields with an `api` key, in
# this order) and the job a worker receives (the fields with a `wire` key; protocol.wire_job
# adds the credentials and first_seq). A column is NOT NULL unless it says null=True.
# A new field: its attribute in JobSpec or Job, a line here whose `since` is a new schema
# version, and its check in validate.parse_spec.
# fmt: off
JOB_FIELDS: tuple[Field, ...] = (
    Field("id", KEY, "id", api="id", wire="id"),
    Field("name", TEXT, "spec.name", api="name", wire="name"),
    Field("description", TEXT, "spec.description", api="description"),
    Field("priority", INT, "spec.priority", api="priority", wire="priority"),
    Field("image", TEXT, "spec.image", api="docker.image", wire="image"),
    Field("command", JSON, "spec.command", api="docker.command", wire="command", null=True),
    Field("env", JSON, "spec.env", api="docker.env", wire="env"),
    Field("container", CONTAINER, "spec.container", api="docker.*", wire="container",
          default="'{}'", since=2),
    Field("gpus", INT, "spec.gpus", api="gpus"),
    Field("gpu_model", TEXT, "spec.gpu_model", api="gpu_model", null=True, since=2),
    Field("gpu_memory_gb", REAL, "spec.gpu_memory_gb", api="gpu_memory_gb", null=True, since=2),
    Field("labels", JSON, "spec.labels", api="labels"),
    Field("timeout", REAL, "spec.timeout", api="timeout", wire="timeout", null=True),
    Field("idle_timeout", REAL, "spec.idle_timeout", api="idle_timeout", null=True, since=7),
    Field("queue_timeout", REAL, "spec.queue_timeout", api="queue_timeout", null=True, since=8),
    Field("webhooks", JSON, "spec.webhooks", api="webhooks", default="'[]'", since=9),
    Field("max_retries", INT, "spec.max_retries", api="max_retries"),
    Field("metadata", JSON, "spec.metadata", api="metadata"),
    Field("submitter", TEXT, "spec.submitter", api="submitter", wire="submitter", null=True,
          since=4),
    Field("allow_process", FLAG, "spec.allow_process", api="allow_process", default="0",
          since=4),
    Field("status", STATUS, "status", api="status"),
    # no column: GET /jobs/<id> fills it in, saying why a QUEUED job waits
    Field("queue_reason", TEXT, None, api="queue_reason", column=False),
    # no column either: where a QUEUED job stands in the fair order (fairshare.place)
    Field("queue_place", JSON, None, api="queue_place", column=False, null=True),
    Field("cancel_requested", FLAG, "cancel_requested", api="cancel_requested", default="0"),
    Field("executed_at", TIME, "executed_at", api="result.executed_at", null=True),
    Field("finished_at", TIME, "finished_at", api="result.finished_at", null=True),
    Field("gpu_ids", JSON, "gpu_ids", api="result.gpus", wire="gpus", default="'[]'"),
    Field("duration", REAL, "duration", api="result.duration", column=False),
    Field("exit_code", INT, "exit_code", api="result.exit_code", null=True),
    Field("error", TEXT, "error", api="result.error", null=True),
    Field("image_id", TEXT, "image_id", api="result.image_id", null=True, since=6),
    Field("image_digest", TEXT, "image_digest", api="result.image_digest", null=True, since=6),
    Field("telemetry", JSON, "telemetry", api="result.telemetry", null=True, since=7),
    Field("worker", TEXT, "worker", api="worker", null=True),
    Field("attempts", INT, "attempts", api="attempts", wire="attempt", default="0"),
    Field("log_seq", BIGINT, "log_seq", api="log_lines", default="0"),
    Field("created_at", TIME, "created_at", api="created_at"),
    Field("updated_at", TIME, "updated_at", api="updated_at"),
    # The store's alone: auth and secrets sealed (erased when the job ends); the job's needs
    # as one text (Needs.shape: the scheduler reads the queue by it); the bytes of its stored
    # log and where its head ends (the max_log_bytes cap).
    Field("sealed", TEXT, "spec.sealed", null=True),
    Field("shape", TEXT, "spec.needs.shape", computed=True, null=True, since=3),
    Field("log_bytes", BIGINT, None, default="0", since=5),
    Field("log_cut", BIGINT, None, default="0", since=5),
    # The last TELEMETRY batch stored for the running attempt (-1: none), so that each is
    # stored once (store.telemetry).
    Field("points_seq", BIGINT, None, default="-1", since=7),
    # At least as many as the most points one GPU of the running attempt has: the store
    # counts them only once this passes the bound (telemetry_max_points).
    Field("points_kept", BIGINT, None, default="0", since=7),
    # When a job still QUEUED ends for its queue_timeout (Job.queue_deadline): indexed, so
    # the broker finds those due without reading the queue.
    Field("queue_deadline", TIME, "queue_deadline", computed=True, null=True, since=8),
    # Webhooks: their signing secrets, sealed (kept past the job's end, unlike `sealed`:
    # deliveries go on after it), and the events not yet turned into deliveries (bits:
    # coordinator.webhooks.START, END).
    Field("webhooks_sealed", TEXT, "spec.webhooks_sealed", null=True, since=9),
    Field("hooks_due", INT, "hooks_due", computed=True, default="0", since=9),
)
# fmt: on
_job_api = fields.api_builder(JOB_FIELDS)
WIRE_FIELDS = tuple(field for field in JOB_FIELDS if field.wire is not None)


def wire_values(job: Job) -> dict[str, Any]:
    """The fields of a job that its worker receives in JOB, by their keys there: those of
    JOB_FIELDS with a `wire` key."""
    return fields.wire_dict(WIRE_FIELDS, job)


# A stored line as the store reads it: (seq, ts, stream, line), as LogLine without its names
# (pages of thousands of lines are rendered from these).
LogRow = tuple[int, str, str, str]

# The stream of a line that gpubox itself wrote into a job's log (an attempt ended, lines were
# dropped), where a job's own lines have stdout or stderr: a job cannot print a line that
# passes for gpubox's. Stores written before it hold such lines as stderr.
GPUBOX_STREAM = "gpubox"

# Where a job's stored output ends, per stream: the latest timestamp stored and how many lines
# (pieces, for a line over protocol.MAX_LINE) have exactly that timestamp. A worker that
# re-attaches to the container reads on from there: the pieces of a long line of which only
# some were stored are completed, not lost. A count of -1: unknown (an older coordinator);
# every entry with that timestamp is then taken as stored.
LogMarks = dict[str, tuple[str, int]]


class LogLine(NamedTuple):
    """One stored line of a job's output (a named tuple: logs are read by the thousand)."""

    seq: int
    ts: str
    stream: str
    line: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "stream": self.stream, "line": self.line}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU a worker offers."""

    uuid: str
    name: str
    memory_mb: int
    index: int = 0
    pci_bus_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "memory_mb": self.memory_mb,
            "index": self.index,
            "pci_bus_id": self.pci_bus_id,
        }


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What the coordinator knows of a worker, for `GET /workers`."""

    name: str
    version: str
    gpus: list[dict[str, Any]]
    labels: dict[str, str]
    max_jobs: int
    connected: bool
    last_seen: datetime
    mounts: list[str] = dataclasses.field(default_factory=list)

    def to_dict(
        self, running: list[int], usage: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """As GET /workers shows it; `usage` (uuid → memory_used_mb, utilization) is what
        NVML said at the worker's last heartbeat, for a connected worker."""
        usage = usage or {}
        return {
            "name": self.name,
            "version": self.version,
            "connected": self.connected,
            "gpus": [{**gpu, **usage.get(gpu.get("uuid", ""), {})} for gpu in self.gpus],
            "labels": dict(self.labels),
            "mounts": list(self.mounts),
            "max_jobs": self.max_jobs,
            "running_jobs": running,
            "last_heartbeat": format_time(self.last_seen),
        }


@dataclasses.dataclass(frozen=True)
class Caps:
    """What the jobs of one token may take at once; None is no limit. The scheduler starts
    none of its jobs past max_gpus (GPUs its running jobs hold) or max_running (its running
    jobs); a submit past max_queued (its queued jobs) is refused."""

    max_gpus: int | None = None
    max_running: int | None = None
    max_queued: int | None = None

    NAMES: ClassVar[tuple[str, ...]] = ("max_gpus", "max_running", "max_queued")

    def to_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in self.NAMES}

    def __bool__(self) -> bool:
        return not (self.max_gpus is None and self.max_running is None and self.max_queued is None)


@dataclasses.dataclass(frozen=True)
class Token:
    """An API token as stored: its SHA-256 digest, never the token itself."""

    name: str
    digest: str
    role: str
    created_at: datetime
    # Whether jobs submitted with it may run on process-runtime workers (admin tokens' may).
    allow_process: bool = False
    caps: Caps = dataclasses.field(default_factory=lambda: Caps())

    @property
    def may_use_process(self) -> bool:
        """Whether this token's jobs may run on process-runtime workers."""
        return self.allow_process or self.role == "admin"


@dataclasses.dataclass(frozen=True)
class WebSession:
    """A dashboard session as stored: the digest of its cookie, never the cookie."""

    id: str
    token_digest: str
    csrf: str
    expires_at: datetime


@dataclasses.dataclass(frozen=True)
class WebhookDelivery:
    """One event of a job (its start or end) to deliver to one webhook URL, with what its
    attempts so far gave (coordinator.webhooks)."""

    job_id: int
    url: str
    event: str  # "job.started" or "job.ended"
    delivery: str  # a UUID, the same in every attempt: the receiver's duplicate check
    payload: str  # the JSON body, as sent
    secret: str | None  # the HMAC key, sealed; None once delivered or given up
    next_at: datetime  # when the next attempt is due
    created_at: datetime
    state: str = "pending"  # pending, delivered, or failed (given up)
    attempts: int = 0
    last_status: int | None = None  # the HTTP status of the last attempt
    last_error: str | None = None
    delivered_at: datetime | None = None
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As GET /api/v1/jobs/<id>/webhooks shows it (neither secret nor payload)."""
        return {
            "url": self.url,
            "event": self.event,
            "delivery": self.delivery,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "next_at": format_time(self.next_at) if self.state == "pending" else None,
            "created_at": format_time(self.created_at),
            "delivered_at": format_time(self.delivered_at),
        }
