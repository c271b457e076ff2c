"""The settings of each process: one frozen dataclass per role, each setting declared once
with `setting(...)` (its default, environment variable, help text and flag), and `validate()`
checking the values together."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gpubox import errors, logfmt, models, protocol
from gpubox.config.values import (
    Mount,
    check_link,
    check_public_url,
    parse_address,
    parse_capabilities,
    parse_fake_gpus,
    parse_labels,
    parse_mounts,
    parse_registries,
    parse_shm_size,
)


def _check_log_level(level: str) -> None:
    if level not in logfmt.LEVELS:
        *most, last = logfmt.LEVELS
        raise errors.ConfigError(f"log_level: {level!r} is not {', '.join(most)} or {last}")


def setting(default: Any, env: str, help: str, flag: str | None = None, many: bool = False) -> Any:
    """Declare a setting: its default, environment variable, help text and flag (if any).
    `many`: a comma-separated list, whose flag may be given more than once (joined)."""
    metadata = {"env": env, "help": help, "flag": flag, "many": many}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of `gpubox coordinator` (and the coordinator half of `gpubox up`)."""

    state_dir: str = setting(
        "", "GPUBOX_STATE_DIR", "state folder: SQLite file, keys, local token", "--state-dir"
    )
    db: str = setting("", "GPUBOX_DB", "store: sqlite:///FILE or postgresql://…", "--db")
    http: str = setting("127.0.0.1:8470", "GPUBOX_HTTP", "HTTP listen address HOST:PORT", "--http")
    bind: str = setting(
        "tcp://0.0.0.0:8471", "GPUBOX_BIND", "worker link address (ZeroMQ)", "--bind"
    )
    log_level: str = setting(
        "info",
        "GPUBOX_LOG_LEVEL",
        "what the log keeps: debug, info (with a line for each job that ends), warning or error",
        "--log-level",
    )
    http_threads: int = setting(
        64,
        "GPUBOX_HTTP_THREADS",
        "HTTP requests served at once (log streams and long polls hold no thread)",
        "--http-threads",
    )
    http_streams: int = setting(
        10_000,
        "GPUBOX_HTTP_STREAMS",
        "log follow streams and long polls open at once, per HTTP process",
        "--http-streams",
    )
    max_body_bytes: int = setting(
        1_048_576, "GPUBOX_MAX_BODY_BYTES", "largest request body accepted"
    )
    heartbeat_interval_s: float = setting(
        2.0, "GPUBOX_HEARTBEAT_INTERVAL", "seconds between heartbeats"
    )
    liveness_s: float = setting(
        10.0, "GPUBOX_LIVENESS", "seconds of silence after which a worker is lost"
    )
    max_log_lines: int = setting(
        1_000_000,
        "GPUBOX_MAX_LOG_LINES",
        "lines kept per job: the first half and the latest, a marker line between",
    )
    max_log_bytes: int = setting(
        256 * 1024 * 1024,
        "GPUBOX_MAX_LOG_BYTES",
        "bytes of output kept per job: the first half and the latest, a marker line between",
    )
    dashboard: bool = setting(
        True,
        "GPUBOX_DASHBOARD",
        "serve the web dashboard at / on the HTTP port (--no-dashboard: the API alone)",
        "--dashboard/--no-dashboard",
    )
    public_url: str = setting(
        "",
        "GPUBOX_PUBLIC_URL",
        "the address people open the dashboard at when a proxy stands in front of the HTTP"
        " port (https://gpubox.example.com): its forms are accepted from there, and with"
        " https its session cookie is marked Secure",
        "--public-url",
    )
    webhook_allow: str = setting(
        "",
        "GPUBOX_WEBHOOK_ALLOW",
        "URL prefixes a job's webhooks may call, like https://ci.example.com/hooks/ (none:"
        " jobs may name no webhook, so no token holder makes the coordinator call an"
        " internal address)",
        "--webhook-allow",
        many=True,
    )
    webhooks: str = setting(
        "",
        "GPUBOX_WEBHOOKS",
        "webhook URLs told of every job's end, signed with the key in <state_dir>/webhook.secret",
        "--webhook",
        many=True,
    )
    telemetry_max_points: int = setting(
        2000,
        "GPUBOX_TELEMETRY_MAX_POINTS",
        "GPU telemetry points kept per job and GPU; past it, the older half is merged two by"
        " two, so a long job keeps its whole curve, coarser where older",
    )
    idle_timeout: float = setting(
        0.0,
        "GPUBOX_IDLE_TIMEOUT",
        "seconds a job's GPUs may all stay under idle_threshold before it is stopped (an"
        " ERROR), for jobs that set no idle_timeout of their own; 0: never",
    )
    queue_timeout: float = setting(
        0.0,
        "GPUBOX_QUEUE_TIMEOUT",
        'seconds a job may stay queued before it ends ERROR ("queue timeout: <why it'
        ' waited>"), for jobs that set no queue_timeout of their own; 0: never',
    )
    idle_threshold: float = setting(
        5.0,
        "GPUBOX_IDLE_THRESHOLD",
        "GPU utilization (%) under which a GPU counts as idle for the idle-GPU policy",
    )
    http_processes: int = setting(
        1,
        "GPUBOX_HTTP_PROCESSES",
        "processes that serve the HTTP API and dashboard on the one port, each with its own"
        " interpreter, beside the one that keeps the worker link and scheduling (1: all in"
        " one process)",
        "--http-processes",
    )
    fair_share_half_life: float = setting(
        86400.0,
        "GPUBOX_FAIR_SHARE_HALF_LIFE",
        "seconds after which a submitter's use of the GPUs counts half in fair share (within"
        " a priority, the jobs of whoever used the GPUs least lately start first); 0: off,"
        " jobs start in submission order",
    )

    def validate(self) -> None:
        _check_log_level(self.log_level)
        parse_address(self.http, "http")
        check_link(self.bind, "bind")
        _positive(
            self,
            "http_threads",
            "http_streams",
            "max_body_bytes",
            "heartbeat_interval_s",
            "liveness_s",
            "max_log_lines",
            "max_log_bytes",
        )
        if self.max_log_lines < 10:
            raise errors.ConfigError("max_log_lines: must be at least 10")
        if self.max_log_bytes < 1024 * 1024:
            raise errors.ConfigError("max_log_bytes: must be at least 1048576 (1 MiB)")
        if self.liveness_s <= self.heartbeat_interval_s:
            raise errors.ConfigError("liveness_s: must be longer than heartbeat_interval_s")
        check_public_url(self.public_url)
        for name in ("webhook_allow", "webhooks"):
            for url in filter(None, getattr(self, name).split(",")):
                if not re.fullmatch(r"https?://[^\s/?#@]+(/\S*)?", url.strip()):
                    raise errors.ConfigError(f"{name}: {url!r} is not an http(s):// URL")
        if self.telemetry_max_points < 10:
            raise errors.ConfigError("telemetry_max_points: must be at least 10")
        if self.queue_timeout < 0:
            raise errors.ConfigError("queue_timeout: must not be negative (0: never)")
        if self.idle_timeout < 0:
            raise errors.ConfigError("idle_timeout: must not be negative (0: never)")
        if not 0 < self.idle_threshold <= 100:
            raise errors.ConfigError("idle_threshold: must be a percentage above 0, at most 100")
        if not 1 <= self.http_processes <= 64:
            raise errors.ConfigError("http_processes: must be from 1 to 64")
        if self.fair_share_half_life < 0:
            raise errors.ConfigError("fair_share_half_life: must not be negative (0: off)")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Settings of `gpubox worker` (and the worker half of `gpubox up`)."""

    state_dir: str = setting("", "GPUBOX_STATE_DIR", "state folder", "--state-dir")
    coordinator: str = setting(
        "tcp://127.0.0.1:8471",
        "GPUBOX_COORDINATOR",
        "coordinator's worker link address; several, comma-separated, for coordinators"
        " sharing one PostgreSQL store (the worker finds the one that leads)",
        "--coordinator",
    )
    name: str = setting("", "GPUBOX_WORKER_NAME", "worker name (default: the host name)", "--name")
    gpus: str = setting(
        "all", "GPUBOX_GPUS", "GPUs to offer: all, none, or indices like 0,2", "--gpus"
    )
    max_jobs: int = setting(
        4, "GPUBOX_MAX_JOBS", "jobs run at once (GPUs limit GPU jobs further)", "--max-jobs"
    )
    prefetch: int = setting(
        0,
        "GPUBOX_PREFETCH",
        "jobs held ready beyond max-jobs, started the moment a slot frees: no coordinator round"
        " trip between short jobs. Held jobs show RUNNING (not started); one of lower priority"
        " than a queued job this worker could run is given back (0: off)",
        "--prefetch",
    )
    log_level: str = setting(
        "info",
        "GPUBOX_LOG_LEVEL",
        "what the log keeps: debug, info (with lines for each job it receives and starts),"
        " warning or error",
        "--log-level",
    )
    runtime: str = setting(
        "docker",
        "GPUBOX_RUNTIME",
        "docker, or process: run commands directly on this host (no isolation; no image)",
        "--runtime",
    )
    process_user: str = setting(
        "",
        "GPUBOX_PROCESS_USER",
        "the process runtime: the user (name or id) jobs run as; never root. Default: nobody"
        " when the worker runs as root, else the worker's own user (the only one a worker"
        " that is not root can run them as)",
        "--process-user",
    )
    log_source: str = setting(
        "auto",
        "GPUBOX_LOG_SOURCE",
        "where the docker runtime reads job output: auto (the json-file log on disk where it"
        " can, much cheaper for dockerd; else the engine's API), or api",
        "--log-source",
    )
    labels: str = setting(
        "", "GPUBOX_LABELS", "labels this worker offers, KEY=VALUE,…", "--label", many=True
    )
    stop_grace_s: float = setting(
        10.0, "GPUBOX_STOP_GRACE", "seconds between SIGTERM and SIGKILL when stopping a job"
    )
    heartbeat_interval_s: float = setting(
        2.0, "GPUBOX_HEARTBEAT_INTERVAL", "seconds between heartbeats"
    )
    liveness_s: float = setting(
        10.0, "GPUBOX_LIVENESS", "seconds of coordinator silence before reconnecting"
    )
    resend_s: float = setting(
        3.0, "GPUBOX_RESEND", "seconds before an unacknowledged LOG or DONE is sent again"
    )
    telemetry_interval_s: float = setting(
        1.0, "GPUBOX_TELEMETRY_INTERVAL", "seconds between readings of a running job's GPUs"
    )
    telemetry_point_s: float = setting(
        10.0,
        "GPUBOX_TELEMETRY_POINT",
        "seconds of readings folded into one telemetry point (mean and max utilization, max"
        " memory, mean power) sent to the coordinator",
    )
    max_unacked_lines: int = setting(
        50_000,
        "GPUBOX_MAX_UNACKED_LINES",
        "log lines a worker holds in memory for the coordinator; past it, they spill to disk",
    )
    spill_max_bytes: int = setting(
        1024**3,
        "GPUBOX_SPILL_MAX_BYTES",
        "bytes of log backlog a worker keeps on disk (<state-dir>/spill); past it, the oldest"
        " are dropped and one marker line says how many",
    )
    container_log_max_bytes: int = setting(
        64 * 1024 * 1024,
        "GPUBOX_CONTAINER_LOG_MAX_BYTES",
        "bytes of a job's output Docker keeps in each file of the container's json-file log"
        " (max-size); 0: the engine's own log settings, unbounded by default",
    )
    container_log_files: int = setting(
        2,
        "GPUBOX_CONTAINER_LOG_FILES",
        "files of the container's json-file log Docker keeps (max-file): at most"
        " container_log_max_bytes x this on disk per job",
    )
    journal_bytes_per_job: int = setting(
        16 * 1024 * 1024,
        "GPUBOX_JOURNAL_BYTES_PER_JOB",
        "bytes of each job's output the worker also copies to its own log (stderr: the journal"
        " under systemd); past it, one line says the rest is not copied (0: copy none)",
    )
    key_file: str = setting(
        "",
        "GPUBOX_KEY_FILE",
        "this worker's CURVE secret key file (default <state-dir>/keys/workers/NAME.key_secret)",
        "--key-file",
    )
    coordinator_key: str = setting(
        "",
        "GPUBOX_COORDINATOR_KEY",
        "the coordinator's public key: a .key file or its 40-character Z85 text"
        " (default <state-dir>/keys/coordinator.key)",
        "--coordinator-key",
    )
    mounts: str = setting(
        "",
        "GPUBOX_MOUNTS",
        "host folders jobs may mount by name: NAME=HOST_PATH[:CONTAINER_PATH][:ro|rw],…"
        " (default /mnt/NAME, read-only)",
        "--mount",
        many=True,
    )
    pids_limit: int = setting(
        4096,
        "GPUBOX_PIDS_LIMIT",
        "processes and threads a job's container may have at once (0: no limit)",
    )
    max_shm_size: str = setting(
        "",
        "GPUBOX_MAX_SHM_SIZE",
        'largest docker.shm_size a job may ask for, like "16g" (default: half of this'
        " host's memory); a job asking for more ends ERROR",
    )
    cap_drop: str = setting(
        "MKNOD",
        "GPUBOX_CAP_DROP",
        "capabilities taken from every job's container, comma-separated (MKNOD: no device files)",
    )
    registries: str = setting(
        "public",
        "GPUBOX_REGISTRIES",
        "registries images may be pulled from: public (any whose host is not a loopback,"
        " private or link-local address; Docker Hub's included), * (any), or names and"
        " patterns like nvcr.io,*.corp.example,10.1.2.3:5000, comma-separated",
    )
    fake_gpus: str = setting(
        "",
        "GPUBOX_FAKE_GPUS",
        "testing only: offer fake GPUs instead of NVML's: N, or [N*]NAME:MEMORY_MB,…",
    )

    def validate(self) -> None:
        _check_log_level(self.log_level)
        for address in self.coordinators:
            check_link(address, "coordinator")
        _positive(
            self,
            "max_jobs",
            "heartbeat_interval_s",
            "liveness_s",
            "resend_s",
            "telemetry_interval_s",
            "telemetry_point_s",
            "max_unacked_lines",
            "spill_max_bytes",
        )
        if self.stop_grace_s < 0:
            raise errors.ConfigError("stop_grace_s: must not be negative")
        if self.telemetry_point_s < self.telemetry_interval_s:
            raise errors.ConfigError(
                "telemetry_point_s: must be at least telemetry_interval_s (a point folds readings)"
            )
        if self.pids_limit < 0:
            raise errors.ConfigError("pids_limit: must not be negative (0: no limit)")
        parse_shm_size(self.max_shm_size)
        parse_capabilities(self.cap_drop)
        parse_registries(self.registries)
        if self.journal_bytes_per_job < 0:
            raise errors.ConfigError("journal_bytes_per_job: must not be negative")
        if self.container_log_max_bytes and self.container_log_max_bytes < 64 * 1024:
            raise errors.ConfigError(
                "container_log_max_bytes: must be 0 or at least 65536 (a line is up to 64 KiB)"
            )
        if self.container_log_files < 1:
            raise errors.ConfigError("container_log_files: must be at least 1")
        if self.gpus not in ("all", "none") and not re.fullmatch(r"\d+(,\d+)*", self.gpus):
            raise errors.ConfigError(f"gpus: {self.gpus!r} is not all, none or indices like 0,2")
        if self.max_jobs > protocol.MAX_JOBS:
            raise errors.ConfigError(f"max_jobs: must be at most {protocol.MAX_JOBS}")
        if not 0 <= self.prefetch <= protocol.MAX_JOBS:
            raise errors.ConfigError(f"prefetch: must be from 0 to {protocol.MAX_JOBS}")
        labels = parse_labels(self.labels)
        if len(labels) > protocol.MAX_LABELS:
            raise errors.ConfigError(f"labels: at most {protocol.MAX_LABELS} labels")
        for key, value in labels.items():
            if max(len(key), len(value)) > protocol.MAX_TEXT:
                raise errors.ConfigError(
                    f"labels: {key[:40]!r}: keys and values of at most {protocol.MAX_TEXT}"
                    " characters"
                )
        parse_fake_gpus(self.fake_gpus)
        if len(parse_mounts(self.mounts)) > protocol.MAX_MOUNTS:
            raise errors.ConfigError(f"mounts: at most {protocol.MAX_MOUNTS} mounts")
        if self.runtime not in models.RUNTIMES:
            raise errors.ConfigError(f"runtime: {self.runtime!r} is not docker or process")
        if self.log_source not in ("auto", "api"):
            raise errors.ConfigError(f"log_source: {self.log_source!r} is not auto or api")
        if self.runtime == "process" and self.mounts:
            raise errors.ConfigError("mounts: the process runtime has no containers to mount in")

    @property
    def label_map(self) -> dict[str, str]:
        return parse_labels(self.labels)

    @property
    def mount_map(self) -> dict[str, Mount]:
        return parse_mounts(self.mounts)

    @property
    def coordinators(self) -> list[str]:
        """The worker link addresses of `coordinator`, in the order given."""
        return [part.strip() for part in self.coordinator.split(",") if part.strip()] or [""]


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Settings of the client commands (submit, show, ls, logs, tail, cancel, workers)."""

    url: str = setting(
        "http://127.0.0.1:8470",
        "GPUBOX_URL",
        "coordinator URL; several, comma-separated, for coordinators sharing one PostgreSQL"
        " store (the next is tried when one cannot be reached)",
        "--url",
    )
    token: str = setting("", "GPUBOX_TOKEN", "API token (default: the local token file)", "--token")
    state_dir: str = setting(
        "", "GPUBOX_STATE_DIR", "state folder holding the local token", "--state-dir"
    )

    def validate(self) -> None:
        for url in self.url.split(","):
            if not url.strip().startswith(("http://", "https://")):
                raise errors.ConfigError(f"url: {url!r} must start with http:// or https://")


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise errors.ConfigError(f"{name}: must be positive")
