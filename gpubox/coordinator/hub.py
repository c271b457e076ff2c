"""How a coordinator's HTTP processes reach its broker process (http_processes > 1).

Three ZeroMQ sockets, ipc:// in a folder only the coordinator's user can enter:
- `calls` (ROUTER, in the broker process): an HTTP process asks what only the broker knows
  (why a job waits, /metrics, a worker's GPUs now, …). Each call is [method, msgpack
  arguments]; each answer [b"ok" or b"error", msgpack value].
- `pokes` (PULL): an HTTP process says a job was queued or cancelled, and waits for nothing.
- `news` (PUB, in the broker process): which jobs changed (lines stored, status changed), so
  that every HTTP process wakes its own followers and waiters at once, with no polling.

Hub is the broker process's side; Remote (RemoteLive and the news reader) the HTTP
processes'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from gpubox import errors, models, supervise
from gpubox.coordinator.events import Changes
from gpubox.store import Store

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # an HTTP process's call the broker process has not answered: 503
NOTIFY, FORGET = b"n", b"f"


def endpoints(folder: str) -> tuple[str, str, str]:
    """The ipc:// endpoints of the calls, the news and the pokes in `folder`."""
    return f"ipc://{folder}/calls", f"ipc://{folder}/news", f"ipc://{folder}/pokes"


class Hub:
    """The broker process's side: answers calls with `live` (the broker's view) and publishes every
    change that `changes` is told of. run() is an essential thread's target."""

    def __init__(
        self,
        live: Any,
        store: Store,
        changes: Changes,
        context: zmq.Context[Any],
        stopping: threading.Event,
    ) -> None:
        self.live = live
        self.store = store
        self.stopping = stopping
        self.loop = supervise.Loop(stall_s=30.0)
        # A short path (ipc:// paths are limited to about 100 bytes), private (0700).
        self.folder = tempfile.mkdtemp(prefix="gpubox-hub-")
        calls, news, pokes = endpoints(self.folder)
        self._calls = context.socket(zmq.ROUTER)
        self._calls.setsockopt(zmq.LINGER, 0)
        self._calls.bind(calls)
        self._pokes = context.socket(zmq.PULL)
        self._pokes.setsockopt(zmq.LINGER, 0)
        self._pokes.bind(pokes)
        self._news = context.socket(zmq.PUB)
        self._news.setsockopt(zmq.LINGER, 0)
        self._news.setsockopt(zmq.SNDHWM, 100_000)  # past it a wake is lost: WAKE_S covers it
        self._news.bind(news)
        self._news_lock = threading.Lock()  # the PUB is used by the threads that notify
        self.ready: set[int] = set()  # HTTP processes (their pids) that said they serve
        self.ready_changed = threading.Condition()
        changes.listeners.append(self.publish)
        self._methods: dict[bytes, Callable[..., Any]] = {
            b"queue_reason": lambda job_id: live.queue_reason(store.get_job(job_id)),
            b"queue_state": lambda job_id, place, recent: live.queue_state(
                store.get_job(job_id), place, recent
            ),
            b"queue_in_order": lambda limit: [job.id for job in live.queue_in_order(limit)],
            b"metrics_page": live.metrics_page,
            b"gpu_usage": live.gpu_usage,
            b"last_heard": lambda worker: models.format_time(live.last_heard(worker)),
            b"quarantine": live.quarantine,
            b"stalled": live.stalled,
            b"last_turn_s": live.last_turn_s,
            b"ready": self._ready,
        }

    def publish(self, kind: str, job_id: int) -> None:
        """Tell every HTTP process that a job changed ("notify") or ended ("forget")."""
        with self._news_lock:
            self._news.send_multipart([NOTIFY if kind == "notify" else FORGET, b"%d" % job_id])

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._calls, zmq.POLLIN)
        poller.register(self._pokes, zmq.POLLIN)
        while not self.stopping.is_set():
            self.loop.tick()
            if not poller.poll(200):
                continue
            while True:
                try:
                    frames = self._calls.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._answer(frames)
            while True:
                try:
                    kind, job_id = self._pokes.recv_multipart(zmq.NOBLOCK)
                    self.live.poke(kind.decode(), int(job_id))
                except zmq.Again:
                    break
                except (ValueError, UnicodeDecodeError):
                    continue  # not a poke of ours

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return  # only our own processes can reach this socket: not a call of theirs
        sender, method, packed = frames
        try:
            args = msgpack.unpackb(packed)
            value = self._methods[method](*args)
            reply = [sender, b"ok", msgpack.packb(value)]
        except Exception as exc:  # the caller answers its request with it
            log.warning("hub call %r failed: %s", method[:40], exc)
            reply = [sender, b"error", msgpack.packb(f"{type(exc).__name__}: {exc}")]
        self._calls.send_multipart(reply)

    def _ready(self, pid: int) -> None:
        with self.ready_changed:
            self.ready.add(pid)
            self.ready_changed.notify_all()

    def close(self) -> None:
        self._calls.close(0)
        self._pokes.close(0)
        with self._news_lock:
            self._news.close(0)
        for name in ("calls", "news", "pokes"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)


class RemoteLive:
    """An HTTP process's view of the broker (api.context.LiveView), by calls to the Hub. Any
    thread: each has its own socket."""

    def __init__(self, folder: str, store: Store, context: zmq.Context[Any]) -> None:
        self.calls, self.news, self.pokes = endpoints(folder)
        self.store = store
        self.context = context
        self._local = threading.local()

    def _call(self, method: str, *args: Any) -> Any:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.calls)
            self._local.sock = sock
        sock.send_multipart([method.encode(), msgpack.packb(list(args))])
        if not sock.poll(CALL_TIMEOUT_S * 1000):
            # Its answer may still come: a fresh socket, so that it is never read as the
            # answer to the next call.
            sock.close(0)
            self._local.sock = None
            raise errors.Busy("the coordinator's broker process did not answer in time")
        status, packed = sock.recv_multipart()
        value = msgpack.unpackb(packed)
        if status != b"ok":
            raise errors.GpuboxError(f"the broker process failed: {value}")
        return value

    def queue_reason(self, job: models.Job) -> str:
        return str(self._call("queue_reason", job.id))

    def queue_state(self, job: models.Job, place: bool, recent: bool) -> dict[str, Any]:
        return dict(self._call("queue_state", job.id, place, recent))

    def queue_in_order(self, limit: int) -> list[models.Job]:
        ids = self._call("queue_in_order", limit)
        return self.store.get_jobs(ids)

    def metrics_page(self) -> str:
        return str(self._call("metrics_page"))

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]:
        return dict(self._call("gpu_usage", worker))

    def last_heard(self, worker: str) -> Any:
        return models.parse_time(self._call("last_heard", worker))

    def quarantine(self, worker: str) -> str:
        return str(self._call("quarantine", worker))

    def stalled(self) -> str:
        return str(self._call("stalled"))

    def last_turn_s(self) -> float:
        return float(self._call("last_turn_s"))

    def poke(self, kind: str, job_id: int = 0) -> None:
        """Tell the broker a job was queued or cancelled; no answer is awaited (a submit
        returns once its job is stored, as in one process)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.pokes)
            self._local.push = sock
        sock.send_multipart([kind.encode(), b"%d" % job_id])

    def ready(self) -> None:
        self._call("ready", os.getpid())

    def listen(self, changes: Changes, stopping: threading.Event, loop: supervise.Loop) -> None:
        """Wake this process's followers and waiters as the broker process says jobs change:
        an essential thread's target."""
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.news)
        try:
            while not stopping.is_set():
                loop.tick()
                if not sock.poll(200):
                    continue
                while True:
                    try:
                        kind, job_id = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if kind == NOTIFY:
                        changes.notify(int(job_id))
                    else:
                        changes.forget(int(job_id))
        finally:
            sock.close(0)
