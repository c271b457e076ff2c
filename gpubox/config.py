"""Settings of each process: one frozen dataclass per role, filled from (highest first) a
command-line flag, a GPUBOX_* environment variable, the TOML config file, the built-in default.

Every setting is declared once, as a dataclass field with `setting(...)`; the CLI's flags,
the environment names and the config examples all come from these declarations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gpubox import errors, models, protocol, validate

T = TypeVar("T")


def setting(default: Any, env: str, help: str, flag: str | None = None, many: bool = False) -> Any:
    """Declare a setting: its default, environment variable, help text and flag (if any).
    `many`: a comma-separated list, whose flag may be given more than once (joined)."""
    metadata = {"env": env, "help": help, "flag": flag, "many": many}
    return dataclasses.field(default=default, metadata=metadata)


def default_state_dir() -> str:
    """/var/lib/gpubox as root, else ~/.local/state/gpubox."""
    if os.geteuid() == 0:
        return "/var/lib/gpubox"
    return str(Path.home() / ".local" / "state" / "gpubox")


def private_state_dir(path: str) -> None:
    """Make the state folder readable by its owner alone: it holds the store (jobs' env,
    metadata and logs), keys and tokens. A new one is made 0700; one that gpubox already
    keeps things in (a store or keys) is tightened to 0700, whoever made it and however gpubox
    is started; any other folder named as the state folder is left as it is, with a warning
    (it may be shared, like /tmp), since the files gpubox writes there are 0600 anyway."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077 == 0:
        return
    ours = (folder / "gpubox.db").exists() or (folder / "keys").is_dir()
    if ours and folder.stat().st_uid == os.geteuid():
        os.chmod(folder, 0o700)
    else:
        logging.getLogger(__name__).warning(
            "state folder %s may be read by other users (mode %03o): chmod 700 it", path, mode
        )


def parse_address(value: str, name: str) -> tuple[str, int]:
    """HOST:PORT for the HTTP listener."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(f"{name}: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_labels(value: str | Mapping[str, str], name: str = "labels") -> dict[str, str]:
    """`k=v,k2=v2` (or a TOML table) as a dict."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    labels = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise errors.ConfigError(f"{name}: {part!r} is not KEY=VALUE")
        labels[key.strip()] = val.strip()
    return labels


MOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Mount:
    """A host folder a worker lets jobs mount by name."""

    name: str
    host_path: str
    container_path: str
    read_only: bool = True


def parse_mounts(value: str) -> dict[str, Mount]:
    """`NAME=HOST_PATH[:CONTAINER_PATH][:ro|rw],…` (or a TOML table NAME = "HOST…") by name.
    The container path defaults to /mnt/NAME; the mode to ro."""
    mounts: dict[str, Mount] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, spec = (s.strip() for s in part.partition("="))
        paths = spec.split(":")
        mode = paths.pop() if len(paths) > 1 and paths[-1] in ("ro", "rw") else "ro"
        if not sep or not MOUNT_NAME.match(name) or not 1 <= len(paths) <= 2:
            raise errors.ConfigError(
                f"mounts: {part!r} is not NAME=HOST_PATH[:CONTAINER_PATH][:ro|rw]"
                " (names: lower-case letters, digits, . _ -)"
            )
        host, container = paths[0], paths[1] if len(paths) == 2 else f"/mnt/{name}"
        for path in (host, container):
            if not path.startswith("/"):
                raise errors.ConfigError(f"mounts: {name}: {path!r} is not an absolute path")
        if name in mounts:
            raise errors.ConfigError(f"mounts: {name} is declared twice")
        if any(other.container_path == container for other in mounts.values()):
            raise errors.ConfigError(f"mounts: {name}: {container} is another mount's place")
        mounts[name] = Mount(name, host, container, read_only=mode == "ro")
    return mounts


def check_mount_folders(mounts: dict[str, Mount]) -> None:
    """ConfigError for a declared mount whose host folder does not exist on this box, or that
    jobs may write to on a filesystem that honours setuid bits or device files.

    A job runs as root in its container unless it asks otherwise, and root owns whatever it
    writes: without nosuid, a copy of a shell with its setuid bit set, left in a writable
    mount, runs as root for any local user who finds it at the host path; without nodev, a
    device file left there opens the device. A `nosuid` seen only inside the container does
    not help, as local users reach the files through the host path. On a nosuid,nodev
    filesystem such files are inert, and no other file a job leaves gives anyone more rights
    than they had: ownership alone (a job with `user: "1000:1000"`, or root's chown) lets that
    user change the file, nothing else. Filesystems mounted below the folder count too: the
    container gets them as well."""
    for mount in mounts.values():
        if not os.path.isdir(mount.host_path):
            raise errors.ConfigError(
                f"mounts: {mount.name}: {mount.host_path} is not a folder on this box"
            )
        if mount.read_only:
            continue
        lacking = setuid_risk(mount.host_path)
        if lacking:
            path = mount.host_path
            quoted = shlex.quote(path)
            raise errors.ConfigError(
                f"mounts: {mount.name}: jobs may write to {path}, but {lacking}, so a program a"
                " job leaves there could run as root for anyone on this box. Mount it"
                f" nosuid,nodev: `mount --bind {quoted} {quoted} && mount -o"
                f" remount,bind,nosuid,nodev {quoted}`, and for the next boot the fstab line"
                f" `{_fstab_path(path)} {_fstab_path(path)} none bind,nosuid,nodev 0 0`;"
                " or make the mount :ro"
            )


def setuid_risk(path: str) -> str | None:
    """What lets files under `path` work as setuid programs or devices on this host: "its
    filesystem is mounted without nosuid,nodev", or the same of a filesystem mounted below
    it; None when neither can happen."""
    flags = os.statvfs(path).f_flag
    lacking = [
        name for name, bit in (("nosuid", os.ST_NOSUID), ("nodev", os.ST_NODEV)) if not flags & bit
    ]
    if lacking:
        return f"its filesystem is mounted without {','.join(lacking)}"
    inside = os.path.realpath(path).rstrip("/") + "/"
    for point, options in _mounted():
        if point.startswith(inside):
            lacking = [name for name in ("nosuid", "nodev") if name not in options]
            if lacking:
                return f"{point}, mounted inside it, is mounted without {','.join(lacking)}"
    return None


def _mounted() -> list[tuple[str, set[str]]]:
    """(mount point, options) of each filesystem this process sees (/proc/self/mounts, which
    writes a space in a path as \\040)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return []
    octal = re.compile(r"\\([0-7]{3})")
    return [
        (octal.sub(lambda m: chr(int(m.group(1), 8)), row[1]), set(row[3].split(",")))
        for row in rows
        if len(row) >= 4
    ]


def _fstab_path(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def parse_fake_gpus(spec: str) -> list[tuple[int, str, int]]:
    """(count, name, memory MiB) groups of the test-only fake_gpus setting: a count ("4":
    GPUs named "Fake GPU" of 16,384 MiB) or entries "[COUNT*]NAME:MEMORY_MB", comma-separated,
    like "2*NVIDIA A100-SXM4-80GB:81920,NVIDIA T4:15360"."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.isdigit():
        return [(int(spec), "Fake GPU", 16384)]
    groups = []
    for entry in (e.strip() for e in spec.split(",")):
        count, _, rest = entry.partition("*") if "*" in entry else ("1", "", entry)
        name, _, memory = rest.rpartition(":")
        if not count.strip().isdigit() or not name.strip() or not memory.strip().isdigit():
            raise errors.ConfigError(
                f"fake_gpus: {entry!r} is not COUNT, or [COUNT*]NAME:MEMORY_MB entries"
            )
        groups.append((int(count), name.strip(), int(memory)))
    return groups


PUBLIC = "public"  # in `registries`: any registry whose addresses are all public
ANY = "*"  # in `registries`: any registry at all
CAPABILITY = re.compile(r"^[A-Z][A-Z0-9_]*$")
REGISTRY_PATTERN = re.compile(r"^[a-z0-9.*?:\[\]_-]+$")


def half_the_memory() -> int:
    """Half of this host's memory, in bytes, rounded down to MiB: the default max_shm_size."""
    half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return half // 1024**2 * 1024**2


def parse_shm_size(value: str) -> int:
    """max_shm_size in bytes: a size like "16g", or "" for half of this host's memory."""
    if not value.strip():
        return half_the_memory()
    try:
        size = validate.parse_size(value, "max_shm_size", 1024**2, 1024**5)
    except errors.BadInput:
        size = None
    if size is None:
        raise errors.ConfigError(
            f'max_shm_size: {value!r} is not a size like "16g" or "512m" (at least 1m)'
        )
    return size


def parse_capabilities(value: str) -> tuple[str, ...]:
    """cap_drop as Docker's capability names, upper-case without CAP_: "MKNOD,NET_RAW"."""
    names = []
    for part in filter(None, (p.strip().upper() for p in value.split(","))):
        name = part.removeprefix("CAP_")
        if not CAPABILITY.match(name):
            raise errors.ConfigError(f"cap_drop: {part!r} is not a capability name like MKNOD")
        names.append(name)
    return tuple(names)


def parse_registries(value: str) -> tuple[str, ...]:
    """`registries` as its entries: "public", "*", or registry names and patterns like
    "nvcr.io", "*.corp.example", "10.1.2.3:5000"."""
    entries = tuple(filter(None, (p.strip().lower() for p in value.split(","))))
    for entry in entries:
        if entry not in (PUBLIC, ANY) and not REGISTRY_PATTERN.match(entry):
            raise errors.ConfigError(
                f"registries: {entry!r} is not public, *, or a registry like nvcr.io,"
                " *.corp.example or 10.1.2.3:5000"
            )
    if not entries:
        raise errors.ConfigError("registries: empty (the default is public)")
    return entries


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
    http_threads: int = setting(
        64, "GPUBOX_HTTP_THREADS", "HTTP threads; each log follower holds one", "--http-threads"
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

    def validate(self) -> None:
        parse_address(self.http, "http")
        _check_link(self.bind, "bind")
        _positive(
            self,
            "http_threads",
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


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Settings of `gpubox worker` (and the worker half of `gpubox up`)."""

    state_dir: str = setting("", "GPUBOX_STATE_DIR", "state folder", "--state-dir")
    coordinator: str = setting(
        "tcp://127.0.0.1:8471",
        "GPUBOX_COORDINATOR",
        "coordinator's worker link address",
        "--coordinator",
    )
    name: str = setting("", "GPUBOX_WORKER_NAME", "worker name (default: the host name)", "--name")
    gpus: str = setting(
        "all", "GPUBOX_GPUS", "GPUs to offer: all, none, or indices like 0,2", "--gpus"
    )
    max_jobs: int = setting(
        4, "GPUBOX_MAX_JOBS", "jobs run at once (GPUs limit GPU jobs further)", "--max-jobs"
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
        _check_link(self.coordinator, "coordinator")
        _positive(
            self,
            "max_jobs",
            "heartbeat_interval_s",
            "liveness_s",
            "resend_s",
            "max_unacked_lines",
            "spill_max_bytes",
        )
        if self.stop_grace_s < 0:
            raise errors.ConfigError("stop_grace_s: must not be negative")
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


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Settings of the client commands (submit, show, ls, logs, tail, cancel, workers)."""

    url: str = setting("http://127.0.0.1:8470", "GPUBOX_URL", "coordinator URL", "--url")
    token: str = setting("", "GPUBOX_TOKEN", "API token (default: the local token file)", "--token")
    state_dir: str = setting(
        "", "GPUBOX_STATE_DIR", "state folder holding the local token", "--state-dir"
    )

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise errors.ConfigError(f"url: {self.url!r} must start with http:// or https://")


def _check_link(value: str, name: str) -> None:
    if not re.fullmatch(r"(tcp://[^\s]+:(\d+|\*)|ipc://\S+|inproc://\S+)", value):
        raise errors.ConfigError(f"{name}: {value!r} is not tcp://HOST:PORT or ipc://PATH")


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise errors.ConfigError(f"{name}: must be positive")


def _convert(value: Any, kind: type, name: str) -> Any:
    if kind is str:
        if isinstance(value, Mapping):  # labels or mounts as a TOML table
            return ",".join(f"{k}={v}" for k, v in value.items())
        return str(value)
    try:
        if kind is int:
            if isinstance(value, (bool, float)):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except (TypeError, ValueError):
        raise errors.ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
    raise AssertionError(kind)


SECTIONS = {CoordinatorConfig: "coordinator", WorkerConfig: "worker", ClientConfig: "client"}
TABLES = ("labels", "mounts")  # settings a config file may give as a TOML table


def read_file(path: str | None) -> dict[str, Any]:
    """A TOML config file as a dict; {} when no file is given. Checks its shape: sections
    [coordinator], [worker], [client] and top-level keys, each naming a known setting."""
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise errors.ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise errors.ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    check_file(data)
    return data


def _names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def check_file(data: Mapping[str, Any]) -> None:
    """ConfigError for a section that is not a table or a key that names no setting."""
    everything = set().union(*(_names(cls) for cls in SECTIONS))
    for key, value in data.items():
        if key in SECTIONS.values():
            if not isinstance(value, Mapping):
                raise errors.ConfigError(f"config: [{key}] must be a table of settings")
            cls = next(c for c, name in SECTIONS.items() if name == key)
            for name in value:
                if name not in _names(cls):
                    raise errors.ConfigError(f"config: unknown setting {key}.{name}")
        elif key not in everything or isinstance(value, Mapping) and key not in TABLES:
            raise errors.ConfigError(f"config: unknown setting {key!r}")


def load(
    cls: Callable[..., T],
    flags: Mapping[str, Any] | None = None,
    file_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Build and validate a config: flags > environment > file ([section], then top level) >
    `defaults` > the built-in default."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    file_data = file_data or {}
    check_file(file_data)
    section_name = SECTIONS[cls]  # type: ignore[index]
    section = file_data.get(section_name, {})
    # Top-level keys are shared settings; the sections' tables never count as values.
    top = {k: v for k, v in file_data.items() if k not in SECTIONS.values()}
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = {"str": str, "int": int, "float": float}[str(field.type)]
        raw: Any = flags.get(field.name)
        if raw is None:
            raw = environ.get(field.metadata["env"])
        if raw is None:
            raw = section.get(field.name, top.get(field.name))
        if raw is None and defaults:
            raw = defaults.get(field.name)
        if raw is not None:
            values[field.name] = _convert(raw, kind, field.name)
    config = cls(**values)
    if hasattr(config, "state_dir"):
        state_dir = os.path.abspath(config.state_dir or default_state_dir())  # type: ignore[attr-defined]
        config = dataclasses.replace(config, state_dir=state_dir)  # type: ignore[type-var]
    if isinstance(config, CoordinatorConfig) and not config.db:
        config = dataclasses.replace(config, db=f"sqlite:///{Path(config.state_dir) / 'gpubox.db'}")
    config.validate()  # type: ignore[attr-defined]
    return config
