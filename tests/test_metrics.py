"""GET /metrics: Prometheus text, with a token, from a real coordinator and worker."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import Cluster, wait_until

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape(cluster: Cluster, token: str | None = None) -> tuple[str, dict[str, float]]:
    """The page's content type and its samples by name{labels}."""
    request = urllib.request.Request(
        f"{cluster.url}/metrics", headers={"Authorization": f"Bearer {token or cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        kind = response.headers["Content-Type"]
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) gpubox_[a-z_]+ ", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return kind, samples


def test_metrics_need_a_token(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = make_cluster(workers=0)
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape(cluster, token="not-a-token")
    assert info.value.code == 401


def test_metrics_follow_jobs_workers_gpus_and_lines(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = make_cluster(workers=0)
    kind, before = scrape(cluster)
    scraped = time.monotonic()
    assert kind.startswith("text/plain; version=0.0.4")
    assert before["gpubox_workers_connected"] == 0
    assert before['gpubox_jobs{status="QUEUED"}'] == 0
    assert before["gpubox_oldest_queued_job_wait_seconds"] == 0

    waiting = cluster.submit("none", ["true"], gpus=1)  # no worker yet: it waits
    cluster.add_worker(runtime="process", fake_gpus="4", name="metrics-w")
    done = cluster.wait(waiting["id"])
    assert done["status"] == "FINISHED"
    holder = cluster.submit("none", ["sh", "-c", "seq 1 250; sleep 300"], gpus=1)
    wait_until(lambda: len(cluster.lines(holder["id"])) == 250, 30, "its lines")
    queued = cluster.submit("none", ["true"], gpus=5)  # more GPUs than any worker has

    def now() -> dict[str, float]:
        return scrape(cluster)[1]

    wait_until(lambda: now()['gpubox_gpus{state="busy"}'] == 1, 10, "the busy GPU counted")
    page = now()
    assert page['gpubox_gpus{state="free"}'] == 3
    assert page["gpubox_workers_connected"] == 1
    assert page['gpubox_jobs{status="RUNNING"}'] == 1
    assert page['gpubox_jobs{status="FINISHED"}'] == 1
    assert page['gpubox_jobs{status="QUEUED"}'] == 1
    assert page["gpubox_oldest_queued_job_wait_seconds"] > 0
    assert page["gpubox_log_lines_stored_total"] == 250
    assert page["gpubox_jobs_dispatched_total"] == 2
    assert page["gpubox_dispatch_latency_seconds_count"] == 2
    assert page['gpubox_dispatch_latency_seconds_bucket{le="+Inf"}'] == 2
    assert 0 < page["gpubox_dispatch_latency_seconds_sum"] < 10
    # The broker worked (two jobs, 250 lines, heartbeats), waiting for work most of the
    # while (a poll's wait is not work); its CPU was spent inside that work.
    # (Over at least a second: in a shorter window, a loaded machine stretches the work
    # itself past half of it.)
    time.sleep(max(0.0, scraped + 1.0 - time.monotonic()))
    page = now()
    busy = page["gpubox_broker_busy_seconds_total"] - before["gpubox_broker_busy_seconds_total"]
    assert 0 < busy < (time.monotonic() - scraped) / 2
    cpu = page["gpubox_broker_cpu_seconds_total"]
    assert 0 < cpu <= page["gpubox_broker_busy_seconds_total"] + 0.01
    # Each GPU's gauges name the job holding it ("" for none): the holder's one GPU.
    held = cluster.client.job(holder["id"])["result"]["gpus"][0]
    for index in range(4):
        uuid = f"GPU-fake-metrics-w-{index:04d}"
        job = holder["id"] if uuid == held else ""
        labels = f'{{worker="metrics-w",uuid="{uuid}",job="{job}"}}'
        assert page[f"gpubox_gpu_utilization_ratio{labels}"] == 0  # made-up GPUs: idle
        assert page[f"gpubox_gpu_memory_used_bytes{labels}"] == 0
    cluster.client.cancel(holder["id"])
    cluster.client.cancel(queued["id"])
    cluster.wait(holder["id"])
    wait_until(lambda: now()['gpubox_gpus{state="busy"}'] == 0, 10, "the GPU free again")


def test_metrics_count_scheduling_rounds(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """gpubox_schedule_round_seconds counts the rounds that plan: with no worker, the timer's
    one a second."""
    cluster: Cluster = make_cluster(workers=0)
    name = "gpubox_schedule_round_seconds"
    first = scrape(cluster)[1][f"{name}_count"]
    page = wait_until(
        lambda: (now := scrape(cluster)[1])[f"{name}_count"] >= first + 2 and now,
        10,
        "two more timer rounds",
    )
    buckets = sorted(
        (float(key.split('"')[1]), value)
        for key, value in page.items()
        if key.startswith(f"{name}_bucket")
    )
    assert [bound for bound, _ in buckets][:2] == [0.0005, 0.001]
    assert buckets[-1] == (float("inf"), page[f"{name}_count"])
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative
    # Each a round of an empty queue: well under a second, and longer than nothing.
    assert 0 < page[f"{name}_sum"] < page[f"{name}_count"]
    # The decision of each round is timed too (before its round ends: never fewer of them).
    decisions = "gpubox_schedule_decision_seconds"
    assert page[f"{decisions}_count"] >= page[f"{name}_count"]
    assert 0 < page[f"{decisions}_sum"] < page[f"{decisions}_count"]
