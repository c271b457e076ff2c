"""Job records, statuses and the validation of what clients submit. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import shlex
from datetime import UTC, datetime
from typing import Any, NamedTuple

from gpubox import errors

MAX_NAME = 200
MAX_DESCRIPTION = 4000
MAX_IMAGE = 512
MAX_GPUS = 64
MAX_INT = 2**31 - 1
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Environment variables a job may not set. gpubox sets CUDA_VISIBLE_DEVICES (process
# runtime) and NVIDIA_VISIBLE_DEVICES to the job's GPUs; the other NVIDIA_* variables steer
# the NVIDIA container runtime (NVIDIA_DRIVER_CAPABILITIES, NVIDIA_MIG_CONFIG_DEVICES give a
# container more of the driver than its GPUs); GPUBOX_* are gpubox's own (the process runtime
# finds its jobs' processes by one).
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})
RESERVED_ENV_PREFIXES = ("NVIDIA_", "GPUBOX_")
MOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
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

    @property
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

    @property
    def shape(self) -> str:
        """These needs as one JSON text: equal needs give the same text, and from_shape
        reads it back."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

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

    @property
    def duration(self) -> float | None:
        if self.executed_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.executed_at).total_seconds(), 3)

    def to_dict(self) -> dict[str, Any]:
        """The job as the HTTP API shows it. Write-only fields (docker.auth) are left out."""
        spec = self.spec
        return {
            "id": self.id,
            "name": spec.name,
            "description": spec.description,
            "priority": spec.priority,
            "docker": {
                "image": spec.image,
                "command": spec.command,
                "env": dict(spec.env),
                **spec.container.to_dict(),
            },
            "gpus": spec.gpus,
            "gpu_model": spec.gpu_model,
            "gpu_memory_gb": spec.gpu_memory_gb,
            "labels": dict(spec.labels),
            "timeout": spec.timeout,
            "max_retries": spec.max_retries,
            "metadata": spec.metadata,
            "submitter": spec.submitter,
            "allow_process": spec.allow_process,
            "status": self.status.value,
            "queue_reason": None,  # GET /jobs/<id> says why a QUEUED job waits
            "cancel_requested": self.cancel_requested,
            "result": {
                "executed_at": format_time(self.executed_at),
                "finished_at": format_time(self.finished_at),
                "gpus": list(self.gpu_ids),
                "duration": self.duration,
                "exit_code": self.exit_code,
                "error": self.error,
            },
            "worker": self.worker,
            "attempts": self.attempts,
            "log_lines": self.log_seq,
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
        }


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


# --- validation of client input -------------------------------------------------------------

JOB_FIELDS = {
    "name",
    "description",
    "priority",
    "docker",
    "gpus",
    "gpu_model",
    "gpu_memory_gb",
    "labels",
    "timeout",
    "max_retries",
    "metadata",
}
DOCKER_FIELDS = {
    "image",
    "command",
    "env",
    "auth",
    "secrets",
    "shm_size",
    "workdir",
    "user",
    "memory",
    "mounts",
}
MIN_SECRET = 4  # shorter values cannot be masked in output without mangling it
AUTH_FIELDS = {"registry", "username", "password"}


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.BadInput(f"{field} must be an integer", field)
    if not low <= value <= high:
        raise errors.BadInput(f"{field} must be between {low} and {high}", field)
    return value


def _str(value: Any, field: str, limit: int, required: bool = False) -> str:
    if not isinstance(value, str):
        raise errors.BadInput(f"{field} must be a string", field)
    if required and not value.strip():
        raise errors.BadInput(f"{field} must not be empty", field)
    if len(value) > limit:
        raise errors.BadInput(f"{field} must be at most {limit} characters", field)
    return value


def _str_map(value: Any, field: str, env_names: bool = False) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.BadInput(f"{field} must be an object of strings", field)
    for key, item in value.items():
        if not isinstance(item, str):
            raise errors.BadInput(f"{field}.{key} must be a string", f"{field}.{key}")
        if env_names and not ENV_NAME.match(key):
            raise errors.BadInput(f"{field}: {key!r} is not a valid variable name", field)
        if not key or len(key) > 256:
            raise errors.BadInput(f"{field} keys must be 1 to 256 characters", field)
    return dict(value)


def _check_text(value: Any, field: str, nul_ok: bool = False) -> None:
    """Every string in a submitted value (keys too) must be text that UTF-8, the store and the
    worker link can hold: JSON's \\ud800 escapes let a lone surrogate through (a shell
    argument that is not UTF-8 arrives as one), and PostgreSQL text, a command line and an
    environment cannot hold NUL (metadata, stored as JSON, can: `nul_ok`). Without this such a
    job failed at its insert (a 500) or, in a command, at every dispatch, never to run."""
    pending = [(value, field)]
    while pending:  # not recursive: metadata may nest as deep as JSON allows
        item, where = pending.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                _check_string(key, f"a key in {where}", where, nul_ok)
                pending.append((inner, f"{where}.{key}"))
        elif isinstance(item, list):
            pending.extend((inner, f"{where}[{index}]") for index, inner in enumerate(item))
        elif isinstance(item, str):
            _check_string(item, where, where, nul_ok)


def _check_string(text: str, what: str, field: str, nul_ok: bool) -> None:
    if not nul_ok and "\x00" in text:
        raise errors.BadInput(f"{what} must not contain NUL characters", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.BadInput(
            f"{what} is not valid Unicode text (it holds a lone surrogate, such as \\ud800,"
            " which is what a shell argument that is not UTF-8 becomes)",
            field,
        ) from None


def _unknown(data: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            field = f"{prefix}{key}"
            raise errors.BadInput(f"unknown field {field!r}", field)


def parse_command(value: Any, field: str = "docker.command") -> list[str] | None:
    """Exec-form command: a list of strings as given, or a string split like a shell would."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise errors.BadInput(f"{field} cannot be split: {exc}", field) from exc
        return parts or None
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return list(value) or None
    raise errors.BadInput(f"{field} must be a list of strings or a string", field)


def parse_size(value: Any, field: str, low: int, high: int) -> int | None:
    """Bytes from an integer or a string like "8g", "512m", "16GiB" (units of 1024)."""
    if value is None:
        return None
    if isinstance(value, str) and (match := SIZE.match(value.strip())):
        number = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise errors.BadInput(f'{field} must be bytes, or a size like "8g" or "512m"', field)
    if not low <= number <= high:
        raise errors.BadInput(f"{field} must be between {low} and {high} bytes", field)
    return int(number)


def parse_container(docker: dict[str, Any]) -> ContainerOptions:
    """The container options of a submission's docker object."""
    workdir = docker.get("workdir")
    if workdir is not None:
        workdir = _str(workdir, "docker.workdir", 4096, required=True)
        if not workdir.startswith("/"):
            raise errors.BadInput("docker.workdir must be an absolute path", "docker.workdir")
    user = docker.get("user")
    if user is not None and (not isinstance(user, str) or not USER.match(user)):
        raise errors.BadInput(
            "docker.user must be a user name or id, optionally :group (like 1000:1000)",
            "docker.user",
        )
    mounts = docker.get("mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, str) for m in mounts):
        raise errors.BadInput("docker.mounts must be a list of mount names", "docker.mounts")
    for name in mounts:
        if not MOUNT_NAME.match(name):
            raise errors.BadInput(f"docker.mounts: {name!r} is not a mount name", "docker.mounts")
    if len(set(mounts)) != len(mounts):
        raise errors.BadInput("docker.mounts names a mount twice", "docker.mounts")
    return ContainerOptions(
        shm_size=parse_size(docker.get("shm_size"), "docker.shm_size", 1024**2, 1024**4),
        workdir=workdir,
        user=user,
        memory=parse_size(docker.get("memory"), "docker.memory", 6 * 1024**2, 64 * 1024**4),
        mounts=list(mounts),
    )


def parse_spec(data: Any) -> JobSpec:
    """Validate a submission (decoded JSON) into a JobSpec, or raise BadInput naming the field."""
    if not isinstance(data, dict):
        raise errors.BadInput("the body must be a JSON object")
    for key, value in data.items():
        _check_string(key, "a field name", "", nul_ok=False)
        _check_text(value, key, nul_ok=key == "metadata")
    _unknown(data, JOB_FIELDS, "")
    if "name" not in data:
        raise errors.BadInput("name is required", "name")
    name = _str(data["name"], "name", MAX_NAME, required=True)
    docker = data.get("docker")
    if not isinstance(docker, dict):
        raise errors.BadInput("docker must be an object with at least an image", "docker")
    _unknown(docker, DOCKER_FIELDS, "docker.")
    if "image" not in docker:
        raise errors.BadInput("docker.image is required", "docker.image")
    image = _str(docker["image"], "docker.image", MAX_IMAGE, required=True)
    auth = docker.get("auth")
    if auth is not None:
        if not isinstance(auth, dict):
            raise errors.BadInput("docker.auth must be an object", "docker.auth")
        _unknown(auth, AUTH_FIELDS, "docker.auth.")
        auth = _str_map(auth, "docker.auth")
        for key in ("username", "password"):
            if key not in auth:
                raise errors.BadInput(f"docker.auth.{key} is required", f"docker.auth.{key}")
    env = _str_map(docker.get("env"), "docker.env", env_names=True)
    secrets = _str_map(docker.get("secrets"), "docker.secrets", env_names=True)
    for field, values in (("docker.env", env), ("docker.secrets", secrets)):
        for key in values:
            if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
                raise errors.BadInput(
                    f"{field}: {key} is gpubox's to set: a job sets no NVIDIA_* or GPUBOX_*"
                    " variable, nor CUDA_VISIBLE_DEVICES (ask for GPUs with gpus)",
                    field,
                )
    for key, value in secrets.items():
        if key in env:
            raise errors.BadInput(
                f"{key} is both in docker.env and docker.secrets", "docker.secrets"
            )
        if len(value) < MIN_SECRET:
            raise errors.BadInput(
                f"docker.secrets.{key} must be at least {MIN_SECRET} characters",
                f"docker.secrets.{key}",
            )
    timeout = data.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise errors.BadInput("timeout must be a number of seconds or null", "timeout")
        if not 0 < timeout <= 366 * 86400:
            raise errors.BadInput("timeout must be positive and at most a year", "timeout")
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise errors.BadInput("metadata must be a JSON object", "metadata")
    gpus = _int(data.get("gpus", 0), "gpus", 0, MAX_GPUS)
    gpu_model = data.get("gpu_model")
    if gpu_model is not None:
        gpu_model = _str(gpu_model, "gpu_model", MAX_NAME, required=True).strip()
    gpu_memory_gb = data.get("gpu_memory_gb")
    if gpu_memory_gb is not None and (
        isinstance(gpu_memory_gb, bool)
        or not isinstance(gpu_memory_gb, int | float)
        or not 0 < gpu_memory_gb <= 4096
    ):
        raise errors.BadInput("gpu_memory_gb must be a number of GB above 0", "gpu_memory_gb")
    for field in ("gpu_model", "gpu_memory_gb"):
        if data.get(field) is not None and gpus == 0:
            raise errors.BadInput(f"{field} needs gpus of 1 or more", field)
    return JobSpec(
        name=name,
        image=image,
        command=parse_command(docker.get("command")),
        env=env,
        auth=auth,
        secrets=secrets,
        description=_str(data.get("description", ""), "description", MAX_DESCRIPTION),
        priority=_int(data.get("priority", 0), "priority", -MAX_INT, MAX_INT),
        gpus=gpus,
        labels=_str_map(data.get("labels"), "labels"),
        timeout=timeout,
        max_retries=_int(data.get("max_retries", 0), "max_retries", 0, 100),
        metadata=metadata,
        gpu_model=gpu_model,
        gpu_memory_gb=gpu_memory_gb,
        container=parse_container(docker),
    )


def parse_status(value: str) -> Status:
    """A status name from a query string, case-insensitive."""
    try:
        return Status(value.upper())
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise errors.BadInput(f"status must be one of {names}", "status") from None


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
class Token:
    """An API token as stored: its SHA-256 digest, never the token itself."""

    name: str
    digest: str
    role: str
    created_at: datetime
    # Whether jobs submitted with it may run on process-runtime workers (admin tokens' may).
    allow_process: bool = False

    @property
    def may_use_process(self) -> bool:
        """Whether this token's jobs may run on process-runtime workers."""
        return self.allow_process or self.role == "admin"
