"""Nothing lost: workers and coordinators killed, links cut, messages dropped or repeated.
Real processes (kill -9), real containers, real sockets."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from gpubox import keys, protocol
from gpubox.client import Client
from tests.conftest import IMAGE, Cluster, remove_containers, wait_until
from tests.fakeworker import FakeWorker

# These run beside other Docker tests (each finds its containers by its own coordinator's
# fingerprint as well as by job id, since job ids repeat across clusters), except those that
# time a link cut against the liveness window: they are marked serial one by one.
pytestmark = [pytest.mark.docker, pytest.mark.slow]

GPUBOX = [sys.executable, "-m", "gpubox"]
# The worker's spill is the same whatever the store: these run on SQLite only (the store's
# side of LOG batches is proven on both backends elsewhere), to keep the suite short.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
FAST = {
    "GPUBOX_HEARTBEAT_INTERVAL": "0.5",
    "GPUBOX_LIVENESS": "3",
    "GPUBOX_RESEND": "1",
    "GPUBOX_STOP_GRACE": "2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A `gpubox` command in its own process, its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*GPUBOX, *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def owner_of(state_dir: str) -> str:
    """The fingerprint a worker of the coordinator in `state_dir` labels its containers with."""
    return keys.fingerprint(keys.load_public(str(keys.coordinator_files(state_dir)[0])))


def job_labels(state_dir: str, job_id: int) -> dict[str, list[str]]:
    """A Docker filter for the containers of job `job_id` of the coordinator in `state_dir`."""
    return {"label": [f"io.gpubox.job={job_id}", f"io.gpubox.coordinator={owner_of(state_dir)}"]}


def worker_env(cluster_or_state: str, name: str, link: str) -> dict[str, str]:
    secret = keys.add_worker(cluster_or_state, name)
    return {
        **os.environ,
        **FAST,
        "GPUBOX_STATE_DIR": cluster_or_state,
        "GPUBOX_WORKER_NAME": name,
        "GPUBOX_COORDINATOR": link,
        "GPUBOX_KEY_FILE": str(secret),
    }


@pytest.fixture()
def processes(docker_client) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()
    for state in {p.env["GPUBOX_STATE_DIR"] for p in started if p.args[0] == "worker"}:
        remove_containers(docker_client, {"proc-w1"}, owner_of(state))


def start_worker(cluster: Cluster, processes: list[Process], tmp_path: Path) -> Process:
    """`gpubox worker` proc-w1 in its own process, linked to the cluster's coordinator."""
    state = cluster.coordinator.config.state_dir
    worker = Process(
        ["worker"],
        worker_env(state, "proc-w1", cluster.coordinator.link_endpoint),
        tmp_path / "worker.log",
    )
    processes.append(worker)
    return worker


def counting_job(cluster: Cluster, lines: int, pause: float = 0.05, **fields: Any) -> dict:
    script = f"for i in $(seq 1 {lines}); do echo line-$i; sleep {pause}; done"
    return cluster.submit(IMAGE, ["sh", "-c", script], **fields)


def assert_every_line_once(cluster: Cluster, job_id: int, lines: int) -> None:
    stored = cluster.lines(job_id)
    assert [r["line"] for r in stored] == [f"line-{i}" for i in range(1, lines + 1)]
    assert [r["seq"] for r in stored] == list(range(1, lines + 1))


def test_worker_killed_and_restarted_reattaches_and_loses_no_line(
    make_cluster, processes, docker_client, tmp_path
):
    cluster: Cluster = make_cluster(workers=0)
    worker = start_worker(cluster, processes, tmp_path)
    job = counting_job(cluster, 80)
    wait_until(lambda: len(cluster.lines(job["id"])) >= 10, 30, "ten lines stored")
    worker.kill9()
    # the container runs on without its worker
    labels = job_labels(cluster.coordinator.config.state_dir, job["id"])
    assert len(docker_client.containers.list(filters=labels)) == 1
    worker.start()
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["attempts"] == 1
    assert_every_line_once(cluster, job["id"], 80)
    wait_until(
        lambda: not docker_client.api.containers(all=True, filters=labels), 10, "the container gone"
    )


@SQLITE_ONLY
def test_a_reattach_completes_a_long_line_of_which_only_some_pieces_were_stored(
    make_cluster, processes, tmp_path
):
    """A 150 KiB line travels as three pieces (64 KiB at most each), in separate batches.
    The worker is killed once all are stored; the store is then put back to the moment only
    the first was (a kill between two batches, made certain). The restarted worker re-attaches
    and sends the other two pieces, then the rest: nothing lost, nothing twice."""
    cluster: Cluster = make_cluster(workers=0)
    worker = start_worker(cluster, processes, tmp_path)
    script = 'echo before; head -c 153600 /dev/zero | tr "\\000" x; echo; sleep 3; echo after'
    job = cluster.submit(IMAGE, ["sh", "-c", script])
    wait_until(lambda: len(cluster.lines(job["id"])) == 4, 30, "the long line's pieces stored")
    worker.kill9()
    pieces = protocol.split_line("x" * 153600)
    assert [r["line"] for r in cluster.lines(job["id"])] == ["before", *pieces]
    path = cluster.coordinator.config.db.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db, db:
        db.execute("DELETE FROM logs WHERE job_id = ? AND seq > 2", (job["id"],))
        db.execute("UPDATE jobs SET log_seq = 2 WHERE id = ?", (job["id"],))
    assert len(cluster.lines(job["id"])) == 2  # "before" and the first piece
    worker.start()
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["attempts"] == 1, done
    stored = cluster.lines(job["id"])
    assert [r["line"] for r in stored] == ["before", *pieces, "after"]
    assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]


def test_a_worker_killed_before_its_done_arrived_reports_the_exit_after_a_restart(
    make_cluster, processes, docker_client, tmp_path
):
    """The container exits while the link is down, so DONE cannot go out; the worker is then
    killed. Its exited container was kept for this: the next start reads the exit code and
    the last lines from it."""
    from tests.proxy import CuttableProxy

    cluster: Cluster = make_cluster(workers=0, liveness_s=30.0)
    state = cluster.coordinator.config.state_dir
    host, port = cluster.coordinator.link_endpoint.removeprefix("tcp://").rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    env = worker_env(state, "proc-w1", f"tcp://127.0.0.1:{proxy.port}")
    worker = Process(["worker"], {**env, "GPUBOX_LIVENESS": "30"}, tmp_path / "worker.log")
    processes.append(worker)
    job = cluster.submit(IMAGE, ["sh", "-c", "echo first; sleep 2; echo last; exit 5"])
    wait_until(lambda: cluster.lines(job["id"]), 30, "the first line stored")
    label = job_labels(state, job["id"])
    cut = threading.Thread(target=proxy.pause, args=(8.0,))
    cut.start()
    wait_until(
        lambda: (
            [c["State"] for c in docker_client.api.containers(all=True, filters=label)]
            == ["exited"]
        ),
        20,
        "the container to exit while the link is down",
    )
    time.sleep(0.5)  # its DONE is now waiting in the worker, undelivered
    worker.kill9()
    cut.join()
    worker.start()
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "ERROR" and done["result"]["exit_code"] == 5, done
    assert done["attempts"] == 1
    assert [r["line"] for r in cluster.lines(job["id"])] == ["first", "last"]
    wait_until(lambda: not docker_client.api.containers(all=True, filters=label), 10, "gone")


def test_worker_that_stays_away_has_its_job_requeued_or_failed(make_cluster, processes, tmp_path):
    cluster: Cluster = make_cluster(workers=0)
    worker = start_worker(cluster, processes, tmp_path)
    retried = cluster.submit(IMAGE, ["sleep", "300"], max_retries=1)
    once = cluster.submit(IMAGE, ["sleep", "300"])
    for job in (retried, once):  # started: the worker has them (not merely sent)
        wait_until(lambda j=job: cluster.client.job(j["id"])["result"]["executed_at"], 30, "start")
    worker.kill9()
    wait_until(lambda: cluster.client.job(retried["id"])["status"] == "QUEUED", 20, "requeue")
    failed = cluster.wait(once["id"], timeout_s=20)
    assert failed["status"] == "ERROR" and "worker lost" in failed["result"]["error"]


def test_coordinator_killed_and_restarted_mid_job(processes, tmp_path, docker_client):
    state = str(tmp_path / "state")
    http, link = free_port(), free_port()
    keys.init(state)
    env = {**os.environ, **FAST, "GPUBOX_STATE_DIR": state}
    args = ["coordinator", "--http", f"127.0.0.1:{http}", "--bind", f"tcp://127.0.0.1:{link}"]
    coordinator = Process(args, env, tmp_path / "coordinator.log")
    processes.append(coordinator)
    url = f"http://127.0.0.1:{http}"
    wait_until(lambda: (Path(state) / "token").exists(), 20, "the coordinator's token")
    client = Client(url, (Path(state) / "token").read_text().strip())
    worker = Process(
        ["worker"], worker_env(state, "proc-w1", f"tcp://127.0.0.1:{link}"), tmp_path / "worker.log"
    )
    processes.append(worker)
    wait_until(lambda: ok(lambda: client.workers()["workers"]), 20, "the worker")
    script = "for i in $(seq 1 100); do echo line-$i; sleep 0.05; done"
    job = client.submit(
        {"name": "survivor", "docker": {"image": IMAGE, "command": ["sh", "-c", script]}}
    )
    out = io.StringIO()
    codes: list[int] = []
    tail = threading.Thread(
        target=lambda: codes.append(client.tail(job["id"], out=out, err=io.StringIO()))
    )
    tail.start()
    wait_until(lambda: out.getvalue().count("\n") >= 15, 30, "lines before the crash")
    coordinator.kill9()
    coordinator.start()
    tail.join(90)
    assert codes == [0]
    assert out.getvalue().splitlines() == [f"line-{i}" for i in range(1, 101)]
    stored = list(client.logs(job["id"]))
    assert [r["seq"] for r in stored] == list(range(1, 101))
    assert client.job(job["id"])["attempts"] == 1
    # One HELLO brought the worker back: the batches it had queued meanwhile each got an
    # "unknown session" answer, and each of those started another session before.
    said = (tmp_path / "worker.log").read_text()
    assert said.count("HELLO again") == 1, said


def ok(call: Any) -> Any:
    try:
        return call()
    except Exception:
        return None


def test_a_lost_job_message_is_sent_again_and_the_job_runs_once(
    make_cluster, tmp_path, monkeypatch
):
    """A fake worker that ignores its first JOB: the coordinator queues it again after the
    liveness window, gives that worker no job for a while (it may be hostile: see
    test_identity), then again, and the job runs exactly once."""
    from gpubox.coordinator import broker

    monkeypatch.setattr(broker, "QUARANTINE_S", 1.0)
    cluster: Cluster = make_cluster(workers=0, liveness_s=2.0, heartbeat_interval_s=0.3)
    state = cluster.coordinator.config.state_dir
    keypair = keys.load_secret(keys.add_worker(state, "fake"))
    server = keys.load_public(str(keys.coordinator_files(state)[0]))
    context = zmq.Context()
    fake = FakeWorker(context, cluster.coordinator.link_endpoint, "fake", keypair, server)
    try:
        fake.hello()
        fake.ready()
        job = cluster.submit(IMAGE, ["true"])
        first = fake.expect("JOB", 10).body["job"]  # "lost": no READY confirms it
        # queued again after the liveness window, then sent again once the quarantine ends
        again = fake.expect("JOB", 20).body["job"]
        assert [first["id"], again["id"]] == [job["id"], job["id"]]
        assert [first["attempt"], again["attempt"]] == [1, 1]  # not counted as an attempt
    finally:
        fake.close()
        context.destroy(linger=0)
    # a real worker then runs it, once
    cluster.add_worker()
    done = cluster.wait(job["id"])
    assert done["status"] == "FINISHED" and done["attempts"] == 1


def test_cancel_kills_a_container_that_ignores_sigterm_after_the_grace(cluster: Cluster):
    job = cluster.submit(IMAGE, ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    wait_until(lambda: cluster.lines(job["id"]), 20, "the trap to be set")
    cluster.client.cancel(job["id"])
    done = cluster.wait(job["id"], timeout_s=20)  # stop_grace_s is 2 in tests
    assert done["status"] == "CANCELLED"
    assert done["result"]["exit_code"] == 137  # SIGKILL


def test_plain_stop_leaves_the_container_and_drain_waits(
    make_cluster, processes, tmp_path, docker_client
):
    cluster: Cluster = make_cluster(workers=0)
    state = cluster.coordinator.config.state_dir
    env = worker_env(state, "proc-w1", cluster.coordinator.link_endpoint)
    worker = Process(["worker", "--drain"], env, tmp_path / "worker.log")
    processes.append(worker)
    job = counting_job(cluster, 30, pause=0.1)
    wait_until(lambda: cluster.lines(job["id"]), 30, "the job to start")
    worker.signal(signal.SIGTERM)  # drain: no new job, wait for this one
    wait_until(lambda: "draining" in (tmp_path / "worker.log").read_text(), 10, "draining")
    later = cluster.submit(IMAGE, ["true"])
    assert worker.proc is not None and worker.proc.wait(30) == 0
    assert cluster.client.job(job["id"])["status"] == "FINISHED"
    assert_every_line_once(cluster, job["id"], 30)
    # Never taken: at most sent in the instant before the drain was announced, unconfirmed,
    # and so queued again after the liveness window, without spending an attempt.
    wait_until(lambda: cluster.client.job(later["id"])["status"] == "QUEUED", 10, "the job queued")
    assert cluster.client.job(later["id"])["attempts"] == 0


@SQLITE_ONLY
def test_a_flood_spills_to_disk_and_every_line_arrives(make_cluster):
    cluster: Cluster = make_cluster(worker_settings={"max_unacked_lines": 2000})
    job = cluster.submit(IMAGE, ["seq", "1", "100000"])
    agent, _ = cluster.agents[0]
    spilled = []
    wait_until(
        lambda: (
            spilled.append(agent.spill.size)
            or cluster.client.job(job["id"])["status"] == "FINISHED"
        ),
        120,
        "the flood to finish",
    )
    done = cluster.client.job(job["id"])
    assert done["log_lines"] == 100000
    assert max(spilled) > 0  # the backlog went to disk, not memory
    # FINISHED once the coordinator applied DONE; the worker lets go at its acknowledgement.
    wait_until(
        lambda: agent.unacked_lines == 0 and agent.spill.size == 0 and not agent.jobs,
        10,
        "the worker to let go of the job",
    )
    assert list(agent.spill.root.iterdir()) == []
    store = cluster.coordinator.store
    assert store is not None
    # spot checks across the whole range: in order, none twice, none missing
    for since in (0, 49_990, 99_990):
        lines = store.read_logs(job["id"], since, 10)
        assert [line.line for line in lines] == [str(i) for i in range(since + 1, since + 11)]


def cut_link_while(cluster: Cluster, job: dict, seconds: float, **worker: Any) -> Any:
    """Start a worker behind a proxy, wait for `job` to print "go", then take the link down
    for `seconds` (under liveness: nothing is lost) while the job prints. Returns the agent
    and the most bytes seen in its spill meanwhile."""
    from tests.proxy import CuttableProxy

    host, port = cluster.coordinator.link_endpoint.removeprefix("tcp://").rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    agent = cluster.add_worker(
        coordinator=f"tcp://127.0.0.1:{proxy.port}", liveness_s=30.0, **worker
    )
    wait_until(lambda: cluster.lines(job["id"]), 30, "the job to start")
    cut = threading.Thread(target=proxy.pause, args=(seconds,))
    cut.start()
    most = 0
    while cut.is_alive():
        most = max(most, agent.spill.size)
        cut.join(0.05)
    return agent, most


@SQLITE_ONLY
def test_an_outage_spills_the_backlog_to_disk_and_loses_nothing(make_cluster):
    cluster: Cluster = make_cluster(workers=0, liveness_s=30.0)
    job = cluster.submit(IMAGE, ["sh", "-c", "echo go; sleep 1; seq 1 30000"])
    agent, most = cut_link_while(cluster, job, 6.0, max_unacked_lines=500)
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["attempts"] == 1
    assert most > 0  # while the link was down, lines past the window were on disk
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert lines == ["go"] + [str(i) for i in range(1, 30001)]
    assert agent.spill.size == 0 and agent.spill.dropped == 0


@SQLITE_ONLY
def test_past_the_spill_bound_the_oldest_lines_go_behind_one_marker(make_cluster):
    cluster: Cluster = make_cluster(workers=0, liveness_s=30.0)
    job = cluster.submit(IMAGE, ["sh", "-c", "echo go; sleep 1; seq 1 50000"])
    agent, most = cut_link_while(
        cluster, job, 8.0, max_unacked_lines=500, spill_max_bytes=64 * 1024
    )
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["log_lines"] == 50001
    assert 0 < most <= 64 * 1024  # the disk bound held, even as batches were added
    stored = cluster.lines(job["id"])
    markers = [r for r in stored if "lines dropped here" in r["line"]]
    assert len(markers) == 1 and markers[0]["stream"] == "gpubox"
    dropped = int(markers[0]["line"].split()[1])
    assert dropped == agent.spill.dropped > 0
    assert "spill_max_bytes" in markers[0]["line"]
    numbers = [int(r["line"]) for r in stored if r["line"].isdigit()]
    # the oldest lines that waited went; everything else arrived once, in order, newest kept
    assert len(numbers) + dropped == 50000
    assert numbers == sorted(set(numbers)) and numbers[-1] == 50000
    head = stored.index(markers[0])
    assert numbers[head - 1 :] == list(range(numbers[head - 1], 50001))  # no gap after it


def test_a_10_mb_line_is_split_not_dropped(cluster: Cluster):
    job = cluster.submit(
        IMAGE, ["sh", "-c", "head -c 10485760 /dev/zero | tr '\\0' y; echo; echo end"]
    )
    done = cluster.wait(job["id"], timeout_s=120)
    assert done["status"] == "FINISHED"
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert lines[-1] == "end"
    assert "".join(lines[:-1]) == "y" * 10485760
    assert all(len(line) <= protocol.MAX_LINE for line in lines)


def test_per_job_log_cap_keeps_head_and_tail_with_a_marker(make_cluster):
    cluster: Cluster = make_cluster(max_log_lines=100)
    job = cluster.submit(IMAGE, ["seq", "1", "1000"])
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["log_lines"] == 1000
    lines = cluster.lines(job["id"])
    assert [r["line"] for r in lines[:50]] == [str(i) for i in range(1, 51)]
    assert lines[50]["seq"] == 51 and "901 lines dropped" in lines[50]["line"]
    assert [r["line"] for r in lines[51:]] == [str(i) for i in range(952, 1001)]


@pytest.mark.serial  # a 1 s cut must stay under the 3 s liveness window: no load beside it
@SQLITE_ONLY  # the link's behaviour; the store's side of a lost attempt is tested on both
def test_link_cut_shorter_than_liveness_changes_nothing_longer_ends_the_attempt(
    make_cluster, docker_client
):
    from tests.proxy import CuttableProxy

    cluster: Cluster = make_cluster(workers=0)
    host, port = cluster.coordinator.link_endpoint.removeprefix("tcp://").rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    try:
        cluster.add_worker(coordinator=f"tcp://127.0.0.1:{proxy.port}")
        short = counting_job(cluster, 60)
        wait_until(lambda: len(cluster.lines(short["id"])) >= 5, 30, "lines before the cut")
        proxy.pause(1.0)  # liveness is 3 s
        done = cluster.wait(short["id"], timeout_s=60)
        assert done["status"] == "FINISHED" and done["attempts"] == 1
        assert_every_line_once(cluster, short["id"], 60)

        long = cluster.submit(IMAGE, ["sh", "-c", "echo first; sleep 300"])
        wait_until(lambda: cluster.lines(long["id"]), 30, "the long job to start")
        proxy.pause(6.0)
        lost = cluster.wait(long["id"], timeout_s=10)
        assert lost["status"] == "ERROR" and "worker lost" in lost["result"]["error"]
        # back on the link, the worker is told the attempt is no longer its own: it stops it
        labels = job_labels(cluster.coordinator.config.state_dir, long["id"])
        wait_until(
            lambda: not docker_client.api.containers(all=True, filters=labels),
            30,
            "the container gone",
        )
        assert [r["line"] for r in cluster.lines(long["id"])] == ["first"]
        assert cluster.client.job(long["id"])["status"] == "ERROR"
    finally:
        proxy.close()


@pytest.mark.docker
def test_a_worker_finds_only_its_own_coordinators_containers(docker_client) -> None:
    # Two gpubox on one Docker engine with one worker name (the host name, by default): a
    # start of one must not re-attach to, and then stop, the other's running job.
    from gpubox.worker import docker_runtime

    name = f"owner-test-{os.getpid()}"

    def container(job_id: int, owner: str | None) -> Any:
        labels = {docker_runtime.LABEL: str(job_id), f"{docker_runtime.LABEL}.attempt": "1"}
        labels[docker_runtime.WORKER_LABEL] = name
        if owner is not None:
            labels[docker_runtime.OWNER_LABEL] = owner
        return docker_client.containers.create(IMAGE, ["true"], labels=labels)

    try:
        container(1, "coordinator-a")
        container(2, "coordinator-b")
        container(3, None)  # made before containers carried their coordinator: anyone's
        runtime = docker_runtime.DockerRuntime(name, client=docker_client, tee=io.StringIO())
        runtime.owner = "coordinator-a"
        assert sorted(job_id for job_id, *_ in runtime.recover()) == [1, 3]
        runtime.owner = "coordinator-b"
        assert sorted(job_id for job_id, *_ in runtime.recover()) == [2, 3]
    finally:
        remove_containers(docker_client, {name})
