"""Prefetch: a worker holds jobs beyond its slots and starts one the moment a slot frees,
through the whole system (coordinator, store, worker link, process runtime), on both stores.
What it must keep: priority order (a held job is recalled for a job of higher priority),
GPU exactness (a held job's GPUs are its own), no attempt spent on a job given back."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox import models, protocol
from gpubox.worker import agent as agent_module
from tests.conftest import Cluster, wait_until

NO_IMAGE = "ignored-by-the-process-runtime"


@pytest.fixture()
def gate() -> Iterator[Path]:
    """A folder the jobs (run as nobody) can read: a job waits until `go` appears in it."""
    folder = Path(tempfile.mkdtemp(prefix="gpubox-gate-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def blocker(gate: Path, name: str = "go") -> list[str]:
    """A command that runs until the file `name` appears in the gate folder."""
    return ["sh", "-c", f"until [ -e {gate / name} ]; do sleep 0.02; done"]


def submit(cluster: Cluster, command: list[str], **fields: Any) -> int:
    return int(cluster.submit(NO_IMAGE, command, **fields)["id"])


def held(cluster: Cluster, job_id: int) -> bool:
    """RUNNING on its worker's hold: claimed and sent, not started."""
    job = cluster.client.job(job_id)
    return job["status"] == "RUNNING" and job["result"]["executed_at"] is None


def started(cluster: Cluster, job_id: int) -> bool:
    return cluster.client.job(job_id)["result"]["executed_at"] is not None


def running_and_held(cluster: Cluster, gate: Path) -> tuple[int, int]:
    """A job that runs until the gate opens, and one (priority 0) held behind it."""
    first = submit(cluster, blocker(gate))
    wait_until(lambda: started(cluster, first), 10, "the first job to start")
    second = submit(cluster, ["true"])
    wait_until(lambda: held(cluster, second), 10, "the second job to be held")
    # The store says so once it is claimed; the worker once its JOB has arrived.
    agent = cluster.agents[0][0]
    wait_until(lambda: second in agent.jobs, 10, "the worker to hold it")
    return first, second


@pytest.fixture(autouse=True)
def long_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held jobs stay held while these tests look at them (a worker gives back a job held
    for agent.HOLD_S, 1 s; the last test here checks that)."""
    monkeypatch.setattr(agent_module, "HOLD_S", 60.0)


@pytest.fixture()
def cluster(make_cluster) -> Cluster:  # type: ignore[no-untyped-def]
    """One process-runtime worker with 2 GPUs, 1 slot and 1 prefetched job."""
    made: Cluster = make_cluster(workers=0)
    made.add_worker(runtime="process", fake_gpus="2", max_jobs=1, prefetch=1)
    return made


def test_a_held_job_starts_when_the_slot_frees_on_gpus_of_its_own(
    cluster: Cluster, gate: Path
) -> None:
    first = submit(cluster, blocker(gate), gpus=1)
    wait_until(lambda: started(cluster, first), 10, "the first job to start")
    second = submit(cluster, ["true"], gpus=1)
    wait_until(lambda: held(cluster, second), 10, "the second job to be held")
    agent = cluster.agents[0][0]
    wait_until(lambda: second in agent.jobs, 10, "the worker to hold it")
    assert agent.jobs[second].prefetched
    # One slot and one prefetched job: a third waits in the queue.
    third = submit(cluster, ["true"])
    assert cluster.client.job(third)["status"] == "QUEUED"
    gpus = [cluster.client.job(i)["result"]["gpus"] for i in (first, second)]
    assert len(gpus[0]) == len(gpus[1]) == 1 and gpus[0] != gpus[1], gpus

    (gate / "go").touch()
    done = [cluster.wait(i) for i in (first, second, third)]
    assert [job["status"] for job in done] == ["FINISHED"] * 3, done
    assert done[1]["result"]["executed_at"] >= done[0]["result"]["executed_at"]
    assert done[1]["attempts"] == 1  # held, then started: one attempt
    assert done[1]["result"]["gpus"] == gpus[1]  # the GPUs it was sent with


def test_a_held_job_is_recalled_for_one_of_higher_priority(cluster: Cluster, gate: Path) -> None:
    first, low = running_and_held(cluster, gate)
    high = submit(cluster, ["true"], priority=5)
    # The low one is given back, the high one takes its place.
    wait_until(lambda: held(cluster, high), 10, "the high-priority job to be held")
    assert cluster.client.job(low)["status"] == "QUEUED"

    (gate / "go").touch()
    done = {i: cluster.wait(i) for i in (first, low, high)}
    assert all(job["status"] == "FINISHED" for job in done.values()), done
    assert done[high]["result"]["executed_at"] < done[low]["result"]["executed_at"]
    assert done[low]["attempts"] == 1  # the recall spent no attempt


def test_a_higher_priority_job_the_worker_cannot_run_recalls_nothing(
    cluster: Cluster, gate: Path
) -> None:
    first, low = running_and_held(cluster, gate)
    # Needs 4 GPUs; this worker has 2: it could never take the held job's place.
    submit(cluster, ["true"], priority=5, gpus=4)
    deadline = time.monotonic() + 1.0  # several scheduling rounds
    while time.monotonic() < deadline:
        assert held(cluster, low)
    (gate / "go").touch()
    assert cluster.wait(low)["status"] == "FINISHED"


def test_cancelling_a_held_job_ends_it_without_running_it(cluster: Cluster, gate: Path) -> None:
    first, second = running_and_held(cluster, gate)
    cluster.client.cancel(second)
    job = cluster.wait(second, timeout_s=10)
    assert job["status"] == "CANCELLED"
    assert job["result"]["executed_at"] is None
    assert cluster.client.job(first)["status"] == "RUNNING"  # the running one runs on
    (gate / "go").touch()
    assert cluster.wait(first)["status"] == "FINISHED"


def test_a_draining_worker_gives_its_held_jobs_back(cluster: Cluster, gate: Path) -> None:
    first, second = running_and_held(cluster, gate)
    agent = cluster.agents[0][0]
    agent.stop(drain=True)
    wait_until(
        lambda: cluster.client.job(second)["status"] == "QUEUED", 10, "the held job to be back"
    )
    assert cluster.client.job(second)["attempts"] == 0  # queued again, no attempt spent
    (gate / "go").touch()
    assert cluster.wait(first)["status"] == "FINISHED"
    # Another worker runs it.
    cluster.add_worker(name="other", runtime="process", fake_gpus="0")
    assert cluster.wait(second)["status"] == "FINISHED"


def test_a_stopping_worker_gives_its_held_jobs_back(cluster: Cluster, gate: Path) -> None:
    first, second = running_and_held(cluster, gate)
    agent, thread = cluster.agents[0]
    agent.stop()
    thread.join(timeout=30)
    (gate / "go").touch()
    job = wait_until(
        lambda: (j := cluster.client.job(second))["status"] == "QUEUED" and j,
        15,
        "the held job to be queued again",
    )
    assert job["attempts"] == 0


def test_the_worker_starts_its_held_jobs_highest_priority_first(
    make_cluster,  # type: ignore[no-untyped-def]
    gate: Path,
) -> None:
    made: Cluster = make_cluster(workers=0)
    made.add_worker(runtime="process", fake_gpus="0", max_jobs=1, prefetch=2)
    first = submit(made, blocker(gate))
    wait_until(lambda: started(made, first), 10, "the first job to start")
    low = submit(made, ["true"])
    wait_until(lambda: held(made, low), 10, "the first held job")
    high = submit(made, ["true"], priority=3)
    wait_until(lambda: held(made, high), 10, "the second held job")
    assert held(made, low)  # a free place in the hold: nothing to recall
    (gate / "go").touch()
    done = {i: made.wait(i) for i in (low, high)}
    assert done[high]["result"]["executed_at"] < done[low]["result"]["executed_at"], done


def test_prefetch_must_be_a_count() -> None:
    from gpubox import errors
    from gpubox.config import settings as cfg

    config = cfg.WorkerConfig(prefetch=-1)
    with pytest.raises(errors.ConfigError, match="prefetch"):
        config.validate()


def test_a_job_held_behind_a_long_one_is_given_back_for_a_free_worker(
    cluster: Cluster, gate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "HOLD_S", 0.5)
    first, second = running_and_held(cluster, gate)
    # Its slot does not free: given back, and the worker holds nothing more meanwhile.
    wait_until(lambda: not held(cluster, second), 10, "the held job to be given back")
    agent = cluster.agents[0][0]
    assert not agent._prefetched and agent._prefetch_paused
    job = cluster.client.job(second)
    assert job["status"] == "QUEUED" and job["attempts"] == 0, job
    # A worker that is free runs it, while the first still runs.
    cluster.add_worker(name="free", runtime="process", fake_gpus="0")
    done = cluster.wait(second)
    assert done["status"] == "FINISHED" and done["worker"] == "free", done
    assert cluster.client.job(first)["status"] == "RUNNING"
    (gate / "go").touch()
    assert cluster.wait(first)["status"] == "FINISHED"
    # A job that ends within HOLD_S of its start: the worker holds jobs again.
    free, free_thread = cluster.agents[1]
    free.stop()
    free_thread.join(timeout=30)
    quick = cluster.wait(submit(cluster, ["true"]))
    assert quick["status"] == "FINISHED" and quick["worker"] == "worker-1", quick
    wait_until(lambda: not agent._prefetch_paused, 10, "prefetch to resume")


def test_a_held_job_whose_release_was_lost_is_queued_again_at_the_next_ready(
    cluster: Cluster, gate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = running_and_held(cluster, gate)
    agent = cluster.agents[0][0]
    send = agent._send
    monkeypatch.setattr(
        agent, "_send", lambda msg: False if isinstance(msg, protocol.Released) else send(msg)
    )
    monkeypatch.setattr(agent_module, "HOLD_S", 0.3)  # it is given back; RELEASED is lost
    job = wait_until(
        lambda: (j := cluster.client.job(second))["status"] == "QUEUED" and j,
        10,
        "the job the worker holds no more to be queued again",
    )
    assert job["attempts"] == 0, job
    (gate / "go").touch()
    assert cluster.wait(first)["status"] == "FINISHED"


def test_a_worker_holds_nothing_for_a_coordinator_that_does_not_take_released(
    make_cluster,  # type: ignore[no-untyped-def]
    gate: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An older coordinator's WELCOME says nothing of prefetch: the worker offers its free
    # slots only, so it is never sent a job to hold (which it could not give back).
    original = protocol.Welcome.__init__

    def older(self: protocol.Welcome, **fields: Any) -> None:
        fields.pop("prefetch", None)
        original(self, **fields)

    monkeypatch.setattr(protocol.Welcome, "__init__", older)
    made: Cluster = make_cluster(workers=0)
    made.add_worker(runtime="process", fake_gpus="0", max_jobs=1, prefetch=2)
    first = submit(made, blocker(gate))
    wait_until(lambda: started(made, first), 10, "the first job to start")
    second = submit(made, ["true"])
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert made.client.job(second)["status"] == "QUEUED"
    assert made.agents[0][0].prefetch == 0
    (gate / "go").touch()
    assert made.wait(second)["status"] == "FINISHED"


def test_a_held_job_waits_while_the_coordinator_is_silent_and_starts_once_it_is_heard(
    make_cluster: Callable[..., Cluster], gate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past half its liveness window without a word from the coordinator, a worker starts no
    # held job: the coordinator may soon count it lost and give the job to another worker.
    # Once it is heard again, the held job starts in the slot that freed meanwhile.
    liveness_s = 4.0
    # Held jobs are given back after HOLD_S: long enough that this one is still held when the
    # slot frees (about 2.5 s after it came), short enough to end the test soon after.
    monkeypatch.setattr(agent_module, "HOLD_S", 6.0)
    made: Cluster = make_cluster(workers=0, liveness_s=liveness_s)
    made.add_worker(runtime="process", fake_gpus="0", max_jobs=1, prefetch=1, liveness_s=liveness_s)
    agent = made.agents[0][0]
    first = submit(made, blocker(gate))
    wait_until(lambda: started(made, first), 10, "the first job to start")
    marks = gate / "marks"  # the jobs run as nobody: a folder they may write in
    marks.mkdir()
    marks.chmod(0o777)
    ran = marks / "second"
    second = submit(made, ["sh", "-c", f"echo ran >> {ran}"])
    wait_until(lambda: held(made, second), 10, "the second job to be held")
    wait_until(lambda: second in agent.jobs, 10, "the worker to hold it")
    session = agent.session

    # The coordinator falls silent: its broker's loop stops turning (as under SIGSTOP; the
    # ZeroMQ I/O thread queues what the worker sends meanwhile).
    broker = made.coordinator.broker
    assert broker is not None
    step, frozen, thaw = broker.step, threading.Event(), threading.Event()

    def stopped(now: float) -> None:
        frozen.set()
        thaw.wait(30)
        step(now)

    monkeypatch.setattr(broker, "step", stopped)
    try:
        wait_until(frozen.is_set, 5, "the broker to stop")
        # Silent past half the worker's liveness window (not the whole: it would reconnect).
        wait_until(
            lambda: time.monotonic() - agent.last_heard > liveness_s / 2 + 0.2,
            liveness_s,
            "half the worker's liveness window to pass",
        )
        (gate / "go").touch()  # the slot frees
        wait_until(lambda: not agent.jobs[first].running, 5, "the first job to end")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert not ran.exists(), "the held job ran while the coordinator was silent"
            assert agent.jobs[second].prefetched and second in agent._prefetched
            time.sleep(0.02)
        silent_s = time.monotonic() - agent.last_heard
        assert liveness_s / 2 < silent_s < liveness_s, silent_s
        assert agent.session == session  # the worker has not reconnected
    finally:
        thawed = time.time()
        thaw.set()

    # Heard again: the held job starts from its hold at once (given back after HOLD_S, it
    # would have waited 3 s more), runs once and spends one attempt.
    done = {i: made.wait(i, timeout_s=20) for i in (first, second)}
    assert [job["status"] for job in done.values()] == ["FINISHED"] * 2, done
    assert done[second]["attempts"] == 1, done[second]
    assert ran.read_text() == "ran\n"
    executed_at = models.parse_time(done[second]["result"]["executed_at"]).timestamp()
    assert executed_at - thawed < 2.0, executed_at - thawed
    assert not agent._prefetch_paused  # it was not given back
