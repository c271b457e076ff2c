"""A fake worker for tests that speak the worker link themselves: a DEALER (a CURVE client,
or a socket without CURVE) that sends and expects gpubox.protocol messages on the test's cue.

The one place in the tests that encodes and decodes the worker protocol for a worker
(`FakeWorker.send` and `received`, which `FakeWorker.receive` uses); tests that need frames no
worker would send (junk, a bad version) write them to `FakeWorker.sock` themselves."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import zmq
import zmq.utils.monitor

from gpubox import protocol
from tests.conftest import wait_until

HEARTBEAT_S = 0.2
TS = "2024-05-01T12:00:00.123456789Z"
TS_END = "2024-05-01T12:00:09.000000000Z"
Keypair = tuple[bytes, bytes]  # (public, secret), Z85
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def lines(first: int, count: int) -> list[list[str]]:
    """`count` log lines numbered from `first`, alternating stdout and stderr."""
    return [
        [TS, "stdout" if i % 2 else "stderr", f"line {i} \u2603"]
        for i in range(first, first + count)
    ]


@dataclasses.dataclass(frozen=True)
class Received:
    """A message from the coordinator as a test looks at it: its type and its map."""

    type: str
    body: dict[str, Any]


def received(frames: list[bytes]) -> Received:
    """Decode (and so check) a coordinator's message, kept as its map for assertions."""
    msg = protocol.decode_from_coordinator(frames)
    return Received(msg.TYPE, msg.to_body())


def dealer(
    context: zmq.Context,
    endpoint: str,
    keypair: Keypair | None,
    server_key: bytes | None,
    monitor: bool = False,
) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A connected DEALER: a CURVE client with `keypair` trusting `server_key`, or (keypair
    None) one without CURVE; with `monitor`, also a socket reporting its handshake events."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keypair is not None:
        sock.curve_publickey, sock.curve_secretkey = keypair
        assert server_key is not None
        sock.curve_serverkey = server_key
    events = (
        sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILURES)
        if monitor
        else None
    )
    sock.connect(endpoint)
    return sock, events


class FakeWorker:
    """A worker as the broker sees it: a DEALER that speaks the protocol on the test's cue.

    It is a CURVE client with `keypair` (None: no CURVE at all) trusting `server_key`. While
    waiting for a message it sends its own HEARTBEAT every HEARTBEAT_S (unless `keepalive` is
    off), so the broker does not declare it lost during a test. Messages it was not waiting for
    are kept, in order, for a later expect(); the coordinator's routine heartbeats (known=True)
    are dropped. With `monitor`, `events` reports the socket's handshakes.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        name: str,
        keypair: Keypair | None,
        server_key: bytes | None,
        labels: dict[str, str] | None = None,
        gpus: list[str] | None = None,
        max_jobs: int = 1,
        monitor: bool = False,
    ) -> None:
        self.sock, self.events = dealer(context, endpoint, keypair, server_key, monitor)
        self.name = name
        self.labels = labels or {}
        self.gpus = gpus or []
        self.max_jobs = max_jobs
        self.session = uuid.uuid4().hex
        self.keepalive = True
        self.liveness_s: float | None = None  # said in HELLO when set, as a worker says it
        self.inbox: list[Received] = []
        self._last_sent = time.monotonic()

    def close(self) -> None:
        if self.events is not None:
            self.sock.disable_monitor()
            self.events.close(linger=0)
        self.sock.close(linger=0)

    # --- sending ------------------------------------------------------------------------------

    def send(self, msg_type: str, **fields: Any) -> None:
        self.sock.send_multipart(
            protocol.encode_body(msg_type, {"session": self.session, **fields})
        )
        self._last_sent = time.monotonic()

    def send_hello(self, running: list[dict[str, int]] | None = None, name: str = "") -> None:
        gpus = [{"uuid": u, "name": "Fake GPU", "memory_mb": 1024} for u in self.gpus]
        self.send(
            "HELLO",
            name=name or self.name,
            version="test",
            gpus=gpus,
            labels=self.labels,
            max_jobs=self.max_jobs,
            running=running or [],
            **({} if self.liveness_s is None else {"liveness_s": self.liveness_s}),
        )

    def hello(self, running: list[dict[str, int]] | None = None) -> Received:
        self.send_hello(running)
        return self.expect("WELCOME")

    def ready(self, slots: int = 1, running: list[int] | None = None) -> None:
        self.send("READY", free_gpus=list(self.gpus), slots=slots, running=running or [])

    def started(self, job: dict[str, Any]) -> None:
        self.send(
            "STARTED",
            job_id=job["id"],
            attempt=job["attempt"],
            container=f"container-{job['id']}",
            executed_at=TS,
        )

    def log(self, job: dict[str, Any], seq: int, batch: list[list[str]]) -> None:
        self.send("LOG", job_id=job["id"], attempt=job["attempt"], seq=seq, lines=batch)

    def done(
        self,
        job: dict[str, Any],
        last_seq: int,
        status: str = "FINISHED",
        exit_code: int | None = 0,
        error: str | None = None,
    ) -> None:
        self.send(
            "DONE",
            job_id=job["id"],
            attempt=job["attempt"],
            status=status,
            exit_code=exit_code,
            error=error,
            executed_at=TS,
            finished_at=TS_END,
            last_seq=last_seq,
        )

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, timeout_s: float = 3.0) -> Received | None:
        """The next message as it comes (nothing kept back, no heartbeat sent meanwhile), or
        None if none arrives within timeout_s."""
        if not self.sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        return received(self.sock.recv_multipart())

    def _pump(self, wait_s: float) -> None:
        """Receive what arrives within wait_s (at most one message) into the inbox."""
        if self.keepalive and time.monotonic() - self._last_sent >= HEARTBEAT_S:
            self.send("HEARTBEAT")
        msg = self.receive(wait_s)
        if msg is None or (msg.type == "HEARTBEAT" and msg.body["known"]):
            return
        self.inbox.append(msg)

    def expect(self, msg_type: str, timeout_s: float = 3.0) -> Received:
        """The first message of this type, waiting up to timeout_s for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, msg in enumerate(self.inbox):
                if msg.type == msg_type:
                    return self.inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = [(m.type, m.body) for m in self.inbox]
                pytest.fail(f"{self.name}: no {msg_type} within {timeout_s} s; got {got}")
            self._pump(min(remaining, 0.05))

    def quiet(self, msg_type: str, for_s: float) -> None:
        """Assert that no message of this type arrives within for_s."""
        deadline = time.monotonic() + for_s
        while (remaining := deadline - time.monotonic()) > 0:
            self._pump(min(remaining, 0.05))
        unexpected = [m.body for m in self.inbox if m.type == msg_type]
        assert not unexpected, f"{self.name}: unexpected {msg_type}: {unexpected}"

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """wait_until(), staying alive (heartbeats) and collecting messages meanwhile."""

        def pumped() -> Any:
            self._pump(0.01)
            return predicate()

        return wait_until(pumped, timeout_s, what)

    def job(self, timeout_s: float = 3.0) -> dict[str, Any]:
        """The next JOB's wire job."""
        return self.expect("JOB", timeout_s).body["job"]  # type: ignore[no-any-return]

    def ack(self, timeout_s: float = 3.0) -> dict[str, Any]:
        return self.expect("ACK", timeout_s).body

    def silent(self, for_s: float) -> None:
        """Assert that nothing at all arrives within for_s, not even a heartbeat."""
        got = list(self.inbox)
        deadline = time.monotonic() + for_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self.keepalive and time.monotonic() - self._last_sent >= HEARTBEAT_S:
                self.send("HEARTBEAT")
            if (msg := self.receive(min(remaining, 0.05))) is not None:
                got.append(msg)
        assert not got, f"{self.name}: expected silence, got {[(m.type, m.body) for m in got]}"

    def handshake(self, timeout_s: float = 3.0) -> int:
        """The first handshake event of a worker made with `monitor`: one of
        zmq.EVENT_HANDSHAKE_SUCCEEDED and HANDSHAKE_FAILURES."""
        assert self.events is not None, "made without monitor=True"
        if not self.events.poll(int(timeout_s * 1000), zmq.POLLIN):
            pytest.fail(f"{self.name}: no handshake event within {timeout_s} s")
        event = zmq.utils.monitor.recv_monitor_message(self.events)
        return int(event["event"])
