"""The worker's side of the launch pad (worker.launchpad): a process that runs as the job
user and starts each job's command with one exec, where a worker running as root would
otherwise exec setpriv before each command.

Launcher.start() returns a Launched process, which the process runtime watches as it would
a subprocess.Popen: its pid (the leader of its own process group), its stdout and stderr
pipes, poll() and wait(). The pad is started with the runtime, through setpriv. A pad that
does not answer a start in time is retired: that job fails to start (the pad may still
start it: such a late start is stopped), it takes no more jobs but still says when its
running ones end, and the next start gets a new pad. A pad that dies (a job running as the
same user may kill it) takes the exit codes of its running jobs with it: those jobs'
process groups are stopped (SIGKILL) and they end with that signal's code.

What the pad says is checked before the worker, root, acts on it: a process it names must
be its own child, in a session of its own, or the pad counts as dead.
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
from typing import IO, Any

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
PAD = Path(__file__).with_name("launchpad.py")
REPLY_S = 10.0  # how long a start may take the pad before it is retired
MAX_PACKET = 64 * 1024  # what the pad says: a few numbers
# A request: a command and its environment. exec takes ~2 MiB of both on Linux; the API's
# 1 MiB bodies keep a job's within that.
MAX_REQUEST = 3 * 1024 * 1024


class PadUnavailable(OSError):
    """No launch pad could be started: the job may start another way. (One that stops
    answering fails the start in hand with a plain OSError: it may still run that one.)"""


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


class _Pad:
    """One pad process, its socket, and what it said. Only its reader thread changes
    `running`."""

    def __init__(self, proc: subprocess.Popen[bytes], link: socket.socket, room: int) -> None:
        self.proc = proc
        self.link = link
        self.room = room  # the largest request its socket takes whole
        # Its answers to starts, each with the process it started (None: it did not).
        self.replies: queue.Queue[tuple[dict[str, Any], Launched | None]] = queue.Queue()
        self.running: dict[int, Launched] = {}
        self.retired = False  # it takes no more starts; it goes once its jobs have ended
        self.dead = False  # its reader stopped: it answers no more (set before it says so)
        self.guard = threading.Lock()  # `retired`, `awaiting` and the queued answers
        # Starts sent and not answered yet. A retired pad is let go only once it runs nothing
        # and owes no answer: one it still owes may start a process, which must be stopped.
        self.awaiting = 0

    @property
    def idle(self) -> bool:
        """It runs nothing and owes no answer: once retired, nothing more will come from it."""
        return not self.running and not self.awaiting


class Launcher:
    """Starts job commands through the pad; any thread. `switch` is the setpriv command
    line that makes a process the job user (process_user.JobUser.switch_command)."""

    def __init__(self, switch: list[str]) -> None:
        self.switch = switch
        self._lock = threading.Lock()  # one start at a time: answers come in order
        self._pad: _Pad | None = None
        self._closing = False

    def open(self) -> None:
        """Start the pad now (else the next start does); PadUnavailable if it cannot."""
        with self._lock:
            if self._pad is None:
                self._pad = self._open()

    def start(self, argv: list[str], cwd: str, env: dict[str, str]) -> Launched:
        """Start `argv` in `cwd` with `env`, in a session of its own, as the job user.
        OSError as subprocess.Popen raises it when the command cannot start, or when the pad
        does not answer in time (it is retired); PadUnavailable when no pad can be
        started."""
        request = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
        read_out, write_out = os.pipe()
        read_err, write_err = os.pipe()
        try:
            with self._lock:
                if self._pad is not None and self._pad.dead:
                    self._pad = None
                pad = self._pad = self._pad or self._open()
                if len(request) > pad.room:
                    raise OSError(errno.E2BIG, "the command and its environment are too long")
                with pad.guard:
                    pad.awaiting += 1
                try:
                    socket.send_fds(pad.link, [request], [write_out, write_err])
                except OSError as exc:
                    with pad.guard:
                        pad.awaiting -= 1  # a packet goes whole or not at all: it has nothing
                    self._retire(pad, f"it did not take a job: {exc!r}")
                    raise OSError(errno.EPIPE, f"the launch pad did not answer: {exc!r}") from exc
                try:
                    reply, launched = pad.replies.get(timeout=REPLY_S)
                except queue.Empty as exc:
                    # Not PadUnavailable: it may still start this one (a late start of a
                    # retired pad is stopped), and another start must not run it twice.
                    self._retire(pad, f"it did not answer a start in {REPLY_S:g} s")
                    raise OSError(errno.EPIPE, "the launch pad did not answer") from exc
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
            code = reply.get("errno")
            raise OSError(code if isinstance(code, int) else 0, str(reply.get("error")))
        launched.args = argv
        launched.stdout = os.fdopen(read_out, "rb", buffering=0)
        launched.stderr = os.fdopen(read_err, "rb", buffering=0)
        return launched

    def close(self) -> None:
        """Let the pad go (it exits once its end of the socket closes)."""
        with self._lock:
            self._closing = True
            pad, self._pad = self._pad, None
        if pad is not None:
            _shut(pad.link)
            try:
                pad.proc.wait(5)
            except subprocess.TimeoutExpired:
                pad.proc.kill()

    def _open(self) -> _Pad:
        """Start a pad (holding _lock), and the thread that reads what it says."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A packet must fit the sender's buffer whole (root may set it past wmem_max; a
        # worker without CAP_NET_ADMIN gets what it gets, and says so for a long request).
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST + 4096)
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_REQUEST + 4096)
        room = min(MAX_REQUEST, ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 4096)
        try:
            proc = subprocess.Popen(
                [*self.switch, sys.executable, "-I", "-S", str(PAD), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env={"PATH": os.defpath},
            )
        except OSError as exc:
            ours.close()
            raise PadUnavailable(exc.errno or errno.EPIPE, f"cannot start it: {exc}") from exc
        finally:
            theirs.close()
        # Set up (as the job user, not dumpable, not traced) before it gets a job; or it
        # cannot start (its Python unreadable to that user, say), and says nothing.
        ours.settimeout(REPLY_S)
        try:
            ready = json.loads(ours.recv(MAX_PACKET) or b"{}")
        except (OSError, ValueError) as exc:
            ready = {"error": repr(exc)}
        ours.settimeout(None)
        if "ready" not in ready:
            ours.close()
            proc.kill()
            proc.wait()
            why = ready.get("error", "it ended")
            raise PadUnavailable(errno.EPIPE, f"the launch pad did not start: {why}")
        pad = _Pad(proc, ours, room)
        threading.Thread(
            target=self._read, args=(pad,), daemon=True, name="gpubox-launcher"
        ).start()
        log.info("the launch pad runs jobs as their user (pid %d)", proc.pid)
        return pad

    def _retire(self, pad: _Pad, why: str) -> None:
        """No more starts for this pad (holding _lock): the next start gets a new one."""
        with pad.guard:
            pad.retired = True
            # An answer that came just as the start was given up on: that start is not run.
            late = [launched for _, launched in _drain(pad.replies) if launched is not None]
            idle = pad.idle
        for launched in late:
            with contextlib.suppress(OSError):
                os.killpg(launched.pid, signal.SIGKILL)
        if idle:
            # It runs nothing and owes no answer: nothing more will come from it to end its
            # reader. Ended here, the reader sees the socket close and _lost lets the pad go.
            _shut(pad.link)
        if self._pad is pad:
            self._pad = None
        log.error("the launch pad (pid %d) takes no more jobs: %s", pad.proc.pid, why)

    def _read(self, pad: _Pad) -> None:
        """What a pad says: the answer to each start, and each process's end."""
        try:
            while True:
                packet = pad.link.recv(MAX_PACKET)
                if not packet:
                    break
                message = json.loads(packet)
                if "exit" in message:
                    ended = pad.running.pop(_int(message["exit"]), None)
                    if ended is not None:
                        ended.ended(_int(message["code"]))
                    if pad.retired and pad.idle:
                        break  # its last job ended: let it go
                    continue
                launched = None
                if "pid" in message:
                    pid = _int(message["pid"])
                    _check_child(pid, pad.proc.pid)
                    launched = pad.running[pid] = Launched(pid)  # known before its end
                with pad.guard:
                    pad.awaiting -= 1
                    if not pad.retired:
                        pad.replies.put((message, launched))
                        continue
                # The answer to a start given up on: not run.
                if launched is not None:
                    with contextlib.suppress(OSError):
                        os.killpg(launched.pid, signal.SIGKILL)
                if pad.idle:
                    break  # it runs nothing and owes no answer: let it go
        except Exception as exc:  # what it said makes no sense: it counts as dead
            if not self._closing:
                log.error("the launch pad (pid %d) said something wrong: %s", pad.proc.pid, exc)
        # No start goes to it from now on; one waiting for its answer gets this one at once.
        pad.dead = True
        pad.replies.put(({"lost": True, "error": "the launch pad ended"}, None))
        self._lost(pad)

    def _lost(self, pad: _Pad) -> None:
        """A pad is gone: stop the jobs whose end it would have said."""
        with self._lock:
            if self._pad is pad:
                self._pad = None
            closing = self._closing
        _shut(pad.link)
        if not closing:
            pad.proc.kill()  # before it starts what it may still hold
        with contextlib.suppress(subprocess.TimeoutExpired):
            pad.proc.wait(5)
        if closing or not pad.running:
            return
        log.error(
            "the launch pad (pid %d) is gone: stopping its %d running job(s)",
            pad.proc.pid,
            len(pad.running),
        )
        for launched in pad.running.values():
            with contextlib.suppress(OSError):
                os.killpg(launched.pid, signal.SIGKILL)
            launched.ended(-signal.SIGKILL)
        pad.running.clear()


def _check_child(pid: int, pad_pid: int) -> None:
    """ValueError unless `pid` is a process the pad started: its child, leading a session
    of its own. Root acts on it (stops its process group): a pad taken over by a job must
    not name any other process. One that already ended and was reaped is let be."""
    if pid <= 1:
        raise ValueError(f"pid {pid}")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return  # ended and reaped already: there is nothing left to stop
    state, parent, session = stat[0], int(stat[1]), int(stat[3])
    if state in ("Z", "X") or parent == 0:
        return  # ended, being reaped (its parent and session read 0 and -1 then)
    if parent != pad_pid or session != pid:
        raise ValueError(f"pid {pid} (parent {parent}, session {session}) is not its job")


def _drain(replies: queue.Queue[Any]) -> list[Any]:
    """What the queue holds now, taken out."""
    drained = []
    with contextlib.suppress(queue.Empty):
        while True:
            drained.append(replies.get_nowait())
    return drained


def _shut(link: socket.socket) -> None:
    # shutdown() first: close() alone leaves the socket open while a reader thread is
    # blocked in recv() on it, and the pad waits for its end.
    with contextlib.suppress(OSError):
        link.shutdown(socket.SHUT_RDWR)
    link.close()


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    return value
