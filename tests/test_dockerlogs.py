"""Reading a container's log straight from the engine (gpubox.worker.dockerlogs): both streams
in one read, in order, tagged; the same entries over the local socket and over the SDK's own
session; Docker's errors as the SDK's exceptions."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import docker
import docker.errors
import pytest

from gpubox.worker.dockerlogs import DockerLogs, parse_frames
from gpubox.worker.runner import ts_ns

SCRIPT = "echo one; echo two >&2; echo three; printf 'no newline' >&2"


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", kind, len(payload)) + payload


def test_frames_cut_across_reads_come_out_whole_and_in_order() -> None:
    wire = frame(1, b"T1 a\n") + frame(2, b"T2 " + b"x" * 70_000) + frame(1, b"T3 c\n")
    buf, got = bytearray(), []
    for start in range(0, len(wire), 7):  # reads that split headers and payloads anywhere
        buf += wire[start : start + 7]
        got += parse_frames(buf)
    assert got == [(1, b"T1 a\n"), (2, b"T2 " + b"x" * 70_000), (1, b"T3 c\n")]
    assert not buf


@pytest.fixture
def exited(docker_client: docker.DockerClient, image: str) -> Iterator[str]:
    container = docker_client.containers.run(image, ["sh", "-c", SCRIPT], detach=True)
    container.wait()
    yield container.id
    container.remove(force=True)


def read(logs: DockerLogs, follow: bool, since: float | None = None) -> list[tuple[str, bytes]]:
    return [(stream, data) for stream, _, data in logs.entries(follow, since)]


def by_stream(entries: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    """Docker copies stdout and stderr in two goroutines: the order between the streams is
    Docker's, the order within each is the program's."""
    return {name: [data for stream, data in entries if stream == name] for name in STREAMS}


STREAMS = ("stdout", "stderr")
EXPECTED = {"stdout": [b"one\n", b"three\n"], "stderr": [b"two\n", b"no newline"]}


def test_both_streams_in_one_read_tagged_and_in_order(
    docker_client: docker.DockerClient, exited: str
) -> None:
    logs = DockerLogs(docker_client.api, exited)
    assert logs.socket_path, "the test engine is on its local socket"
    entries = read(logs, follow=False)
    assert by_stream(entries) == EXPECTED
    assert read(logs, follow=True) == entries  # an exited container's follow ends


def test_the_sdk_session_path_reads_the_same(
    docker_client: docker.DockerClient, exited: str
) -> None:
    local = read(DockerLogs(docker_client.api, exited), follow=False)
    logs = DockerLogs(docker_client.api, exited)
    logs.socket_path = None  # as for an engine over TCP, TLS or ssh
    assert read(logs, follow=False) == local
    assert read(logs, follow=True) == local


def test_since_skips_what_came_before(docker_client: docker.DockerClient, image: str) -> None:
    container = docker_client.containers.run(
        image, ["sh", "-c", "echo early; sleep 1.2; echo late"], detach=True
    )
    try:
        container.wait()
        logs = DockerLogs(docker_client.api, container.id)
        stamps = {data: ts for _, ts, data in logs.entries(False)}
        since = ts_ns(stamps[b"late\n"].decode()) / 1e9 - 0.5
        assert read(logs, follow=False, since=since) == [("stdout", b"late\n")]
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("local", [True, False])
def test_a_missing_container_is_docker_not_found(
    docker_client: docker.DockerClient, local: bool
) -> None:
    logs = DockerLogs(docker_client.api, "no-such-container-gpubox")
    if not local:
        logs.socket_path = None
    with pytest.raises(docker.errors.NotFound):
        read(logs, follow=False)


def test_close_ends_a_quiet_follow(docker_client: docker.DockerClient, image: str) -> None:
    container = docker_client.containers.run(image, ["sh", "-c", "echo hi; sleep 60"], detach=True)
    try:
        logs = DockerLogs(docker_client.api, container.id)
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.extend(d for _, _, d in logs.entries(True)))
        thread.start()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        logs.close()
        thread.join(5)
        assert not thread.is_alive(), "close() did not end the follow"
        assert got == [b"hi\n"]
    finally:
        container.remove(force=True)
