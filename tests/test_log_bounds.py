"""Attacks on the bounds of a job's log (issue 19): memory of the coordinator while serving it,
the store's bytes per job, the disk and memory a flood costs a worker, gpubox's own markers,
and follow streams of revoked tokens."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox import keys, models
from gpubox.client import ApiError, Client
from gpubox.store import open_store
from gpubox.worker import docker_runtime, lines, logreader
from tests.conftest import wait_until
from tests.test_store import running

GPUBOX = [sys.executable, "-m", "gpubox"]
TS = "2024-05-01T12:00:00.000000001Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """The resident memory of a process now (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def stored_job(db: str, lines: int, width: int) -> int:
    """A FINISHED job whose stored log is `lines` lines of `width` characters; its id."""
    store = open_store(db)
    try:
        job = running(store)
        for first in range(1, lines + 1, 100):
            count = min(100, lines - first + 1)
            batch = [
                (TS, "stdout", f"{seq:08d}" + "x" * (width - 8))
                for seq in range(first, first + count)
            ]
            store.append_logs(job.id, 1, first, batch)
        store.finish_job(job.id, 1, models.Status.FINISHED, 0, None, None, models.utcnow(), lines)
        return job.id
    finally:
        store.close()


class CoordinatorProcess:
    """`gpubox coordinator` in a subprocess, on a state folder of its own."""

    def __init__(self, state: Path, db: str) -> None:
        keys.init(str(state))
        self.http = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "GPUBOX_STATE_DIR": str(state),
            "GPUBOX_DB": db,
            "GPUBOX_HTTP": self.http,
            "GPUBOX_BIND": f"tcp://127.0.0.1:{free_port()}",
        }
        self.log = state / "coordinator.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*GPUBOX, "coordinator"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://{self.http}"
        wait_until(self._healthy, 30, "the coordinator to answer")
        self.token = (state / "token").read_text().strip()
        self.client = Client(self.url, self.token)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            host, port = self.http.split(":")
            with socket.create_connection((host, int(port)), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return sock.recv(100).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def idle_request(http: str, path: str, token: str) -> socket.socket:
    """A GET whose answer is never read: the socket's receive buffer kept small."""
    host, port = http.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


# --- finding 2: reading a log exhausts the coordinator's memory -------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_requests_that_never_read_a_log_of_long_lines_hold_little_memory(tmp_path: Path):
    """1,500 lines of 60 KB (90 MB) stored; 6 requests for them (3 pages, 3 follows, text and
    NDJSON) that never read: the coordinator grows by less than 100 MB (it was ~270 MB per
    request: a page of up to 5,000 lines read, rendered and encoded whole). A client that
    reads still gets every line once."""
    state = tmp_path / "state"
    db = f"sqlite:///{state}/gpubox.db"
    job_id = stored_job(db, lines=1500, width=60_000)
    coordinator = CoordinatorProcess(state, db)
    try:
        before = rss_mib(coordinator.proc.pid)
        path = f"/api/v1/jobs/{job_id}/logs"
        sockets = [
            idle_request(coordinator.http, path + query, coordinator.token)
            for query in (
                "",
                "?format=ndjson",
                "?limit=5000",
                "?follow=1",
                "?follow=1&format=ndjson",
                "?follow=1",
            )
        ]
        peak = before
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(coordinator.proc.pid))
            time.sleep(0.05)
        assert peak - before < 100, f"the coordinator grew from {before:.0f} to {peak:.0f} MiB"
        for sock in sockets:
            sock.close()
        seqs = [record["seq"] for record in coordinator.client.logs(job_id)]
        assert seqs == list(range(1, 1501))
    finally:
        coordinator.stop()


# --- finding 10: a flood's lines piled up in the worker's memory ------------------------------


class FloodLogs:
    """A container's log that holds `total` lines of 60 KB, read 4 lines (240 KB) at a time
    as fast as they are asked for: a json-file log Docker wrote faster than the worker sends."""

    container_id = "flood"

    def __init__(self, total: int) -> None:
        self.total = total

    def batches(
        self, follow: bool, since: float | None = None, tail: int | None = None
    ) -> Iterator[list[tuple[str, bytes, bytes]]]:
        if tail is not None:
            return iter([])
        return (
            [
                ("stdout", b"2026-01-01T00:00:00.%09dZ" % n, b"x" * 60_000 + b"\n")
                for n in range(first, min(first + 4, self.total))
            ]
            for first in range(0, self.total, 4)
        )

    def container_exited(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_log_reader_waits_while_the_line_buffer_is_full() -> None:
    """1,000 lines of 60 KB (60 MB) in the log, nothing taken from the buffer: the reader
    stops at the buffer's bound (4 MiB) plus one read, not at 60 MB; once lines are taken it
    goes on, and every line comes out once, in order."""
    buffer = lines.LineBuffer(1)
    reader = logreader.LogReader(FloodLogs(1000), buffer, lines.Masker([]))
    reader.thread.start()
    wait_until(
        lambda: not reader.thread.is_alive() or getattr(buffer, "waiting", 0),
        10,
        "the reader to wait for room, or to end",
    )
    held = sum(len(line[2]) for _, batch in buffer.take(0) for line in batch)
    assert held <= 4 * 2**20 + 4 * 60_000, f"{held / 2**20:.0f} MiB held"
    taken = held // 60_000
    next_seq = 1 + taken
    while reader.thread.is_alive() or taken < 1000:
        for seq, batch in buffer.take(0.1):
            assert seq == next_seq
            next_seq += len(batch)
            taken += len(batch)
    assert taken == 1000


def test_abandoning_a_follow_that_waits_for_room_ends_it() -> None:
    buffer = lines.LineBuffer(1, max_bytes=100_000)
    reader = logreader.LogReader(FloodLogs(1000), buffer, lines.Masker([]))
    reader.thread.start()
    wait_until(lambda: buffer.waiting, 10, "the reader to wait for room")
    reader.abandon()
    reader.thread.join(5)
    assert not reader.thread.is_alive()


# --- finding 9: a flood fills the disks --------------------------------------------------------


def test_the_worker_copies_at_most_journal_bytes_per_job_of_a_jobs_output_to_its_own_log():
    """3 MB of output: the worker's own log gets the first 1 MB of it, tagged, then one line
    saying the rest is not copied; every line still goes to the coordinator."""
    journal = io.StringIO()
    copy = lines.OutputCopy(journal, 1_000_000)
    buffer = lines.LineBuffer(1)
    sent: list[list[str]] = []

    def emit(kind: str, body: dict[str, Any]) -> None:
        sent.extend(body["lines"])

    lock = threading.Lock()
    for first in range(0, 3000, 100):
        buffer.add_many(
            [(TS, "stdout", f"{n:04d} " + "x" * 995) for n in range(first, first + 100)]
        )
        lines.send_lines(buffer, emit, copy, lock, "job=7 container=abc", 0)
    assert len(sent) == 3000
    copied = journal.getvalue().splitlines()
    assert len(journal.getvalue().encode()) <= 1_000_000 + 300
    assert all(line.startswith("job=7 container=abc ") for line in copied)
    assert copied[0] == "job=7 container=abc stdout: 0000 " + "x" * 995
    assert [line for line in copied if "gpubox:" in line] == [copied[-1]]
    assert "the rest of its output is not copied" in copied[-1]
    assert len(copied) - 1 == 1_000_000 // len(copied[0] + "\n")


# --- low (a): a job printed text identical to gpubox's own markers -----------------------------


def test_a_job_cannot_print_a_line_that_passes_for_gpuboxs_own(make_cluster: Any):
    """A job prints the very text of gpubox's attempt marker; the real marker, written when
    the attempt is lost, has the stream gpubox in NDJSON, and tail and logs print it on
    stderr, where the job's forged line stays stdout."""
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    job = cluster.submit("busybox", ["true"], max_retries=1)
    assert store.claim_job(job["id"], "w1", [], models.utcnow()) is not None
    forged = "[gpubox: attempt 1 ended: worker lost; the job is queued again (retry 1 of 1)]"
    store.append_logs(job["id"], 1, 1, [(TS, "stdout", forged)])
    store.release_job(job["id"], 1, "worker lost", models.utcnow())
    cluster.client.cancel(job["id"])
    records = list(cluster.client.logs(job["id"]))
    assert [(r["stream"], r["line"]) for r in records] == [
        ("stdout", forged),
        ("gpubox", forged),
    ]
    out, err = io.StringIO(), io.StringIO()
    assert cluster.client.tail(job["id"], out=out, err=err) == 130
    assert out.getvalue() == forged + "\n"
    assert err.getvalue().splitlines()[0] == forged


# --- low (b): a revoked token's follow stream ran on -------------------------------------------


def test_a_follow_stream_ends_soon_after_its_token_is_revoked(make_cluster: Any, db_url: str):
    """A follower with its own token, on a running job; the token is revoked by another
    process (`gpubox token revoke`, another store): the stream ends within a few seconds
    (it ran on until the job ended), and the token gets 401 after."""
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    token = cluster.client.call("POST", "/api/v1/tokens", {"name": "ci"})["token"]
    job = cluster.submit("busybox", ["true"])
    assert store.claim_job(job["id"], "w1", [], models.utcnow()) is not None
    host, port = cluster.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "GET",
        f"/api/v1/jobs/{job['id']}/logs?follow=1&format=ndjson",
        headers={"Authorization": f"Bearer {token}"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline() == b"\n"  # the stream is open
    ended = threading.Event()

    def read_to_the_end() -> None:
        # A revoked token cuts the stream (no last chunk): an error, not an end.
        with contextlib.suppress(http.client.IncompleteRead):
            response.read()
        ended.set()

    threading.Thread(target=read_to_the_end, daemon=True).start()
    assert not ended.wait(1.5)  # a stream with a valid token goes on
    other = open_store(db_url)  # another process's revoke: no cache of ours is told
    try:
        assert other.revoke_token("ci")
    finally:
        other.close()
    revoked_at = time.monotonic()
    assert ended.wait(10), "the stream went on after its token was revoked"
    assert time.monotonic() - revoked_at < 4
    conn.close()
    with pytest.raises(ApiError) as refused:
        Client(cluster.url, token).job(job["id"])
    assert refused.value.status == 401


@pytest.mark.slow
@pytest.mark.docker
def test_a_job_printing_past_max_log_bytes_keeps_a_head_a_marker_and_its_tail(
    make_cluster: Any, image: str
):
    """A job prints 4,000 lines of 1,000 characters (4 MB) under a cap of 1 MiB: the store
    keeps at most 1 MiB of it, the first lines, a gpubox marker naming max_log_bytes and the
    last lines; the job runs to its end (it printed 4 MB into a store with no byte cap)."""
    cluster = make_cluster(max_log_bytes=1024 * 1024)
    line = "$(head -c 996 /dev/zero | tr '\\0' x)"
    script = f"x={line}; i=1; while [ $i -le 4000 ]; do printf '%04d%s\\n' $i $x; i=$((i+1)); done"
    job = cluster.submit(image, ["sh", "-c", script])
    done = cluster.wait(job["id"], timeout_s=120)
    assert done["status"] == "FINISHED"
    stored = cluster.lines(job["id"])
    assert sum(len(r["line"]) for r in stored) <= 1024 * 1024
    (marker,) = [r for r in stored if r["stream"] == "gpubox"]
    assert "lines dropped here" in marker["line"] and "(max_log_bytes)" in marker["line"]
    numbers = [int(r["line"][:4]) for r in stored if r["stream"] == "stdout"]
    head = numbers[: stored.index(marker)]
    assert head == list(range(1, len(head) + 1)) and len(head) * 1000 <= 512 * 1024
    assert numbers[len(head) :] == list(range(numbers[len(head)], 4001))  # the latest kept


@pytest.mark.slow
@pytest.mark.serial  # the worker must read faster than Docker rotates: no other load beside
@pytest.mark.docker
def test_docker_keeps_a_bounded_log_of_a_job_and_the_worker_reads_it_across_rotations(
    make_cluster: Any, image: str, docker_client: Any, monkeypatch: pytest.MonkeyPatch
):
    """The container's json-file log is bounded (max-size, max-file: it had neither, and a
    flood wrote 4.5 GB a minute there); 30,000 lines (~2.6 MB of json-file log) through
    files of 256 KiB still reach the store each once, in order, read from the files."""
    read: list[str] = []

    class Recording(docker_runtime.JsonLogFile):  # type: ignore[misc]
        def batches(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            read.append(self.path)
            yield from super().batches(*args, **kwargs)

    monkeypatch.setattr(docker_runtime, "JsonLogFile", Recording)
    cluster = make_cluster(workers=0)
    name = f"logs-{os.getpid()}"  # other tests on this engine name their workers worker-N
    cluster.add_worker(name=name, container_log_max_bytes=256 * 1024, container_log_files=2)
    # (a pause every 1,000 lines: a reader in this busy test process may fall behind a job
    # printing flat out by more than these small files, and then lines are lost, as marked)
    script = (
        "sleep 2; i=1; while [ $i -le 30000 ]; do echo $i;"
        " [ $((i % 1000)) -eq 0 ] && sleep 0.05; i=$((i+1)); done"
    )
    job = cluster.submit(image, ["sh", "-c", script])
    labels = [f"io.gpubox.job={job['id']}", f"io.gpubox.worker={name}"]
    (found,) = wait_until(
        lambda: docker_client.api.containers(filters={"label": labels}), 30, "the container"
    )
    config = docker_client.api.inspect_container(found["Id"])["HostConfig"]["LogConfig"]
    assert config == {"Type": "json-file", "Config": {"max-file": "2", "max-size": "262144"}}
    done = cluster.wait(job["id"], timeout_s=120)
    assert done["status"] == "FINISHED"
    stored = cluster.lines(job["id"])
    assert [r["line"] for r in stored] == [str(n) for n in range(1, 30001)]
    assert read  # from the files, not through the engine's API
