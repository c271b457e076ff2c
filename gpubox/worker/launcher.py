"""The worker's side of the launch pad (worker.launchpad): a process that runs as the job
user and starts each job's command with one exec, where a worker running as root would
otherwise exec setpriv before each command.

Launcher.start() returns a Launched process, which the process runtime watches as it would
a subprocess.Popen: its pid (the leader of its own process group), its stdout and stderr
pipes, poll() and wait(). The pad is started at the first job, through setpriv, and again
after it died. Should it die while jobs run (killed: a job running as the same user may
signal it), their exit statuses are lost with it: those jobs' process groups are stopped
(SIGKILL) and they end with that signal's code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

PAD = Path(__file__).with_name("launchpad.py")
REPLY_S = 10.0  # how long a start may take the pad before it counts as dead
MAX_PACKET = 64 * 1024  # what the pad says: a few numbers
# A request: a command and its environment. exec takes ~2 MiB of both on Linux; the API's
# 1 MiB bodies keep a job's within that.
MAX_REQUEST = 3 * 1024 * 1024


class Launched:
    """A job's process started by the pad: what the process runtime needs of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.args: list[str] = []
        self.stdout: IO[bytes] | None = None  # set by Launcher.start
        self.stderr: IO[bytes] | None = None
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode


class Launcher:
    """Starts job commands through the pad; any thread. `switch` is the setpriv command
    line that makes a process the job user (process_user.JobUser.switch_command)."""

    def __init__(self, switch: list[str]) -> None:
        self.switch = switch
        self._lock = threading.Lock()  # one start at a time: replies come in order
        self._link: socket.socket | None = None
        self._pad: subprocess.Popen[bytes] | None = None
        # The pad's answers to starts, each with the process it started (None: it did not).
        self._replies: queue.Queue[tuple[dict[str, object], Launched | None]] = queue.Queue()
        self._running: dict[int, Launched] = {}
        self._closing = False

    def start(self, argv: list[str], cwd: str, env: dict[str, str]) -> Launched:
        """Start `argv` in `cwd` with `env`, in a session of its own, as the job user.
        OSError as subprocess.Popen raises it when the command cannot start; also when the
        pad cannot be started or answered in time (it is started again next time)."""
        request = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
        if len(request) > MAX_REQUEST:
            raise OSError(errno.E2BIG, "the command and its environment are too long")
        read_out, write_out = os.pipe()
        read_err, write_err = os.pipe()
        try:
            with self._lock:
                link = self._link or self._open()
                try:
                    socket.send_fds(link, [request], [write_out, write_err])
                    reply, launched = self._replies.get(timeout=REPLY_S)
                except (OSError, queue.Empty) as exc:
                    self._lost(f"it did not take a job: {exc!r}")
                    raise OSError(errno.EPIPE, f"the launch pad did not answer: {exc!r}") from exc
        except BaseException:
            os.close(read_out)
            os.close(read_err)
            raise
        finally:
            os.close(write_out)
            os.close(write_err)
        if launched is None:
            os.close(read_out)
            os.close(read_err)
            raise OSError(_int(reply.get("errno")), str(reply.get("error")))
        launched.args = argv
        launched.stdout = os.fdopen(read_out, "rb", buffering=0)
        launched.stderr = os.fdopen(read_err, "rb", buffering=0)
        return launched

    def open(self) -> None:
        """Start the pad now (else the first job does); OSError if it cannot start."""
        with self._lock:
            if self._link is None:
                self._open()

    def close(self) -> None:
        """Let the pad go (it exits once its end of the socket closes)."""
        with self._lock:
            self._closing = True
            if self._link is not None:
                # shutdown() first: close() alone leaves the socket open while the reader
                # thread is blocked in recv() on it, and the pad waits for its end.
                with contextlib.suppress(OSError):
                    self._link.shutdown(socket.SHUT_RDWR)
                self._link.close()
                self._link = None
        if self._pad is not None:
            try:
                self._pad.wait(5)
            except subprocess.TimeoutExpired:
                self._pad.kill()

    def _open(self) -> socket.socket:
        """Start the pad (holding _lock), and the thread that reads what it says."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A packet must fit the sender's buffer whole (root may set past wmem_max).
        try:
            ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_REQUEST + 4096)
        except OSError:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST + 4096)
        try:
            self._pad = subprocess.Popen(
                [*self.switch, sys.executable, "-I", "-S", str(PAD), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env={"PATH": os.defpath},
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        # Set up (as the job user, not dumpable) before it gets a job; or it cannot start
        # (its Python unreadable to that user, say), and says nothing.
        ours.settimeout(REPLY_S)
        try:
            ready = json.loads(ours.recv(MAX_PACKET) or b"{}")
        except (OSError, ValueError) as exc:
            ready = {"error": repr(exc)}
        ours.settimeout(None)
        if "ready" not in ready:
            ours.close()
            self._pad.kill()
            self._pad.wait()
            raise OSError(
                errno.EPIPE, f"the launch pad did not start: {ready.get('error', 'it ended')}"
            )
        self._link = ours
        self._replies = queue.Queue()
        threading.Thread(
            target=self._read, args=(ours, self._replies), daemon=True, name="gpubox-launcher"
        ).start()
        log.info("the launch pad runs jobs as their user (pid %d)", self._pad.pid)
        return ours

    def _read(
        self, link: socket.socket, replies: queue.Queue[tuple[dict[str, object], Launched | None]]
    ) -> None:
        """What the pad says: the answer to each start, and each process's end."""
        try:
            while True:
                packet = link.recv(MAX_PACKET)
                if not packet:
                    break
                message = json.loads(packet)
                if "exit" in message:
                    ended = self._running.pop(_int(message["exit"]), None)
                    if ended is not None:
                        ended.ended(_int(message["code"]))
                    continue
                launched = None
                if "pid" in message:  # known here before its end can be read
                    launched = self._running[_int(message["pid"])] = Launched(_int(message["pid"]))
                replies.put((message, launched))
        except (OSError, ValueError) as exc:
            if not self._closing:
                log.error("reading the launch pad failed: %s", exc)
        # A start waiting for its answer gets this one at once.
        replies.put(({"errno": errno.EPIPE, "error": "the launch pad ended"}, None))
        with self._lock:
            if self._link is link:
                self._lost("it ended")

    def _lost(self, why: str) -> None:
        """The pad is gone (holding _lock): stop the jobs whose end it would have said."""
        if self._link is not None:
            with contextlib.suppress(OSError):
                self._link.shutdown(socket.SHUT_RDWR)
            self._link.close()
            self._link = None
        if self._closing:
            return
        running, self._running = self._running, {}
        log.error(
            "the launch pad is gone (%s): stopping its %d running job(s); the next job starts"
            " a new one",
            why,
            len(running),
        )
        for launched in running.values():
            with contextlib.suppress(OSError):
                os.killpg(launched.pid, signal.SIGKILL)
            launched.ended(-signal.SIGKILL)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
