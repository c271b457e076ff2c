"""Follow streams and long polls once Waitress has handed their connection over to the
streams thread (coordinator.streams), read as raw bytes: what HTTP/1.1 and HTTP/1.0 clients
get, a stream that follows an earlier answer on the same keep-alive connection, HEAD, and
a client that reads slowly."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Cluster

pytestmark = pytest.mark.timeout(60)
PROCESS_WORKER = {"runtime": "process", "max_jobs": 4}
JOBS = "/api/v1/jobs"


def submit(cluster: Cluster, script: str) -> dict[str, Any]:
    command = ["sh", "-c", script]
    return cluster.client.submit({"name": "s", "docker": {"image": "-", "command": command}})


def raw(cluster: Cluster, *requests: str) -> socket.socket:
    """A connection to the coordinator on which `requests` (paths, GETs with its token)
    were sent at once."""
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall("".join(requests).encode())
    return conn


def get(cluster: Cluster, path: str, version: str = "HTTP/1.1", method: str = "GET") -> str:
    return f"{method} {path} {version}\r\nHost: x\r\nAuthorization: Bearer {cluster.token}\r\n\r\n"


def read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = b""
    while data := conn.recv(65536):
        got += data
    conn.close()
    return got


def unchunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body decoded; fails unless it ends with the last (empty) chunk."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body
            return out
        out, body = out + body[:size], body[size + 2 :]


@pytest.fixture()
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(workers=1, worker_settings=PROCESS_WORKER, http_threads=2)


def test_an_http11_stream_is_chunked_and_ends_with_its_last_chunk_and_the_end_record(
    cluster: Cluster,
) -> None:
    job = submit(cluster, "for i in 1 2 3; do echo line $i; sleep 0.2; done")
    got = read_all(raw(cluster, get(cluster, f"{JOBS}/{job['id']}/logs?follow=1&format=ndjson")))
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    headers = head.decode().lower()
    assert "transfer-encoding: chunked" in headers and "connection: close" in headers
    assert "content-type: application/x-ndjson" in headers and "content-length" not in headers
    records = [json.loads(line) for line in unchunk(body).splitlines() if line]
    assert [r["line"] for r in records if r.get("stream") == "stdout"] == [
        "line 1",
        "line 2",
        "line 3",
    ]
    assert records[-1] == {
        "end": True,
        "id": job["id"],
        "status": "FINISHED",
        "exit_code": 0,
        "error": None,
    }


def test_an_http10_stream_sends_plain_text_until_the_job_ends(cluster: Cluster) -> None:
    job = submit(cluster, "echo one; sleep 0.3; echo two")
    got = read_all(raw(cluster, get(cluster, f"{JOBS}/{job['id']}/logs?follow=1", "HTTP/1.0")))
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"chunked" not in head.lower()
    assert [line for line in body.decode().splitlines() if not line.startswith("[")] == [
        "one",
        "two",
    ]


def test_a_stream_after_an_answer_on_the_same_connection_comes_after_it_whole(
    cluster: Cluster,
) -> None:
    # Two requests sent at once on a keep-alive connection: Waitress answers the first,
    # then hands the connection over to the stream, which must not start before that
    # answer has gone out.
    job = submit(cluster, "echo hello")
    conn = raw(
        cluster,
        get(cluster, f"{JOBS}/{job['id']}"),
        get(cluster, f"{JOBS}/{job['id']}/logs?follow=1&format=ndjson"),
    )
    got = read_all(conn)
    first, _, rest = got.partition(b"\r\n\r\n")
    length = int(
        next(h for h in first.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
            b":"
        )[1]
    )
    assert json.loads(rest[:length])["id"] == job["id"]
    head, _, body = rest[length:].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    records = [json.loads(line) for line in unchunk(body).splitlines() if line]
    assert records[-1]["end"] is True and any(r.get("line") == "hello" for r in records)


def test_head_of_a_stream_is_its_headers_alone(cluster: Cluster) -> None:
    job = submit(cluster, "sleep 5")
    conn = raw(cluster, get(cluster, f"{JOBS}/{job['id']}/logs?follow=1", method="HEAD"))
    head = conn.recv(65536)
    conn.close()
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n"), head
    conn = raw(cluster, get(cluster, f"{JOBS}/{job['id']}?wait=5", method="HEAD"))
    assert conn.recv(65536).startswith(b"HTTP/1.1 200 OK")
    conn.close()


def test_a_long_poll_answers_with_a_sized_json_body_at_the_jobs_end(cluster: Cluster) -> None:
    job = submit(cluster, "sleep 1")
    began = time.monotonic()
    got = read_all(raw(cluster, get(cluster, f"{JOBS}/{job['id']}?wait=20")))
    assert time.monotonic() - began < 10
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"application/json" in head
    assert f"content-length: {len(body)}".encode() in head.lower()
    assert json.loads(body)["status"] == "FINISHED"


def test_a_slow_reader_gets_every_line_in_order(cluster: Cluster) -> None:
    # 20,000 lines of 100 bytes (2 MB) read 64 KB at a time with pauses: the stream holds at
    # most a page for it and goes on where it left off.
    job = submit(cluster, "i=0; while [ $i -lt 20000 ]; do printf '%099d\\n' $i; i=$((i+1)); done")
    cluster.client.wait(job["id"])
    conn = raw(cluster, get(cluster, f"{JOBS}/{job['id']}/logs?follow=1"))
    got = b""
    while data := conn.recv(65536):
        got += data
        time.sleep(0.002)
    conn.close()
    body = unchunk(got.partition(b"\r\n\r\n")[2]).decode()
    lines = [line for line in body.splitlines() if not line.startswith("[")]
    assert lines == [f"{i:099d}" for i in range(20000)]


def test_a_stream_ends_with_its_job_not_at_the_safety_nets_next_look(cluster: Cluster) -> None:
    # Jobs that end before or about when their stream is handed over: the broker's wake-up
    # may come before the stream is served, so its first look reads the job's status too.
    # Waiting for the look every WAKE_S (5 s) instead would take each stream seconds.
    for index in range(6):
        job = submit(cluster, "echo quick")
        if index % 2:
            cluster.client.wait(job["id"])  # ended before its stream is handed over
        began = time.monotonic()
        got = read_all(raw(cluster, get(cluster, f"{JOBS}/{job['id']}/logs?follow=1")))
        assert time.monotonic() - began < 3, "the stream waited for the safety net"
        assert b"quick" in got and got.endswith(b"0\r\n\r\n")
