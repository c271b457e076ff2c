"""The worker link's wire format (gpubox.protocol): pure, no sockets.

Every message type round-trips with a valid body, and `decode` turns everything else into
errors.ProtocolError (never another exception), since the broker drops what raises it and
would crash on anything else.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gpubox import errors, protocol

pytestmark = pytest.mark.timeout(60)

TS = "2024-05-01T12:00:00.123456789Z"
TS2 = "2024-05-01T12:00:05.000000000Z"
GPU = {
    "uuid": "GPU-11111111-2222-3333-4444-555555555555",
    "name": "NVIDIA H100",
    "memory_mb": 81559,
}
WIRE_JOB = {
    "id": 7,
    "attempt": 1,
    "name": "train",
    "image": "registry.example.com/train:1",
    "command": ["sh", "-c", "echo hi"],
    "env": {"EPOCHS": "3"},
    "secrets": {"API_KEY": "sk-0123456789"},
    "auth": {"registry": "registry.example.com", "username": "bot", "password": "s3cret"},
    "gpus": [GPU["uuid"]],
    "timeout": 30.5,
    "first_seq": 1,
    "container": {"shm_size": None, "workdir": None, "user": None, "memory": None, "mounts": []},
    "submitter": "ci",
}

# A TELEMETRY point: gpu, start, end, samples, util_mean, util_max, memory_max_mb,
# memory_total_mb, power_mean_w, temperature_max_c (gpubox.telemetry.POINT_FIELDS).
POINT = ["GPU-a", 1.7e9, 1.7e9 + 10.5, 10, 55.5, 100, 20000, 81920, 250.25, 71]

WORKER_BODIES: dict[str, dict[str, Any]] = {
    "HELLO": {
        "name": "box-1",
        "version": "0.1.0",
        "session": "s-1",
        "gpus": [GPU],
        "labels": {"gpu": "h100", "zone": "eu"},
        "max_jobs": 4,
        "running": [{"job_id": 3, "attempt": 2}],
    },
    "READY": {"session": "s-1", "free_gpus": [GPU["uuid"]], "slots": 3, "running": [3]},
    "STARTED": {
        "session": "s-1",
        "job_id": 7,
        "attempt": 1,
        "container": "0123456789ab",
        "executed_at": TS,
    },
    "LOG": {
        "session": "s-1",
        "job_id": 7,
        "attempt": 1,
        "seq": 1,
        "lines": [[TS, "stdout", "hello"], [TS, "stderr", "wörld \u2603"], [TS2, "stdout", ""]],
    },
    "DONE": {
        "session": "s-1",
        "job_id": 7,
        "attempt": 1,
        "status": "FINISHED",
        "exit_code": 0,
        "error": None,
        "executed_at": TS,
        "finished_at": TS2,
        "last_seq": 3,
    },
    "TELEMETRY": {
        "session": "s-1",
        "job_id": 7,
        "attempt": 1,
        "seq": 0,
        "points": [POINT, ["GPU-b", 1.0e9, 1.0e9 + 10, 10, 0, 0.0, 0, 81920, None, None]],
    },
    "RELEASED": {"session": "s-1", "job_id": 7, "attempt": 1},
    "HEARTBEAT": {"session": "s-1"},
}

COORDINATOR_BODIES: dict[str, dict[str, Any]] = {
    "WELCOME": {"coordinator": "c-1", "heartbeat_interval_s": 2.0, "liveness_s": 10},
    "JOB": {"coordinator": "c-1", "job": WIRE_JOB},
    "ACK": {"job_id": 7, "attempt": 1, "seq": 3, "done": True},
    "CANCEL": {"job_id": 7, "attempt": 1},
    "RECALL": {"job_id": 7, "attempt": 1},
    "HEARTBEAT": {"coordinator": "c-1", "known": True},
    "REFUSED": {"coordinator": "c-1", "reason": "it calls itself 'b', but its key is worker a's"},
}

# Other valid bodies: optional fields left empty, edge values.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("worker", "HELLO", {"gpus": [], "labels": {}, "running": []}),
    ("worker", "READY", {"free_gpus": [], "slots": 0, "running": []}),
    ("worker", "LOG", {"lines": []}),
    (
        "worker",
        "STARTED",
        {"image_id": "sha256:" + "0" * 64, "image_digest": "registry.example.com/train@sha256:1"},
    ),
    ("worker", "DONE", {"status": "ERROR", "exit_code": 137, "error": "timeout"}),
    ("worker", "DONE", {"status": "ERROR", "exit_code": None, "executed_at": None}),
    ("worker", "DONE", {"status": "CANCELLED", "exit_code": 143, "error": "cancelled"}),
    ("coordinator", "JOB", {"job": {**WIRE_JOB, "command": None, "auth": None, "timeout": None}}),
    ("coordinator", "JOB", {"job": {**WIRE_JOB, "gpus": [], "env": {}, "timeout": 60}}),
    ("coordinator", "JOB", {"resume": {"stdout": "2026-01-01T00:00:00.000000000Z"}}),
    (
        "coordinator",
        "JOB",
        {"resume": {"stdout": "2026-01-01T00:00:00.000000000Z"}, "resume_stored": {"stdout": 2}},
    ),
    ("coordinator", "ACK", {"done": False, "seq": 0}),
    ("coordinator", "ACK", {"done": False, "seq": -1, "points": 12}),
    ("coordinator", "WELCOME", {"telemetry": True}),
    ("coordinator", "JOB", {"job": {**WIRE_JOB, "idle_timeout": 1800, "idle_threshold": 5}}),
    ("coordinator", "JOB", {"resume": {"stdout": "2026-01-01T00:00:00Z"}, "resume_points": 4}),
    ("worker", "TELEMETRY", {"points": [], "last": 9}),
    (
        "worker",
        "HEARTBEAT",
        {"usage": [{"uuid": "GPU-a", "utilization": 5, "power_w": 61.5, "temperature_c": 40}]},
    ),
    ("coordinator", "HEARTBEAT", {"known": False}),
    ("worker", "HELLO", {"prefetch": 4}),
    ("coordinator", "WELCOME", {"telemetry": True, "prefetch": True}),
    ("coordinator", "JOB", {"job": {**WIRE_JOB, "priority": -3}}),
]

DECODERS: dict[str, Callable[[list[bytes]], protocol.Message]] = {
    "worker": protocol.decode_from_worker,
    "coordinator": protocol.decode_from_coordinator,
}
BODIES = {"worker": WORKER_BODIES, "coordinator": COORDINATOR_BODIES}


def body_of(direction: str, msg_type: str, **changes: Any) -> dict[str, Any]:
    """A deep copy of the valid body of that message type, with `changes` applied."""
    body = copy.deepcopy(BODIES[direction][msg_type])
    body.update(changes)
    return body


def raw(msg_type: str, body: Any) -> list[bytes]:
    """Frames with any body at all (encode() would refuse nothing, but be explicit)."""
    return [protocol.VERSION, msg_type.encode(), msgpack.packb(body, use_bin_type=True)]


def assert_rejected(direction: str, frames: list[bytes]) -> errors.ProtocolError:
    with pytest.raises(errors.ProtocolError) as info:
        DECODERS[direction](frames)
    return info.value


# --- round trips ------------------------------------------------------------------------------


def decoded(direction: str, frames: list[bytes]) -> dict[str, Any]:
    """The map of a message as its record holds it once decoded."""
    return DECODERS[direction](frames).to_body()


def test_every_message_type_has_a_valid_body_here() -> None:
    """A new message type must get a round-trip body in this file."""
    assert set(WORKER_BODIES) == set(protocol.FROM_WORKER)
    assert set(COORDINATOR_BODIES) == set(protocol.FROM_COORDINATOR)


@pytest.mark.parametrize(
    ("direction", "msg_type"),
    [("worker", t) for t in protocol.FROM_WORKER]
    + [("coordinator", t) for t in protocol.FROM_COORDINATOR],
)
def test_round_trip(direction: str, msg_type: str) -> None:
    body = body_of(direction, msg_type)
    kinds = protocol.FROM_WORKER if direction == "worker" else protocol.FROM_COORDINATOR
    record = kinds[msg_type].from_body(body, msg_type)
    frames = protocol.encode(record)
    assert len(frames) == 3
    assert frames[0] == protocol.VERSION
    assert frames[1] == msg_type.encode("ascii")
    assert all(isinstance(frame, bytes) for frame in frames)
    assert msgpack.unpackb(frames[2]) == body
    msg = DECODERS[direction](frames)
    assert type(msg) is kinds[msg_type] and msg == record
    assert msg.to_body() == body


@pytest.mark.parametrize(("direction", "msg_type", "changes"), VARIANTS)
def test_round_trip_variants(direction: str, msg_type: str, changes: dict[str, Any]) -> None:
    body = body_of(direction, msg_type, **changes)
    assert decoded(direction, protocol.encode_body(msg_type, body)) == body


def test_extra_keys_are_tolerated() -> None:
    """A newer peer may add fields; the documented ones are still checked, the others
    passed over."""
    body = body_of("worker", "HEARTBEAT", extra={"nested": [1, 2]})
    assert decoded("worker", protocol.encode_body("HEARTBEAT", body)) == {"session": "s-1"}


def test_decode_accepts_what_recv_multipart_returns() -> None:
    """A DEALER's recv_multipart gives a list; the broker passes a slice of one."""
    frames = [b"routing-id", *protocol.encode(protocol.WorkerHeartbeat(session="s"))]
    assert protocol.decode_from_worker(frames[1:]) == protocol.WorkerHeartbeat(session="s")


# --- malformed messages ------------------------------------------------------------------------

GOOD_HEARTBEAT = protocol.encode(protocol.WorkerHeartbeat(session="s-1"))


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("direction", ["worker", "coordinator"])
def test_wrong_frame_count(direction: str, count: int) -> None:
    frames = [*GOOD_HEARTBEAT, b"", b"extra"][:count]
    error = assert_rejected(direction, frames)
    assert "frames" in str(error)


@pytest.mark.parametrize("version", [b"", b"GPBX2", b"gpbx1", b"GPBX1 ", b"\x00" * 5, b"\xff\xfe"])
def test_wrong_version(version: bytes) -> None:
    assert_rejected("worker", [version, *GOOD_HEARTBEAT[1:]])


@pytest.mark.parametrize(
    "msg_type",
    [b"", b"HELLOX", b"hello", b"WELCOME", b"JOB", b"ACK", b"__class__", b"get", b"HEARTBEAT\x00"],
)
def test_unknown_type_from_worker(msg_type: bytes) -> None:
    assert_rejected("worker", [protocol.VERSION, msg_type, GOOD_HEARTBEAT[2]])


@pytest.mark.parametrize("msg_type", [b"HELLO", b"READY", b"LOG", b"DONE", b"STARTED", b"welcome"])
def test_unknown_type_from_coordinator(msg_type: bytes) -> None:
    body = msgpack.packb({"coordinator": "c", "known": True, "session": "s"})
    assert_rejected("coordinator", [protocol.VERSION, msg_type, body])


@pytest.mark.parametrize(
    "msg_type", ["HÉLLO".encode(), b"HELLO\xff", b"\xff\xfe\xfd", "HEARTBEAT\u2603".encode()]
)
@pytest.mark.parametrize("direction", ["worker", "coordinator"])
def test_non_ascii_type(direction: str, msg_type: bytes) -> None:
    assert_rejected(direction, [protocol.VERSION, msg_type, GOOD_HEARTBEAT[2]])


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing at all
        b"\xc1",  # the one byte msgpack never uses
        b"\x81\xa7session",  # truncated map
        b"\x92\x01",  # truncated array
        b"\xdf\xff\xff\xff\xff",  # map claiming 4 billion entries
        GOOD_HEARTBEAT[2] + b"\x00",  # trailing data after a valid map
        b"\x81\xa7session\xa1\xff",  # not UTF-8 inside a str
        b"\x81\x01\xa1s",  # map with an int key
        b"\x81\x80\xa1s",  # map with a map key
        b"\x81\xc0\xa1s",  # map with a nil key
        b"{session: s}",
    ],
)
@pytest.mark.parametrize("direction", ["worker", "coordinator"])
def test_body_not_msgpack(direction: str, data: bytes) -> None:
    assert_rejected(direction, [protocol.VERSION, b"HEARTBEAT", data])


@pytest.mark.parametrize("body", [[1, 2], ["session", "s"], 7, -1, "session", None, True, 1.5])
@pytest.mark.parametrize("direction", ["worker", "coordinator"])
def test_body_not_a_map(direction: str, body: Any) -> None:
    error = assert_rejected(direction, raw("HEARTBEAT", body))
    assert "map" in str(error)


def test_bin_keys_do_not_count_as_field_names() -> None:
    frames = [protocol.VERSION, b"HEARTBEAT", msgpack.packb({b"session": "s"}, use_bin_type=True)]
    assert_rejected("worker", frames)


# Every key whose check refuses None is required (a missing key reads as None; the optional
# ones, like DONE.exit_code, may be absent or null).
MISSING = [
    (direction, msg_type, field.name)
    for direction, kinds in (
        ("worker", protocol.FROM_WORKER),
        ("coordinator", protocol.FROM_COORDINATOR),
    )
    for msg_type, kind in kinds.items()
    for field in kind.wire_fields()
    if not field.check(None)
]


def test_the_optional_fields_are_the_documented_ones() -> None:
    optional = {
        f"{t}.{field.name}"
        for kinds in (protocol.FROM_WORKER, protocol.FROM_COORDINATOR)
        for t, kind in kinds.items()
        for field in kind.wire_fields()
        if field.check(None)
    }
    assert optional == {
        "DONE.exit_code",
        "DONE.error",
        "DONE.executed_at",
        "JOB.resume",
        "REFUSED.standby",
        "JOB.resume_stored",
        "LOG.last",
        "STARTED.image_id",
        "TELEMETRY.last",
        "ACK.points",
        "WELCOME.telemetry",
        "JOB.resume_points",
        "STARTED.image_digest",
        "LOG.notes",
        "HELLO.mounts",
        "HELLO.runtime",
        "HELLO.liveness_s",
        "HELLO.prefetch",
        "WELCOME.prefetch",
        "HEARTBEAT.usage",
    }


@pytest.mark.parametrize(("direction", "msg_type", "key"), MISSING)
def test_missing_required_key(direction: str, msg_type: str, key: str) -> None:
    body = body_of(direction, msg_type)
    del body[key]
    error = assert_rejected(direction, raw(msg_type, body))
    assert f"{msg_type}.{key}" in str(error)


@pytest.mark.parametrize(
    "key", [f.name for f in protocol.WireJob.wire_fields() if not f.check(None)]
)
def test_job_missing_required_key(key: str) -> None:
    job = dict(WIRE_JOB)
    del job[key]
    error = assert_rejected("coordinator", raw("JOB", {"coordinator": "c-1", "job": job}))
    assert "JOB.job" in str(error)


def _gpu(**changes: Any) -> dict[str, Any]:
    gpu = {**GPU, **changes}
    return {k: v for k, v in gpu.items() if v is not DROP}


def _job(**changes: Any) -> dict[str, Any]:
    job = {**WIRE_JOB, **changes}
    return {k: v for k, v in job.items() if v is not DROP}


DROP = object()

# (direction, type, field, bad value): each must be refused.
WRONG_TYPES: list[tuple[str, str, str, Any]] = [
    # HELLO
    ("worker", "HELLO", "name", 5),
    ("worker", "HELLO", "name", None),
    ("worker", "HELLO", "name", b"box-1"),
    ("worker", "HELLO", "version", 1),
    ("worker", "HELLO", "session", ["s"]),
    ("worker", "HELLO", "max_jobs", True),
    ("worker", "HELLO", "max_jobs", 4.0),
    ("worker", "HELLO", "max_jobs", "4"),
    ("worker", "HELLO", "gpus", GPU),
    ("worker", "HELLO", "gpus", [_gpu(uuid=DROP)]),
    ("worker", "HELLO", "gpus", [_gpu(uuid=7)]),
    ("worker", "HELLO", "gpus", [_gpu(name=DROP)]),
    ("worker", "HELLO", "gpus", [_gpu(memory_mb=True)]),
    ("worker", "HELLO", "gpus", [_gpu(memory_mb="80GB")]),
    ("worker", "HELLO", "gpus", [GPU, "GPU-1"]),
    ("worker", "HELLO", "labels", {"gpu": 1}),
    ("worker", "HELLO", "labels", {"gpu": None}),
    ("worker", "HELLO", "labels", ["gpu=h100"]),
    ("worker", "HELLO", "labels", "gpu=h100"),
    ("worker", "HELLO", "running", [{"job_id": 3}]),
    ("worker", "HELLO", "running", [{"job_id": True, "attempt": 1}]),
    ("worker", "HELLO", "running", [{"job_id": 3, "attempt": "1"}]),
    ("worker", "HELLO", "running", [3]),
    ("worker", "HELLO", "running", {"job_id": 3, "attempt": 1}),
    # READY
    ("worker", "READY", "slots", True),
    ("worker", "READY", "slots", 1.0),
    ("worker", "READY", "slots", None),
    ("worker", "READY", "free_gpus", [0]),
    ("worker", "READY", "free_gpus", "GPU-1"),
    ("worker", "READY", "running", ["3"]),
    ("worker", "READY", "running", [True]),
    ("worker", "READY", "running", [{"job_id": 3, "attempt": 1}]),
    ("worker", "READY", "session", b"s-1"),
    # STARTED
    ("worker", "STARTED", "job_id", "7"),
    ("worker", "STARTED", "job_id", False),
    ("worker", "STARTED", "attempt", 1.0),
    ("worker", "STARTED", "container", None),
    ("worker", "STARTED", "executed_at", 1714564800),
    ("worker", "STARTED", "image_id", 5),
    ("worker", "STARTED", "image_digest", ["x"]),
    ("worker", "STARTED", "image_id", "x" * (protocol.MAX_IMAGE + 1)),
    # LOG
    ("worker", "LOG", "seq", True),
    ("worker", "LOG", "seq", "1"),
    ("worker", "LOG", "attempt", None),
    ("worker", "LOG", "lines", [[TS, "stdout"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", "a", "b"]]),
    ("worker", "LOG", "lines", [[TS, "stdin", "hello"]]),
    ("worker", "LOG", "lines", [[TS, "STDOUT", "hello"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", b"hello"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", 5]]),
    ("worker", "LOG", "lines", [[None, "stdout", "hello"]]),
    ("worker", "LOG", "lines", [['2024-05-01T12:00:00Z", "x', "stdout", "hello"]]),
    ("worker", "LOG", "lines", [["yesterday", "stdout", "hello"]]),
    ("worker", "LOG", "lines", [{"ts": TS, "stream": "stdout", "line": "x"}]),
    ("worker", "LOG", "lines", [[TS, "stdout", "ok"], "not a line"]),
    # (the checks run over the whole batch at once: none may let a bad line through)
    ("worker", "LOG", "lines", [[f"{TS}\n{TS}", "stdout", "two stamps in one"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", "ok"], [TS, ["stdout"], "unhashable"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", "ok"], [TS, "stdout", None], [TS, "stdout", "ok"]]),
    ("worker", "LOG", "lines", [[TS, "stdout", "ok"], [5, "stdout", "ok"]]),
    ("worker", "LOG", "lines", "hello"),
    ("worker", "LOG", "lines", None),
    ("worker", "LOG", "last", "9"),
    ("worker", "LOG", "last", 9.5),
    # DONE
    ("worker", "DONE", "status", "RUNNING"),
    ("worker", "DONE", "status", "QUEUED"),
    ("worker", "DONE", "status", "finished"),
    ("worker", "DONE", "status", 0),
    ("worker", "DONE", "status", ["FINISHED"]),
    ("worker", "DONE", "exit_code", True),
    ("worker", "DONE", "exit_code", "0"),
    ("worker", "DONE", "exit_code", 0.0),
    ("worker", "DONE", "error", 5),
    ("worker", "DONE", "executed_at", 5),
    ("worker", "DONE", "finished_at", None),
    ("worker", "DONE", "last_seq", None),
    ("worker", "DONE", "last_seq", True),
    ("worker", "DONE", "last_seq", 3.0),
    # HEARTBEAT
    ("worker", "HEARTBEAT", "session", 5),
    ("worker", "HEARTBEAT", "session", None),
    # WELCOME
    ("coordinator", "WELCOME", "coordinator", None),
    ("coordinator", "WELCOME", "heartbeat_interval_s", True),
    ("coordinator", "WELCOME", "heartbeat_interval_s", "2"),
    ("coordinator", "WELCOME", "liveness_s", None),
    # JOB
    ("coordinator", "JOB", "coordinator", 1),
    ("coordinator", "JOB", "job", "train"),
    ("coordinator", "JOB", "job", [WIRE_JOB]),
    ("coordinator", "JOB", "job", _job(image=DROP)),
    ("coordinator", "JOB", "job", _job(id=True)),
    ("coordinator", "JOB", "job", _job(id="7")),
    ("coordinator", "JOB", "job", _job(attempt=None)),
    ("coordinator", "JOB", "job", _job(name=None)),
    ("coordinator", "JOB", "job", _job(command="sh -c 'echo hi'")),
    ("coordinator", "JOB", "job", _job(command=["sh", 1])),
    ("coordinator", "JOB", "job", _job(env={"A": 1})),
    ("coordinator", "JOB", "job", _job(env=None)),
    ("coordinator", "JOB", "job", _job(auth={"username": None})),
    ("coordinator", "JOB", "job", _job(auth="bot:s3cret")),
    ("coordinator", "JOB", "job", _job(gpus="all")),
    ("coordinator", "JOB", "job", _job(gpus=[0])),
    ("coordinator", "JOB", "job", _job(timeout="10")),
    ("coordinator", "JOB", "job", _job(timeout=True)),
    ("coordinator", "JOB", "job", _job(first_seq=None)),
    ("coordinator", "JOB", "job", _job(first_seq=1.0)),
    ("coordinator", "JOB", "resume", {"stdout": 1}),
    ("coordinator", "JOB", "resume_stored", {"stdout": "2"}),
    ("coordinator", "JOB", "resume_stored", {"stdout": -1}),
    ("coordinator", "JOB", "resume_stored", {"stdout": True}),
    ("coordinator", "JOB", "resume_stored", [2]),
    # ACK
    ("coordinator", "ACK", "job_id", "7"),
    ("coordinator", "ACK", "seq", True),
    ("coordinator", "ACK", "seq", None),
    ("coordinator", "ACK", "done", 2),
    ("coordinator", "ACK", "done", None),
    ("coordinator", "ACK", "done", "1"),
    ("coordinator", "ACK", "done", 1),  # an int where a bool is expected
    ("coordinator", "ACK", "done", 0),
    ("coordinator", "ACK", "done", 1.0),
    # CANCEL
    ("coordinator", "CANCEL", "attempt", True),
    ("coordinator", "CANCEL", "job_id", None),
    # TELEMETRY: a point is a list of ten readings in their ranges
    ("worker", "TELEMETRY", "points", [POINT[:9]]),
    ("worker", "TELEMETRY", "points", [{"gpu": "GPU-a"}]),
    ("worker", "TELEMETRY", "points", [[None, *POINT[1:]]]),
    ("worker", "TELEMETRY", "points", [[*POINT[:2], POINT[1] - 1, *POINT[3:]]]),  # ends first
    ("worker", "TELEMETRY", "points", [[*POINT[:4], 101, *POINT[5:]]]),  # over 100 %
    ("worker", "TELEMETRY", "points", [[*POINT[:4], float("nan"), *POINT[5:]]]),
    ("worker", "TELEMETRY", "points", [[*POINT[:5], True, *POINT[6:]]]),
    ("worker", "TELEMETRY", "points", [[*POINT[:6], -1, *POINT[7:]]]),
    ("worker", "TELEMETRY", "points", [[*POINT[:8], float("inf"), POINT[9]]]),
    ("worker", "TELEMETRY", "points", [POINT] * (protocol.MAX_POINTS + 1)),
    ("worker", "TELEMETRY", "seq", -1),
    ("worker", "TELEMETRY", "last", "9"),
    ("worker", "HEARTBEAT", "usage", [{"uuid": "GPU-a", "power_w": "61"}]),
    ("worker", "HEARTBEAT", "usage", [{"uuid": "GPU-a", "temperature_c": 1e9}]),
    ("coordinator", "ACK", "points", "3"),
    ("coordinator", "WELCOME", "telemetry", 1),
    # HEARTBEAT
    ("coordinator", "HEARTBEAT", "known", 1),
    ("coordinator", "HEARTBEAT", "known", 0),
    ("coordinator", "HEARTBEAT", "known", None),
    ("coordinator", "HEARTBEAT", "known", "true"),
    ("coordinator", "HEARTBEAT", "coordinator", None),
]


@pytest.mark.parametrize(
    ("direction", "msg_type", "field", "value"),
    WRONG_TYPES,
    ids=[f"{d}-{t}.{f}={v!r:.40}" for d, t, f, v in WRONG_TYPES],
)
def test_wrong_field_type(direction: str, msg_type: str, field: str, value: Any) -> None:
    body = body_of(direction, msg_type, **{field: value})
    error = assert_rejected(direction, raw(msg_type, body))
    assert f"{msg_type}.{field}" in str(error)


def test_wrong_direction_is_an_unknown_type() -> None:
    """What the coordinator sends is no valid worker message, and the other way round."""
    for msg_type, body in COORDINATOR_BODIES.items():
        if msg_type != "HEARTBEAT":
            assert_rejected("worker", protocol.encode_body(msg_type, body))
    for msg_type, body in WORKER_BODIES.items():
        if msg_type != "HEARTBEAT":
            assert_rejected("coordinator", protocol.encode_body(msg_type, body))
    # HEARTBEAT exists both ways, with different bodies.
    assert_rejected("worker", protocol.encode_body("HEARTBEAT", COORDINATOR_BODIES["HEARTBEAT"]))
    assert_rejected("coordinator", protocol.encode_body("HEARTBEAT", WORKER_BODIES["HEARTBEAT"]))


# --- size limits -------------------------------------------------------------------------------

# A HEARTBEAT body {"session": s} packs as fixmap(1) + fixstr "session"(8) + str32 header(5) + s.
_HEARTBEAT_OVERHEAD = 1 + 8 + 5


def test_body_of_exactly_max_body_passes() -> None:
    # A session is at most MAX_TEXT characters: the bulk is a field a newer worker might send,
    # which is passed over. {"session": "s", "x": pad} packs as fixmap(2) + "session"(8) +
    # "s"(2) + "x"(2) + str32 header(5) + pad.
    body = {"session": "s", "x": "p" * (protocol.MAX_BODY - 18)}
    frames = protocol.encode_body("HEARTBEAT", body)
    assert len(frames[2]) == protocol.MAX_BODY
    assert protocol.decode_from_worker(frames) == protocol.WorkerHeartbeat(session="s")


def test_decode_refuses_a_body_over_max_body() -> None:
    data = msgpack.packb({"session": "s" * (protocol.MAX_BODY - _HEARTBEAT_OVERHEAD + 1)})
    assert len(data) == protocol.MAX_BODY + 1
    error = assert_rejected("worker", [protocol.VERSION, b"HEARTBEAT", data])
    assert "exceeds" in str(error)
    # The limit is checked before parsing: junk of that size is refused the same way.
    assert_rejected("worker", [protocol.VERSION, b"LOG", b"\xc1" * (protocol.MAX_BODY + 1)])


def test_encode_refuses_a_body_over_max_body() -> None:
    lines = [[TS, "stdout", "x" * protocol.MAX_LINE]] * (protocol.MAX_BODY // protocol.MAX_LINE)
    batch = protocol.Log(session="s", job_id=1, attempt=1, seq=1, lines=lines)
    with pytest.raises(errors.ProtocolError) as info:
        protocol.encode(batch)
    assert "LOG" in str(info.value)


# --- long lines --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello", "x" * protocol.MAX_LINE, "\u2603" * 1000, "\r"])
def test_split_line_keeps_short_lines(text: str) -> None:
    assert protocol.split_line(text) == [text]


@pytest.mark.parametrize("length", [protocol.MAX_LINE + 1, 150_000, 3 * protocol.MAX_LINE])
def test_split_line_cuts_long_lines(length: int) -> None:
    rng = random.Random(length)
    text = "".join(rng.choice("abcdé☃ \t") for _ in range(length))
    pieces = protocol.split_line(text)
    assert "".join(pieces) == text
    sizes = [len(piece.encode()) for piece in pieces]
    assert all(protocol.MAX_LINE - 3 <= size <= protocol.MAX_LINE for size in sizes[:-1])
    assert 0 < sizes[-1] <= protocol.MAX_LINE
    assert len(pieces) == -(-len(text.encode()) // (protocol.MAX_LINE - 3)) or len(pieces) == -(
        -len(text.encode()) // protocol.MAX_LINE
    )


def test_split_line_never_cuts_inside_a_character() -> None:
    text = "ab" + "\u2603" * 30_000  # 2 + 90,000 bytes: byte 65,536 is inside a snowman
    pieces = protocol.split_line(text)
    assert "".join(pieces) == text
    assert [len(piece.encode()) for piece in pieces] == [65534, 90002 - 65534]


def test_split_line_150k_fits_a_log_message() -> None:
    text = "y" * 150_000
    pieces = protocol.split_line(text)
    assert len(pieces) == 3
    lines = [[TS, "stdout", piece] for piece in pieces]
    batch = protocol.Log(session="s", job_id=1, attempt=1, seq=1, lines=lines)
    got = protocol.decode_from_worker(protocol.encode(batch))
    assert isinstance(got, protocol.Log)
    assert "".join(line[2] for line in got.lines) == text


# --- fuzz --------------------------------------------------------------------------------------


def _decode_only_raises_protocol_error(frames: list[bytes]) -> None:
    for direction, decode in DECODERS.items():
        try:
            msg = decode(frames)
        except errors.ProtocolError:
            continue
        except Exception as exc:  # the point of the test: report the frames that did it
            pytest.fail(f"decode ({direction}) raised {exc!r} for {frames!r:.300}")
        assert isinstance(msg, protocol.Message)
        assert isinstance(msg.to_body(), dict)


def test_fuzz_random_frames() -> None:
    rng = random.Random(20240501)
    types = [t.encode() for t in (*protocol.FROM_WORKER, *protocol.FROM_COORDINATOR)]
    valid = [
        protocol.encode_body(t, b)[2]
        for t, b in (*WORKER_BODIES.items(), *COORDINATOR_BODIES.items())
    ]
    for _ in range(2000):
        frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.choice([0, 1, 2, 3, 3, 4]))]
        if len(frames) == 3 and rng.random() < 0.7:  # get past the version and type checks
            frames[0] = protocol.VERSION
            frames[1] = rng.choice(types)
            if rng.random() < 0.5:  # a valid body with a few bytes changed, cut or extended
                data = bytearray(rng.choice(valid))
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                if rng.random() < 0.3:
                    data = data[: rng.randrange(len(data))]
                frames[2] = bytes(data)
        _decode_only_raises_protocol_error(frames)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bool", "none", "float", "str", "bytes", "bigint", "negint"]
    if depth < 3:
        kinds += ["list", "map", "line", "gpu"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(0, 10)
    if kind == "bigint":
        return rng.choice([2**63, 2**64 - 1, 2**31])
    if kind == "negint":
        return -rng.randint(1, 2**63)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "float":
        return rng.choice([0.0, 1.0, -1.5, float("nan"), float("inf")])
    if kind == "str":
        return rng.choice(["", "stdout", "stdin", "FINISHED", "RUNNING", "x" * rng.randint(0, 9)])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 5))
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "line":
        return [_random_value(rng, depth + 1) for _ in range(3)]
    if kind == "gpu":
        return {k: _random_value(rng, depth + 1) for k in ("uuid", "name", "memory_mb")}
    return {
        rng.choice(["uuid", "job_id", "attempt", "a"]): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def test_fuzz_field_values() -> None:
    """Valid bodies with fields replaced by random values of every msgpack type."""
    rng = random.Random(7)
    cases = [("worker", t) for t in WORKER_BODIES] + [
        ("coordinator", t) for t in COORDINATOR_BODIES
    ]
    for _ in range(2000):
        direction, msg_type = rng.choice(cases)
        body = body_of(direction, msg_type)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*body, "job"]) if msg_type == "JOB" else rng.choice(list(body))
            if key == "job" and isinstance(body["job"], dict) and rng.random() < 0.7:
                body["job"][rng.choice(list(WIRE_JOB))] = _random_value(rng)
            else:
                body[key] = _random_value(rng)
        _decode_only_raises_protocol_error(raw(msg_type, body))


def test_resume_marks_round_trip_and_an_older_coordinators_count_is_unknown() -> None:
    marks = {"stdout": ("2026-01-01T00:00:00.000000001Z", 2), "stderr": ("2026-01-01T00:00:00Z", 1)}

    def job(**fields: Any) -> protocol.Job:
        body = {"coordinator": "c-1", "job": WIRE_JOB, **fields}
        msg = protocol.decode_from_coordinator(protocol.encode_body("JOB", body))
        assert isinstance(msg, protocol.Job)
        return msg

    assert protocol.resume_marks(job(**protocol.resume_fields(marks))) == marks
    older = job(resume={"stdout": marks["stdout"][0]})
    assert protocol.resume_marks(older) == {"stdout": (marks["stdout"][0], -1)}
    assert protocol.resume_marks(job()) is None


# --- compatibility with the wire as it was ------------------------------------------------------

RECORDED = Path(__file__).parent / "data" / "wire-frames-e318193.jsonl"


def test_frames_recorded_from_earlier_code_decode_and_encode_as_the_same_maps() -> None:
    """Frames that gpubox's broker and agent sent at commit e318193, before messages were
    records (each line: the sending module, the type, the body in hex; recorded by wrapping
    protocol.encode while tests/test_recovery.py, test_broker.py, test_identity.py,
    test_log_bounds.py, test_process.py and test_spill.py ran). Today's code decodes every
    one, and encodes what it decoded as the same map: a peer running the earlier code reads
    today's messages as it read its own."""
    seen = set()
    for line in RECORDED.read_text().splitlines():
        sender, msg_type, body = json.loads(line)
        frames = [protocol.VERSION, msg_type.encode(), bytes.fromhex(body)]
        direction = "worker" if sender == "gpubox.worker.agent" else "coordinator"
        msg = DECODERS[direction](frames)
        assert msg_type == msg.TYPE
        again = protocol.encode(msg)
        assert again[:2] == frames[:2]
        assert msgpack.unpackb(again[2]) == msgpack.unpackb(frames[2]), line
        seen.add((direction, msg_type))
    # Every type the earlier code sent; TELEMETRY, RELEASED and RECALL came after it.
    later = {"TELEMETRY", "RELEASED", "RECALL"}
    assert seen == {("worker", t) for t in protocol.FROM_WORKER if t not in later} | {
        ("coordinator", t) for t in protocol.FROM_COORDINATOR if t not in later
    }
