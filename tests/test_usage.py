"""The usage report: GET /api/v1/usage over real HTTP against a real coordinator, on both
stores, with jobs stored through the store's own operations at known times; `gpubox usage`
as a table and as CSV; the report's parts (the time parser, the percentiles, the weighting
of utilization) without I/O; and scripts/bench-usage on a few jobs."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gpubox import cli, errors, models, telemetry, usage, validate
from gpubox.coordinator import tokens
from gpubox.store import Store, open_store
from tests.conftest import Cluster
from tests.test_api import DEFAULT, JOBS, assert_error, request

USAGE = "/api/v1/usage"
# The jobs' times are seconds after BASE, a day ago (whole seconds: the windows below are
# exact RFC 3339 texts).
BASE = models.utcnow().replace(microsecond=0) - timedelta(days=1)
SINCE, UNTIL = BASE, BASE + timedelta(hours=3)  # the window the tests ask for
WINDOW = {"since": models.format_time(SINCE), "until": models.format_time(UNTIL)}


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


@dataclasses.dataclass(frozen=True)
class Made:
    """A job as the tests store it: when it was submitted, started and ended (seconds after
    BASE; None: never), how it ended (or QUEUED, RUNNING: not ended), and the utilization of
    each of its GPUs in its one telemetry point of 100 s."""

    submitter: str | None
    labels: dict[str, str]
    gpus: int
    created: float
    started: float | None
    ended: float | None
    status: str
    worker: str | None = None
    utils: tuple[float, ...] = ()


JOBS_MADE = (
    # alice: 2 GPUs × 3600 s and 1 GPU × 1800 s: 2.5 GPU-hours; waited 10 s and 30 s
    Made("alice", {"team": "vision", "env": "prod"}, 2, 0, 10, 3610, "FINISHED", "w1", (40, 60)),
    Made("alice", {"team": "vision"}, 1, 100, 130, 1930, "ERROR", "w2", (80,)),
    # bob: a job on no GPUs (0 GPU-hours), and one cancelled while queued (never ran)
    Made("bob", {}, 0, 200, 201, 261.5, "FINISHED", "w1"),
    Made("bob", {"team": "nlp"}, 4, 300, None, 400, "CANCELLED"),
    # a job stored before gpubox recorded submitters: 1 GPU × 7200.25 s
    Made(None, {}, 1, 500, 560, 7760.25, "FINISHED", "w2"),
    # carol: cancelled while it ran, 1 GPU × 300 s
    Made("carol", {"env": "dev"}, 1, 600, 610, 910, "CANCELLED", "w1"),
    # the window's edges: ended exactly at since (in), a microsecond before it and exactly at
    # until (both out)
    Made("dave", {}, 1, -200, -100, 0, "FINISHED", "w1"),
    Made("dave", {}, 1, -300, -200, -0.000001, "FINISHED", "w1"),
    Made("dave", {}, 1, 10500, 10700, 10800, "FINISHED", "w1"),
    # not ended: never counted
    Made("erin", {}, 1, 50, 60, None, "RUNNING", "w3"),
    Made("erin", {}, 1, 70, None, None, "QUEUED"),
)
GPU_S = {"alice": 9000, "bob": 0, None: 7200.25, "carol": 300, "dave": 100}
TOTAL_GPU_S = sum(GPU_S.values())  # 16,600.25


def store_job(store: Store, made: Made) -> models.Job:
    """Store one job through the store's operations, as the coordinator would."""
    body = {"name": "usage", "docker": {"image": "img"}, "gpus": made.gpus, "labels": made.labels}
    spec = dataclasses.replace(validate.parse_spec(body), submitter=made.submitter)
    job = store.create_job(spec, at(made.created))
    if made.status == "QUEUED":
        return job
    assert made.ended is not None or made.status == "RUNNING"
    if made.started is None:  # cancelled while queued
        return store.cancel_job(job.id, at(made.ended or 0))
    gpu_ids = [f"GPU-{job.id}-{i}" for i in range(made.gpus)]
    assert made.worker and store.claim_job(job.id, made.worker, gpu_ids, at(made.started))
    assert store.mark_started(job.id, 1, at(made.started))
    start = at(made.started).timestamp()
    points = [
        telemetry.Point(uuid, start, start + 100, 10, util, util, 1000, 80000)
        for uuid, util in zip(gpu_ids, made.utils, strict=False)
    ]
    if points:
        assert store.add_points(job.id, 1, 0, 0, points) == 0
    if made.status == "RUNNING":
        return job
    if made.status == "CANCELLED":
        store.cancel_job(job.id, at(made.ended or 0))  # the worker is asked to stop it
    code, error = {"FINISHED": (0, None), "ERROR": (3, "exit code 3")}.get(
        made.status, (143, "cancelled")
    )
    assert made.ended is not None
    status = models.Status(made.status)
    finish = store.finish_job(job.id, 1, status, code, error, None, at(made.ended), 0)
    assert finish.value == "applied"
    return store.get_job(job.id)


@pytest.fixture()
def filled(db_url: str, make_cluster: Callable[..., Cluster]) -> Cluster:
    """A coordinator (no workers) whose store holds JOBS_MADE, on each backend."""
    store = open_store(db_url)
    try:
        for made in JOBS_MADE:
            store_job(store, made)
    finally:
        store.close()
    return make_cluster(workers=0)


def get(cluster: Cluster, auth: Any = DEFAULT, **params: str) -> Any:
    """GET /api/v1/usage with these query parameters; `auth` as request() takes it."""
    path = f"{USAGE}?{urllib.parse.urlencode(params)}" if params else USAGE
    return request(cluster, "GET", path, auth=auth)


def report(cluster: Cluster, **params: str) -> dict[str, Any]:
    answer = get(cluster, **{**WINDOW, **params})
    assert answer.status == 200, answer.raw[:500]
    return answer.body  # type: ignore[no-any-return]


def jobs(finished: int = 0, error: int = 0, cancelled: int = 0) -> dict[str, int]:
    total = finished + error + cancelled
    return {"FINISHED": finished, "ERROR": error, "CANCELLED": cancelled, "total": total}


def figures(gpu_s: float, counts: dict[str, int], util: Any, p50: Any, p95: Any) -> Any:
    return {
        "gpu_hours": pytest.approx(gpu_s / 3600, rel=1e-12),
        "jobs": counts,
        "util_mean": util,
        "wait_p50_s": p50,
        "wait_p95_s": p95,
    }


# --- the store's read, on both stores ----------------------------------------------------------


def test_the_store_reads_the_jobs_that_ended_in_the_window_and_no_other(store: Store) -> None:
    made = [store_job(store, job) for job in JOBS_MADE]
    found = sorted(store.ended_jobs(SINCE, UNTIL), key=lambda job: job.created_at)
    assert [job.status for job in found] == [
        "FINISHED", "FINISHED", "ERROR", "FINISHED", "CANCELLED", "FINISHED", "CANCELLED",
    ]  # fmt: skip
    first = made[0]
    assert found[1] == usage.EndedJob(
        status="FINISHED",
        gpus=2,
        submitter="alice",
        worker="w1",
        labels={"team": "vision", "env": "prod"},
        created_at=first.created_at,
        executed_at=first.executed_at,
        finished_at=at(3610),
        util_mean=50.0,
        measured_gpu_s=200.0,
    )
    assert found[0].finished_at == SINCE  # the edge: since is in the window
    queued_then_cancelled = found[4]
    assert (queued_then_cancelled.executed_at, queued_then_cancelled.worker) == (None, None)
    assert list(store.ended_jobs(UNTIL, UNTIL + timedelta(days=1)))[0].finished_at == UNTIL


# --- the report over HTTP, on both stores ------------------------------------------------------


def test_by_submitter_gives_exact_figures_per_submitter_and_in_total(filled: Cluster) -> None:
    body = report(filled)
    assert (body["since"], body["until"], body["by"]) == (*WINDOW.values(), "submitter")
    groups = {group.pop("key"): group for group in body["groups"]}
    # by GPU-hours; erin's jobs have not ended
    assert list(groups) == ["alice", "(not recorded)", "carol", "dave", "bob"]
    # alice's utilization: 50 % on 200 GPU-seconds, 80 % on 100: 60 %; waits 10 s and 30 s
    assert groups["alice"] == figures(9000, jobs(1, 1), 60.0, 20.0, 29.0)
    assert groups["(not recorded)"] == figures(7200.25, jobs(1), None, 60.0, 60.0)
    assert groups["carol"] == figures(300, jobs(cancelled=1), None, 10.0, 10.0)
    assert groups["dave"] == figures(100, jobs(1), None, 100.0, 100.0)
    # bob's queued-then-cancelled job has no wait: his only wait is the 1 s of the other
    assert groups["bob"] == figures(0, jobs(1, cancelled=1), None, 1.0, 1.0)
    # waits of the six jobs that started: 1, 10, 10, 30, 60, 100 s
    assert body["total"] == figures(TOTAL_GPU_S, jobs(4, 1, 2), 60.0, 20.0, 90.0)


def test_gpu_hours_are_the_sum_of_each_jobs_duration_times_its_gpus(filled: Cluster) -> None:
    listed = request(filled, "GET", f"{JOBS}?limit=1000").body["jobs"]
    since, until = WINDOW["since"], WINDOW["until"]
    ended = [
        j
        for j in listed
        if j["result"]["finished_at"] and since <= j["result"]["finished_at"] < until
    ]
    assert len(ended) == 7
    gpu_s = math.fsum(j["gpus"] * (j["result"]["duration"] or 0) for j in ended)
    assert report(filled)["total"]["gpu_hours"] == pytest.approx(gpu_s / 3600, rel=1e-12)


def test_by_label_counts_a_job_under_each_of_its_labels_and_the_total_once(
    filled: Cluster,
) -> None:
    body = report(filled, by="label")
    groups = {group["key"]: group for group in body["groups"]}
    assert list(groups) == ["team=vision", "(no labels)", "env=prod", "env=dev", "team=nlp"]
    assert groups["team=vision"]["jobs"] == jobs(1, 1)
    assert groups["team=vision"]["gpu_hours"] == pytest.approx(2.5)
    assert groups["env=prod"]["gpu_hours"] == pytest.approx(2.0)  # the same job as above
    assert groups["env=prod"]["util_mean"] == 50.0
    assert groups["(no labels)"]["jobs"] == jobs(3)
    assert groups["(no labels)"]["gpu_hours"] == pytest.approx((7200.25 + 100) / 3600)
    assert groups["team=nlp"]["jobs"] == jobs(cancelled=1)
    # The groups add up to more than the total: the first job is in two of them.
    assert sum(g["jobs"]["total"] for g in groups.values()) == 8
    assert body["total"]["jobs"] == jobs(4, 1, 2)
    assert body["total"]["gpu_hours"] == pytest.approx(TOTAL_GPU_S / 3600)


def test_by_worker_puts_jobs_that_never_ran_in_a_group_of_their_own(filled: Cluster) -> None:
    groups = {g["key"]: g for g in report(filled, by="worker")["groups"]}
    assert list(groups) == ["w2", "w1", "(never ran)"]
    assert groups["w2"]["gpu_hours"] == pytest.approx((1800 + 7200.25) / 3600)
    assert groups["w1"]["gpu_hours"] == pytest.approx((7200 + 300 + 100) / 3600)
    assert groups["w1"]["jobs"] == jobs(3, cancelled=1)
    assert groups["(never ran)"] == {
        "key": "(never ran)",
        **figures(0, jobs(cancelled=1), None, None, None),
    }


def test_the_window_takes_relative_ages_and_defaults_to_the_last_seven_days(
    filled: Cluster,
) -> None:
    # From 2 days ago to 12 hours ago: every job above that ended, the edge jobs too.
    body = report(filled, since="2d", until="12h")
    since, until = models.parse_time(body["since"]), models.parse_time(body["until"])
    assert since and until and until - since == timedelta(days=1, hours=12)
    assert abs(models.utcnow() - timedelta(days=2) - since) < timedelta(seconds=30)
    assert body["total"]["jobs"] == jobs(6, 1, 2)
    default = get(filled).body
    since, until = models.parse_time(default["since"]), models.parse_time(default["until"])
    assert since and until and until - since == timedelta(days=7)
    assert default["by"] == "submitter"
    # an empty window, and one that ends before any job did
    empty = report(filled, since=WINDOW["since"], until=WINDOW["since"])
    assert empty["groups"] == []
    assert empty["total"] == figures(0, jobs(), None, None, None)


def test_any_valid_token_may_read_it_and_none_may_not(filled: Cluster) -> None:
    store = filled.coordinator.store
    assert store is not None
    viewer = tokens.create(store, "viewer", "view")
    answer = get(filled, auth=f"Bearer {viewer}", **WINDOW)
    assert answer.status == 200 and answer.body["total"]["jobs"]["total"] == 7
    assert_error(get(filled, auth=None, **WINDOW), 401, "unauthorized")


BAD = [
    ("by=team", "by"),
    ("by=Submitter", "by"),
    ("since=7x", "since"),
    ("since=12", "since"),  # a number needs its unit
    ("since=-7d", "since"),
    ("since=2026-12-01T00:00:00", "since"),  # no time zone
    ("until=yesterday", "until"),
    ("until=99999999w", "until"),  # before the first year there is
    ("since=1d&until=2d", "since"),  # since after until
    ("since=1d&since=2d", "since"),
    ("since=%ff", "since"),
    ("label=a%3Db", "label"),
]


def test_bad_input_is_400_naming_the_parameter(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=0)
    answers = {query: request(cluster, "GET", f"{USAGE}?{query}") for query, _ in BAD}
    said = {query: (a.status, a.body["error"].get("field")) for query, a in answers.items()}
    assert said == {query: (400, field) for query, field in BAD}
    for answer in answers.values():
        assert_error(answer, 400, "bad_input")
    assert "is after until" in answers["since=1d&until=2d"].body["error"]["message"]


# --- gpubox usage ------------------------------------------------------------------------------


def run_usage(cluster: Cluster, *args: str) -> Any:
    flags = ["--url", cluster.url, "--token", cluster.token]
    return CliRunner().invoke(cli.main, ["usage", *flags, *args])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_writes_csv_with_raw_numbers_and_a_total_row(filled: Cluster) -> None:
    done = run_usage(
        filled, "--since", WINDOW["since"], "--until", WINDOW["until"], "--by", "label", "--csv"
    )
    assert done.exit_code == 0, done.output
    rows = list(csv.reader(io.StringIO(done.output)))
    assert rows[0] == [
        "label",
        "gpu_hours",
        "jobs",
        "finished",
        "error",
        "cancelled",
        "util_mean",
        "wait_p50_s",
        "wait_p95_s",
    ]
    assert [row[0] for row in rows[1:]] == [
        "team=vision",
        "(no labels)",
        "env=prod",
        "env=dev",
        "team=nlp",
        "(total)",
    ]
    assert rows[1] == ["team=vision", "2.5", "2", "1", "1", "0", "60.0", "20.0", "29.0"]
    assert rows[5] == ["team=nlp", "0.0", "1", "0", "0", "1", "", "", ""]
    assert float(rows[6][1]) == pytest.approx(TOTAL_GPU_S / 3600, rel=1e-12)
    assert rows[6][2:] == ["7", "4", "1", "2", "60.0", "20.0", "90.0"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_prints_a_table_with_a_total_line(filled: Cluster) -> None:
    done = run_usage(filled, "--since", WINDOW["since"], "--until", WINDOW["until"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert lines[0] == f"Jobs that ended from {WINDOW['since']} to {WINDOW['until']}:"
    assert lines[1].split() == [
        "SUBMITTER", "GPU-HOURS", "JOBS", "FINISHED", "ERROR", "CANCELLED", "UTIL", "%",
        "WAIT", "P50", "WAIT", "P95",
    ]  # fmt: skip
    assert lines[2].split() == ["alice", "2.50", "2", "1", "1", "0", "60.0", "20.0s", "29.0s"]
    assert lines[3].split() == [
        "(not",
        "recorded)",
        "2.00",
        "1",
        "1",
        "0",
        "0",
        "-",
        "1m00s",
        "1m00s",
    ]
    assert lines[-1].split() == ["TOTAL", "4.61", "7", "4", "1", "2", "60.0", "20.0s", "1m30s"]
    # the columns line up: each header ends where its numbers end
    assert len({len(line) for line in lines[1:]}) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_refuses_a_bad_time_before_asking(filled: Cluster) -> None:
    done = run_usage(filled, "--since", "7 days")
    assert done.exit_code == 2
    assert "Invalid value for '--since': '7 days' is not a relative age" in done.output
    refused = run_usage(filled, "--since", "1d", "--until", "2d")  # the coordinator's 400
    assert refused.exit_code != 0 and "is after until" in refused.output


def test_a_csv_key_that_a_spreadsheet_would_run_as_a_formula_is_made_text() -> None:
    from gpubox.cli import usage as usage_cli

    assert usage_cli.spreadsheet_safe("=HYPERLINK(1)=x") == "'=HYPERLINK(1)=x"
    assert usage_cli.spreadsheet_safe("@team=a") == "'@team=a"
    assert usage_cli.spreadsheet_safe("team=vision") == "team=vision"


# --- the parts, without I/O --------------------------------------------------------------------

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("7d", datetime(2026, 11, 29, 12, 0, tzinfo=UTC)),
        ("12h", datetime(2026, 12, 6, 0, 0, tzinfo=UTC)),
        ("30m", datetime(2026, 12, 6, 11, 30, tzinfo=UTC)),
        ("90s", datetime(2026, 12, 6, 11, 58, 30, tzinfo=UTC)),
        ("2w", datetime(2026, 11, 22, 12, 0, tzinfo=UTC)),
        ("1.5h", datetime(2026, 12, 6, 10, 30, tzinfo=UTC)),
        ("0d", NOW),
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, 0, tzinfo=UTC)),
        ("2026-12-01t10:00:00z", datetime(2026, 12, 1, 10, 0, tzinfo=UTC)),
        ("2026-12-01T10:00:00.25+02:00", datetime(2026, 12, 1, 8, 0, 0, 250000, tzinfo=UTC)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_parse_when_reads_ages_times_and_dates(text: str, when: datetime) -> None:
    assert usage.parse_when(text, "since", NOW) == when


@pytest.mark.parametrize(
    "text", ["", "7", "7x", "d", "7 d", "-1d", "1e3d", "2026-12-01T10:00", "2026-13-01", "now"]
)
def test_parse_when_refuses_anything_else_naming_the_parameter(text: str) -> None:
    with pytest.raises(errors.BadInput) as refused:
        usage.parse_when(text, "until", NOW)
    assert refused.value.field == "until"


def ended(wait_s: float, **fields: Any) -> usage.EndedJob:
    """A job that waited `wait_s` and then ran 60 s on 1 GPU; `fields` change any of it."""
    values: dict[str, Any] = {
        "status": "FINISHED",
        "gpus": 1,
        "submitter": "s",
        "worker": "w",
        "labels": {},
        "created_at": NOW,
        "executed_at": NOW + timedelta(seconds=wait_s),
        "finished_at": NOW + timedelta(seconds=wait_s + 60),
        "util_mean": None,
        "measured_gpu_s": None,
    }
    return usage.EndedJob(**{**values, **fields})


def test_percentiles_are_linear_between_the_nearest_ranks() -> None:
    made = usage.report([ended(float(s)) for s in range(20, 0, -1)], NOW, NOW, "submitter")
    assert (made["total"]["wait_p50_s"], made["total"]["wait_p95_s"]) == (10.5, 19.05)
    single = usage.report([ended(7.0)], NOW, NOW, "worker")["total"]
    assert (single["wait_p50_s"], single["wait_p95_s"]) == (7.0, 7.0)


def test_utilization_is_weighted_by_the_gpu_seconds_telemetry_measured() -> None:
    jobs_ = [
        ended(1, util_mean=90.0, measured_gpu_s=100.0),
        ended(1, util_mean=10.0, measured_gpu_s=300.0),
        ended(1),  # no telemetry: not in the mean
    ]
    assert usage.report(jobs_, NOW, NOW, "submitter")["total"]["util_mean"] == 30.0
    # telemetry that measured no time at all: the plain mean
    flat = [ended(1, util_mean=u, measured_gpu_s=0.0) for u in (20.0, 50.0)]
    assert usage.report(flat, NOW, NOW, "submitter")["total"]["util_mean"] == 35.0


def test_gpu_hours_use_the_durations_rounded_as_result_duration_is() -> None:
    # 0.0005 s rounds up to 0.001 s as result.duration (round(…, 3)), on 3 GPUs: 3 ms.
    quick = ended(0, finished_at=NOW + timedelta(microseconds=500), gpus=3)
    job = models.Job(1, models.JobSpec("n", "i"), models.Status.FINISHED, NOW, NOW,
                     executed_at=quick.executed_at, finished_at=quick.finished_at)  # fmt: skip
    assert job.duration == 0.001
    assert usage.report([quick], NOW, NOW, "submitter")["total"]["gpu_hours"] == 0.003 / 3600


def test_groups_are_sorted_by_gpu_hours_then_by_key() -> None:
    made = [ended(0, submitter=name, gpus=gpus) for name, gpus in (("b", 1), ("a", 1), ("c", 2))]
    made.append(ended(0, submitter=None, gpus=0))
    keys = [g["key"] for g in usage.report(made, NOW, NOW, "submitter")["groups"]]
    assert keys == ["c", "a", "b", "(not recorded)"]


# --- the benchmark -----------------------------------------------------------------------------


def test_the_benchmark_runs_through_on_a_few_jobs() -> None:
    # Its figures are printed, never asserted: it only has to keep working.
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench-usage"
    done = subprocess.run(
        [sys.executable, str(script), "--jobs", "300", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "GPUBOX_BENCH_PG"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[1].startswith("sqlite      fill: 300 ended jobs")
    assert sum("30d, by label: " in line and "7 groups" in line for line in lines) == 1


# --- through the whole system --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_totals_of_jobs_run_by_workers_are_their_durations_times_gpus(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Jobs run by process-runtime workers on made-up GPUs, as they come: the report's
    GPU-hours equal Σ duration × GPUs of the jobs as the API shows them, within 1 %, and
    the jobs by status add up."""
    cluster = make_cluster(workers=0)
    for name in ("u1", "u2"):
        cluster.add_worker(name=name, runtime="process", fake_gpus="3", max_jobs=4)
    made = []
    for index, (gpus, seconds) in enumerate([(1, 0.4), (2, 0.8), (0, 0.3), (3, 0.6)] * 3):
        made.append(cluster.submit("-", ["sleep", str(seconds)], name=f"u{index}", gpus=gpus))
    failing = cluster.submit("-", ["sh", "-c", "sleep 0.2; exit 3"], gpus=1)
    ended = [cluster.wait(job["id"]) for job in [*made, failing]]
    assert [job["status"] for job in ended].count("FINISHED") == len(made)
    expected = sum(job["result"]["duration"] * job["gpus"] for job in ended) / 3600
    report = cluster.client.call("GET", USAGE, since="1h", by="worker")
    assert report["total"]["gpu_hours"] == pytest.approx(expected, rel=0.01)
    assert report["total"]["jobs"]["total"] == len(ended)
    by_worker = {group["key"]: group for group in report["groups"]}
    assert set(by_worker) == {"u1", "u2"}
    assert sum(g["gpu_hours"] for g in by_worker.values()) == pytest.approx(expected, rel=0.01)
    assert report["total"]["wait_p95_s"] >= report["total"]["wait_p50_s"] >= 0
