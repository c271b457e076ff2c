"""The process runtime: a job's command run directly on this host, as a child process.

For hosts without Docker (like other runners' shell executors) and to measure gpubox's own
overhead without Docker's. It gives NO isolation: the command runs as the worker's user, sees
the host's files, network and every GPU driver. `docker.image` is ignored; `docker.command` is
required. The job gets its own environment (PATH, HOME, LANG, TZ from the worker, then
docker.env and docker.secrets) and its GPUs as NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES
(the UUIDs; "" when it has none) with CUDA_DEVICE_ORDER=PCI_BUS_ID; it starts in
docker.workdir or a fresh empty folder. Container options that need Docker (user, mounts,
shm_size, memory) make the job ERROR with a reason.

Output, cancel, timeout and exit codes behave as with Docker: stdout and stderr are read line
by line, timestamped as they arrive, masked, batched; cancel and timeout send SIGTERM to the
job's process group, then SIGKILL after the grace period; a signal's exit code is 128 + its
number. A worker that stops stops its processes: there is nothing to re-attach to. One
killed outright (SIGKILL) leaves them running unattached, in their own process groups, while
the coordinator hands their jobs out again (or fails them): stop them by hand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

from gpubox import models
from gpubox.worker.runner import (
    Emit,
    LineBuffer,
    Masker,
    emit_done,
    line_text,
    secret_values,
    send_lines,
)

FLUSH_S = 0.1
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
NEEDS_DOCKER = ("user", "mounts", "shm_size", "memory")


def timestamp() -> str:
    """Now, as Docker writes log timestamps (nine fraction digits)."""
    ns = time.time_ns()
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
    return f"{whole}.{ns % 1_000_000_000:09d}Z"


class ProcessRuntime:
    """Runs job attempts as child processes of the worker (see the module docstring)."""

    def __init__(
        self, worker_name: str, stop_grace_s: float = 10.0, tee: IO[str] | None = None
    ) -> None:
        self.worker_name = worker_name
        self.stop_grace_s = stop_grace_s
        self.tee = tee or sys.stderr
        self._tee_lock = threading.Lock()

    def recover(self) -> list[tuple[int, int, list[str], Any]]:
        return []  # a process does not outlive its worker: nothing to find

    def discard(self, container: Any, stop: bool = True) -> None:
        """Nothing to remove: recover() never finds anything."""

    def forget(self, job_id: int) -> None:
        """Nothing kept after a job ends."""

    def run(
        self,
        job: dict[str, Any],
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event | None = None,
        container: Any = None,
        resume: dict[str, str] | None = None,
    ) -> None:
        """Run one attempt to its end and emit "started", "lines", then "done" last. With
        `detach` set (the worker is stopping) the process is stopped and nothing more is
        emitted: the coordinator hands the job out again or fails it, as for a lost worker."""
        detach = detach or threading.Event()
        buffer = LineBuffer(job["first_seq"])
        executed_at: str | None = None
        options = models.ContainerOptions.from_dict(job.get("container"))
        refused = [name for name in NEEDS_DOCKER if getattr(options, name)]
        workdir = options.workdir
        scratch = None
        if not job.get("command"):
            outcome: dict[str, Any] | None = {
                "status": "ERROR",
                "error": "the process runtime runs docker.command, and this job has none",
            }
        elif refused:
            outcome = {
                "status": "ERROR",
                "error": f"the process runtime cannot apply docker.{', docker.'.join(refused)}"
                " (they need the Docker runtime)",
            }
        elif cancel.is_set():
            outcome = {"status": "CANCELLED", "error": "cancelled before the process started"}
        else:
            if workdir is None:
                scratch = workdir = tempfile.mkdtemp(prefix=f"gpubox-job-{job['id']}-")
            try:
                proc = subprocess.Popen(
                    job["command"],
                    cwd=workdir,
                    env=environment(job),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group, stopped as one
                )
            except OSError as exc:
                outcome = {"status": "ERROR", "error": f"could not start the command: {exc}"}
            else:
                executed_at = models.format_time(models.utcnow())
                emit("started", {"container": f"pid-{proc.pid}", "executed_at": executed_at})
                outcome = self._watch(job, proc, buffer, emit, cancel, detach)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if outcome is None:
            return
        self._flush(job, buffer, emit, 0)
        emit_done(emit, outcome, executed_at, buffer)

    def _watch(
        self,
        job: dict[str, Any],
        proc: subprocess.Popen[bytes],
        buffer: LineBuffer,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event,
    ) -> dict[str, Any] | None:
        mask = Masker(secret_values(job))
        ended = [threading.Event(), threading.Event()]
        readers = [
            threading.Thread(target=_read, args=(pipe, name, buffer, mask, end), daemon=True)
            for (pipe, name), end in zip(
                ((proc.stdout, "stdout"), (proc.stderr, "stderr")), ended, strict=True
            )
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + job["timeout"] if job.get("timeout") else None
        stopped_for: str | None = None
        while proc.poll() is None:
            if all(end.is_set() for end in ended):
                # Its output is closed: send what is left, then wait on the exit itself.
                self._flush(job, buffer, emit, 0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(FLUSH_S)
            else:
                self._flush(job, buffer, emit, FLUSH_S)
            if detach.is_set():
                self._stop(proc)
                return None
            if stopped_for is None and cancel.is_set():
                stopped_for = "cancel"
            elif stopped_for is None and deadline is not None and time.monotonic() >= deadline:
                stopped_for = "timeout"
            else:
                continue
            threading.Thread(target=self._stop, args=(proc,), daemon=True).start()
        for reader in readers:
            reader.join(timeout=10)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if stopped_for == "cancel":
            return {"status": "CANCELLED", "exit_code": code, "error": "cancelled"}
        if stopped_for == "timeout":
            return {"status": "ERROR", "exit_code": code, "error": "timeout"}
        if code == 0:
            return {"status": "FINISHED", "exit_code": 0}
        return {"status": "ERROR", "exit_code": code, "error": f"exit code {code}"}

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
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

    def _flush(self, job: dict[str, Any], buffer: LineBuffer, emit: Emit, wait_s: float) -> None:
        send_lines(buffer, emit, self.tee, self._tee_lock, f"job={job['id']} process", wait_s)


def environment(job: dict[str, Any]) -> dict[str, str]:
    """The job's environment: a few of the worker's variables, the job's, its GPUs."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    env.update(job.get("env") or {})
    env.update(job.get("secrets") or {})
    gpus = ",".join(job.get("gpus") or [])
    env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = gpus
    if gpus:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def _read(
    pipe: IO[bytes] | None, stream: str, buffer: LineBuffer, mask: Masker, ended: threading.Event
) -> None:
    """Every line of one pipe into the buffer, timestamped as it arrives; `ended` is set when
    the pipe closed."""
    assert pipe is not None
    try:
        with pipe:
            for raw in pipe:
                buffer.add(timestamp(), stream, line_text(raw, mask))
    finally:
        ended.set()
        buffer.wake()  # the process is likely exiting: the runner looks now
