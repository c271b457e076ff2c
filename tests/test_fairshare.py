"""Fair share and caps per token (issue 24) through the real parts: a coordinator, its HTTP
API, and process-runtime workers with made-up GPUs, on SQLite and PostgreSQL.

The jobs are host processes: `sleep`, `true`, or a gated job, which runs until the test
removes its gate file, so that the test decides when GPUs free up. On a worker with one GPU
the jobs start strictly one after another, so their start times (result.executed_at) give
the scheduler's order exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gpubox import exits, models
from gpubox.client import ApiError, Client
from gpubox.coordinator import fairshare
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NO_IMAGE = "ignored-by-the-process-runtime"
GPUBOX = [sys.executable, "-m", "gpubox"]


# --- helpers ----------------------------------------------------------------------------------


def gpu_cluster(
    make_cluster: Callable[..., Cluster], workers: int, gpus: int, **settings: Any
) -> Cluster:
    """A coordinator with `workers` process-runtime workers of `gpus` made-up GPUs each."""
    return make_cluster(
        workers=workers,
        worker_settings={"runtime": "process", "fake_gpus": str(gpus), "max_jobs": max(4, gpus)},
        **settings,
    )


def make_token(cluster: Cluster, name: str, **caps: int | None) -> Client:
    """A client holding a new submit token NAME, made through the API; its jobs may use
    process workers, and `caps` (max_gpus, max_running, max_queued) limit them."""
    made = cluster.client.call(
        "POST", "/api/v1/tokens", {"name": name, "allow_process": True, **caps}
    )
    assert {cap: made[cap] for cap in caps} == caps
    return Client(cluster.url, made["token"])


def spec(command: list[str], gpus: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "name": fields.pop("name", command[0]),
        "gpus": gpus,
        "docker": {"image": NO_IMAGE, "command": command},
        **fields,
    }


def submit_many(
    client: Client, specs: list[dict[str, Any]], threads: int = 4
) -> list[dict[str, Any]]:
    """Submit these jobs from a few threads at once; the jobs as stored, by id."""
    with ThreadPoolExecutor(threads) as pool:
        jobs = list(pool.map(lambda one: client.submit(one, retry_for_s=0), specs))
    return sorted(jobs, key=lambda job: job["id"])


def started(job: dict[str, Any]) -> datetime | None:
    return models.parse_time(job["result"]["executed_at"])


def created(job: dict[str, Any]) -> datetime:
    when = models.parse_time(job["created_at"])
    assert when is not None
    return when


def all_jobs(cluster: Cluster, submitter: str | None = None) -> list[dict[str, Any]]:
    """Every job (at most 1,000), by id."""
    found = cluster.client.jobs(limit=1000, submitter=submitter)["jobs"]
    return sorted(found, key=lambda job: job["id"])


def fresh(cluster: Cluster, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """These jobs as they are now."""
    return [cluster.client.job(job["id"]) for job in jobs]


def wait_started(cluster: Cluster, job: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
    """The job once its worker said it started."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: started(now := cluster.client.job(job["id"])) and now,
        timeout_s,
        f"job {job['id']} to start",
    )


def start_order(cluster: Cluster, jobs: list[dict[str, Any]]) -> list[str]:
    """The jobs' names in the order they started, once every one has ended."""
    ended = [cluster.wait(job["id"], timeout_s=30) for job in jobs]
    assert {job["status"] for job in ended} == {"FINISHED"}, ended
    return [job["name"] for job in sorted(ended, key=lambda job: started(job) or 0)]


class Gates:
    """Gate files in a folder any user may read: a gated job runs until its gate is gone
    (a job runs as nobody under a root worker, so the folder is not in tmp_path, whose
    parents only root may enter). Removing the folder at the end opens every gate."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="gpubox-gates-"))
        self.folder.chmod(0o755)

    def command(self, name: str) -> list[str]:
        """A command that runs until gate `name` opens (the gate is closed from now)."""
        gate = self.folder / name
        gate.touch()
        return ["sh", "-c", f"while [ -e {gate} ]; do sleep 0.05; done"]

    def open(self, name: str) -> None:
        (self.folder / name).unlink()


@pytest.fixture()
def gates(make_cluster: Callable[..., Cluster]) -> Iterator[Gates]:
    """Gates for jobs, opened before the cluster stops (this fixture is set up after it)."""
    made = Gates()
    yield made
    shutil.rmtree(made.folder)


class Sampler:
    """Reads the running jobs (GET /api/v1/jobs?status=RUNNING) every `every_s` in a thread
    of its own, and keeps what each submitter's jobs held at each read, with the caps the
    test said were in force (`limits`: submitter → (max_running, max_gpus))."""

    def __init__(self, client: Client, every_s: float = 0.05) -> None:
        self.client = client
        self.every_s = every_s
        self.limits: dict[str, tuple[int | None, int | None]] = {}
        # each read: submitter → (jobs, GPUs), and the limits then
        self.samples: list[tuple[dict[str, tuple[int, int]], dict]] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every_s):
                limits = dict(self.limits)  # before the read: a cap is raised before PATCH
                held: dict[str, tuple[int, int]] = {}
                for job in self.client.jobs("RUNNING", limit=1000)["jobs"]:
                    jobs, gpus = held.get(job["submitter"], (0, 0))
                    held[job["submitter"]] = (jobs + 1, gpus + job["gpus"])
                self.samples.append((held, limits))
        except BaseException as exc:  # raised again in the test's thread (over_caps)
            self.failure = exc

    def over_caps(self) -> list[str]:
        """Every read at which a submitter's jobs held more than its caps, in words."""
        if self.failure is not None:
            raise self.failure
        over = []
        for index, (held, limits) in enumerate(self.samples):
            for who, (max_running, max_gpus) in limits.items():
                jobs, gpus = held.get(who, (0, 0))
                if (max_running is not None and jobs > max_running) or (
                    max_gpus is not None and gpus > max_gpus
                ):
                    over.append(f"read {index}: {who} ran {jobs} jobs on {gpus} GPUs")
        return over

    def most(self, who: str) -> int:
        """The most GPUs `who`'s jobs held at one read."""
        return max((held.get(who, (0, 0))[1] for held, _ in self.samples), default=0)


# --- 1: a light user's jobs start at the next turnover, not behind a heavy user's flood -----


def test_a_light_users_jobs_start_within_one_turnover_of_a_flood(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Alice queues 300 one-GPU jobs of 0.5 s on 4 GPUs (2 workers of 2); once 30 of hers
    have ended, Bob queues 10 at once. In submission order Bob's first would wait behind
    the ~260 of hers still queued (about 30 s); with fair share his jobs go first, as he has
    used nothing and she has used 15 GPU-seconds or more (his 10 jobs use 5 at most, so he
    stays the lighter one until his last has started).

    The bound: at most 4 (one per GPU) of Alice's jobs start after Bob's first is queued and
    before his last starts. When his first is queued, the jobs of hers that were already sent
    to a worker but had not started yet (at most one per GPU, and in practice none: a start
    takes milliseconds) start after it; after that, no job of hers is sent while one of his
    waits. (A job of hers sent just after his last may also start a moment before it, on the
    other worker.) Measured: 0 or 1 of hers start in between, and his last starts about
    1.2 s after his first is queued. So the issue's bound, that all of Bob's start before
    the 40th of her jobs not started when his first was queued, holds with room to spare."""
    cluster = gpu_cluster(make_cluster, workers=2, gpus=2)
    total_gpus = 4
    alice, bob = make_token(cluster, "alice"), make_token(cluster, "bob")
    flood = submit_many(alice, [spec(["sleep", "0.5"], name=f"a{i}") for i in range(300)])
    assert [job["submitter"] for job in flood] == ["alice"] * 300
    wait_until(
        lambda: len(alice.jobs("FINISHED", limit=1000, submitter="alice")["jobs"]) >= 30,
        60,
        "30 of Alice's jobs to end",
    )
    light = submit_many(bob, [spec(["sleep", "0.5"], name=f"b{i}") for i in range(10)], threads=10)
    light = [wait_started(cluster, job) for job in light]

    first_queued = min(created(job) for job in light)
    last_started = max(started(job) or first_queued for job in light)
    hers = all_jobs(cluster, "alice")
    assert len(hers) == 300
    # Hers not started when his first was queued (a job not started yet counts as later).
    later = [job for job in hers if (started(job) or last_started) > first_queued]
    assert len(later) > 200  # what submission order would have put ahead of Bob
    overtook = [job["id"] for job in later if (started(job) or last_started) < last_started]
    assert len(overtook) <= total_gpus, (
        f"{len(overtook)} of Alice's jobs started while Bob's waited: {overtook}"
    )
    fortieth = started(later[39])
    assert fortieth is None or last_started < fortieth


# --- 2 and 7: priority first, then fair share; or submission order when it is off ----------


def _one_gpu_queue(
    cluster: Cluster, gates: Gates, queue: Callable[[Client, Client], list[dict[str, Any]]]
) -> list[str]:
    """On a cluster with one GPU: Alice's gated job holds the GPU for a second (so she has
    used more than Bob, who used nothing), `queue` submits jobs meanwhile, then the gate
    opens: the names of the queued jobs in the order they started."""
    alice, bob = make_token(cluster, "alice"), make_token(cluster, "bob")
    blocker = wait_started(cluster, alice.submit(spec(gates.command("blocker"), name="held")))
    queued = queue(alice, bob)
    begun = started(blocker)
    assert begun is not None
    wait_until(lambda: (models.utcnow() - begun).total_seconds() > 1.0, 5, "a second of use")
    assert {job["status"] for job in fresh(cluster, queued)} == {"QUEUED"}
    gates.open("blocker")
    return start_order(cluster, queued)


def test_priority_wins_over_fair_share(make_cluster: Callable[..., Cluster], gates: Gates) -> None:
    """Alice (a second of use) queues three jobs at priority 1, then Bob (no use) two at
    priority 0 and one at 1. Priority 1 goes first, Bob's before Alice's as he used less
    (not submission order); then Bob's at priority 0, behind all of Alice's at 1 although
    she used more (not fair share across priorities)."""
    cluster = gpu_cluster(make_cluster, workers=1, gpus=1)

    def queue(alice: Client, bob: Client) -> list[dict[str, Any]]:
        jobs = [alice.submit(spec(["true"], name=f"a-p1-{i}", priority=1)) for i in (1, 2, 3)]
        jobs += [bob.submit(spec(["true"], name=f"b-p0-{i}", priority=0)) for i in (1, 2)]
        jobs.append(bob.submit(spec(["true"], name="b-p1", priority=1)))
        # Where Bob's first job at priority 0 stands: behind the four at priority 1.
        where = wait_until(lambda: cluster.client.job(jobs[3]["id"]).get("queue_place"), 10)
        assert where["place"] == 5
        assert [(a["submitter"], a["jobs"]) for a in where["ahead"]] == [("alice", 3), ("bob", 1)]
        # A list says why each waits, not where it stands: a place counts the queue, twice.
        listed = {job["id"]: job for job in cluster.client.jobs("QUEUED", 50)["jobs"]}
        assert listed[jobs[3]["id"]]["queue_place"] is None
        assert listed[jobs[3]["id"]]["queue_reason"]
        return jobs

    order = _one_gpu_queue(cluster, gates, queue)
    assert order == ["b-p1", "a-p1-1", "a-p1-2", "a-p1-3", "b-p0-1", "b-p0-2"]


@pytest.mark.parametrize(
    ("half_life_s", "expected"),
    [
        (86400.0, ["b1", "b2", "b3", "a1", "a2", "a3"]),  # the lighter user first
        (0.0, ["a1", "a2", "a3", "b1", "b2", "b3"]),  # off: submission order
    ],
)
def test_fair_share_orders_within_a_priority_and_off_gives_submission_order(
    make_cluster: Callable[..., Cluster], gates: Gates, half_life_s: float, expected: list[str]
) -> None:
    cluster = gpu_cluster(make_cluster, workers=1, gpus=1, fair_share_half_life=half_life_s)

    def queue(alice: Client, bob: Client) -> list[dict[str, Any]]:
        jobs = [alice.submit(spec(["true"], name=f"a{i}")) for i in (1, 2, 3)]
        return jobs + [bob.submit(spec(["true"], name=f"b{i}")) for i in (1, 2, 3)]

    assert _one_gpu_queue(cluster, gates, queue) == expected


# --- 3: caps hold at every moment, leave the rest to others, and change live ---------------


def test_max_gpus_holds_at_every_read_while_others_use_the_rest(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Alice (max_gpus 2) queues 16 short jobs, then Bob 16, on 4 GPUs: at no read of the
    running jobs (every 50 ms) do hers hold more than 2 GPUs, and his take the other 2."""
    cluster = gpu_cluster(make_cluster, workers=2, gpus=2)
    alice, bob = make_token(cluster, "alice", max_gpus=2), make_token(cluster, "bob")
    with Sampler(cluster.client) as sampler:
        sampler.limits = {"alice": (None, 2)}
        jobs = submit_many(alice, [spec(["sleep", "0.3"]) for _ in range(16)])
        jobs += submit_many(bob, [spec(["sleep", "0.3"]) for _ in range(16)])
        ended = [cluster.wait(job["id"], timeout_s=60) for job in jobs]
    assert {job["status"] for job in ended} == {"FINISHED"}
    assert len(sampler.samples) > 20
    assert sampler.over_caps() == []
    assert sampler.most("alice") == 2  # the cap, not less: she used what it allows
    assert sampler.most("bob") >= 2  # the rest went to Bob
    assert any(
        held.get("alice", (0, 0))[1] == 2 == held.get("bob", (0, 0))[1]
        for held, _ in sampler.samples
    )


def test_caps_hold_back_jobs_say_why_and_change_live(
    make_cluster: Callable[..., Cluster], gates: Gates
) -> None:
    """On one worker of 4 GPUs: Alice's max_gpus 1 keeps 3 of her 4 gated jobs queued
    while GPUs are free, each saying why; Bob takes the free GPUs; raising her cap with
    PATCH lets one more of hers start; max_running then limits her jobs, not her GPUs."""
    cluster = gpu_cluster(make_cluster, workers=1, gpus=4)
    alice, bob = make_token(cluster, "alice", max_gpus=1), make_token(cluster, "bob")
    patch = cluster.client.call

    def hers(status: str) -> list[dict[str, Any]]:
        return alice.jobs(status, limit=100, submitter="alice")["jobs"]

    def reasons() -> set[str]:
        return {alice.job(job["id"]).get("queue_reason", "") for job in hers("QUEUED")}

    with Sampler(cluster.client) as sampler:
        sampler.limits = {"alice": (None, 1)}
        for _ in range(4):
            alice.submit(spec(gates.command("alice")))
        wait_until(lambda: len(hers("RUNNING")) == 1 and len(hers("QUEUED")) == 3, 20)
        held = "held back by the caps of its token 'alice', which holds 1 GPU of its max_gpus 1"
        wait_until(lambda: reasons() == {held}, 10, lambda: f"that reason, not {reasons()}")
        assert len(cluster.client.jobs("RUNNING")["jobs"]) == 1  # 3 of the 4 GPUs are free

        for _ in range(4):
            bob.submit(spec(gates.command("bob")))
        wait_until(lambda: len(bob.jobs("RUNNING", submitter="bob")["jobs"]) == 3, 20)
        assert len(hers("RUNNING")) == 1  # the cap holds while Bob has jobs queued too

        sampler.limits = {"alice": (None, 2)}  # before the PATCH: no read sees it early
        changed = patch("PATCH", "/api/v1/tokens/alice", {"max_gpus": 2})
        assert (changed["max_gpus"], changed["max_running"]) == (2, None)
        gates.open("bob")  # Bob's GPUs free: one for her (her cap now), two for him
        wait_until(lambda: len(hers("RUNNING")) == 2, 20, "a second job of hers to start")
        held = "held back by the caps of its token 'alice', which holds 2 GPUs of its max_gpus 2"
        wait_until(lambda: reasons() == {held}, 10, lambda: f"that reason, not {reasons()}")

        sampler.limits = {"alice": (3, None)}
        changed = patch("PATCH", "/api/v1/tokens/alice", {"max_gpus": None, "max_running": 3})
        assert (changed["max_gpus"], changed["max_running"]) == (None, 3)
        wait_until(lambda: len(hers("RUNNING")) == 3, 20, "a third job of hers to start")
        held = "held back by the caps of its token 'alice', which runs 3 jobs of its max_running 3"
        wait_until(lambda: reasons() == {held}, 10, lambda: f"that reason, not {reasons()}")
        wait_until(lambda: sampler.most("alice") == 3, 10, "a read of her three jobs")
        gates.open("alice")
        wait_until(lambda: len(hers("FINISHED")) == 4, 20, "all of her jobs to end")
    assert sampler.over_caps() == []


def settled(client: Client, jobs: list[dict[str, Any]]) -> bool:
    """Whether a scheduling round has seen every one of these jobs: each has started, or
    waits for a reason of that round's."""
    unseen = "waiting to be scheduled"
    return all(
        job["status"] != "QUEUED" or not job["queue_reason"].startswith(unseen)
        for job in (client.job(one["id"]) for one in jobs)
    )


def test_caps_are_in_force_as_soon_as_a_token_is_made_or_changed(
    make_cluster: Callable[..., Cluster], gates: Gates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caps hold from the moment the API answers: the scheduler reads the tokens' caps every
    round, whatever it reads less often (here the running jobs, read once a minute)."""
    monkeypatch.setattr(fairshare, "READ_EVERY_S", 60.0)
    cluster = gpu_cluster(make_cluster, workers=1, gpus=4)  # its first round read the caps
    alice = make_token(cluster, "alice", max_gpus=1)
    jobs = [alice.submit(spec(gates.command("alice"))) for _ in range(3)]
    wait_until(lambda: settled(alice, jobs), 10, "a round that planned her jobs")
    running = alice.jobs("RUNNING", submitter="alice")["jobs"]
    assert len(running) == 1, f"{len(running)} jobs of hers run on {len(running)} GPUs"

    # The same when a cap is lowered: Bob's max_running made 0 lets no job of his start.
    bob = make_token(cluster, "bob")
    patch = cluster.client.call("PATCH", "/api/v1/tokens/bob", {"max_running": 0})
    assert patch["max_running"] == 0
    his = [bob.submit(spec(["true"]))]
    wait_until(lambda: settled(bob, his), 10, "a round that planned his job")
    assert bob.job(his[0]["id"])["status"] == "QUEUED"


# --- 4: a big job among a flood of small ones still starts -----------------------------------


def test_a_four_gpu_job_in_a_flood_of_one_gpu_jobs_starts_before_those_behind_it(
    make_cluster: Callable[..., Cluster],
) -> None:
    """On one worker of 4 GPUs, Alice queues 12 one-GPU jobs, a 4-GPU job, then 40 more of
    one GPU while Bob queues 12. Without a reservation the 4-GPU job would start only once
    the flood ran dry, as some GPU is always taken. With one, it starts after at most the
    jobs queued before it and Bob's (which are ahead of it while he has used less), and
    before every job of Alice's queued after it."""
    cluster = gpu_cluster(make_cluster, workers=1, gpus=4)
    alice, bob = make_token(cluster, "alice"), make_token(cluster, "bob")
    submit_many(alice, [spec(["sleep", "0.3"]) for _ in range(12)])
    big = alice.submit(spec(["sleep", "0.3"], gpus=4, name="big"))
    with ThreadPoolExecutor(2) as pool:
        behind_f = pool.submit(submit_many, alice, [spec(["sleep", "0.3"]) for _ in range(40)])
        bobs_f = pool.submit(submit_many, bob, [spec(["sleep", "0.3"]) for _ in range(12)])
        behind, _ = behind_f.result(), bobs_f.result()
    big = wait_started(cluster, big, timeout_s=60)
    begun = started(big)
    assert begun is not None
    overtook = [job["id"] for job in fresh(cluster, behind) if (started(job) or begun) < begun]
    assert overtook == [], "jobs of Alice's queued after the 4-GPU job started before it"
    # The 24 jobs that may go first take about 24 × 0.3 s / 4 GPUs ≈ 2 s; 20 s leaves room
    # for a loaded machine. The order above is what tells a reservation from none.
    assert (begun - created(big)).total_seconds() < 20


# --- 5: a submit past max_queued is refused until some of the jobs start --------------------


def cli(cluster: Cluster, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `gpubox` command against this cluster, with this token."""
    env = {**os.environ, "GPUBOX_URL": cluster.url, "GPUBOX_TOKEN": token}
    return subprocess.run(
        [*GPUBOX, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def raw_submit(cluster: Cluster, token: str, body: dict[str, Any]) -> urllib.error.HTTPError:
    """POST /api/v1/jobs that the coordinator refuses: its error, with headers and body."""
    request = urllib.request.Request(
        cluster.url + "/api/v1/jobs",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10).close()
    return refused.value


def test_a_submit_past_max_queued_is_refused_until_jobs_start(
    make_cluster: Callable[..., Cluster], gates: Gates
) -> None:
    cluster = gpu_cluster(make_cluster, workers=1, gpus=1)
    carol = make_token(cluster, "carol", max_queued=3)
    wait_started(cluster, carol.submit(spec(gates.command("first"))))  # running: not queued
    queued = [carol.submit(spec(["true"])) for _ in range(3)]

    refused = raw_submit(cluster, carol.token, spec(["true"]))
    with refused:
        assert refused.code == 429
        assert refused.headers["Retry-After"] == "30"
        error = json.loads(refused.read())["error"]
    assert (error["code"], error["field"]) == ("over_cap", "max_queued")
    assert error["message"].startswith("token 'carol' has 3 jobs queued, its max_queued cap")
    with pytest.raises(ApiError) as by_client:  # the client does not send it again
        carol.submit(spec(["true"]))
    assert (by_client.value.status, by_client.value.code) == (429, "over_cap")

    shell = cli(cluster, carol.token, "submit", NO_IMAGE, "true")
    # 75: try again later, as CI retries (the exit code table in README)
    assert shell.returncode == exits.GAVE_UP and shell.stdout == ""
    assert "token 'carol' has 3 jobs queued, its max_queued cap" in shell.stderr
    assert "[HTTP 429]" in shell.stderr and "Traceback" not in shell.stderr
    assert len(carol.jobs("QUEUED", submitter="carol")["jobs"]) == 3  # none was added

    gates.open("first")
    wait_started(cluster, queued[0])  # one of the three left the queue
    again = carol.submit(spec(["true"]), retry_for_s=0)
    assert again["status"] == "QUEUED" and again["submitter"] == "carol"


# --- 6: gpubox show tells a queued job's place and who is ahead ------------------------------


def test_show_prints_a_queued_jobs_place_and_who_is_ahead(
    make_cluster: Callable[..., Cluster], gates: Gates
) -> None:
    """Alice's gated job holds the one GPU; she queues two more, then Bob two. Bob has used
    nothing, so his go first: Alice's first queued job is third, behind two of Bob's."""
    cluster = gpu_cluster(make_cluster, workers=1, gpus=1)
    alice, bob = make_token(cluster, "alice"), make_token(cluster, "bob")
    wait_started(cluster, alice.submit(spec(gates.command("blocker"))))
    mine = [alice.submit(spec(["true"])) for _ in range(2)]
    his = [bob.submit(spec(["true"])) for _ in range(2)]

    where = wait_until(
        lambda: (place := alice.job(mine[0]["id"])["queue_place"])["place"] == 3 and place,
        10,
        "Alice's job to be third",
    )
    assert [(a["submitter"], a["jobs"]) for a in where["ahead"]] == [("bob", 2)]
    assert where["half_life_s"] == 86400.0
    shown = cli(cluster, cluster.token, "show", str(mine[1]["id"]))
    assert shown.returncode == 0, shown.stderr
    # Alice's use is her blocker's moment so far: more than none, less than a thousandth of
    # a GPU-hour (or a few thousandths, on a slow machine).
    assert re.fullmatch(
        r"4 in the queue: 3 jobs ahead of it \(2 of bob, 1 of alice\);"
        r" GPU-hours used lately: bob 0, alice (<0\.001|0\.00[0-9]+)",
        row(shown.stdout, "place"),
    )
    shown = cli(cluster, cluster.token, "show", str(his[1]["id"]))
    assert shown.returncode == 0, shown.stderr
    assert row(shown.stdout, "place") == (
        "2 in the queue: 1 job ahead of it (1 of bob); GPU-hours used lately: bob 0"
    )


def row(shown: str, key: str) -> str:
    """The value of one row of `gpubox show`'s table ("     place  4 in the queue: …")."""
    (value,) = [line.split(None, 1)[1] for line in shown.splitlines() if line.split()[0] == key]
    return value
