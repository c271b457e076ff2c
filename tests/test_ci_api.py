"""The API as a CI pipeline uses it (curl and jq, or raw HTTP): streams that never end
cleanly unless the job did, an NDJSON stream's last record, waiting without a stream (a long
poll), unknown query parameters refused, list filters, and safe retries of a submit with an
Idempotency-Key. Real HTTP against a real coordinator, on both stores where the store is
involved."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from gpubox import models
from tests.conftest import Cluster, wait_until
from tests.test_api import JOBS, request

WORKER = {"runtime": "process"}
FOREVER = ["sh", "-c", "echo started; sleep 300"]


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-N", *args], capture_output=True, text=True, timeout=timeout
    )


def started(cluster: Cluster, command: list[str] = FOREVER, **fields: Any) -> dict[str, Any]:
    """A process job, once it printed its first line."""
    job = cluster.submit("-", command, **fields)
    wait_until(lambda: cluster.lines(job["id"]), 20, "the job's first line")
    return job


# --- follow streams --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "ndjson"])
def test_a_follow_stream_cut_by_a_stopping_coordinator_is_an_error_not_an_end(
    make_cluster: Callable[..., Cluster], fmt: str
) -> None:
    cluster = make_cluster(workers=1, worker_settings=WORKER)
    job = started(cluster)
    url = f"{cluster.url}{JOBS}/{job['id']}/logs?follow=1&format={fmt}"
    result: list[subprocess.CompletedProcess[str]] = []
    follower = threading.Thread(
        target=lambda: result.append(curl("-H", f"Authorization: Bearer {cluster.token}", url))
    )
    follower.start()
    time.sleep(1.0)  # the stream is open and has sent the first line
    state = cluster.client.job(job["id"])["status"]
    cluster.coordinator.stop()
    follower.join(30)
    assert state == "RUNNING"
    # curl: "transfer closed with outstanding read data remaining" (18), not 0
    assert result[0].returncode == 18, (result[0].returncode, result[0].stderr)
    assert "started" in result[0].stdout
    assert '"end"' not in result[0].stdout


def test_an_ndjson_follow_ends_with_a_record_of_how_the_job_ended(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=1, worker_settings=WORKER)
    job = cluster.submit("-", ["sh", "-c", "echo one; echo two >&2; exit 3"])
    url = f"{cluster.url}{JOBS}/{job['id']}/logs?follow=1&format=ndjson"
    done = curl("-H", f"Authorization: Bearer {cluster.token}", url)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["line"] for r in records[:-1]] == ["one", "two"]
    assert records[-1] == {
        "end": True,
        "id": job["id"],
        "status": "ERROR",
        "exit_code": 3,
        "error": "exit code 3",
    }
    # A text follow of an ended job: its lines, then a clean end.
    text = curl("-H", f"Authorization: Bearer {cluster.token}", url.replace("ndjson", "text"))
    assert text.returncode == 0 and text.stdout == "one\ntwo\n"


# --- long poll -------------------------------------------------------------------------------


def test_a_long_poll_answers_when_the_job_ends_or_when_its_time_is_up(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=1, worker_settings=WORKER)
    job = started(cluster, ["sh", "-c", "echo started; sleep 2"])
    began = time.monotonic()
    short = request(cluster, "GET", f"{JOBS}/{job['id']}?wait=0.5")
    assert short.status == 200 and short.body["status"] == "RUNNING"
    assert 0.4 < time.monotonic() - began < 3
    ended = request(cluster, "GET", f"{JOBS}/{job['id']}?wait=30")
    assert ended.status == 200 and ended.body["status"] == "FINISHED"
    assert time.monotonic() - began < 10  # at the job's end, not after 30 s
    for bad in ("-1", "61", "soon", "nan"):
        answer = request(cluster, "GET", f"{JOBS}/{job['id']}?wait={bad}")
        assert answer.status == 400 and answer.body["error"]["field"] == "wait", bad


def test_long_polls_past_their_share_of_streams_are_answered_at_once_with_retry_after(
    make_cluster: Callable[..., Cluster],
) -> None:
    # 6 streams, of which at most 3 long polls; 2 HTTP threads: a long poll holds none.
    cluster = make_cluster(workers=1, worker_settings=WORKER, http_threads=2, http_streams=6)
    job = started(cluster)
    answers: list[tuple[float, Any]] = []

    def poll() -> None:
        began = time.monotonic()
        answer = request(cluster, "GET", f"{JOBS}/{job['id']}?wait=3")
        answers.append((time.monotonic() - began, answer))

    polls = [threading.Thread(target=poll) for _ in range(6)]
    for thread in polls:
        thread.start()
    for thread in polls:
        thread.join(20)
    quick = [a for seconds, a in answers if seconds < 1.5]
    held = [a for seconds, a in answers if seconds >= 2.5]
    assert len(held) == 3 and len(quick) == 3, [s for s, _ in answers]
    assert all(a.headers["Retry-After"] == "5" for a in quick)
    assert all(a.body["status"] == "RUNNING" for _, a in answers)
    assert request(cluster, "GET", "/healthz").status == 200


# --- query parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"{JOBS}?labels=zone%3Da",
        f"{JOBS}?worker=zz",
        f"{JOBS}/1?follow=1",
        f"{JOBS}/1/logs?tail=5",
        f"{JOBS}/1/telemetry?until=5",
        "/api/v1/workers?all=1",
        f"{JOBS}?metadata.bad%20key=1",
    ],
)
def test_an_unknown_query_parameter_is_400_naming_it(
    make_cluster: Callable[..., Cluster], path: str
) -> None:
    cluster = make_cluster(workers=0)
    cluster.submit("img", ["true"])
    answer = request(cluster, "GET", path)
    assert answer.status == 400, answer.body
    assert answer.body["error"]["code"] == "bad_input"
    name = path.split("?", 1)[1].split("=", 1)[0].replace("%20", " ")
    assert answer.body["error"]["field"] == name


def test_the_list_filters_by_status_name_submitter_label_metadata_and_time(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    made = cluster.client.call("POST", "/api/v1/tokens", {"name": "ci", "role": "submit"})
    from gpubox.client import Client

    ci = Client(cluster.url, made["token"])

    def submit(client: Any, name: str, **fields: Any) -> int:
        spec = {"name": name, "docker": {"image": "img", "command": ["true"]}, **fields}
        return int(client.submit(spec)["id"])

    # NUL in metadata is kept (test_api): on PostgreSQL it made every metadata filter a 500
    first = {"pipeline": "p42", "raw": "a\x00b"}
    a = submit(cluster.client, "train-a", labels={"zone": "a"}, metadata=first)
    time.sleep(0.01)
    middle = models.format_time(models.utcnow())
    time.sleep(0.01)
    b = submit(ci, "train-b", labels={"zone": "b"}, metadata={"pipeline": "p43", "n": 7})
    c = submit(ci, "eval-c", labels={"zone": "a", "gpu": "h100"}, metadata={"pipeline": "p42"})
    cluster.client.cancel(c)

    def ids(query: str) -> list[int]:
        answer = request(cluster, "GET", f"{JOBS}?{query}")
        assert answer.status == 200, answer.body
        return [job["id"] for job in answer.body["jobs"]]

    assert ids("status=QUEUED") == [b, a]
    assert ids("status=queued,cancelled") == [c, b, a]
    assert ids("status=QUEUED&status=CANCELLED") == [c, b, a]
    assert ids("name=train-") == [b, a]
    assert ids("name=TRAIN") == []  # a prefix, and case matters
    assert ids("submitter=ci") == [c, b]
    assert ids("label=zone%3Da") == [c, a]
    assert ids("label=zone%3Da&label=gpu%3Dh100") == [c]
    assert ids("metadata.pipeline=p42") == [c, a]
    assert ids("metadata.n=7") == [b]
    assert ids(f"created_after={middle}") == [c, b]
    assert ids(f"created_before={middle}&status=QUEUED") == [a]
    assert ids("name=train-&submitter=ci&status=QUEUED") == [b]
    # queued jobs in a list say why they wait, as GET /jobs/<id> does
    assert all(
        isinstance(j["queue_reason"], str)
        for j in request(cluster, "GET", JOBS).body["jobs"]
        if j["status"] == "QUEUED"
    )
    # paging keeps the filters: the next page is asked with them
    first = request(cluster, "GET", f"{JOBS}?label=zone%3Da&limit=1").body
    assert [j["id"] for j in first["jobs"]] == [c] and first["next"] == c
    assert ids(f"label=zone%3Da&limit=1&before={first['next']}") == [a]
    for bad, field in (
        ("status=DONE", "status"),
        ("label=novalue", "label"),
        # NUL, which PostgreSQL text cannot hold: its query failed, a 500
        ("label=zone%3Da%00", "label"),
        ("label=zo%00ne%3Da", "label"),
        ("metadata.pipeline=p%0042", "metadata.pipeline"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-12-06T10:00:00", "created_after"),
        # UTC before year 1 or after 9999, which Python cannot hold: it was a 500
        ("created_before=0001-01-01T00:00:00%2B00:07", "created_before"),
        ("created_after=9999-12-31T23:59:59-01:00", "created_after"),
    ):
        answer = request(cluster, "GET", f"{JOBS}?{bad}")
        assert answer.status == 400 and answer.body["error"]["field"] == field, bad


# --- image references ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    ["UPPER/Bad Image", "Busybox", "my/Trainer:1", "x:", "x@sha256:zz", "/x", "a//b", "x:a b"],
)
def test_an_image_docker_would_refuse_is_refused_at_submission(
    make_cluster: Callable[..., Cluster], image: str
) -> None:
    cluster = make_cluster(workers=0)
    answer = request(cluster, "POST", JOBS, {"name": "x", "docker": {"image": image}})
    assert answer.status == 400 and answer.body["error"]["field"] == "docker.image"
    assert "not an image reference Docker would take" in answer.body["error"]["message"]


def test_image_references_docker_takes_are_accepted(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=0)
    for image in (
        "busybox",
        "gpubox-busybox:latest",
        "nvcr.io/nvidia/pytorch:24.01-py3",
        "localhost:5000/team/trainer:v1.2",
        "ghcr.io/org/img@sha256:" + "a" * 64,
        "my_org/tool__x:1",
        "-",  # no image: for process-runtime workers
    ):
        answer = request(cluster, "POST", JOBS, {"name": "x", "docker": {"image": image}})
        assert answer.status == 201, (image, answer.body)


def test_a_token_name_with_nul_is_not_found_not_a_500(
    make_cluster: Callable[..., Cluster],
) -> None:
    # No token name holds NUL, and PostgreSQL text cannot: asking the store for one was a 500.
    cluster = make_cluster(workers=0)
    answer = request(cluster, "DELETE", "/api/v1/tokens/lo%00cal")
    assert answer.status == 404 and answer.body["error"]["code"] == "not_found"
    assert request(cluster, "GET", JOBS).status == 200  # the admin token "local" still holds


# --- queue timeout --------------------------------------------------------------------------


def test_a_job_that_can_never_start_ends_at_its_queue_timeout_saying_why(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=1, worker_settings=WORKER, queue_timeout=30.0)
    nowhere = cluster.submit("-", ["true"], labels={"zone": "nowhere"}, queue_timeout=1)
    default = cluster.submit("-", ["true"])
    assert cluster.client.job(default["id"])["queue_timeout"] == 30.0  # the coordinator's
    ended = cluster.wait(nowhere["id"], timeout_s=20)
    assert ended["status"] == "ERROR" and ended["result"]["exit_code"] is None
    assert ended["result"]["error"] == (
        "queue timeout: queued for 1 s; no connected worker has the labels zone=nowhere"
    )
    assert cluster.wait(default["id"])["status"] == "FINISHED"  # it could start: it did
    bad = request(
        cluster, "POST", JOBS, {"name": "x", "docker": {"image": "i"}, "queue_timeout": 0}
    )
    assert bad.status == 400 and bad.body["error"]["field"] == "queue_timeout"


# --- Idempotency-Key -------------------------------------------------------------------------


def test_a_submit_with_an_idempotency_key_makes_one_job_however_often_it_is_sent(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    body = {"name": "once", "docker": {"image": "img", "command": ["true"]}}
    key = {"Idempotency-Key": "pipeline-42-step-3"}
    first = request(cluster, "POST", JOBS, body, headers=key)
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    # the same body, written another way: the same request
    again = request(cluster, "POST", JOBS, json.dumps(body, indent=4), headers=key)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body["id"] == first.body["id"]
    other = request(cluster, "POST", JOBS, {**body, "name": "twice"}, headers=key)
    assert other.status == 422 and other.body["error"]["code"] == "idempotency_conflict"
    # a key is its token's: another token's same key is another request
    made = cluster.client.call("POST", "/api/v1/tokens", {"name": "ci", "role": "submit"})
    theirs = request(cluster, "POST", JOBS, body, headers=key, auth=f"Bearer {made['token']}")
    assert theirs.status == 201 and theirs.body["id"] != first.body["id"]
    bad = request(cluster, "POST", JOBS, body, headers={"Idempotency-Key": "x" * 256})
    assert bad.status == 400 and bad.body["error"]["field"] == "Idempotency-Key"
    assert len(cluster.client.jobs()["jobs"]) == 2


def test_requests_with_one_idempotency_key_at_once_make_one_job(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    body = {"name": "race", "docker": {"image": "img"}}
    answers: list[Any] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        answers.append(request(cluster, "POST", JOBS, body, headers={"Idempotency-Key": "k"}))

    senders = [threading.Thread(target=send) for _ in range(8)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(30)
    assert sorted(a.status for a in answers) == [200] * 7 + [201]
    assert len({a.body["id"] for a in answers}) == 1
    assert len(cluster.client.jobs()["jobs"]) == 1
