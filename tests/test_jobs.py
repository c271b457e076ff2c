"""End to end: jobs submitted over HTTP run as real containers on a real worker."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.docker]


def test_stdout_and_stderr_lines_stored_in_order_and_job_finishes(cluster: Cluster, image: str):
    script = "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; sleep 0.2; echo four >&2"
    job = cluster.submit(image, ["sh", "-c", script])
    assert job["status"] == "QUEUED"
    done = cluster.wait(job["id"])
    assert done["status"] == "FINISHED"
    result = done["result"]
    assert result["exit_code"] == 0 and result["error"] is None
    assert result["executed_at"] and result["finished_at"]
    assert result["duration"] is not None and 0.5 < result["duration"] < 30
    assert done["worker"] == "worker-1" and done["attempts"] == 1
    lines = cluster.lines(job["id"])
    assert [(r["stream"], r["line"]) for r in lines] == [
        ("stdout", "one"),
        ("stderr", "two"),
        ("stdout", "three"),
        ("stderr", "four"),
    ]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4]
    assert all(r["ts"].endswith("Z") for r in lines)


def test_a_docker_job_records_the_image_it_ran(cluster: Cluster, image: str, docker_client):
    job = cluster.submit(image, ["true"])
    done = cluster.wait(job["id"])
    assert done["status"] == "FINISHED"
    # The ID the engine gives the image now; this image was imported here, never pulled from
    # a registry, so it has no repo digest.
    engine = docker_client.images.get(image)
    assert done["result"]["image_id"] == engine.id and engine.id.startswith("sha256:")
    assert engine.attrs.get("RepoDigests") in ([], None)
    assert done["result"]["image_digest"] is None
    shown = cluster.client.job(job["id"])["result"]
    assert (shown["image_id"], shown["image_digest"]) == (engine.id, None)


def test_non_zero_exit_is_error_with_exit_code(cluster: Cluster, image: str):
    job = cluster.submit(image, ["sh", "-c", "echo bye; exit 3"])
    done = cluster.wait(job["id"])
    assert done["status"] == "ERROR"
    assert done["result"]["exit_code"] == 3
    assert "3" in done["result"]["error"]


def test_missing_image_is_error_naming_the_image(cluster: Cluster):
    job = cluster.submit("gpubox-test/does-not-exist:1.0", ["true"])
    done = cluster.wait(job["id"])
    assert done["status"] == "ERROR"
    assert done["result"]["error"].startswith(
        "could not pull image 'gpubox-test/does-not-exist:1.0'"
    )
    assert done["result"]["exit_code"] is None


def test_env_and_list_command_reach_the_container_and_metadata_round_trips(
    cluster: Cluster, image: str
):
    metadata = {"commit": "abc123", "nested": {"list": [1, 2.5, None, True], "s": "ü"}}
    job = cluster.submit(
        image,
        ["sh", "-c", 'echo "$GREETING, $WHO"', "ignored-arg0"],
        docker={"env": {"GREETING": "hello there", "WHO": "gpu's friend"}},
        metadata=metadata,
    )
    done = cluster.wait(job["id"])
    assert done["status"] == "FINISHED"
    assert [r["line"] for r in cluster.lines(job["id"])] == ["hello there, gpu's friend"]
    assert done["metadata"] == metadata
    assert done["docker"]["command"] == ["sh", "-c", 'echo "$GREETING, $WHO"', "ignored-arg0"]


def test_string_command_is_split_like_a_shell(cluster: Cluster, image: str):
    job = cluster.submit(image, "echo 'two words' three")
    done = cluster.wait(job["id"])
    assert done["docker"]["command"] == ["echo", "two words", "three"]
    assert [r["line"] for r in cluster.lines(job["id"])] == ["two words three"]


@pytest.mark.slow
def test_twenty_thousand_lines_all_stored_once_in_order(cluster: Cluster, image: str):
    job = cluster.submit(image, ["seq", "1", "20000"])
    done = cluster.wait(job["id"], timeout_s=120)
    assert done["status"] == "FINISHED"
    lines = cluster.lines(job["id"])
    assert [r["line"] for r in lines] == [str(i) for i in range(1, 20001)]
    assert [r["seq"] for r in lines] == list(range(1, 20001))
    assert done["log_lines"] == 20000


def test_last_line_without_newline_and_long_lines_are_kept(cluster: Cluster, image: str):
    # 100 KiB line: Docker cuts it into 16 KiB pieces, gpubox joins them and stores 64 KiB pieces.
    script = "head -c 102400 /dev/zero | tr '\\0' x; echo; printf 'no newline at the end'"
    job = cluster.submit(image, ["sh", "-c", script])
    assert cluster.wait(job["id"])["status"] == "FINISHED"
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert lines[:2] == ["x" * 65536, "x" * (102400 - 65536)]
    assert lines[2:] == ["no newline at the end"]


def test_cancel_queued_job(make_cluster, image: str):
    cluster = make_cluster(workers=0)
    job = cluster.submit(image, ["true"])
    cancelled = cluster.client.cancel(job["id"])
    assert cancelled["status"] == "CANCELLED"
    cluster.add_worker()
    assert cluster.client.job(job["id"])["status"] == "CANCELLED"
    assert cluster.client.job(job["id"])["attempts"] == 0


def test_cancel_running_sleep_stops_container_quickly(cluster: Cluster, image: str, docker_client):
    job = cluster.submit(image, ["sleep", "300"])
    running = cluster.wait(job["id"], ("RUNNING",))
    wait_until(lambda: cluster.client.job(job["id"])["result"]["executed_at"], 20, "the start")
    answer = cluster.client.cancel(running["id"])
    assert answer["cancel_requested"] is True
    done = cluster.wait(job["id"], timeout_s=15)
    assert done["status"] == "CANCELLED"
    label = f"io.gpubox.job={job['id']}"
    wait_until(  # removed once its DONE is acknowledged
        lambda: docker_client.api.containers(all=True, filters={"label": label}) == [],
        10,
        "the container removed",
    )


def test_timeout_ends_job_with_error_timeout(cluster: Cluster, image: str):
    job = cluster.submit(image, ["sleep", "300"], timeout=1)
    done = cluster.wait(job["id"], timeout_s=20)
    assert done["status"] == "ERROR"
    assert done["result"]["error"] == "timeout"


def test_higher_priority_runs_first_on_a_busy_worker(make_cluster, image: str):
    cluster = make_cluster(workers=0)
    blocker = cluster.submit(image, ["sleep", "1"], name="blocker")
    low = cluster.submit(image, ["true"], name="low", priority=0)
    high = cluster.submit(image, ["true"], name="high", priority=10)
    cluster.add_worker(max_jobs=1)
    for job in (blocker, low, high):
        assert cluster.wait(job["id"])["status"] == "FINISHED"
    started = {j["name"]: cluster.client.job(j["id"])["result"]["executed_at"] for j in (low, high)}
    assert started["high"] < started["low"]


def test_a_worker_runs_several_jobs_at_once(make_cluster, image: str):
    cluster = make_cluster(worker_settings={"max_jobs": 3})
    jobs = [cluster.submit(image, ["sleep", "2"]) for _ in range(3)]
    wait_until(
        lambda: all(cluster.client.job(j["id"])["result"]["executed_at"] for j in jobs),
        20,
        "all three to start",
    )
    assert all(cluster.client.job(j["id"])["status"] == "RUNNING" for j in jobs)
    for job in jobs:
        assert cluster.wait(job["id"])["status"] == "FINISHED"


def test_worker_stderr_gets_every_line_tagged_with_job_and_container(cluster: Cluster, image: str):
    job = cluster.submit(image, ["sh", "-c", "echo to-out; echo to-err >&2"])
    cluster.wait(job["id"])
    agent, _ = cluster.agents[0]
    tee = agent.runtime.tee.getvalue()  # type: ignore[attr-defined]
    tagged = [line for line in tee.splitlines() if line.startswith(f"job={job['id']} ")]
    assert len(tagged) == 2
    for line in tagged:
        assert line.split()[1].startswith("container=") and len(line.split()[1]) > 12
    assert any(line.endswith("stdout: to-out") for line in tagged)
    assert any(line.endswith("stderr: to-err") for line in tagged)
