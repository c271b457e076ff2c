"""The CLI as a CI step runs it: exit codes a CI system can act on, a stopped step that
cancels its job, waiting without a stream, `--` before the command, secrets from the
environment, --follow --json, filters that survive paging, a submit whose answer was lost,
a follow past the coordinator's stream limit. Real `gpubox` processes against a real
coordinator with a process-runtime worker."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from gpubox import exits
from tests.conftest import Cluster, wait_until

GPUBOX = [sys.executable, "-m", "gpubox"]
WORKER = {"runtime": "process"}
# The CLI's side; the store's (filters, keys, long polls) is in test_ci_api.py, on both.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def env_for(cluster: Cluster, url: str | None = None) -> dict[str, str]:
    return {**os.environ, "GPUBOX_URL": url or cluster.url, "GPUBOX_TOKEN": cluster.token}


def run(cluster: Cluster, *args: str, timeout: float = 60, **env: str) -> Any:
    return subprocess.run(
        [*GPUBOX, *args],
        env={**env_for(cluster), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,  # as in CI: not a terminal
    )


def start(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*GPUBOX, *args],
        env=env_for(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture()
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(workers=1, worker_settings=WORKER)


def test_exit_codes_tell_the_jobs_failure_from_gpuboxs(cluster: Cluster) -> None:
    def submit(*args: str) -> int:
        return int(run(cluster, "submit", "--follow", *args).returncode)

    assert submit("-", "true") == exits.OK
    assert submit("-", "--", "sh", "-c", "exit 3") == 3
    assert submit("--timeout", "0.5", "-", "sleep", "30") == exits.TIMEOUT
    # no worker here can run a Docker-only option: it ends at its queue timeout, not run
    assert submit("--user", "1000", "--queue-timeout", "1", "-", "true") == exits.NOT_RUN
    assert run(cluster, "show", "999").returncode == exits.NO_SUCH_JOB
    assert run(cluster, "submit", "-", "true", GPUBOX_TOKEN="wrong").returncode == exits.REFUSED
    assert run(cluster, "submit", "--gpus", "1", "--memory", "lots", "-").returncode in (
        exits.USAGE,
        exits.INVALID,
    )
    bad = run(cluster, "submit", "-", "true", GPUBOX_URL=cluster.url + "/nope")
    assert bad.returncode == exits.NO_SUCH_JOB  # a 404 from a wrong path: not retried
    assert exits.for_job("ERROR", None, "worker lost: no word from w1 for 10 s") == exits.JOB_LOST
    assert exits.for_job("CANCELLED", 143, None) == exits.CANCELLED


def test_a_double_dash_before_the_command_is_not_the_command(cluster: Cluster) -> None:
    done = run(cluster, "submit", "--follow", "-", "--", "sh", "-c", "echo one two")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "one two\n"


def test_a_stopped_step_cancels_its_job_and_ctrl_c_at_a_terminal_would_not(
    cluster: Cluster,
) -> None:
    for how in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        step = start(cluster, "submit", "--follow", "-", "--", "sh", "-c", "echo up; sleep 60")
        wait_until(lambda p=step: p.stdout and p.stdout.readline() == "up\n", 20, "the job")
        step.send_signal(how)
        assert step.wait(20) == 128 + how
        err = step.stderr.read() if step.stderr else ""
        job_id = int(err.split("job ", 1)[1].split()[0])
        assert "cancel" in err, err
        assert cluster.wait(job_id, timeout_s=20)["status"] == "CANCELLED"
    # tail without --cancel-on-exit: SIGTERM stops following only
    job = cluster.submit("-", ["sh", "-c", "echo up; sleep 60"])
    tail = start(cluster, "tail", str(job["id"]))
    wait_until(lambda: tail.stdout and tail.stdout.readline() == "up\n", 20, "the tail")
    tail.send_signal(signal.SIGTERM)
    tail.wait(20)
    assert cluster.client.job(job["id"])["status"] == "RUNNING"
    # with it, it cancels
    tail = start(cluster, "tail", "--cancel-on-exit", str(job["id"]))
    time.sleep(1)
    tail.send_signal(signal.SIGTERM)
    assert tail.wait(20) == 128 + signal.SIGTERM
    assert cluster.wait(job["id"], timeout_s=20)["status"] == "CANCELLED"


def test_wait_exits_with_the_first_failing_jobs_code_and_gives_up_at_its_timeout(
    cluster: Cluster,
) -> None:
    ok = cluster.submit("-", ["sh", "-c", "sleep 1"])
    bad = cluster.submit("-", ["sh", "-c", "sleep 1; exit 4"])
    done = run(cluster, "wait", str(ok["id"]), str(bad["id"]), "--json")
    assert done.returncode == 4, done.stderr
    assert [j["status"] for j in json.loads(done.stdout)] == ["FINISHED", "ERROR"]
    assert f"job {bad['id']} ERROR" in done.stderr
    slow = cluster.submit("-", ["sleep", "60"])
    began = time.monotonic()
    late = run(cluster, "wait", "--timeout", "1.5", str(slow["id"]))
    assert late.returncode == exits.GAVE_UP and 1.4 < time.monotonic() - began < 15
    assert cluster.client.job(slow["id"])["status"] in ("QUEUED", "RUNNING")  # runs on
    cluster.client.cancel(slow["id"])
    assert run(cluster, "wait", str(slow["id"])).returncode == exits.CANCELLED


def test_follow_json_keeps_the_jobs_output_and_its_json_apart(cluster: Cluster) -> None:
    done = run(cluster, "submit", "--follow", "--json", "-", "--", "sh", "-c", "echo out; exit 2")
    assert done.returncode == 2
    job = json.loads(done.stdout)  # stdout is the ended job alone
    assert job["status"] == "ERROR" and job["result"]["exit_code"] == 2
    assert "out\n" in done.stderr


def test_a_secret_named_alone_comes_from_the_environment_and_is_masked(cluster: Cluster) -> None:
    value = "s3cr3t-value-from-ci"
    done = run(
        cluster,
        "submit",
        "--follow",
        "--secret",
        "CI_SECRET",
        "-",
        "--",
        "sh",
        "-c",
        'echo "got $CI_SECRET"',
        CI_SECRET=value,
    )
    assert done.returncode == 0, done.stderr
    assert value not in done.stdout and "got " in done.stdout
    job_id = int(done.stderr.split("job ", 1)[1].split()[0])
    assert value not in json.dumps(cluster.client.job(job_id))
    missing = run(cluster, "submit", "--secret", "NOT_SET_ANYWHERE", "-", "true")
    assert missing.returncode == exits.USAGE and "NOT_SET_ANYWHERE is not set" in missing.stderr


def test_ls_filters_shows_times_and_keeps_the_filters_in_its_paging_hint(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    for i in range(3):
        cluster.submit("img", ["true"], name=f"train-{i}", metadata={"pipeline": "p42"})
    cluster.submit("img", ["true"], name="other", metadata={"pipeline": "p43"})
    listed = run(cluster, "ls", "--metadata", "pipeline=p42", "--name", "train-", "--limit", "2")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:6] == ["ID", "STATUS", "EXIT", "CREATED", "DURATION", "GPUS"]
    assert [row.split()[-1] for row in rows] == ["train-2", "train-1"]
    hint = listed.stderr.strip()
    assert hint.startswith("(more: gpubox ls") and "--metadata pipeline=p42" in hint
    assert "--name train-" in hint and "--limit 2" in hint
    rest = run(cluster, *hint.removeprefix("(more: gpubox ").removesuffix(")").split())
    assert [row.split()[-1] for row in rest.stdout.splitlines()[1:]] == ["train-0"]


class LosingProxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP to a coordinator, but drops the answer to the first POST: the request
    reached the coordinator, its answer never reached the client."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.lost = 0
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Forward(http.server.BaseHTTPRequestHandler):
    server: LosingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = self.server.target
        conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request(self.command, self.path, body or None, headers)
        answer = conn.getresponse()
        data = answer.read()
        if self.command == "POST" and self.server.lost == 0:
            self.server.lost += 1
            self.close_connection = True
            return  # the coordinator made the job; its answer is dropped here
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


def test_a_submit_whose_answer_was_lost_is_sent_again_and_makes_one_job(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    proxy = LosingProxy(cluster.url)
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        done = run(cluster, "submit", "img", "true", GPUBOX_URL=url)
        assert done.returncode == 0, done.stderr
        assert proxy.lost == 1 and "sending the job again" in done.stderr
        jobs = cluster.client.jobs()["jobs"]
        assert [j["id"] for j in jobs] == [int(done.stdout)]
    finally:
        proxy.shutdown()


def test_tail_past_the_coordinators_stream_limit_reads_pages_instead(
    make_cluster: Callable[..., Cluster],
) -> None:
    # One follow stream at most.
    cluster = make_cluster(workers=1, worker_settings=WORKER, http_streams=1)
    script = "for i in $(seq 1 6); do echo line-$i; sleep 0.5; done"
    job = cluster.submit("-", ["sh", "-c", script])
    url = urlsplit(cluster.url)
    hog = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    hog.request(
        "GET",
        f"/api/v1/jobs/{job['id']}/logs?follow=1&format=ndjson",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    assert hog.getresponse().status == 200  # the one stream is taken
    try:
        done = run(cluster, "tail", str(job["id"]), timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"line-{i}" for i in range(1, 7)]
    finally:
        hog.close()


def test_a_retried_step_with_its_idempotency_key_gets_its_job_back(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    args = ["submit", "--idempotency-key", "p42-train", "--metadata", "pipeline=p42"]
    args += ["--metadata", '{"attempt": 1, "pipeline": "overridden"}', "img", "true"]
    first, again = run(cluster, *args), run(cluster, *args)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout  # the same job id
    job = cluster.client.job(int(first.stdout))
    assert job["metadata"] == {"pipeline": "overridden", "attempt": 1}
    listed = run(cluster, "ls", "-q", "--metadata", "attempt=1")
    assert listed.stdout.split() == [first.stdout.strip()]
    assert run(cluster, "submit", "--metadata", "[1]", "img").returncode == exits.USAGE
