"""The process runtime: a job's command run directly on this host, as a child process.

For hosts without Docker (like other runners' shell executors) and to measure gpubox's own
overhead without Docker's. It gives NO isolation beyond a user: the command runs as the
worker's `process_user` (never root; by default "nobody" when the worker runs as root, else
the worker's own user), sees the host's files that user may read, the network and every GPU
driver. The coordinator sends such a worker only jobs whose token may use process workers.
`docker.image` is ignored; `docker.command` is required. The job gets its own environment
(PATH, HOME, LANG, TZ from the worker, HOME, USER and LOGNAME of the job's user, then
docker.env and docker.secrets, GPUBOX_JOB_ID, and a marker, GPUBOX_WORKER_RUN) and its GPUs
as NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES (the UUIDs; "" when it has none) with
CUDA_DEVICE_ORDER=PCI_BUS_ID; it starts in docker.workdir or a fresh empty folder (one
emptied by the job that used it last counts as fresh: it is kept for the next). Container
options that need Docker (user, mounts, shm_size, memory) make the job ERROR with a reason.

Output, cancel, timeout and exit codes behave as with Docker: stdout and stderr are read line
by line, timestamped as they arrive, masked, batched (the job ends when the command has exited
and its output is closed; output held open by a process it left running is read for at most
READ_AFTER_EXIT_S more); cancel and timeout send SIGTERM to the
job's process group, then SIGKILL after the grace period; a signal's exit code is 128 + its
number. A worker that stops stops its processes: there is nothing to re-attach to. One
killed outright (SIGKILL) leaves them running unattached, in their own process groups, while
the coordinator hands their jobs out again (or fails them); its next start stops every
process that still carries its marker (a job's children too, unless they dropped it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

from gpubox import models, protocol
from gpubox.logfmt import fields
from gpubox.worker import stopping
from gpubox.worker.launcher import Launched, Launcher, PadUnavailable
from gpubox.worker.lines import Emit, LineBuffer, Masker, emit_done, secret_values, send_lines
from gpubox.worker.process_output import Output
from gpubox.worker.process_user import JobUser, check_runnable, job_user
from gpubox.worker.scratch import Scratch

# What tests and other modules import from here, whichever module holds it.
__all__ = [
    "JobUser",
    "Output",
    "ProcessRuntime",
    "Scratch",
    "environment",
    "job_user",
]

FLUSH_S = 0.1
READ_AFTER_EXIT_S = 2.0
log = logging.getLogger(__name__)

PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
OWNER_VARIABLE = "GPUBOX_WORKER_RUN"  # coordinator:worker, in every job process's environment

# A job's process: started by this worker, or by the launch pad for it.
Process = subprocess.Popen[bytes] | Launched


class ProcessRuntime:
    """Runs job attempts as child processes of the worker (see the module docstring)."""

    outlives_worker = False  # stopping the worker stops its jobs' processes
    owner = ""  # set by the agent (Runtime.owner)

    def __init__(
        self,
        worker_name: str,
        stop_grace_s: float = 10.0,
        tee: IO[str] | None = None,
        process_user: str = "",
    ) -> None:
        """`process_user`: the worker setting (see job_user, which may refuse it)."""
        self.worker_name = worker_name
        self.stop_grace_s = stop_grace_s
        self.tee = tee or sys.stderr
        self._tee_lock = threading.Lock()
        self.user = job_user(process_user)
        self._scratch = Scratch(self.user.uid, self.user.gid)
        # A worker that switches user starts jobs through the launch pad (worker.launcher):
        # one exec a job, not setpriv's and the command's. Where the pad cannot start,
        # each job goes through setpriv as before.
        self._launcher: Launcher | None = None
        switch = self.user.switch_command()
        if switch is not None:
            launcher = Launcher(switch)
            try:
                launcher.open()
                self._launcher = launcher
            except OSError as exc:
                log.warning(
                    "cannot start the launch pad (%s): each job starts through setpriv", exc
                )
        log.info(
            "the process runtime runs jobs as %s (uid %d)",
            self.user.name,
            self.user.uid,
            extra=fields(worker=worker_name),
        )

    def recover(self) -> list[tuple[int, int, list[str], Any]]:
        """Nothing to re-attach to; but a worker killed outright (SIGKILL, a crash) left its
        jobs' processes running, which the coordinator has handed out again or ended: they
        are stopped now, found by the marker in their environment (see environment())."""
        marker = f"{OWNER_VARIABLE}={self.marker()}".encode()
        stopped: set[str] = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as fh:
                    variables = fh.read().split(b"\0")
                if marker in variables:
                    os.kill(int(entry.name), signal.SIGKILL)
                    job = [v for v in variables if v.startswith(b"GPUBOX_JOB_ID=")]
                    stopped.add(job[0].decode().partition("=")[2] if job else "?")
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
        if stopped:
            log.warning(
                "stopped what the last run of this worker left running of job(s) %s",
                ", ".join(sorted(stopped)),
            )
        return []

    def marker(self) -> str:
        """What marks this worker's job processes: its coordinator, its name."""
        return f"{self.owner}:{self.worker_name}"

    def discard(self, container: Any, stop: bool = True) -> None:
        """Nothing to remove: recover() never finds anything."""

    def forget(self, job_id: int) -> None:
        """Nothing kept after a job ends."""

    def run(
        self,
        job: protocol.WireJob,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event | None = None,
        container: Any = None,
        resume: models.LogMarks | None = None,
    ) -> None:
        """Run one attempt to its end and emit "started", "lines", then "done" last. With
        `detach` set (the worker is stopping) the process is stopped and nothing more is
        emitted: the coordinator hands the job out again or fails it, as for a lost worker."""
        detach = detach or threading.Event()
        buffer = LineBuffer(job.first_seq)
        stopping.attach(cancel, buffer)  # the worker's notes (an idle warning) go in its log
        executed_at: str | None = None
        options = models.ContainerOptions.from_dict(job.container)
        refused = options.needs_docker()
        workdir = options.workdir
        scratch = None
        if not job.command:
            outcome: dict[str, Any] | None = {
                "status": "ERROR",
                "error": "the process runtime runs docker.command, and this job has none",
            }
        elif refused:
            outcome = {
                "status": "ERROR",
                "error": f"the process runtime cannot apply docker.{', docker.'.join(refused)}"
                " (only the Docker runtime can)",
            }
        elif cancel.is_set():
            outcome = {"status": "CANCELLED", "error": "cancelled before the process started"}
        else:
            if workdir is None:
                scratch = workdir = self._scratch.take()
            try:
                env = environment(job, self.marker(), self.user)
                proc = self._start(job.command, workdir, env)
            except OSError as exc:
                outcome = {
                    "status": "ERROR",
                    "error": f"could not start the command: {exc}",
                    # as a shell (and Docker) says it: 127 not found, 126 found but not run
                    "exit_code": 127 if isinstance(exc, FileNotFoundError) else 126,
                }
            else:
                executed_at = models.format_time(models.utcnow())
                emit("started", {"container": f"pid-{proc.pid}", "executed_at": executed_at})
                outcome = self._watch(job, proc, buffer, emit, cancel, detach)
        if scratch is not None:
            self._scratch.give_back(scratch)
        if outcome is None:
            return
        self._flush(job, buffer, emit, 0)
        emit_done(emit, outcome, executed_at, buffer)

    def _start(self, command: list[str], cwd: str, env: dict[str, str]) -> Process:
        """Start the job's command, in its own process group (stopped as one); OSError when
        it cannot start."""
        if self._launcher is not None:
            # Found first as root, so a missing program is "not found" (127) even where a
            # folder on PATH is closed to the job's user, who would be told "denied" (126).
            check_runnable(command[0], cwd, env)
            try:
                return self._launcher.start(command, cwd, env)
            except PadUnavailable as exc:
                log.warning("the launch pad is away (%s): this job starts through setpriv", exc)
        argv, switch = self.user.launch(command, cwd, env)
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            **switch,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def close(self) -> None:
        """Let the launch pad go (the worker stops)."""
        if self._launcher is not None:
            self._launcher.close()

    def _watch(
        self,
        job: protocol.WireJob,
        proc: Process,
        buffer: LineBuffer,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event,
    ) -> dict[str, Any] | None:
        """Read both pipes in this thread until they close and the process has exited,
        sending lines in batches, and stop the process on cancel, timeout or detach."""
        assert proc.stdout is not None and proc.stderr is not None
        output = Output(Masker(secret_values(job)), proc.stdout, proc.stderr)
        deadline = time.monotonic() + job.timeout if job.timeout else None
        exited_at: float | None = None
        stopped_for: str | None = None
        try:
            while True:
                now = time.monotonic()
                lines = output.read(FLUSH_S if output.due is None else output.due - now)
                buffer.add_many(lines)
                if output.flush_due(time.monotonic()):
                    self._flush(job, buffer, emit, 0)
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
                if exited_at is not None and (
                    output.closed or time.monotonic() - exited_at > READ_AFTER_EXIT_S
                ):
                    break  # (output held open by a process it left behind is not waited for)
                if output.closed:
                    # Nothing more to read: wait on the exit itself, a little at a time.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(FLUSH_S)
                if detach.is_set():
                    self._stop(proc)
                    return None
                if stopped_for is None and cancel.is_set():
                    stopped_for = "cancel"
                elif stopped_for is None and deadline is not None and now >= deadline:
                    stopped_for = "timeout"
                else:
                    continue
                threading.Thread(target=self._stop, args=(proc,), daemon=True).start()
        finally:
            output.close()
        buffer.add_many(output.rest())
        returned = proc.returncode
        assert returned is not None  # the loop above ends once it has exited
        code = returned if returned >= 0 else 128 - returned
        if stopped_for == "cancel":
            return stopping.outcome(cancel, code)
        if stopped_for == "timeout":
            return {"status": "ERROR", "exit_code": code, "error": "timeout"}
        if code == 0:
            return {"status": "FINISHED", "exit_code": 0}
        return {"status": "ERROR", "exit_code": code, "error": f"exit code {code}"}

    def _stop(self, proc: Process) -> None:
        """SIGTERM to the job's process group, SIGKILL after the grace period."""
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def _flush(self, job: protocol.WireJob, buffer: LineBuffer, emit: Emit, wait_s: float) -> None:
        send_lines(buffer, emit, self.tee, self._tee_lock, f"job={job.id} process", wait_s)


def environment(
    job: protocol.WireJob, marker: str = "", user: JobUser | None = None
) -> dict[str, str]:
    """The job's environment: a few of the worker's variables (HOME, USER and LOGNAME those
    of `user` when the worker switches to it), the job's, its GPUs, its id, and the marker by
    which a restarted worker finds what its last run left behind."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    if user is not None and user.switch:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    env.update(job.env or {})
    env.update(job.secrets or {})
    env["GPUBOX_JOB_ID"] = str(job.id)
    env[OWNER_VARIABLE] = marker
    gpus = ",".join(job.gpus or [])
    env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = gpus
    if gpus:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
