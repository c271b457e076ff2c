"""The launch pad (worker.launchpad, worker.launcher): a process already running as the job
user starts each job's command with one exec. Real processes, as root switching to nobody."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubox.worker import launcher as launcher_module
from gpubox.worker import process_user
from gpubox.worker.launcher import MAX_REQUEST, Launcher, PadUnavailable, _Pad
from tests.conftest import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or process_user._setpriv() is None,
    reason="switches to nobody through setpriv: needs root and util-linux",
)

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture()
def launcher() -> Iterator[Launcher]:
    switch = process_user.job_user("nobody").switch_command()
    assert switch is not None
    made = Launcher(switch)
    made.open()
    yield made
    made.close()


@pytest.fixture()
def folder() -> Iterator[str]:
    """A folder nobody may enter."""
    made = tempfile.mkdtemp(prefix="gpubox-launch-")
    os.chmod(made, 0o755)
    yield made
    os.rmdir(made)


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def test_a_command_runs_as_the_job_user_with_its_output_and_exit_code(
    launcher: Launcher, folder: str
) -> None:
    proc = launcher.start(["sh", "-c", "id -u; pwd; echo oops >&2; exit 3"], folder, ENV)
    assert proc.wait(10) == 3 and proc.poll() == 3
    assert proc.stdout is not None and proc.stderr is not None
    nobody = process_user.job_user("nobody")
    assert proc.stdout.read().decode().split() == [str(nobody.uid), folder]
    assert proc.stderr.read() == b"oops\n"
    # Its parent is the pad, which runs as nobody: root switched once, not per job.
    assert launcher._pad is not None
    pad = status_of(launcher._pad.proc.pid)
    assert pad["Uid"].split() == [str(nobody.uid)] * 4
    assert int(pad["CapEff"], 16) == 0


def test_a_signal_gives_a_negative_code_and_a_wait_times_out_first(
    launcher: Launcher, folder: str
) -> None:
    proc = launcher.start(["sleep", "30"], folder, ENV)
    with pytest.raises(Exception, match="timed out"):
        proc.wait(0.1)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)  # its own process group, as the runtime stops it
    assert proc.wait(10) == -signal.SIGTERM


def test_what_cannot_start_raises_as_popen_would(launcher: Launcher, folder: str) -> None:
    with pytest.raises(FileNotFoundError):
        launcher.start(["/no/such/program"], folder, ENV)
    with pytest.raises(PermissionError):  # a folder nobody may not enter
        launcher.start(["true"], "/root", ENV)
    with pytest.raises(OSError) as raised:
        launcher.start(["true", "x" * (MAX_REQUEST + 1)], folder, ENV)
    assert raised.value.errno == errno.E2BIG
    assert launcher.start(["true"], folder, ENV).wait(10) == 0  # the pad serves on


def test_the_pad_hides_its_memory_from_the_jobs_it_runs(launcher: Launcher) -> None:
    # Not dumpable: its /proc files belong to root, so a job (same user) cannot read the
    # environments, secrets included, of the jobs it started, nor ptrace it.
    assert launcher._pad is not None
    environ = Path(f"/proc/{launcher._pad.proc.pid}/environ")
    assert environ.stat().st_uid == 0
    assert status_of(launcher._pad.proc.pid)["Uid"].split()[0] != "0"


def test_a_pad_killed_mid_job_stops_its_jobs_and_the_next_start_makes_a_new_one(
    launcher: Launcher, folder: str
) -> None:
    proc = launcher.start(["sleep", "30"], folder, ENV)
    assert launcher._pad is not None
    first = launcher._pad.proc.pid
    os.kill(first, signal.SIGKILL)
    # Its exit code would be lost with it: the job is stopped, and ends as killed.
    assert proc.wait(10) == -signal.SIGKILL
    wait_until(lambda: not Path(f"/proc/{proc.pid}").exists() or _zombie(proc.pid), 10)
    again = launcher.start(["true"], folder, ENV)
    assert again.wait(10) == 0
    assert launcher._pad.proc.pid != first


def _zombie(pid: int) -> bool:
    try:
        return status_of(pid)["State"].startswith("Z")
    except OSError:
        return True


def test_closing_lets_the_pad_go(folder: str) -> None:
    switch = process_user.job_user("nobody").switch_command()
    assert switch is not None
    made = Launcher(switch)
    made.open()
    assert made._pad is not None
    pad = made._pad.proc
    made.close()
    assert pad.poll() is not None  # it exited once its socket closed


def test_a_runtime_whose_pad_cannot_start_starts_each_job_through_setpriv(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import io
    import threading

    from gpubox.worker import launcher as launcher_module
    from gpubox.worker.process import ProcessRuntime
    from tests.conftest import wire_job

    monkeypatch.setattr(launcher_module, "PAD", Path("/no/such/launchpad.py"))
    runtime = ProcessRuntime("w", tee=io.StringIO(), process_user="nobody")
    assert runtime._launcher is None
    assert "cannot start the launch pad" in caplog.text
    events: list[tuple[str, dict]] = []
    spec = wire_job(id=1, image="-", command=["id", "-u"], container=None)
    runtime.run(spec, lambda *event: events.append(event), threading.Event())
    assert events[-1][1]["status"] == "FINISHED"
    out = [line[2] for kind, body in events if kind == "lines" for line in body["lines"]]
    assert out == [str(runtime.user.uid)]


def test_a_process_the_pad_names_must_be_its_own_job(launcher: Launcher, folder: str) -> None:
    from gpubox.worker.launcher import _check_child

    assert launcher._pad is not None
    pad = launcher._pad.proc.pid
    proc = launcher.start(["sleep", "30"], folder, ENV)
    _check_child(proc.pid, pad)  # its child, leading its own session
    for pid in (0, 1, os.getpid()):  # not its child: root must not act on it
        with pytest.raises(ValueError):
            _check_child(pid, pad)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    # One that ended (a zombie, or reaped: its parent then reads 0) is let be: the pad
    # names a quick job after it may have ended.
    _check_child(proc.pid, pad)


def test_a_job_starts_through_setpriv_while_the_pad_is_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno
    import io
    import threading

    from gpubox.worker.launcher import PadUnavailable
    from gpubox.worker.process import ProcessRuntime
    from tests.conftest import wire_job

    runtime = ProcessRuntime("w", tee=io.StringIO(), process_user="nobody")
    assert runtime._launcher is not None

    def away(*args: object) -> None:
        raise PadUnavailable(errno.EPIPE, "the launch pad did not answer")

    monkeypatch.setattr(runtime._launcher, "start", away)
    events: list[tuple[str, dict]] = []
    spec = wire_job(id=1, image="-", command=["id", "-u"], container=None)
    runtime.run(spec, lambda *event: events.append(event), threading.Event())
    runtime.close()
    assert events[-1][1]["status"] == "FINISHED", events[-1]
    out = [line[2] for kind, body in events if kind == "lines" for line in body["lines"]]
    assert out == [str(runtime.user.uid)]


@pytest.fixture()
def writable() -> Iterator[str]:
    """A folder the job user (nobody) may write in."""
    nobody = process_user.job_user("nobody")
    made = tempfile.mkdtemp(prefix="gpubox-launch-")
    os.chown(made, nobody.uid, nobody.gid)
    yield made
    shutil.rmtree(made)


@pytest.fixture()
def frozen(launcher: Launcher) -> Iterator[_Pad]:
    """The launcher's pad, stopped (SIGSTOP): it gets starts and cannot answer them. Killed
    at the end, whatever the test left of it."""
    pad = launcher._pad
    assert pad is not None
    os.kill(pad.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: status_of(pad.proc.pid)["State"].startswith("T"), 10, "SIGSTOP")
        yield pad
    finally:
        if pad.proc.poll() is None:
            os.kill(pad.proc.pid, signal.SIGCONT)
            pad.proc.kill()
            pad.proc.wait(10)


def start_unanswered(
    launcher: Launcher, argv: list[str], cwd: str, monkeypatch: pytest.MonkeyPatch
) -> OSError:
    """start() on a pad that does not answer within REPLY_S (0.5 s here): what it raises."""
    with monkeypatch.context() as patch:
        patch.setattr(launcher_module, "REPLY_S", 0.5)
        began = time.monotonic()
        with pytest.raises(OSError) as raised:
            launcher.start(argv, cwd, ENV)
        took = time.monotonic() - began
    assert 0.5 <= took < 5, took
    return raised.value


def test_a_pad_that_does_not_answer_is_retired_and_its_late_start_is_stopped(
    launcher: Launcher, frozen: _Pad, writable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that would leave MARKER if it ever ran, after long enough to be stopped.
    late = ["sh", "-c", "sleep 0.3; touch MARKER"]
    failed = start_unanswered(launcher, late, writable, monkeypatch)
    # A plain OSError, not PadUnavailable: the pad may still start this job, so the caller
    # must not start it another way.
    assert not isinstance(failed, PadUnavailable)
    assert failed.errno == errno.EPIPE
    assert frozen.retired

    # The next start gets a new pad, and runs (RAN shows the job user can write here).
    again = launcher.start(["sh", "-c", "touch RAN; exit 7"], writable, ENV)
    assert again.wait(10) == 7
    assert launcher._pad is not None and launcher._pad.proc.pid != frozen.proc.pid
    assert os.path.exists(os.path.join(writable, "RAN"))

    # Let the first pad go on: it starts the late job, which the launcher stops at once.
    # The job's end is the retired pad's last: it is let go.
    os.kill(frozen.proc.pid, signal.SIGCONT)
    woke = time.monotonic()
    wait_until(lambda: frozen.dead and frozen.proc.poll() is not None, 10, "the pad to go")
    assert not frozen.running
    time.sleep(max(0.0, woke + 1.5 - time.monotonic()))  # well past the job's 0.3 s
    assert not os.path.exists(os.path.join(writable, "MARKER")), "the late start ran"


def test_a_retired_pad_whose_late_answer_is_a_failure_is_let_go(
    launcher: Launcher, frozen: _Pad, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_unanswered(launcher, ["/no/such/program"], folder, monkeypatch)
    # It answers, late, that the program does not exist: it runs nothing, and no start will
    # come to it again, so it goes (it stayed, with its reader thread, for good).
    os.kill(frozen.proc.pid, signal.SIGCONT)
    wait_until(lambda: frozen.dead and frozen.proc.poll() is not None, 10, "the pad to go")
    assert launcher.start(["true"], folder, ENV).wait(10) == 0


def test_a_failure_answered_just_as_the_start_gives_up_lets_the_pad_go(
    launcher: Launcher, frozen: _Pad, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the start's wait has timed out, and the pad's answer (it could not start
    # the program) comes before the start marks it retired. The answer was queued for no
    # one and the reader waited on a pad that would say nothing more.
    retire = Launcher._retire

    def answered_first(self: Launcher, pad: _Pad, why: str) -> None:
        os.kill(pad.proc.pid, signal.SIGCONT)
        wait_until(lambda: not pad.replies.empty(), 10, "the pad's answer")
        retire(self, pad, why)

    monkeypatch.setattr(Launcher, "_retire", answered_first)
    start_unanswered(launcher, ["/no/such/program"], folder, monkeypatch)
    wait_until(lambda: frozen.dead and frozen.proc.poll() is not None, 10, "the pad to go")
