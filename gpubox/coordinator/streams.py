"""Log follow streams and long polls, served without a thread each.

A request that follows a job's log (`?follow=1`) or waits for its end (`?wait=`) may stay open
for hours. Waitress gives each request one of its threads until the answer is written, so a
few dozen such requests would take them all. Instead their route only checks the request and
says what to send (a `Follow` or a `Wait`); handover.detachable, around the app, then takes
the connection's socket over from Waitress, and one thread per HTTP process (`Streams.run`) serves
every such connection from a selector (epoll): it looks at the store when the broker says a job
changed (`Changes`), or every WAKE_S in case a wake-up was lost, and sends what it finds as
fast as each client takes it.

Why not an asyncio server, or another WSGI server: the rest of the API stays on Waitress as it
is, the store's calls stay the blocking calls every route makes, and what is served here is
small (read rows, write bytes) — a selector and a dict do it, with no second HTTP stack.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

import bottle

from gpubox import errors, models, supervise
from gpubox.coordinator.events import Changes
from gpubox.coordinator.handover import DETACHABLE_KEY, STREAM_KEY
from gpubox.store import Store

log = logging.getLogger(__name__)

PAGE_LINES = 5000
# A page of a job's log also stops at about this many bytes of text, and a stream reads no
# more while this much waits for its client: each open stream holds at most about one page.
# Pages of 5,000 lines of 60 KB made 6 requests that never read their answer hold 10 GB.
PAGE_BYTES = 1024 * 1024
KEEPALIVE_S = 15.0  # an NDJSON stream sends an empty line after this long without one
WAKE_S = 5.0  # a stream looks at its job at least this often, whatever wakes it (a safety net)
SWEEP_S = 0.5  # how often deadlines, keep-alives and revoked tokens are looked at
STOP_GRACE_S = 2.0  # how long streams may go on sending once the coordinator stops


class Stream:
    """One detached connection: its socket once handed over, and the bytes left to send."""

    kind = ""  # "follow" or "wait": which places (Streams.reserve) it holds

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.ending = False  # closes once `out` is sent
        self.mask = 0  # the selector events it is registered for
        self.looked = 0.0  # when it last looked at its job (time.monotonic())
        # Whether its next look must read the job's status too: at its first look (the job may
        # have ended before the stream was handed over), once the broker says the job ended,
        # and at each look of the safety net (WAKE_S).
        self.check_status = True
        self.head = b""  # the status line and headers, without the ones about the body
        self.chunked = False  # HTTP/1.1: the body goes out in chunks; HTTP/1.0: until close

    def start(self, version: str, status: str, headers: list[tuple[str, str]]) -> None:
        """Take the status and headers the app answered with (its body is this stream)."""
        lines = [f"{version} {status}"]
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                lines.append(f"{name}: {value}")
        lines += [f"Date: {email.utils.formatdate(usegmt=True)}", "Server: gpubox"]
        lines.append("Connection: close")  # no request follows a stream on its connection
        self.head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.chunked = version == "HTTP/1.1"

    def step(self, store: Store) -> bool:
        """Look at the job and queue what it has to send; True while there is more to read
        than the client has yet taken."""
        raise NotImplementedError

    def sweep(self, now: float, stopping: bool) -> bool:
        """The timed checks; True when the stream must look at its job now."""
        if now - self.looked < WAKE_S:
            return False
        self.check_status = True
        return True

    def cut(self, why: str) -> None:
        """End before the job's end: the client sees a transfer cut short (no last chunk; curl
        exits 18), never a clean end while the job runs on, and resumes with ?since=."""
        if not self.ending:
            log.info("%s stream of job %d cut: %s", self.kind, self.job_id, why)
        self.ending = True


class Follow(Stream):
    """`?follow=1`: stored lines, then new ones as they are stored, until the job ends (logs.py
    says how each looks). `end` renders the last record once the job has ended ("" for none);
    `revoked` says when the request's token has been revoked since it began."""

    kind = "follow"

    def __init__(
        self,
        job_id: int,
        since: int,
        render: Callable[[list[models.LogRow]], str],
        end: Callable[[models.Job], str],
        revoked: Callable[[], bool],
        keepalive: bool,
    ) -> None:
        super().__init__(job_id)
        self.since = since
        self.render = render
        self.end = end
        self.revoked = revoked
        self.keepalive = keepalive
        self.sent = 0.0  # when it last sent something

    def start(self, version: str, status: str, headers: list[tuple[str, str]]) -> None:
        super().start(version, status, headers)
        self.out += self.head + (b"Transfer-Encoding: chunked\r\n" if self.chunked else b"")
        self.out += b"\r\n"
        if self.keepalive:
            self.send("\n")  # tells a client the stream is open before the first line

    def send(self, text: str) -> int:
        """Queue `text` as the body's next part; its length in bytes."""
        data = text.encode()
        self.out += b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        self.sent = time.monotonic()
        return len(data)

    def step(self, store: Store) -> bool:
        self.looked = time.monotonic()
        while len(self.out) < PAGE_BYTES:
            lines = store.read_log_rows(self.job_id, self.since, PAGE_LINES, PAGE_BYTES)
            if not lines:
                job = store.get_job(self.job_id)
                self.check_status = False
                if not job.status.terminal:
                    return False
                # Lines stored between the read and the status check come before the end.
                lines = store.read_log_rows(self.job_id, self.since, PAGE_LINES, PAGE_BYTES)
                if not lines:
                    self.finish(self.end(job))
                    return False
            self.since = lines[-1][0]
            sent = self.send(self.render(lines))
            if len(lines) < PAGE_LINES and sent < PAGE_BYTES and not self.check_status:
                # Not a full page (its lines are fewer bytes than what they render to): this
                # was all that is stored. Once the job has ended, the broker says so
                # (check_status), and the next read finds nothing and looks at its status.
                return False
        return True

    def finish(self, last: str) -> None:
        """The job has ended: send `last`, then the response's last chunk."""
        if last:
            self.send(last)
        if self.chunked:
            self.out += b"0\r\n\r\n"
        self.ending = True

    def sweep(self, now: float, stopping: bool) -> bool:
        if stopping:
            self.cut("the coordinator is stopping")
        elif self.revoked():
            self.cut("its token was revoked")
        elif self.keepalive and now - self.sent >= KEEPALIVE_S:
            self.send("\n")
        return super().sweep(now, stopping)


class Wait(Stream):
    """`?wait=S`: the job once it has ended, or as it is after `wait_s` or when the coordinator
    stops. `answer` renders the job as the route would (its JSON body)."""

    kind = "wait"

    def __init__(self, job_id: int, wait_s: float, answer: Callable[[models.Job], bytes]):
        super().__init__(job_id)
        self.deadline = time.monotonic() + wait_s
        self.answer = answer
        self.now = False  # answer at the next look, ended or not

    def step(self, store: Store) -> bool:
        self.looked = time.monotonic()
        job = store.get_job(self.job_id)
        if job.status.terminal or self.now or self.looked >= self.deadline:
            body = self.answer(job)
            self.out += self.head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            self.ending = True
        return False

    def sweep(self, now: float, stopping: bool) -> bool:
        self.now = stopping or now >= self.deadline
        return self.now or super().sweep(now, stopping)


class Streams:
    """The detached streams of one HTTP process and the thread that serves them (run()).

    Places: at most `limit` streams at once, of which at most half long polls (a crowd of
    waiters never shuts out log streams); routes reserve one before they detach."""

    def __init__(self, store: Store, changes: Changes, stopping: threading.Event, limit: int):
        self.store = store
        self.stopping = stopping
        self.limit = limit
        self.loop = supervise.Loop(stall_s=30.0)
        self.follows = 0
        self.waits = 0
        self._lock = threading.Lock()  # guards the counts, _new and _changed
        self._new: list[Stream] = []
        self._changed: dict[int, bool] = {}  # job id → whether it ended
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._by_job: dict[int, set[Stream]] = {}
        self._due: set[Stream] = set()
        changes.listeners.append(self._changed_job)

    def reserve(self, kind: str) -> None:
        """A place for a stream of this kind, or errors.Busy."""
        with self._lock:
            if self.follows + self.waits >= self.limit:
                raise errors.Busy(
                    f"{self.follows} log followers and {self.waits} waiters are connected, as"
                    " many as this HTTP process serves at once (--http-streams): retry later"
                )
            if kind == "wait":
                if self.waits >= max(1, self.limit // 2):
                    raise errors.Busy(f"{self.waits} long polls are waiting: retry later")
                self.waits += 1
            else:
                self.follows += 1

    def release(self, kind: str) -> None:
        with self._lock:
            if kind == "wait":
                self.waits -= 1
            else:
                self.follows -= 1

    def detach(self, stream: Stream) -> None:
        """Ask handover.detachable to hand this request's connection over to `stream` (the route
        then returns an empty body, which is never sent). The caller holds a place for it."""
        environ = bottle.request.environ
        if not environ.get(DETACHABLE_KEY):
            raise RuntimeError("log streams and long polls need detachable() around the app")
        environ[STREAM_KEY] = (self, stream)

    def adopt(self, stream: Stream) -> None:
        """Serve `stream` from now on (called from Waitress's thread, its socket handed over)."""
        with self._lock:
            self._new.append(stream)
        self.wake()

    def _changed_job(self, kind: str, job_id: int) -> None:
        # Told by Changes of each change (any thread): its streams look at the job. "forget"
        # comes once the job has ended, after its last lines were stored.
        if job_id not in self._by_job:
            # No stream follows it (most jobs): nothing to wake this thread for. A stream
            # handed over meanwhile misses nothing: the change is stored before it is told,
            # and a new stream's first look reads the store after it is listed here.
            return
        with self._lock:
            first = not self._changed
            self._changed[job_id] = self._changed.get(job_id, False) or kind == "forget"
        if first:
            self.wake()

    def wake(self) -> None:
        """Make run() turn now (to take new streams and changes, or see the coordinator stop)."""
        with contextlib.suppress(BlockingIOError):  # full: it is awake already
            self._wake_w.send(b"\0")

    def run(self) -> None:
        """Serve the streams until the coordinator stops and every stream has ended (an
        essential thread's target)."""
        next_sweep = 0.0
        stopped_at = None
        while True:
            self.loop.tick()
            for key, mask in self._selector.select(SWEEP_S):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                stream: Stream = key.data
                if mask & selectors.EVENT_READ:
                    self._read(stream)
                if mask & selectors.EVENT_WRITE and stream.sock is not None:
                    self._send(stream)
            self._take_news()
            now = time.monotonic()
            stopping = self.stopping.is_set()
            if now >= next_sweep or stopping:
                next_sweep = now + SWEEP_S
                self._sweep(now, stopping)
            for stream in list(self._due):
                if len(stream.out) < PAGE_BYTES and stream.sock is not None:
                    self._due.discard(stream)
                    self._step(stream)
            if stopping:
                stopped_at = stopped_at or now
                if not self._by_job or now - stopped_at > STOP_GRACE_S:
                    break
        for streams in list(self._by_job.values()):
            for stream in list(streams):
                self._close(stream)

    def _take_news(self) -> None:
        """Start the streams handed over since the last turn; wake those of changed jobs."""
        with self._lock:
            new, self._new = self._new, []
            changed, self._changed = self._changed, {}
        for stream in new:
            assert stream.sock is not None
            self._by_job.setdefault(stream.job_id, set()).add(stream)
            stream.mask = selectors.EVENT_READ
            self._selector.register(stream.sock, stream.mask, stream)
            self._due.add(stream)
        for job_id, ended in changed.items():
            for stream in self._by_job.get(job_id, ()):
                stream.check_status = stream.check_status or ended
                self._due.add(stream)

    def _sweep(self, now: float, stopping: bool) -> None:
        for streams in list(self._by_job.values()):
            for stream in list(streams):
                if not stream.ending and stream.sweep(now, stopping):
                    self._due.add(stream)
                if stream.ending or stream.out:
                    self._send(stream)

    def _step(self, stream: Stream) -> None:
        if stream.ending:
            return
        try:
            if stream.step(self.store):
                self._due.add(stream)
        except errors.GpuboxError as exc:
            stream.cut(f"the store failed: {exc}")
        except Exception:  # noqa: BLE001 - one stream's bug must not end the others
            log.exception("%s stream of job %d failed", stream.kind, stream.job_id)
            stream.cut("an internal error")
        self._send(stream)

    def _read(self, stream: Stream) -> None:
        """A stream's client sends nothing after its request: data is dropped, the end of
        its side (or an error) means it went away."""
        assert stream.sock is not None
        try:
            if stream.sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        if not stream.ending:
            log.debug("%s stream of job %d: the client went away", stream.kind, stream.job_id)
        self._close(stream)

    def _send(self, stream: Stream) -> None:
        """Send what the socket takes now; close once all is sent of an ending stream."""
        sock = stream.sock
        if sock is None:
            return
        if stream.out:
            try:
                sent = sock.send(stream.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(stream)
                return
            del stream.out[:sent]
        if stream.ending and not stream.out:
            self._close(stream)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if stream.out else 0)
        if mask != stream.mask:
            stream.mask = mask
            self._selector.modify(sock, mask, stream)

    def _close(self, stream: Stream) -> None:
        sock, stream.sock = stream.sock, None
        if sock is None:
            return
        self._selector.unregister(sock)
        sock.close()
        streams = self._by_job.get(stream.job_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_job[stream.job_id]
        self._due.discard(stream)
        self.release(stream.kind)
