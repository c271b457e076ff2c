"""The process runtime: jobs as child processes of the worker, through the whole system
(coordinator, store, worker link), on both stores."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from gpubox import protocol
from gpubox.worker import process_user
from gpubox.worker.process import ProcessRuntime, Scratch, environment
from tests.conftest import IMAGE, Cluster, wait_until
from tests.conftest import wire_job as make_wire_job

NO_IMAGE = "ignored-by-the-process-runtime"


@pytest.fixture()
def cluster(make_cluster) -> Cluster:  # type: ignore[no-untyped-def]
    made: Cluster = make_cluster(workers=0)
    made.add_worker(runtime="process", fake_gpus="2", stop_grace_s=1.0)
    return made


def wire_job(job_id: int, **fields: Any) -> protocol.WireJob:
    """A job as a worker receives it, for the runtime alone."""
    return make_wire_job(
        **{"id": job_id, "image": "-", "command": None, "container": None, **fields}
    )


def run(cluster: Cluster, command: list[str], **fields: object) -> tuple[dict, list[dict]]:
    job = cluster.submit(NO_IMAGE, command, **fields)
    done = cluster.wait(job["id"], timeout_s=60)
    return done, cluster.lines(job["id"])


def test_output_exit_code_and_order(cluster: Cluster) -> None:
    # The sleeps order the lines: each stream is read and timestamped as it arrives, so
    # lines written microseconds apart to two streams may swap.
    done, lines = run(
        cluster, ["sh", "-c", "echo one; sleep 0.05; echo two >&2; sleep 0.05; echo three"]
    )
    assert done["status"] == "FINISHED" and done["result"]["exit_code"] == 0
    assert [(r["stream"], r["line"]) for r in lines] == [
        ("stdout", "one"),
        ("stderr", "two"),
        ("stdout", "three"),
    ]
    assert done["worker"] == "worker-1" and done["result"]["duration"] is not None
    # No image runs here, so none is recorded.
    assert done["result"]["image_id"] is None and done["result"]["image_digest"] is None
    failed, _ = run(cluster, ["sh", "-c", "exit 3"])
    assert failed["status"] == "ERROR" and failed["result"]["exit_code"] == 3
    assert failed["result"]["error"] == "exit code 3"


def test_environment_secrets_and_gpus(cluster: Cluster) -> None:
    script = (
        'echo "$GREETING $TOKEN $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER"; echo "${HOSTILE-unset}"'
    )
    os.environ["HOSTILE"] = "the worker's own variable"
    try:
        done, lines = run(
            cluster,
            ["sh", "-c", script],
            gpus=1,
            docker={"env": {"GREETING": "hi"}, "secrets": {"TOKEN": "s3cret-value"}},
        )
    finally:
        del os.environ["HOSTILE"]
    assert done["status"] == "FINISHED", done
    (uuid,) = done["result"]["gpus"]
    assert [r["line"] for r in lines] == [f"hi [MASKED] {uuid} PCI_BUS_ID", "unset"]
    plain, lines = run(cluster, ["sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'])
    assert [r["line"] for r in lines] == ["[]"]  # no GPU: none visible


def test_workdir_given_or_a_fresh_folder_kept_if_left_empty(
    cluster: Cluster, tmp_path: Path
) -> None:
    given = Path(tempfile.mkdtemp(prefix="gpubox-workdir-"))  # one the job's user may enter
    given.chmod(0o755)
    done, lines = run(cluster, ["pwd"], docker={"workdir": str(given)})
    assert [r["line"] for r in lines] == [str(given)]
    given.rmdir()
    # One it may not enter (tmp_path is under pytest's root-only folder): the job does not
    # start, as a command it may not run (the worker, root, does not enter it for it).
    done, lines = run(cluster, ["pwd"], docker={"workdir": str(tmp_path)})
    assert done["status"] == "ERROR" and done["result"]["exit_code"] == 126, done
    assert "could not start the command" in done["result"]["error"]
    done, lines = run(cluster, ["sh", "-c", "pwd; ls -A | wc -l; touch left-behind"])
    folder, count = (r["line"] for r in lines)
    assert folder != str(tmp_path) and "gpubox-scratch-" in folder and count.strip() == "0"
    assert not Path(folder).exists()  # not empty at the end: removed
    done, lines = run(cluster, ["sh", "-c", "pwd; ls -A | wc -l"])
    clean, count = (r["line"] for r in lines)
    assert clean != folder and count.strip() == "0"
    assert Path(clean).is_dir()  # left empty: kept for the next job, which gets it
    done, lines = run(cluster, ["sh", "-c", "pwd; ls -A | wc -l"])
    assert [r["line"] for r in lines] == [clean, "0"]


def test_scratch_keeps_only_folders_left_as_made(tmp_path: Path) -> None:
    scratch = Scratch()
    first = scratch.take()
    assert Path(first).is_dir() and not os.listdir(first)
    assert (os.stat(first).st_mode & 0o777) == 0o700
    scratch.give_back(first)
    assert scratch.take() == first  # empty, as made: the next job gets it
    os.chmod(first, 0o755)  # opened up by the job: not fresh any more
    scratch.give_back(first)
    assert not Path(first).exists()
    second = scratch.take()
    assert second != first
    (Path(second) / "sub").mkdir()
    (Path(second) / "sub" / "file").write_text("x")
    scratch.give_back(second)
    assert not Path(second).exists()
    third = scratch.take()
    os.rmdir(third)  # the job removed its own folder
    scratch.give_back(third)
    assert scratch.take() not in (first, second, third)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_cancel_stops_the_whole_process_group(cluster: Cluster) -> None:
    job = cluster.submit(NO_IMAGE, ["sh", "-c", "sleep 300 & echo $!; wait"])
    wait_until(lambda: cluster.lines(job["id"]), 30, "the job to start")
    child = int(cluster.lines(job["id"])[0]["line"])
    assert alive(child)
    cluster.client.cancel(job["id"])
    done = cluster.wait(job["id"], timeout_s=30)
    assert done["status"] == "CANCELLED" and done["result"]["exit_code"] == 143
    wait_until(lambda: not alive(child), 10, "the job's background child to be gone too")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(cluster: Cluster) -> None:
    job = cluster.submit(NO_IMAGE, ["sh", "-c", "trap '' TERM; echo ready; sleep 300"])
    wait_until(lambda: cluster.lines(job["id"]), 30, "the job to start")
    cluster.client.cancel(job["id"])
    done = cluster.wait(job["id"], timeout_s=30)
    assert done["status"] == "CANCELLED" and done["result"]["exit_code"] == 137


def test_timeout(cluster: Cluster) -> None:
    done, _ = run(cluster, ["sleep", "300"], timeout=1)
    assert done["status"] == "ERROR" and done["result"]["error"] == "timeout"


def test_a_command_that_cannot_start_ends_the_job_with_a_reason(
    cluster: Cluster, tmp_path: Path
) -> None:
    done, _ = run(cluster, ["/no/such/program"])
    assert done["status"] == "ERROR" and "could not start the command" in done["result"]["error"]
    assert done["result"]["exit_code"] == 127  # as a shell and the Docker runtime say it
    (tmp_path / "data").write_text("not a program")
    done, _ = run(cluster, [str(tmp_path / "data")])  # found, not executable
    assert done["status"] == "ERROR" and done["result"]["exit_code"] == 126


@pytest.mark.parametrize(
    ("command", "docker", "why"),
    [
        (None, {}, "it has no docker.command"),
        (["true"], {"user": "1000"}, "it sets docker.user"),
        (["true"], {"shm_size": "1g", "memory": "1g"}, "it sets docker.shm_size, docker.memory"),
    ],
)
def test_what_it_cannot_do_is_not_sent_to_it_and_the_job_says_why(
    cluster: Cluster, command: list[str] | None, docker: dict, why: str
) -> None:
    job = cluster.submit(NO_IMAGE, command, docker=docker)
    wait_until(
        lambda: why in cluster.client.job(job["id"]).get("queue_reason", ""),
        10,
        "the scheduler's reason",
    )
    assert cluster.client.job(job["id"])["status"] == "QUEUED"


@pytest.mark.parametrize(
    ("command", "docker", "error"),
    [
        (None, {}, "the process runtime runs docker.command, and this job has none"),
        (["true"], {"user": "1000"}, "cannot apply docker.user"),
        (["true"], {"shm_size": "1g", "memory": "1g"}, "docker.shm_size, docker.memory"),
    ],
)
def test_the_runtime_itself_refuses_what_it_cannot_do(
    command: list[str] | None, docker: dict, error: str
) -> None:
    # should a job reach it anyway (a coordinator that does not know runtimes)
    spec = wire_job(1, command=command, container=docker)
    events: list[tuple[str, dict]] = []
    ProcessRuntime("w", tee=io.StringIO()).run(
        spec, lambda *event: events.append(event), threading.Event()
    )
    ((kind, body),) = events
    assert kind == "done" and body["status"] == "ERROR" and error in body["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to nobody: needs root")
@pytest.mark.parametrize("switch", ["setpriv", "fork"])
def test_a_job_runs_as_its_user_with_no_way_back_to_root(
    switch: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The worker (root) switches to process_user in the child: through setpriv where it is
    # installed (no fork of the whole worker), else in Python's forked child. Either way the
    # job must hold nobody's ids, saved ones included, its groups and no capability.
    if switch == "fork":
        monkeypatch.setattr(process_user, "_setpriv", lambda: None)
    elif process_user._setpriv() is None:
        pytest.skip("no setpriv (util-linux) on this host")
    runtime = ProcessRuntime("w", tee=io.StringIO(), process_user="nobody")
    events: list[tuple[str, dict]] = []
    spec = wire_job(
        1, command=["grep", "-E", "^(Uid|Gid|Groups|CapPrm|CapEff):", "/proc/self/status"]
    )
    runtime.run(spec, lambda *event: events.append(event), threading.Event())
    status = dict(
        line[2].split(":\t", 1)
        for kind, body in events
        if kind == "lines"
        for line in body["lines"]
    )
    nobody = runtime.user
    assert status["Uid"].split() == [str(nobody.uid)] * 4
    assert status["Gid"].split() == [str(nobody.gid)] * 4
    assert sorted(map(int, status["Groups"].split())) == sorted(set(nobody.groups))
    assert int(status["CapPrm"], 16) == int(status["CapEff"], 16) == 0
    assert events[-1][1]["status"] == "FINISHED"
    if switch == "fork":
        return
    # What setpriv would fail to start ends the job as an ERROR before, as Python's own exec.
    events.clear()
    (tmp_path / "data").write_text("not a program")
    for command, code in ((["no-such-program"], 127), ([str(tmp_path / "data")], 126)):
        runtime.run(wire_job(2, command=command), lambda *e: events.append(e), threading.Event())
        done = events[-1][1]
        assert done["status"] == "ERROR" and done["exit_code"] == code, done
        assert "could not start the command" in done["error"]


def test_long_lines_are_split_and_nothing_is_lost(cluster: Cluster) -> None:
    done, lines = run(
        cluster, ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x; echo; seq 1 5000"]
    )
    assert done["status"] == "FINISHED"
    texts = [r["line"] for r in lines]
    assert texts[-5000:] == [str(i) for i in range(1, 5001)]
    assert "".join(texts[:-5000]) == "x" * 200000


def test_a_last_line_without_newline_and_a_child_left_behind(cluster: Cluster) -> None:
    # The command exits while a process it started still holds its output open: the job ends
    # (after a bounded wait), with every line written before the exit.
    done, lines = run(cluster, ["sh", "-c", "sleep 30 & printf 'a\\nb'; printf c >&2"])
    assert done["status"] == "FINISHED"
    assert sorted((r["stream"], r["line"]) for r in lines) == [
        ("stderr", "c"),
        ("stdout", "a"),
        ("stdout", "b"),
    ]


@pytest.mark.docker
def test_a_mixed_pool_sends_docker_only_jobs_to_docker_workers(make_cluster) -> None:  # type: ignore[no-untyped-def]
    made: Cluster = make_cluster(workers=0)
    made.add_worker(name="a-proc", runtime="process")  # first by name: preferred on a tie
    made.add_worker(name="b-docker")
    docker_only = [
        made.submit(IMAGE, ["true"], docker={"memory": "64m"}),
        made.submit(IMAGE, ["true"], docker={"shm_size": "128m"}),
    ]
    for job in docker_only:
        done = made.wait(job["id"])
        assert (done["status"], done["worker"]) == ("FINISHED", "b-docker"), done
    # the image's own command (this test image has none, so Docker refuses it: on b-docker)
    assert made.wait(made.submit(IMAGE)["id"])["worker"] == "b-docker"
    anywhere = made.wait(made.submit(IMAGE, ["true"])["id"])
    assert (anywhere["status"], anywhere["worker"]) == ("FINISHED", "a-proc"), anywhere


def test_a_restarted_worker_stops_what_its_killed_run_left_behind(tmp_path: Path) -> None:
    # A worker killed outright (SIGKILL) leaves its job's processes running while the
    # coordinator hands the job out again: the next start must stop them, a job's children
    # too, and nothing of another worker (another coordinator, same name) on this host.
    def left_behind(owner: str, job_id: int) -> tuple[subprocess.Popen[bytes], int]:
        runtime = ProcessRuntime("w1", tee=io.StringIO())
        runtime.owner = owner
        spec = wire_job(job_id)
        child_pid = tmp_path / f"child-{job_id}"
        proc = subprocess.Popen(
            ["sh", "-c", f"sleep 300 & echo $! > {child_pid}; wait"],
            env=environment(spec, runtime.marker()),
            start_new_session=True,
        )
        wait_until(lambda: child_pid.exists() and child_pid.read_text().strip(), 10, "the child")
        return proc, int(child_pid.read_text())

    ours, our_child = left_behind("coordinator-a", 7)
    theirs, their_child = left_behind("coordinator-b", 8)
    try:
        restarted = ProcessRuntime("w1", tee=io.StringIO())
        restarted.owner = "coordinator-a"
        assert restarted.recover() == []  # nothing to re-attach to, but:
        assert ours.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: not alive(our_child), 10, "the job's child to be stopped too")
        assert theirs.poll() is None and alive(their_child)
    finally:
        for proc in (ours, theirs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
