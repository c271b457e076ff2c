"""What the follower rows run in processes of their own, away from the bench's threads and
the coordinator: many log follow streams read from one selector (read_streams), and /healthz
asked at a steady pace (probe_health). Both are multiprocessing targets (spawned)."""

from __future__ import annotations

import dataclasses
import json
import resource
import selectors
import socket
import time
from datetime import datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any
from urllib.parse import urlsplit

from benchlib.common import connect

OPENING = 100  # streams whose answer has not begun, at most: they open a batch at a time
TURN_S = 0.2  # how often the reader looks at `stop`


@dataclasses.dataclass
class Received:
    """What the reader saw of its streams: how many opened (answered 200) and how many were
    refused (with the first few answers), cut (closed by the coordinator while the job ran)
    or ended (the job's end: none should); lines missing between two lines of one stream;
    the longest one stream went without a line once it had one; and each line's arrival
    (time.time(), seconds since the line's own timestamp)."""

    opened: int = 0
    refused: int = 0
    answers: list[str] = dataclasses.field(default_factory=list)
    cut: int = 0
    ended: int = 0
    missing: int = 0
    wait_max_s: float = 0.0
    arrivals: list[tuple[float, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Reading:
    """One follow stream: its socket, the bytes not yet parsed, whether its status line and
    headers came, the seq of its last line and when that came (time.monotonic())."""

    job_id: int
    sock: socket.socket
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    head: bool = False
    seq: int = -1
    heard: float = 0.0


def request(host: str, job_id: int, token: str) -> bytes:
    return (
        f"GET /api/v1/jobs/{job_id}/logs?follow=1&format=ndjson HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n"
    ).encode()


def read_streams(
    url: str,
    token: str,
    job_ids: list[int],
    stop: Event,
    out: Queue[tuple[str, Any]],
) -> None:
    """Follow the log of each job in `job_ids` (NDJSON over HTTP/1.1, chunked), OPENING at a
    time until all are open, then read them all until `stop`. Puts ("opened", Received) once
    every stream was answered and ("received", Received) at the end on `out`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, len(job_ids) + 256)), hard))
    split = urlsplit(url)
    host, address = split.netloc, (split.hostname or "127.0.0.1", split.port)
    got = Received()
    selector = selectors.DefaultSelector()
    todo, waiting, said = list(job_ids), 0, False
    try:
        while not stop.is_set():
            while todo and waiting < OPENING:
                job_id = todo.pop(0)
                sock = socket.create_connection(address, timeout=30)
                sock.sendall(request(host, job_id, token))
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, Reading(job_id, sock))
                waiting += 1
            for key, _ in selector.select(TURN_S):
                stream: Reading = key.data
                began = stream.head
                if not _read(stream, got):
                    selector.unregister(stream.sock)
                    stream.sock.close()
                    waiting -= 0 if began else 1
                elif stream.head and not began:
                    waiting -= 1
                    got.opened += 1
            if not said and not todo and not waiting:
                said = True
                out.put(("opened", dataclasses.replace(got, arrivals=[])))
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        out.put(("received", got))


def _read(stream: Reading, got: Received) -> bool:
    """Take what the socket has; False once the stream is over."""
    try:
        data = stream.sock.recv(65536)
    except BlockingIOError:
        return True
    except OSError as exc:
        data = b""
        if not stream.head:
            _refused(got, f"job {stream.job_id}: {exc!r}")
            return False
    if not data:
        if not stream.head:
            _refused(got, f"job {stream.job_id}: closed before an answer")
        else:
            got.cut += 1
        return False
    stream.buf += data
    if not stream.head:
        end = stream.buf.find(b"\r\n\r\n")
        if end < 0:
            return True
        status = bytes(stream.buf[: stream.buf.find(b"\r\n")])
        if b" 200 " not in status:
            _refused(got, f"job {stream.job_id}: {bytes(stream.buf[:300])!r}")
            return False
        del stream.buf[: end + 4]
        stream.head = True
    return _chunks(stream, got)


def _refused(got: Received, answer: str) -> None:
    got.refused += 1
    if len(got.answers) < 5:
        got.answers.append(answer)


def _chunks(stream: Reading, got: Received) -> bool:
    """Take each whole chunk in the buffer (the coordinator sends whole lines in each);
    False after the last one."""
    buf = stream.buf
    while (line_end := buf.find(b"\r\n")) >= 0:
        size = int(buf[:line_end], 16)
        if len(buf) < line_end + 2 + size + 2:
            return True
        data = bytes(buf[line_end + 2 : line_end + 2 + size])
        del buf[: line_end + 2 + size + 2]
        if not size:
            got.ended += 1
            return False
        _lines(stream, data, got)
    return True


def _lines(stream: Reading, data: bytes, got: Received) -> None:
    """Count the NDJSON records of one chunk (empty lines are keep-alives)."""
    wall, now = time.time(), time.monotonic()
    for line in data.split(b"\n"):
        if not line:
            continue
        record = json.loads(line)
        if "seq" not in record:  # the job's end record
            continue
        if stream.seq >= 0:
            got.missing += max(0, record["seq"] - stream.seq - 1)
            got.wait_max_s = max(got.wait_max_s, now - stream.heard)
        stream.seq, stream.heard = record["seq"], now
        got.arrivals.append((wall, wall - datetime.fromisoformat(record["ts"]).timestamp()))


def probe_health(
    url: str, count: int, seconds: float, ready: Event, go: Event, out: Queue[list[float]]
) -> None:
    """Connect, set `ready`, and once `go` is set GET /healthz `count` times, one after
    another on that keep-alive connection, spread evenly over `seconds`; put the seconds
    each took on `out`."""
    conn = connect(url, timeout=30)
    times = []
    try:
        conn.connect()
        ready.set()
        go.wait()
        began = time.monotonic()
        for index in range(count):
            time.sleep(max(0.0, began + index * seconds / count - time.monotonic()))
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /healthz: HTTP {response.status}")
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
        out.put(times)
