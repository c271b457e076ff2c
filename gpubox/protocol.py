"""The worker link's wire format: the only module that knows how messages look on the wire.

Every message is a multipart ZeroMQ message of three frames (a ROUTER sees the peer's routing
id in front of them):

    frame 0  protocol version, ASCII: b"GPBX1"
    frame 1  message type, ASCII: b"HELLO", b"LOG", ...
    frame 2  body: one msgpack map, at most MAX_BODY bytes

Bodies, by direction. `session` is a random id a worker picks per connection; `coordinator` is
a random id the coordinator picks per start, so either side recognises messages meant for an
earlier incarnation of the other.

worker -> coordinator
    HELLO      {name, version, session, gpus: [{uuid, name, memory_mb, index?, pci_bus_id?}],
                labels: {str: str}, max_jobs, running: [{job_id, attempt, recovered?}],
                mounts?: [name], runtime?, liveness_s?, prefetch?}  recovered: found as a
                container at start, not held in memory (answered with JOB + resume); mounts:
                the mount names jobs may ask for; runtime: "docker" (when absent) or
                "process", which gets only the jobs it can run (models.JobSpec.runs_on);
                liveness_s: the seconds of coordinator silence after which it reconnects
                (absent: each of its HEARTBEATs is answered; see HEARTBEAT below);
                prefetch: jobs it holds ready beyond max_jobs, started as a slot frees
                (absent: 0; used only with a coordinator whose WELCOME says prefetch)
    READY      {session, free_gpus: [uuid], slots, running: [job_id]}   running: every job
                it holds; this confirms receipt of a JOB (unconfirmed ones are queued again);
                slots: the jobs it takes now (held ones count, as do their GPUs)
    STARTED    {session, job_id, attempt, container, executed_at, image_id?, image_digest?}
                image_id: the ID of the image the container was created from (sha256:…);
                image_digest: its repo digest (name@sha256:…) where the engine has one;
                neither from the process runtime; an older coordinator ignores both
    LOG        {session, job_id, attempt, seq, lines: [[ts, stream, line]], last?, notes?}
                seq: first line's; last: the last seq the batch covers when more than its
                lines (a marker line standing for lines the worker dropped: its spill went past
                its disk bound); notes: the indices of lines that are the worker's own (such
                markers), sent with stream stderr and stored with stream gpubox
                (models.GPUBOX_STREAM); an older coordinator ignores it
    DONE       {session, job_id, attempt, status, exit_code, error, executed_at, finished_at,
                last_seq}                                                     the full record
    RELEASED   {session, job_id, attempt}   a held (prefetched) job given back unstarted: it
                was recalled or cancelled, or the worker drains or stops; queued again
                without spending an attempt (CANCELLED if a cancel came in)
    TELEMETRY  {session, job_id, attempt, seq, points: [[gpu, start, end, samples, util_mean,
                util_max, memory_max_mb, memory_total_mb, power_mean_w, temperature_max_c]],
                last?}  a running job's GPU readings, folded into points (gpubox.telemetry);
                seq numbers a job attempt's TELEMETRY messages from 0; last: the last seq it
                covers when it stands for several (merged while the coordinator was away).
                Sent only to a coordinator whose WELCOME says telemetry: true
    HEARTBEAT  {session, usage?: [{uuid, memory_used_mb, utilization, power_w?,
                temperature_c?}]}   usage: NVML's now

coordinator -> worker
    WELCOME    {coordinator, heartbeat_interval_s, liveness_s, telemetry?, prefetch?}
                telemetry: true when it takes TELEMETRY; prefetch: true when it takes
                RELEASED (a worker holds prefetched jobs only for such a coordinator)
    JOB        {coordinator, job: {id, attempt, name, image, command, env, secrets, auth, gpus,
                timeout, first_seq, container?, submitter?, idle_timeout?, idle_threshold?,
                priority?},
                resume?, resume_stored?, resume_points?}  secrets
                and auth are write-only: mask, never log; gpus: the GPU uuids it gets;
                submitter: the name of the token that submitted it (null: not recorded); container:
                {shm_size, workdir, user, memory, mounts}; resume {stream: last stored
                timestamp}: re-attach to the running container; resume_stored {stream: how
                many lines with that timestamp are stored} (pieces of a long line: the rest
                are sent; without it, every entry with that timestamp counts as stored);
                idle_timeout, idle_threshold: stop the job (ERROR) once all its GPUs stayed
                under idle_threshold % for idle_timeout seconds (absent: never);
                resume_points: the last TELEMETRY seq stored for this attempt (a re-attach
                numbers its next TELEMETRY from one more); priority: a worker holding
                prefetched jobs starts the highest first (absent: 0)
    ACK        {job_id, attempt, seq, done, points?}   seq: last stored line (-1: says
                nothing of lines); done: DONE was applied; points: the last TELEMETRY seq
                stored (a worker waits for its job's points to be stored before its DONE)
    CANCEL     {job_id, attempt}
    RECALL     {job_id, attempt}   give back this held job (RELEASED) unless it started: a
                job of higher priority waits that this worker could run. Sent only to a
                worker whose HELLO said prefetch
    HEARTBEAT  {coordinator, known}   known: false when the session is unknown (say HELLO).
                Sent to each worker sent nothing for heartbeat_interval_s, and as the answer
                to each of a worker's HEARTBEATs unless its HELLO's liveness_s leaves room for
                three of those beats
    REFUSED    {coordinator, reason}   a HELLO not taken, and why (the key is another
                worker's, it claims more than its key was enrolled with, or it is malformed or
                past the bounds below); the worker logs it and says HELLO again when next told
                known: false

A worker whose HEARTBEAT is answered with another `coordinator` id than its WELCOME's knows
the coordinator restarted, and says HELLO again.

Each body is a frozen record below (Hello, Ready, ..., and WireJob for the job in JOB):
`encode` takes one, and `decode` returns one after checking the version, the type and every
field's type, and raises ProtocolError on anything else; the receiver logs and drops such a
message (a HELLO: answered with REFUSED).
What a worker says of itself is bounded too (see the MAX_* figures below): at most
MAX_WORKER_GPUS GPUs, MAX_LABELS labels, MAX_MOUNTS mounts, max_jobs and slots of 0 to
MAX_JOBS, MAX_RUNNING jobs held, names, labels and other texts of MAX_TEXT characters, ids and
sequence numbers of 0 to MAX_ID, exit codes that fit 32 bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import msgpack

from gpubox import errors, models
from gpubox.records import (
    Record,
    bounded_list,
    int_in,
    is_bool,
    is_count_map,
    is_dict,
    is_int,
    is_number,
    is_str,
    is_str_map,
    list_of,
    opt,
    text,
    wire,
)

VERSION = b"GPBX1"
MAX_BODY = 32 * 1024 * 1024
MAX_LINE = 64 * 1024
STREAMS = ("stdout", "stderr")
_STREAM_SET = frozenset(STREAMS)


# Bounds on what a worker says of itself, far above any real box: without them one worker's
# HELLO with 100,000 GPUs and 20,000 labels made GET /workers answer 28 MB, and a READY
# with 2**64 - 1 free slots broke every scheduling round (no store takes such an integer).
MAX_WORKER_GPUS = 256
MAX_LABELS = 64
MAX_MOUNTS = 64
MAX_JOBS = 1024  # a worker's max_jobs, and the free slots a READY offers
MAX_RUNNING = 4096  # jobs a worker lists as held (more than max_jobs after a restart)
MAX_TEXT = 256  # a worker's name, version, label key or value, GPU name or uuid, session
MAX_ERROR = 65536  # the error text of a DONE
MAX_ID = 2**63 - 1  # job ids, attempts and sequence numbers: what both stores hold
MAX_EXIT = 2**31 - 1  # an exit code, either sign
MAX_MEMORY_MB = 2**40
MAX_IMAGE = 4096  # an image ID or repo digest
MAX_POINTS = 4096  # the points of one TELEMETRY message


def _is_labels(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_LABELS
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_TEXT and len(v) <= MAX_TEXT
            for k, v in value.items()
        )
    )


def _is_time(value: Any) -> bool:
    try:
        return isinstance(value, str) and models.parse_time(value) is not None
    except ValueError:
        return False


# A line's timestamp, with every digit written 0: RFC 3339 in UTC, up to nine fraction digits.
TS_SHAPES = frozenset(
    ["0000-00-00T00:00:00Z"] + [f"0000-00-00T00:00:00.{'0' * n}Z" for n in range(1, 10)]
)
DIGITS_TO_0 = str.maketrans("123456789", "000000000")


def _is_lines(value: Any) -> bool:
    """A LOG batch's lines: [timestamp, stream, text] each. Checked in bulk, with the loops
    in C (the timestamps by their shape, all digits turned to 0 in one pass): a batch holds
    up to a thousand lines, and a check per line, with a regular expression, cost the broker
    more than storing them."""
    if type(value) is not list:
        return False
    if not value:
        return True
    try:
        if set(map(type, value)) != {list} or set(map(len, value)) != {3}:
            return False
        stamps, streams, texts = zip(*value, strict=True)
        shapes = "\n".join(stamps).translate(DIGITS_TO_0).split("\n")  # (TypeError: not text)
        return (
            set(map(type, texts)) == {str}
            and set(streams) <= _STREAM_SET
            and len(shapes) == len(stamps)  # no timestamp holds a newline
            and set(shapes) <= TS_SHAPES
        )
    except TypeError:  # a stream that cannot be hashed
        return False


_ID = int_in(0, MAX_ID)
_SESSION = text(MAX_TEXT)
GPU_FIELDS = ("uuid", "name", "memory_mb", "index", "pci_bus_id")  # what a GPU is kept with


def _is_gpu(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and text(MAX_TEXT)(value.get("uuid"))
        and text(MAX_TEXT)(value.get("name"))
        and int_in(0, MAX_MEMORY_MB)(value.get("memory_mb"))
        and opt(int_in(0, MAX_ID))(value.get("index"))
        and opt(text(MAX_TEXT))(value.get("pci_bus_id"))
    )


def gpu_record(gpu: dict[str, Any]) -> dict[str, Any]:
    """A GPU of a HELLO with only the fields gpubox knows (GPU_FIELDS): anything else a
    worker adds is not kept nor shown."""
    return {key: gpu[key] for key in GPU_FIELDS if key in gpu}


def _is_usage(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and text(MAX_TEXT)(value.get("uuid"))
        and opt(int_in(0, MAX_MEMORY_MB))(value.get("memory_used_mb"))
        and opt(int_in(0, 100))(value.get("utilization"))
        and opt(_reading(0, MAX_WATTS))(value.get("power_w"))
        and opt(_reading(-300, 300))(value.get("temperature_c"))
    )


MAX_WATTS = 100_000.0


def _reading(low: float, high: float) -> Any:
    """A number from low to high, an int or a float (never a bool, NaN or infinity)."""

    def check(value: Any) -> bool:
        return type(value) in (int, float) and low <= value <= high

    return check


_PERCENT = _reading(0, 100)
_SECONDS = _reading(0, 2**40)
_MB = int_in(0, MAX_MEMORY_MB)


def _is_point(value: Any) -> bool:
    """A TELEMETRY point: a list in telemetry.POINT_FIELDS order."""
    return (
        type(value) is list
        and len(value) == 10
        and text(MAX_TEXT)(value[0])
        and _SECONDS(value[1])
        and _SECONDS(value[2])
        and value[1] <= value[2]
        and int_in(0, MAX_ID)(value[3])
        and _PERCENT(value[4])
        and _PERCENT(value[5])
        and _MB(value[6])
        and _MB(value[7])
        and opt(_reading(0, MAX_WATTS))(value[8])
        and opt(_reading(-300, 300))(value[9])
    )


# --- records ----------------------------------------------------------------------------------
#
# Each message, and each map inside one that has fields of its own, is a frozen dataclass
# below. A field says how it is checked on arrival with `wire(check)`; `omit=True` marks an
# optional field that is left out of the map when it is None (what older peers expect).
# The dataclass's field order is the order of the keys on the wire.


class Message(Record):
    """A whole message: a record with the type it travels under."""

    __slots__ = ()
    TYPE: ClassVar[str]


# --- parts ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Running(Record):
    """A job a worker holds, as its HELLO lists it."""

    job_id: int = wire(_ID)
    attempt: int = wire(_ID)
    # Found as a container at start, not held in memory (answered with JOB + resume).
    recovered: bool | None = wire(opt(is_bool), omit=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WireJob(Record):
    """The job as a worker receives it in JOB: what it needs to run this attempt.
    `secrets` and `auth` are write-only: mask, never log."""

    secrets: dict[str, str] = wire(is_str_map)
    id: int = wire(is_int)
    attempt: int = wire(is_int)
    name: str = wire(is_str)
    image: str = wire(is_str)
    command: list[str] | None = wire(opt(list_of(is_str)))
    env: dict[str, str] = wire(is_str_map)
    auth: dict[str, str] | None = wire(opt(is_str_map))
    gpus: list[str] = wire(list_of(is_str))  # the GPU uuids it gets
    timeout: float | None = wire(opt(is_number))
    first_seq: int = wire(is_int)
    # {shm_size, workdir, user, memory, mounts}: models.ContainerOptions.to_dict()
    container: dict[str, Any] | None = wire(opt(is_dict))
    # The name of the token that submitted it (None: not recorded).
    submitter: str | None = wire(opt(is_str))
    # The idle-GPU policy: stop the job once all its GPUs stayed under idle_threshold % for
    # idle_timeout seconds. Absent (an older coordinator, or no policy): never.
    idle_timeout: float | None = wire(opt(is_number), omit=True)
    idle_threshold: float | None = wire(opt(is_number), omit=True)
    # A worker that holds prefetched jobs starts the one of highest priority first. Absent
    # (an older coordinator): 0.
    priority: int | None = wire(opt(is_int), omit=True)


# --- worker -> coordinator --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(Message):
    TYPE: ClassVar[str] = "HELLO"
    name: str = wire(text(MAX_TEXT))
    version: str = wire(text(MAX_TEXT))
    session: str = wire(_SESSION)
    gpus: list[dict[str, Any]] = wire(bounded_list(_is_gpu, MAX_WORKER_GPUS))
    labels: dict[str, str] = wire(_is_labels)
    max_jobs: int = wire(int_in(0, MAX_JOBS))
    mounts: list[str] | None = wire(opt(bounded_list(text(MAX_TEXT), MAX_MOUNTS)), omit=True)
    runtime: str | None = wire(opt(text(MAX_TEXT)), omit=True)  # None: "docker"
    liveness_s: float | None = wire(opt(_SECONDS), omit=True)  # None: not said (answer each beat)
    # Jobs it holds ready beyond max_jobs, to start as soon as a slot frees (None: none).
    prefetch: int | None = wire(opt(int_in(0, MAX_JOBS)), omit=True)
    running: list[Running] = wire(
        lambda v: isinstance(v, list) and len(v) <= MAX_RUNNING, part=Running, many=True
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ready(Message):
    TYPE: ClassVar[str] = "READY"
    session: str = wire(_SESSION)
    free_gpus: list[str] = wire(bounded_list(text(MAX_TEXT), MAX_WORKER_GPUS))
    slots: int = wire(int_in(0, MAX_JOBS))
    running: list[int] = wire(bounded_list(_ID, MAX_RUNNING))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Started(Message):
    TYPE: ClassVar[str] = "STARTED"
    session: str = wire(_SESSION)
    job_id: int = wire(_ID)
    attempt: int = wire(_ID)
    container: str = wire(text(MAX_TEXT))
    executed_at: str = wire(_is_time)
    image_id: str | None = wire(opt(text(MAX_IMAGE)), omit=True)
    image_digest: str | None = wire(opt(text(MAX_IMAGE)), omit=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Log(Message):
    TYPE: ClassVar[str] = "LOG"
    session: str = wire(_SESSION)
    job_id: int = wire(_ID)
    attempt: int = wire(_ID)
    seq: int = wire(_ID)
    lines: list[list[str]] = wire(_is_lines)
    last: int | None = wire(opt(_ID), omit=True)
    notes: list[int] | None = wire(opt(list_of(is_int)), omit=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Done(Message):
    TYPE: ClassVar[str] = "DONE"
    session: str = wire(_SESSION)
    job_id: int = wire(_ID)
    attempt: int = wire(_ID)
    status: str = wire(lambda v: v in ("FINISHED", "ERROR", "CANCELLED"))
    exit_code: int | None = wire(opt(int_in(-MAX_EXIT - 1, MAX_EXIT)))
    error: str | None = wire(opt(text(MAX_ERROR)))
    executed_at: str | None = wire(opt(_is_time))
    finished_at: str = wire(_is_time)
    last_seq: int = wire(_ID)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Released(Message):
    """A prefetched job given back unstarted (recalled, cancelled, or the worker drains):
    the coordinator queues it again without spending an attempt."""

    TYPE: ClassVar[str] = "RELEASED"
    session: str = wire(_SESSION)
    job_id: int = wire(_ID)
    attempt: int = wire(_ID)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Telemetry(Message):
    TYPE: ClassVar[str] = "TELEMETRY"
    session: str = wire(_SESSION)
    job_id: int = wire(_ID)
    attempt: int = wire(_ID)
    seq: int = wire(_ID)
    points: list[list[Any]] = wire(bounded_list(_is_point, MAX_POINTS))
    last: int | None = wire(opt(_ID), omit=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerHeartbeat(Message):
    TYPE: ClassVar[str] = "HEARTBEAT"
    session: str = wire(_SESSION)
    # NVML's now: [{uuid, memory_used_mb, utilization}]
    usage: list[dict[str, Any]] | None = wire(
        opt(bounded_list(_is_usage, MAX_WORKER_GPUS)), omit=True
    )


# --- coordinator -> worker --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "WELCOME"
    coordinator: str = wire(is_str)
    heartbeat_interval_s: float = wire(is_number)
    liveness_s: float = wire(is_number)
    telemetry: bool | None = wire(opt(is_bool), omit=True)  # True: it takes TELEMETRY
    # True: it takes RELEASED and may send a worker more jobs than its free slots.
    prefetch: bool | None = wire(opt(is_bool), omit=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job(Message):
    TYPE: ClassVar[str] = "JOB"
    coordinator: str = wire(is_str)
    job: WireJob = wire(part=WireJob)
    # A re-attach: {stream: last stored timestamp}, and {stream: how many lines with that
    # timestamp are stored}.
    resume: dict[str, str] | None = wire(opt(is_str_map), omit=True)
    resume_stored: dict[str, int] | None = wire(opt(is_count_map), omit=True)
    resume_points: int | None = wire(opt(is_int), omit=True)  # the last TELEMETRY seq stored


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ACK"
    job_id: int = wire(is_int)
    attempt: int = wire(is_int)
    seq: int = wire(is_int)  # the last stored line (-1: says nothing of lines)
    done: bool = wire(is_bool)  # DONE was applied
    points: int | None = wire(opt(is_int), omit=True)  # the last TELEMETRY seq stored


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "CANCEL"
    job_id: int = wire(is_int)
    attempt: int = wire(is_int)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recall(Message):
    """Give back a prefetched job not started yet (answered by RELEASED); one that started
    runs on."""

    TYPE: ClassVar[str] = "RECALL"
    job_id: int = wire(is_int)
    attempt: int = wire(is_int)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoordinatorHeartbeat(Message):
    TYPE: ClassVar[str] = "HEARTBEAT"
    coordinator: str = wire(is_str)
    known: bool = wire(is_bool)  # False: the session is unknown, say HELLO


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refused(Message):
    TYPE: ClassVar[str] = "REFUSED"
    coordinator: str = wire(is_str)
    reason: str = wire(is_str)
    # True: a standby coordinator answers, which does not lead; try another coordinator.
    standby: bool | None = wire(opt(is_bool), omit=True)


FromWorker = Hello | Ready | Started | Log | Done | Released | Telemetry | WorkerHeartbeat
FromCoordinator = Welcome | Job | Ack | Cancel | Recall | CoordinatorHeartbeat | Refused
FROM_WORKER: dict[str, type[FromWorker]] = {
    cls.TYPE: cls
    for cls in (Hello, Ready, Started, Log, Done, Released, Telemetry, WorkerHeartbeat)
}
FROM_COORDINATOR: dict[str, type[FromCoordinator]] = {
    cls.TYPE: cls for cls in (Welcome, Job, Ack, Cancel, Recall, CoordinatorHeartbeat, Refused)
}


def encode(msg: Message) -> list[bytes]:
    """The frames of one message."""
    return encode_body(msg.TYPE, msg.to_body())


def encode_body(msg_type: str, body: dict[str, Any]) -> list[bytes]:
    """The frames of a message given as a raw map: for tests and tools that must also send
    what no record allows (a malformed body, an unknown type)."""
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_BODY:
        raise errors.ProtocolError(f"{msg_type} body of {len(data)} bytes exceeds {MAX_BODY}")
    return [VERSION, msg_type.encode("ascii"), data]


_M = TypeVar("_M", bound=Message)


def _decode(frames: Sequence[bytes], kinds: Mapping[str, type[_M]]) -> _M:
    if len(frames) != 3:
        raise errors.ProtocolError(f"expected 3 frames, got {len(frames)}")
    version, raw_type, data = frames
    if version != VERSION:
        raise errors.ProtocolError(f"unknown protocol version {bytes(version)[:16]!r}")
    msg_type = bytes(raw_type).decode("ascii", "replace")
    kind = kinds.get(msg_type)
    if kind is None:
        raise errors.ProtocolError(f"unknown message type {msg_type[:32]!r}")
    if len(data) > MAX_BODY:
        raise errors.ProtocolError(f"{msg_type} body exceeds {MAX_BODY} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise errors.ProtocolError(f"{msg_type} body is not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise errors.ProtocolError(f"{msg_type} body is not a map")
    return kind.from_body(body, msg_type)


def decode_from_worker(frames: Sequence[bytes]) -> FromWorker:
    """Decode a message a worker sent (without the routing id)."""
    return _decode(frames, FROM_WORKER)


def decode_from_coordinator(frames: Sequence[bytes]) -> FromCoordinator:
    """Decode a message the coordinator sent."""
    return _decode(frames, FROM_COORDINATOR)


def resume_fields(marks: models.LogMarks) -> dict[str, Any]:
    """JOB's resume and resume_stored for a re-attach, from the store's log marks."""
    return {
        "resume": {stream: ts for stream, (ts, _) in marks.items()},
        "resume_stored": {stream: count for stream, (_, count) in marks.items()},
    }


def resume_marks(msg: Job) -> models.LogMarks | None:
    """The log marks a JOB carries (None: not a re-attach); a count an older coordinator did
    not send is -1 (unknown)."""
    if msg.resume is None:
        return None
    stored = msg.resume_stored or {}
    return {stream: (ts, stored.get(stream, -1)) for stream, ts in msg.resume.items()}


def split_line(text: str, limit: int = MAX_LINE) -> list[str]:
    """A line cut into pieces of at most `limit` UTF-8 bytes, never inside a character:
    long lines are split, never dropped."""
    if len(text) * 4 <= limit:
        return [text]
    data = text.encode("utf-8", "surrogatepass")
    pieces, start = [], 0
    while len(data) - start > limit:
        cut = start + limit
        while data[cut] & 0xC0 == 0x80:  # a continuation byte: step back to the char start
            cut -= 1
        pieces.append(data[start:cut].decode("utf-8", "surrogatepass"))
        start = cut
    pieces.append(data[start:].decode("utf-8", "surrogatepass"))
    return pieces


def wire_job(
    job: models.Job,
    credentials: dict[str, Any],
    idle_timeout: float | None = None,
    idle_threshold: float | None = None,
) -> WireJob:
    """The job as a worker receives it in JOB: the fields of models.JOB_FIELDS that have a
    wire key (models.wire_values), its unsealed credentials ({"auth": …, "secrets": …}), the
    seq its first line takes, and the idle-GPU policy the coordinator gives it (None: none).
    A wire key WireJob does not declare fails here, loudly."""
    return WireJob(
        secrets=dict(credentials.get("secrets") or {}),
        auth=credentials.get("auth"),
        first_seq=job.log_seq + 1,
        idle_timeout=idle_timeout,
        idle_threshold=idle_threshold,
        **models.wire_values(job),
    )
