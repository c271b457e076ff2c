"""Following logs live: `tail` as users run it, through dropped connections and many followers."""

from __future__ import annotations

import http.client
import io
import threading
import time
import urllib.parse

import pytest

from gpubox.client import Client
from tests.conftest import Cluster, wait_until
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.docker]


class Tail:
    """client.tail() in a thread, with its output captured."""

    def __init__(self, client: Client, job_id: int) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(client, job_id), daemon=True)
        self.thread.start()

    def _run(self, client: Client, job_id: int) -> None:
        self.code = client.tail(job_id, out=self.out, err=self.err)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def join(self, timeout_s: float = 60) -> int:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "tail did not end with the job"
        assert self.code is not None
        return self.code


def test_tail_shows_lines_while_the_job_runs_and_exits_with_its_code(cluster: Cluster, image: str):
    job = cluster.submit(
        image, ["sh", "-c", "echo ready; echo warn >&2; sleep 3; echo end; exit 5"]
    )
    tail = Tail(cluster.client, job["id"])
    wait_until(lambda: tail.lines() == ["ready"], 20, "the first line")
    assert cluster.client.job(job["id"])["status"] == "RUNNING"
    assert tail.err.getvalue() == "warn\n"
    assert tail.join() == 5
    assert tail.lines() == ["ready", "end"]


def test_tail_resumes_after_its_connection_drops_without_gap_or_repeat(
    cluster: Cluster, image: str
):
    url = urllib.parse.urlsplit(cluster.url)
    proxy = CuttableProxy(url.hostname or "127.0.0.1", url.port or 80)
    try:
        client = Client(f"http://127.0.0.1:{proxy.port}", cluster.token)
        script = "for i in $(seq 1 60); do echo line-$i; sleep 0.05; done; exit 7"
        job = cluster.submit(image, ["sh", "-c", script])
        tail = Tail(client, job["id"])
        wait_until(lambda: len(tail.lines()) >= 10, 20, "ten lines")
        proxy.cut()
        wait_until(lambda: len(tail.lines()) >= 30, 20, "lines after the cut")
        proxy.cut()
        assert tail.join() == 7
        assert tail.lines() == [f"line-{i}" for i in range(1, 61)]
        assert proxy.accepted >= 3  # it did reconnect
    finally:
        proxy.close()


def test_tail_of_finished_and_cancelled_jobs(cluster: Cluster, image: str):
    finished = cluster.submit(image, ["echo", "done"])
    cluster.wait(finished["id"])
    tail = Tail(cluster.client, finished["id"])
    assert tail.join() == 0 and tail.lines() == ["done"]

    sleeper = cluster.submit(image, ["sleep", "300"])
    cluster.wait(sleeper["id"], ("RUNNING",))
    tail = Tail(cluster.client, sleeper["id"])
    cluster.client.cancel(sleeper["id"])
    assert tail.join() == 130


def test_32_followers_do_not_starve_submits(cluster: Cluster, image: str):
    job = cluster.submit(image, ["sh", "-c", "echo start; sleep 300"])
    cluster.wait(job["id"], ("RUNNING",))
    url = urllib.parse.urlsplit(cluster.url)
    followers = []
    for _ in range(32):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request(
            "GET",
            f"/api/v1/jobs/{job['id']}/logs?follow=1&format=ndjson",
            headers={"Authorization": f"Bearer {cluster.token}"},
        )
        response = conn.getresponse()
        assert response.status == 200
        followers.append((conn, response))
    started = time.monotonic()
    other = cluster.submit(image, ["echo", "not starved"])
    assert time.monotonic() - started < 5
    assert cluster.wait(other["id"])["status"] == "FINISHED"
    cluster.client.cancel(job["id"])
    cluster.wait(job["id"])
    for conn, response in followers:
        body = response.read()  # each stream ends with the job
        assert b'"line": "start"' in body
        conn.close()


def test_follow_streams_plain_text_for_curl(cluster: Cluster, image: str):
    job = cluster.submit(image, ["sh", "-c", "echo a; sleep 1; echo b"])
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(
        "GET",
        f"/api/v1/jobs/{job['id']}/logs?follow=1",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    response = conn.getresponse()
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert response.readline() == b"a\n"
    assert cluster.client.job(job["id"])["status"] == "RUNNING"
    assert response.read() == b"b\n"
    conn.close()
