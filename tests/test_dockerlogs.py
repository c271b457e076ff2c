"""Reading a container's log straight from the engine (gpubox.worker.dockerlogs): both streams
in one read, in order, tagged; the same entries over the local socket and over the SDK's own
session; Docker's errors as the SDK's exceptions."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from gpubox.worker.dockerlogs import DockerLogs, Entry, parse_frames
from gpubox.worker.lines import ts_ns
from tests.conftest import wait_until

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


def entries(logs: DockerLogs, follow: bool, since: float | None = None) -> Iterator[Entry]:
    for batch in logs.batches(follow, since):
        yield from batch


def read(logs: DockerLogs, follow: bool, since: float | None = None) -> list[tuple[str, bytes]]:
    return [(stream, data) for stream, _, data in entries(logs, follow, since)]


def by_stream(entries: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    """Docker copies stdout and stderr in two goroutines: the order between the streams is
    Docker's, the order within each is the program's."""
    return {name: [data for stream, data in entries if stream == name] for name in STREAMS}


STREAMS = ("stdout", "stderr")
EXPECTED = {"stdout": [b"one\n", b"three\n"], "stderr": [b"two\n", b"no newline"]}


@pytest.mark.docker
def test_both_streams_in_one_read_tagged_and_in_order(
    docker_client: docker.DockerClient, exited: str
) -> None:
    logs = DockerLogs(docker_client.api, exited)
    assert logs.socket_path, "the test engine is on its local socket"
    entries = read(logs, follow=False)
    assert by_stream(entries) == EXPECTED
    assert read(logs, follow=True) == entries  # an exited container's follow ends


@pytest.mark.docker
def test_the_sdk_session_path_reads_the_same(
    docker_client: docker.DockerClient, exited: str
) -> None:
    local = read(DockerLogs(docker_client.api, exited), follow=False)
    logs = DockerLogs(docker_client.api, exited)
    logs.socket_path = None  # as for an engine over TCP, TLS or ssh
    assert read(logs, follow=False) == local
    assert read(logs, follow=True) == local


@pytest.mark.docker
def test_since_skips_what_came_before(docker_client: docker.DockerClient, image: str) -> None:
    container = docker_client.containers.run(
        image, ["sh", "-c", "echo early; sleep 1.2; echo late"], detach=True
    )
    try:
        container.wait()
        logs = DockerLogs(docker_client.api, container.id)
        stamps = {data: ts for _, ts, data in entries(logs, False)}
        since = ts_ns(stamps[b"late\n"].decode()) / 1e9 - 0.5
        assert read(logs, follow=False, since=since) == [("stdout", b"late\n")]
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.docker
def test_a_missing_container_is_docker_not_found(
    docker_client: docker.DockerClient, local: bool
) -> None:
    logs = DockerLogs(docker_client.api, "no-such-container-gpubox")
    if not local:
        logs.socket_path = None
    with pytest.raises(docker.errors.NotFound):
        read(logs, follow=False)


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.docker
def test_close_ends_a_quiet_follow(
    docker_client: docker.DockerClient, image: str, local: bool
) -> None:
    container = docker_client.containers.run(image, ["sh", "-c", "echo hi; sleep 60"], detach=True)
    try:
        logs = DockerLogs(docker_client.api, container.id)
        if not local:
            logs.socket_path = None
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.extend(d for _, _, d in entries(logs, True)))
        thread.start()
        wait_until(lambda: got, 10, "the follow's first line")
        logs.close()
        thread.join(5)
        assert not thread.is_alive(), "close() did not end the follow"
        assert got == [b"hi\n"]
    finally:
        container.remove(force=True)


class FakeEngine:
    """A unix socket that answers every request with `answer` and closes."""

    def __init__(self, path: str, answer: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen()
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b'HTTP/1.0 500 Internal Server Error\r\n\r\n{"message": "disk full"}', "disk full"),
        (b"garbage\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.0 200 OK\r\n", "before answering"),  # closed before the head ended
    ],
)
def test_a_bad_answer_from_the_engine_is_a_docker_error(
    tmp_path: Path, answer: bytes, error: str
) -> None:
    sock = str(tmp_path / "docker.sock")
    engine = FakeEngine(sock, answer)
    # A client of the fake engine alone (a version given, it asks the engine nothing).
    api = docker.APIClient(base_url=f"unix://{sock}", version="1.41")
    try:
        logs = DockerLogs(api, "abc")
        assert logs.socket_path == sock
        with pytest.raises(docker.errors.APIError, match=error):
            read(logs, follow=False)
    finally:
        api.close()
        engine.server.close()


def test_a_partial_frame_waits_for_the_next_read() -> None:
    buf = bytearray(frame(3, b"T x\n") + frame(1, b"T y\n")[:6])
    assert parse_frames(buf) == [(3, b"T x\n")]
    assert len(buf) == 6  # kept for the next read
