"""The broker (gpubox.coordinator.broker) against fake workers: real ZeroMQ with CURVE on
loopback, keys made in tmp_path, a real SQLite store in tmp_path, no Docker. Each test plays the
worker itself with a FakeWorker (tests/fakeworker.py), so it controls every message and its
timing."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.utils.monitor

from gpubox import keys, models, protocol, validate
from gpubox.coordinator import collector, sealing
from gpubox.coordinator.broker import Broker
from gpubox.coordinator.events import Changes
from gpubox.store import Store, open_store
from tests.conftest import wait_until
from tests.fakeworker import (
    HANDSHAKE_FAILURES,
    HEARTBEAT_S,
    TS_END,
    FakeWorker,
    Keypair,
    lines,
)

pytestmark = pytest.mark.timeout(30)

LIVENESS_S = 1.0
Status = models.Status


@dataclasses.dataclass
class Keys:
    """The CURVE keys of one coordinator state folder."""

    state_dir: str
    server: Keypair  # the coordinator's

    @classmethod
    def make(cls, state_dir: Path) -> Keys:
        keys.init(str(state_dir))
        return cls(str(state_dir), keys.load_secret(keys.coordinator_files(str(state_dir))[1]))

    @property
    def server_key(self) -> bytes:
        return self.server[0]

    def allow_list(self) -> keys.AllowList:
        return keys.AllowList(keys.allowed_dir(self.state_dir))

    def worker(self, name: str) -> Keypair:
        """Worker NAME's keypair, made and allowed on first use (later uses keep it)."""
        path = keys.worker_secret_file(self.state_dir, name)
        if not path.exists():
            keys.add_worker(self.state_dir, name)
        return keys.load_secret(path)


@dataclasses.dataclass
class Served:
    """One broker with its own context (each context carries the broker's ZAP authenticator)
    and its thread."""

    broker: Broker
    context: zmq.Context
    thread: threading.Thread


@dataclasses.dataclass
class Link:
    """A running broker, its store and keys, and the fake workers of one test. The workers
    share one context, apart from every broker's."""

    store: Store
    keys: Keys
    sealer: sealing.Sealer
    context: zmq.Context
    heartbeat_interval_s: float
    liveness_s: float
    served: list[Served] = dataclasses.field(default_factory=list)
    workers: list[FakeWorker] = dataclasses.field(default_factory=list)
    # (User-Id, frames) of every message any broker's handle() was given
    handled: list[tuple[str | None, list[bytes]]] = dataclasses.field(default_factory=list)

    @property
    def broker(self) -> Broker:
        return self.served[0].broker

    @property
    def thread(self) -> threading.Thread:
        return self.served[0].thread

    def start_broker(self) -> Broker:
        """Start a broker on the store and keys, with a fresh context; stopped at teardown."""
        context = zmq.Context()
        broker = Broker(
            self.store,
            Changes(),
            "tcp://127.0.0.1:*",
            server_keys=self.keys.server,
            allow=self.keys.allow_list(),
            sealer=self.sealer,
            heartbeat_interval_s=self.heartbeat_interval_s,
            liveness_s=self.liveness_s,
            context=context,
        )
        handle = broker.handle

        def recording(frames: list[bytes], now: float, key: str | None) -> None:
            self.handled.append((key, frames))
            handle(frames, now, key)

        broker.handle = recording  # type: ignore[method-assign]
        thread = threading.Thread(target=broker.run, name="broker", daemon=True)
        self.served.append(Served(broker, context, thread))
        thread.start()
        return broker

    def worker(
        self,
        name: str = "w1",
        endpoint: str = "",
        keypair: Keypair | None = None,
        server_key: bytes | None = None,
        curve: bool = True,
        **kwargs: Any,
    ) -> FakeWorker:
        """A fake worker using NAME's own allowed key and the coordinator's public key, unless
        `keypair` or `server_key` say otherwise; `curve` False: one without CURVE at all."""
        fake = FakeWorker(
            self.context,
            endpoint or self.broker.endpoint,
            name,
            (keypair or self.keys.worker(name)) if curve else None,
            (server_key or self.keys.server_key) if curve else None,
            **kwargs,
        )
        self.workers.append(fake)
        return fake

    def create(self, **fields: Any) -> models.Job:
        """A QUEUED job in the store, its credentials sealed as the API would; keyword
        arguments are submission fields."""
        spec = validate.parse_spec({"name": "job", "docker": {"image": "busybox"}, **fields})
        return self.store.create_job(self.sealer.seal(spec), models.utcnow())

    def status(self, job_id: int) -> Status:
        return self.store.get_job(job_id).status

    def connected(self, name: str) -> bool | None:
        """The stored worker's `connected`, None if never stored."""
        record = {w.name: w for w in self.store.list_workers()}.get(name)
        return None if record is None else record.connected

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.broker.endpoint.removeprefix("tcp://").rpartition(":")
        return host, int(port)


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    heartbeat_interval_s: float = HEARTBEAT_S,
    liveness_s: float = LIVENESS_S,
    db_url: str = "",
) -> Iterator[Link]:
    """A Link with one broker started, on the store at db_url (a SQLite file in tmp_path by
    default); everything stopped and closed afterwards."""
    store = open_store(db_url or f"sqlite:///{tmp_path}/gpubox.db")
    state_dir = tmp_path / "state"
    state = Link(
        store,
        Keys.make(state_dir),
        sealing.Sealer(str(state_dir)),
        zmq.Context(),
        heartbeat_interval_s,
        liveness_s,
    )
    try:
        state.start_broker()
        yield state
    finally:
        stuck = []
        for served in state.served:
            served.broker.stop()
        for served in state.served:
            served.thread.join(timeout=5)
            if served.thread.is_alive():
                stuck.append(served)
                continue  # never pull sockets from under a running broker
            served.broker.close()
            served.context.destroy(linger=0)
        for fake in state.workers:
            fake.close()
        state.context.destroy(linger=0)
        if not stuck:
            store.close()
        assert not stuck, "a broker did not stop within 5 s"


@pytest.fixture()
def link(tmp_path: Path) -> Iterator[Link]:
    with serve(tmp_path) as state:
        yield state


@pytest.fixture()
def any_link(tmp_path: Path, db_url: str) -> Iterator[Link]:
    """A Link on each store backend (see conftest.db_url)."""
    with serve(tmp_path, db_url=db_url) as state:
        yield state


# --- robustness --------------------------------------------------------------------------------


def zmtp3_greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting as a client sends it: signature, version, mechanism, filler."""
    return b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" * 32


def test_junk_without_curve_never_reaches_the_broker(link: Link) -> None:
    """Raw TCP junk and a DEALER without CURVE fail the handshake: the broker's handle() never
    sees a byte of them, and a real worker is served as before."""
    job = link.create()
    rng = random.Random(4242)

    # A DEALER without CURVE, speaking good protocol for an allowed name: the mechanisms
    # differ, so its handshake fails and its messages go nowhere.
    plain = link.worker("good", curve=False, monitor=True)
    plain.keepalive = False
    plain.send_hello()
    plain.ready()
    for _ in range(50):
        # Without blocking: once the failed handshake has dropped its only connection, a
        # DEALER's send would wait for a peer for ever.
        with contextlib.suppress(zmq.Again):
            plain.sock.send_multipart(
                [rng.randbytes(rng.randint(0, 64)) for _ in range(3)], zmq.NOBLOCK
            )
    assert plain.handshake() & HANDSHAKE_FAILURES  # no detail or protocol: who noticed first
    plain.silent(0.3)

    # Raw TCP junk: not ZMTP at all, or a greeting followed by nonsense.
    host, port = link.address
    payloads = [
        rng.randbytes(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        zmtp3_greeting(b"NULL") + b"\xff" * 64,
        # CURVE greeting, then a HELLO command whose box was never sealed with our key.
        zmtp3_greeting(b"CURVE") + b"\x04\xc8\x05HELLO" + rng.randbytes(194),
        # ZMTP 1.0: an empty identity, then a message frame carrying protocol frames.
        b"\x01\x00" + b"\x07\x00" + protocol.VERSION + b"\x01\x00" * 8,
        b"",
    ]
    for payload in payloads:
        with (
            socket.create_connection((host, port), timeout=2) as sock,
            contextlib.suppress(OSError),
        ):
            sock.sendall(payload)
            sock.settimeout(0.2)
            sock.recv(1024)

    assert link.handled == []
    assert link.broker.dropped_messages == 0
    assert link.status(job.id) is Status.QUEUED

    # The broker is still there, and still serves a worker with its key.
    worker = link.worker("good")
    welcome = worker.hello()
    assert welcome.body["coordinator"] == link.broker.coordinator_id
    worker.ready(slots=1)
    assert worker.job()["id"] == job.id
    assert link.thread.is_alive()
    good_key = link.keys.worker("good")[0].decode()
    assert {key for key, _ in link.handled} == {good_key}
    assert link.broker.dropped_messages == 0
    assert [w.name for w in link.store.list_workers()] == ["good"]
    plain.silent(0.1)


def test_malformed_messages_from_an_authenticated_worker_are_dropped(link: Link) -> None:
    """Past the handshake, whatever does not decode is dropped and counted; the broker keeps
    serving."""
    job = link.create()
    rng = random.Random(4242)
    fake = link.worker("junk")
    junk = fake.sock  # frames no worker would send go out raw
    dropped = 0

    # Random frames, 1 to 5 of them, random bytes (never starting with the version).
    for _ in range(200):
        frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 5))]
        if frames[0] == protocol.VERSION:
            frames[0] = b"x"
        junk.send_multipart(frames)
        dropped += 1
    # A valid version and type with random bodies.
    for _ in range(50):
        junk.send_multipart([protocol.VERSION, b"READY", rng.randbytes(rng.randint(0, 64))])
        dropped += 1
    hello = {
        "name": "junk",
        "version": "x",
        "session": "junk-session",
        "gpus": [],
        "labels": {},
        "max_jobs": 1,
        "running": [],
    }
    bad = [
        [b"just one frame"],
        [protocol.VERSION, b"HELLO"],
        [b"GPBX0", b"HELLO", msgpack.packb(hello)],  # wrong version
        [protocol.VERSION, b"HELLO", msgpack.packb({"name": "junk"})],  # HELLO, bad body
        [protocol.VERSION, b"HELLO", msgpack.packb({**hello, "max_jobs": "1"})],
        [protocol.VERSION, b"HELLO", msgpack.packb([hello])],
        [protocol.VERSION, b"HELLO", b"\xc1"],
        [protocol.VERSION, b"WELCOME", msgpack.packb({"coordinator": "c"})],
        [protocol.VERSION, "HÉLLO".encode(), msgpack.packb(hello)],
        [*protocol.encode_body("HELLO", hello), b"fourth frame"],
    ]
    for frames in bad:
        junk.send_multipart(frames)
        dropped += 1
    # Well-formed, but from a session the broker never welcomed: not stored, asked to HELLO.
    fake.send("LOG", session="nobody", job_id=job.id, attempt=1, seq=1, lines=lines(1, 2))
    refused = []  # a malformed HELLO is answered with why (REFUSED), so its worker logs it
    while True:
        answer = fake.receive(3)
        assert answer is not None, "no answer to a LOG from an unknown session"
        if answer.type != "REFUSED":
            break
        refused.append(answer.body["reason"])
    assert len(refused) == 7 and all("HELLO is malformed" in reason for reason in refused)
    assert answer.type == "HEARTBEAT"
    assert answer.body == {"coordinator": link.broker.coordinator_id, "known": False}
    # One connection's messages are handled in order: every one before the LOG was dropped.
    assert link.broker.dropped_messages == dropped
    assert len(link.handled) == dropped + 1
    assert {key for key, _ in link.handled} == {link.keys.worker("junk")[0].decode()}

    # The broker is still there, and still serves a well-behaved worker.
    worker = link.worker("good")
    welcome = worker.hello()
    assert welcome.body["coordinator"] == link.broker.coordinator_id
    worker.ready(slots=1)
    wire = worker.job()
    assert wire["id"] == job.id
    assert link.thread.is_alive()
    assert link.broker.dropped_messages == dropped
    assert link.store.read_logs(job.id) == []
    assert [w.name for w in link.store.list_workers()] == ["good"]


def test_unknown_session_heartbeat_is_answered_known_false(link: Link) -> None:
    stranger = link.worker("stranger")
    stranger.keepalive = False
    stranger.send("HEARTBEAT")
    reply = stranger.expect("HEARTBEAT")
    assert reply.body == {"coordinator": link.broker.coordinator_id, "known": False}


def test_a_session_used_from_another_connection_is_unknown(link: Link) -> None:
    """A session id is bound to the connection that said HELLO with it, even for a connection
    with the same key."""
    worker = link.worker("w1")
    worker.hello()
    imposter = link.worker("w1")
    imposter.keepalive = False
    imposter.session = worker.session
    imposter.send("HEARTBEAT")
    assert imposter.expect("HEARTBEAT").body["known"] is False


def test_welcome_and_worker_record(link: Link) -> None:
    worker = link.worker("w1", labels={"zone": "eu"}, gpus=["GPU-a", "GPU-b"], max_jobs=3)
    welcome = worker.hello()
    assert welcome.body == {
        "coordinator": link.broker.coordinator_id,
        "heartbeat_interval_s": HEARTBEAT_S,
        "liveness_s": LIVENESS_S,
        "telemetry": True,  # it takes TELEMETRY
        "prefetch": True,  # it takes RELEASED: a worker may hold jobs
    }
    (record,) = wait_until(link.store.list_workers, what="the worker to be stored")
    assert record.name == "w1"
    assert record.connected is True
    assert record.labels == {"zone": "eu"}
    assert [g["uuid"] for g in record.gpus] == ["GPU-a", "GPU-b"]
    assert record.max_jobs == 3
    # The broker's own heartbeats come every heartbeat_interval_s.
    worker.keepalive = False
    worker.send("HEARTBEAT")
    msg = worker.receive(2)
    assert msg is not None and msg.type == "HEARTBEAT" and msg.body["known"] is True


def beats_heard(
    senders: list[FakeWorker], listeners: list[FakeWorker], intervals: int, each: int
) -> tuple[int, dict[str, int]]:
    """For `intervals` of the broker's heartbeat intervals, each sender sends a HEARTBEAT
    `each` times an interval: how many each sent, and the HEARTBEATs each listener heard."""
    sent, got = 0, {worker.name: 0 for worker in listeners}
    ends = time.monotonic() + intervals * HEARTBEAT_S
    while time.monotonic() < ends:
        for worker in senders:
            worker.send("HEARTBEAT")
        sent += 1
        turn = time.monotonic() + HEARTBEAT_S / each
        while (left := turn - time.monotonic()) > 0:
            for worker in listeners:
                msg = worker.receive(min(left, 0.01))
                if msg is not None and msg.type == "HEARTBEAT":
                    got[worker.name] += 1
    return sent, got


def test_the_broker_beats_only_to_workers_it_sent_nothing_within_the_interval(
    link: Link,
) -> None:
    # w1 heartbeats twice an interval and gets each answered; w2 says nothing. Any message
    # tells a worker the coordinator is there, so w1 needs no beat of the broker's own: at
    # 1,000 workers those were a third of the heartbeats' messages.
    chatty, silent = link.worker("w1"), link.worker("w2")
    for worker in (chatty, silent):
        worker.hello()
        worker.keepalive = False
    while chatty.receive(0.05) is not None or silent.receive(0.05) is not None:
        pass  # what the HELLOs brought
    # 20 intervals, of which the bounds below ask for a quarter: a busy machine (the suite
    # runs six tests at once on two cores) may delay some of the broker's turns.
    sent, got = beats_heard([chatty], [chatty, silent], intervals=20, each=2)
    assert got["w2"] >= 5  # a silent worker still hears the broker every interval
    assert got["w1"] <= sent + 2, (got, sent)  # its answers, and hardly a beat more


def test_a_worker_with_room_in_its_liveness_hears_the_brokers_beats_and_no_answers(
    link: Link,
) -> None:
    # A worker's HELLO says how long it waits in silence (liveness_s). With room there for
    # three of the broker's intervals, the broker's own beats (at least every 1.25
    # intervals, those due sent together) are enough: its HEARTBEATs are not answered one
    # by one, which at 1,000 workers woke the broker and ZeroMQ's I/O thread 500 times a
    # second. One with a short liveness (or none said: an older worker) still gets each
    # answered.
    patient, hasty = link.worker("w1"), link.worker("w2")
    patient.liveness_s = 10 * HEARTBEAT_S
    hasty.liveness_s = 2 * HEARTBEAT_S
    for worker in (patient, hasty):
        worker.hello()
        worker.keepalive = False
    while patient.receive(0.05) is not None or hasty.receive(0.05) is not None:
        pass  # what the HELLOs brought
    sent, got = beats_heard([patient, hasty], [patient, hasty], intervals=12, each=4)
    # The bounds leave room for a busy machine delaying the broker's turns.
    assert got["w2"] >= sent * 3 // 4, (got, sent)  # each answered
    assert 4 <= got["w1"] <= 14, (got, sent)  # ~12 beats of the broker's own (at most 1 an
    # interval, at least 1 in 1.5), not the ~48 answers


def test_a_turns_short_lived_objects_never_reach_the_oldest_generation() -> None:
    # Made while a turn runs and alive until it ends, as a round's view of each worker is:
    # far more than it takes to start a collection (700), which would move them up.
    gc.collect()
    with collector.CollectionDeferral().deferred():
        made = [[n] for n in range(50_000)]
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(o) in oldest for o in made)
    assert gc.isenabled()


def test_the_collector_stays_off_while_any_brokers_turn_runs() -> None:
    deferral = collector.CollectionDeferral()
    first, second = deferral.deferred(), deferral.deferred()
    first.__enter__()
    second.__enter__()  # another broker's turn, begun during the first
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second is still in its turn
    second.__exit__(None, None, None)
    assert gc.isenabled()
    # Off before any turn began (by whoever embeds the broker): it stays off.
    gc.disable()
    try:
        with deferral.deferred():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_held_off_while_the_broker_handles_a_message(link: Link) -> None:
    enabled: list[bool] = []
    handle = link.broker.handle

    def recording(*args: Any) -> None:
        enabled.append(gc.isenabled())
        handle(*args)

    link.broker.handle = recording  # type: ignore[method-assign]
    stranger = link.worker("stranger")
    stranger.keepalive = False
    stranger.send("HEARTBEAT")
    stranger.expect("HEARTBEAT")
    assert enabled == [False]
    # and on again once the turn has ended (the broker waits for the next message)
    wait_until(gc.isenabled, timeout_s=2)


# --- the life of a job -------------------------------------------------------------------------


def test_happy_path(link: Link) -> None:
    auth = {"registry": "registry.example.com", "username": "bot", "password": "s3cret"}
    docker = {"image": "busybox", "command": ["echo", "hi"], "env": {"A": "1"}, "auth": auth}
    created = link.create(docker=docker)
    worker = link.worker("w1")
    worker.hello()
    worker.ready(slots=1)
    msg = worker.expect("JOB")
    assert msg.body["coordinator"] == link.broker.coordinator_id
    job = msg.body["job"]
    assert job["id"] == created.id
    assert job["attempt"] == 1
    assert job["first_seq"] == 1
    assert job["image"] == "busybox"
    assert job["command"] == ["echo", "hi"]
    assert job["env"] == {"A": "1"}
    assert job["auth"] == auth  # the worker needs the pull credentials
    stored = link.store.get_job(created.id)
    assert stored.status is Status.RUNNING
    assert stored.worker == "w1"
    assert stored.attempts == 1

    worker.started(job)
    wait_until(
        lambda: link.store.get_job(created.id).executed_at is not None, what="STARTED stored"
    )

    first, second = lines(1, 3), lines(4, 2)
    worker.log(job, 1, first)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 3, "done": False}
    assert [line.seq for line in link.store.read_logs(created.id)] == [1, 2, 3]
    worker.log(job, 4, second)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 5, "done": False}
    stored_lines = link.store.read_logs(created.id)
    assert [[line.ts, line.stream, line.line] for line in stored_lines] == first + second
    assert [line.seq for line in stored_lines] == [1, 2, 3, 4, 5]

    # A batch sent again (its ACK was lost, say) is acknowledged and stored once.
    worker.log(job, 4, second)
    assert worker.ack()["seq"] == 5
    worker.log(job, 1, first + second)
    assert worker.ack()["seq"] == 5
    assert link.store.read_logs(created.id) == stored_lines
    assert link.store.get_job(created.id).log_seq == 5

    worker.done(job, last_seq=5)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 5, "done": True}
    finished = link.store.get_job(created.id)
    assert finished.status is Status.FINISHED
    assert finished.exit_code == 0
    assert finished.error is None
    assert finished.finished_at == models.parse_time(TS_END)
    assert finished.spec.auth is None  # write-only: erased when the job ends

    # DONE again (the ACK was lost): acknowledged again, nothing changes.
    worker.done(job, last_seq=5)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 5, "done": True}
    worker.done(job, last_seq=5, status="ERROR", exit_code=1, error="late and different")
    assert worker.ack()["done"] is True
    assert link.store.get_job(created.id) == finished
    assert link.store.read_logs(created.id) == stored_lines
    # A late LOG for the ended job stores nothing.
    worker.log(job, 6, lines(6, 1))
    worker.ack()
    assert link.store.read_logs(created.id) == stored_lines


def test_done_with_missing_lines_is_not_applied(link: Link) -> None:
    created = link.create()
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    worker.started(job)
    worker.log(job, 1, lines(1, 2))
    assert worker.ack()["seq"] == 2

    worker.done(job, last_seq=5)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 2, "done": False}
    assert link.status(created.id) is Status.RUNNING

    # The worker resends what the ACK says is missing, then DONE again: now it applies.
    worker.log(job, 3, lines(3, 3))
    assert worker.ack()["seq"] == 5
    worker.done(job, last_seq=5, status="ERROR", exit_code=3)
    assert worker.ack() == {"job_id": created.id, "attempt": 1, "seq": 5, "done": True}
    ended = link.store.get_job(created.id)
    assert ended.status is Status.ERROR
    assert ended.exit_code == 3
    assert [line.seq for line in link.store.read_logs(created.id)] == [1, 2, 3, 4, 5]


def test_log_batch_with_a_gap_is_not_stored(link: Link) -> None:
    created = link.create()
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    worker.log(job, 3, lines(3, 2))
    assert worker.ack()["seq"] == 0
    assert link.store.read_logs(created.id) == []


def test_the_workers_own_lines_are_stored_with_the_gpubox_stream(link: Link) -> None:
    """Lines a LOG names in `notes` (the worker's markers, sent as stderr) are stored with
    stream gpubox; from a worker that sends no notes, so is the last line of a batch that
    covers more seqs than it has lines (its spill's marker). A job's own line with the same
    text stays stderr."""
    created = link.create()
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    text = "[gpubox: 5 lines dropped here; …]"
    ts = "2024-05-01T12:00:00.000000001Z"
    worker.send(
        "LOG",
        job_id=job["id"],
        attempt=job["attempt"],
        seq=1,
        lines=[[ts, "stderr", text], [ts, "stderr", text]],
        notes=[1, 7],  # an index past the batch is ignored
    )
    assert worker.ack()["seq"] == 2
    worker.send(
        "LOG",
        job_id=job["id"],
        attempt=job["attempt"],
        seq=3,
        lines=[[ts, "stdout", "x"], [ts, "stderr", text]],
        last=9,
    )
    assert worker.ack()["seq"] == 9
    stored = link.store.read_logs(created.id)
    assert [(line.seq, line.stream) for line in stored] == [
        (1, "stderr"),
        (2, "gpubox"),
        (3, "stdout"),
        (4, "gpubox"),
    ]


def test_jobs_go_out_by_priority(link: Link) -> None:
    low = link.create(name="low", priority=0)
    high = link.create(name="high", priority=5)
    mid = link.create(name="mid", priority=1)
    worker = link.worker("w1")
    worker.hello()
    worker.ready(slots=1)
    order = []
    for _ in range(3):
        job = worker.job()
        order.append(job["id"])
        worker.quiet("JOB", 0.3)  # one slot: nothing more until this one is done
        worker.done(job, last_seq=0)
        assert worker.ack()["done"] is True
        worker.ready(slots=1)
    assert order == [high.id, mid.id, low.id]
    worker.quiet("JOB", 0.3)
    assert all(link.status(j.id) is Status.FINISHED for j in (low, high, mid))


def test_slots_limit_how_many_jobs_a_worker_gets(link: Link) -> None:
    jobs = [link.create(name=f"j{i}") for i in range(3)]
    worker = link.worker("w1", max_jobs=2)
    worker.hello()
    worker.ready(slots=2)
    got = [worker.job()["id"], worker.job()["id"]]
    worker.quiet("JOB", 0.4)
    assert got == [jobs[0].id, jobs[1].id]
    assert link.status(jobs[2].id) is Status.QUEUED


def test_gpu_jobs_go_only_where_gpus_are_free(link: Link) -> None:
    gpu_job = link.create(name="gpu", gpus=2)
    worker = link.worker("w1", gpus=["GPU-a"])
    worker.hello()
    worker.ready(slots=4)
    worker.quiet("JOB", 0.4)
    assert link.status(gpu_job.id) is Status.QUEUED
    big = link.worker("w2", gpus=["GPU-x", "GPU-y", "GPU-z"])
    big.hello()
    big.ready(slots=4)
    job = big.job()
    assert job["id"] == gpu_job.id
    assert job["gpus"] == ["GPU-x", "GPU-y"]


def test_labels_pick_the_worker(link: Link) -> None:
    created = link.create(labels={"gpu": "a100"})
    plain = link.worker("plain", labels={})
    plain.hello()
    plain.ready(slots=1)
    plain.quiet("JOB", 0.5)
    assert link.status(created.id) is Status.QUEUED

    a100 = link.worker("a100", labels={"gpu": "a100", "zone": "eu"})
    a100.hello()
    a100.ready(slots=1)
    assert a100.job()["id"] == created.id
    plain.quiet("JOB", 0.2)
    assert link.store.get_job(created.id).worker == "a100"


def test_schedule_poke_hands_out_a_new_job(link: Link) -> None:
    worker = link.worker("w1")
    worker.hello()
    worker.ready(slots=1)
    worker.quiet("JOB", 0.2)
    created = link.create()
    link.broker.poke("schedule")
    assert worker.job(timeout_s=0.9)["id"] == created.id  # sooner than the 1 s scheduling timer


def test_every_schedule_poke_after_the_last_one_was_taken_counts(link: Link) -> None:
    # A poke is skipped only while another is on its way: once the broker took it, the next
    # submit's poke goes out again.
    # (Each job must come well before the 1 s scheduling timer could have sent it.)
    worker = link.worker("w1", max_jobs=5)
    worker.hello()
    worker.ready(slots=5)
    worker.quiet("JOB", 0.2)
    for _ in range(5):
        created = link.create()
        link.broker.poke("schedule")
        link.broker.poke("schedule")  # a second one, likely still behind the first
        assert worker.job(timeout_s=0.3)["id"] == created.id


# --- jobs that no worker can run ---------------------------------------------------------------


def create_many(link: Link, count: int, **fields: Any) -> list[models.Job]:
    """`count` QUEUED jobs with these submission fields, in one transaction."""
    with link.store.batch():
        return [link.create(**fields) for _ in range(count)]


def test_jobs_no_worker_can_run_do_not_hold_back_one_that_can(any_link: Link) -> None:
    # Issue 19, finding 3: the scheduler looked only at the first 200 queued jobs, so 200
    # jobs that could never run kept every job behind them queued.
    link = any_link
    too_big = create_many(link, 250, gpus=64, priority=10)
    nowhere = create_many(link, 250, labels={"pool": "nobody"})
    worker = link.worker("w1", gpus=["GPU-a"])
    worker.hello()
    worker.ready(slots=1)
    runnable = link.create(gpus=1)
    link.broker.poke("schedule")
    assert worker.job(timeout_s=1.0)["id"] == runnable.id
    worker.quiet("JOB", 0.3)
    # every job left has the reason of its own: none is said to wait behind others
    reason = link.broker.view.queue_reason
    for job in (too_big[0], too_big[-1]):
        assert reason(job) == "no connected worker with its labels has 64 GPUs"
    for job in (nowhere[0], nowhere[-1]):
        assert reason(job) == "no connected worker has the labels pool=nobody"


def test_jobs_no_worker_can_run_submitted_after_runnable_ones_change_nothing(
    any_link: Link,
) -> None:
    link = any_link
    first, second = link.create(gpus=1), link.create(gpus=1)
    create_many(link, 300, gpus=64)
    create_many(link, 300, gpus=1, labels={"pool": "nobody"})
    third = link.create()
    worker = link.worker("w1", gpus=["GPU-a", "GPU-b"], max_jobs=4)
    worker.hello()
    worker.ready(slots=4)
    assert sorted(worker.job()["id"] for _ in range(3)) == [first.id, second.id, third.id]
    worker.quiet("JOB", 0.3)


def test_a_job_no_worker_could_run_starts_when_a_worker_that_can_connects(
    any_link: Link,
) -> None:
    link = any_link
    waiting = create_many(link, 300, labels={"pool": "h100"})
    plain = link.worker("plain")
    plain.hello()
    plain.ready(slots=1)
    reason = link.broker.view.queue_reason
    plain.wait_for(
        lambda: reason(waiting[-1]) == "no connected worker has the labels pool=h100",
        3.0,
        "the reason of a job past the first 200",
    )
    plain.quiet("JOB", 0.2)
    h100 = link.worker("h100", labels={"pool": "h100"}, max_jobs=2)
    h100.hello()
    h100.ready(slots=2)
    assert [h100.job()["id"], h100.job()["id"]] == [waiting[0].id, waiting[1].id]
    assert link.broker.view.queue_reason(waiting[-1]) == (
        "waiting for a free job slot (max_jobs) on h100"
    )
    plain.quiet("JOB", 0.2)


def test_a_big_job_behind_jobs_no_worker_can_run_still_gathers_its_gpus(any_link: Link) -> None:
    link = any_link
    # The jobs no worker can run, queued before the worker connects: filling the queue may
    # outlast the liveness window (1 s) on a busy machine, and the fake worker only beats
    # while the test talks to it.
    create_many(link, 300, gpus=64)
    create_many(link, 300, gpus=1, labels={"pool": "nobody"})
    first = link.create(gpus=1)
    worker = link.worker("w1", gpus=["GPU-a", "GPU-b"], max_jobs=4)
    worker.hello()
    worker.ready(slots=1)
    running = worker.job()
    assert (running["id"], running["gpus"]) == (first.id, ["GPU-a"])
    worker.started(running)
    big, small = link.create(gpus=2), link.create(gpus=1)
    worker.send("READY", free_gpus=["GPU-b"], slots=3, running=[first.id])
    link.broker.poke("schedule")
    worker.quiet("JOB", 1.2)  # past a timer round: GPU-b is held for the big job
    assert link.broker.view.queue_reason(small) == (
        f"waiting behind job {big.id}: the GPUs of w1 are held for it"
    )
    worker.done(running, last_seq=0)
    assert worker.ack()["done"] is True
    worker.ready(slots=4)
    job = worker.job()
    assert (job["id"], job["gpus"]) == (big.id, ["GPU-a", "GPU-b"])
    worker.quiet("JOB", 0.3)
    assert link.status(small.id) is Status.QUEUED


# --- lost workers and cancels ------------------------------------------------------------------


def test_silent_worker_is_lost(link: Link) -> None:
    retried = link.create(name="retried", max_retries=1)
    failed = link.create(name="failed", max_retries=0)
    worker = link.worker("w1", max_jobs=2)
    worker.hello()
    worker.ready(slots=2)
    jobs = {worker.job()["id"], worker.job()["id"]}
    assert jobs == {retried.id, failed.id}
    assert link.status(retried.id) is Status.RUNNING
    worker.ready(slots=0, running=sorted(jobs))  # confirms it holds both
    for job_id in sorted(jobs):  # and both containers started
        worker.started({"id": job_id, "attempt": 1})
    wait_until(lambda: all(link.store.get_job(j).executed_at for j in jobs), what="both started")

    worker.keepalive = False  # and it reads nothing more: silent from now on
    lost_at, silent_since = time.monotonic(), models.utcnow()
    wait_until(
        lambda: link.status(failed.id) is not Status.RUNNING,
        timeout_s=LIVENESS_S + 3,
        what="the silent worker to be lost",
    )
    assert time.monotonic() - lost_at >= LIVENESS_S * 0.6

    again = link.store.get_job(retried.id)
    assert again.status is Status.QUEUED
    assert again.attempts == 1
    assert again.worker is None
    # Its log says where the attempt ended (the next one's lines follow); the other's not.
    (marker,) = link.store.read_logs(retried.id)
    assert (marker.seq, marker.stream) == (1, "gpubox") and again.log_seq == 1
    assert marker.line.startswith("[gpubox: attempt 1 ended: worker lost: no word from w1")
    assert marker.line.endswith("; the job is queued again (retry 1 of 1)]")
    assert link.store.read_logs(failed.id) == []
    gone = link.store.get_job(failed.id)
    assert gone.status is Status.ERROR
    assert gone.error is not None and "worker lost" in gone.error
    (record,) = link.store.list_workers()
    assert record.name == "w1"
    assert record.connected is False
    # Last heard from before it fell silent, not when it was declared lost.
    assert (record.last_seen - silent_since).total_seconds() < LIVENESS_S * 0.3

    # The lost worker speaks again: it is told to say HELLO, and its late DONE changes nothing.
    worker.inbox.clear()
    worker.done({"id": failed.id, "attempt": 1}, last_seq=0)
    assert worker.expect("HEARTBEAT").body["known"] is False
    assert link.store.get_job(failed.id) == gone

    # After a new HELLO it gets the requeued job again, as attempt 2.
    worker.keepalive = True
    worker.session = uuid.uuid4().hex
    worker.hello()
    worker.ready(slots=2)
    job = worker.job()
    assert (job["id"], job["attempt"], job["first_seq"]) == (retried.id, 2, 2)
    assert link.store.list_workers()[0].connected is True


def test_a_worker_is_found_by_name_in_its_latest_session_until_lost(link: Link) -> None:
    """gpu_usage, last_heard and quarantine (what GET /workers asks of each worker) find a
    worker by name: its latest session's, and nothing once it is lost."""
    broker = link.broker

    def usage(percent: int) -> list[dict[str, Any]]:
        return [{"uuid": "GPU-a", "utilization": percent}]

    first = link.worker("w1", gpus=["GPU-a"])
    first.hello()
    first.send("HEARTBEAT", usage=usage(10))
    wait_until(lambda: broker.view.gpu_usage("w1").get("GPU-a", {}).get("utilization") == 10)
    assert broker.view.last_heard("w1") is not None and broker.view.quarantine("w1") == ""
    assert broker.view.gpu_usage("w2") == {} and broker.view.last_heard("w2") is None

    second = link.worker("w1", gpus=["GPU-a"])  # the same name again: a new session
    second.hello()
    assert broker.view.gpu_usage("w1") == {}  # the new session's: nothing heard yet
    second.send("HEARTBEAT", usage=usage(20))
    wait_until(lambda: broker.view.gpu_usage("w1").get("GPU-a", {}).get("utilization") == 20)

    second.keepalive = False  # silent from now on
    wait_until(lambda: broker.view.last_heard("w1") is None, LIVENESS_S + 3, "w1 lost")
    assert broker.view.gpu_usage("w1") == {} and broker.view.quarantine("w1") == ""


def test_worker_that_keeps_talking_is_not_lost(link: Link) -> None:
    created = link.create()
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    worker.ready(slots=0, running=[job["id"]])  # confirms it holds the job
    worker.quiet("CANCEL", LIVENESS_S * 1.6)  # heartbeats only, for longer than liveness_s
    assert link.status(created.id) is Status.RUNNING
    assert link.store.list_workers()[0].connected is True


def test_cancel_of_a_running_job_reaches_its_worker(link: Link) -> None:
    created = link.create()
    bystander = link.worker("bystander", labels={"other": "yes"})
    bystander.hello()
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    worker.started(job)

    cancelled = link.store.cancel_job(created.id, models.utcnow())
    assert cancelled.cancel_requested
    link.broker.poke("cancel", created.id)
    cancel = worker.expect("CANCEL")
    assert cancel.body == {"job_id": created.id, "attempt": 1}
    bystander.quiet("CANCEL", 0.2)

    worker.done(job, last_seq=0, status="CANCELLED", exit_code=143, error="cancelled")
    assert worker.ack()["done"] is True
    assert link.status(created.id) is Status.CANCELLED


def test_cancel_poke_for_an_unknown_or_queued_job_is_harmless(link: Link) -> None:
    queued = link.create()
    link.store.cancel_job(queued.id, models.utcnow())
    link.broker.poke("cancel", queued.id)
    link.broker.poke("cancel", 999_999)
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    worker.quiet("CANCEL", 0.3)
    assert worker.inbox == []  # no JOB either: the only job was cancelled while queued
    assert link.thread.is_alive()
    assert link.status(queued.id) is Status.CANCELLED


# --- reconnects and restarts -------------------------------------------------------------------


def test_reconnect_keeps_the_jobs_the_worker_reports(link: Link) -> None:
    kept = link.create(name="kept")
    dropped = link.create(name="dropped", max_retries=1)
    worker = link.worker("w1", max_jobs=2)
    worker.hello()
    worker.ready(slots=2)
    jobs = {job["id"]: job for job in (worker.job(), worker.job())}
    worker.started(jobs[dropped.id])  # it ran: losing it spends an attempt
    wait_until(lambda: link.store.get_job(dropped.id).executed_at, what="dropped started")
    worker.log(jobs[kept.id], 1, lines(1, 2))
    assert worker.ack()["seq"] == 2

    # The same worker on a new connection (new session), still running only `kept`.
    again = link.worker("w1", max_jobs=2)
    again.hello(running=[{"job_id": kept.id, "attempt": 1}])
    wait_until(lambda: link.status(dropped.id) is Status.QUEUED, what="the dropped job requeued")
    assert link.status(kept.id) is Status.RUNNING
    # The old connection's session is gone.
    worker.keepalive = False
    worker.inbox.clear()
    worker.send("HEARTBEAT")
    assert worker.expect("HEARTBEAT").body["known"] is False

    again.log(jobs[kept.id], 3, lines(3, 1))
    assert again.ack()["seq"] == 3
    again.ready(slots=1, running=[kept.id])
    retry = again.job()
    assert (retry["id"], retry["attempt"]) == (dropped.id, 2)
    again.done(jobs[kept.id], last_seq=3)
    assert again.ack()["done"] is True
    assert link.status(kept.id) is Status.FINISHED
    assert [line.seq for line in link.store.read_logs(kept.id)] == [1, 2, 3]


def test_coordinator_restart_keeps_reported_jobs_and_releases_the_rest(link: Link) -> None:
    kept = link.create(name="kept", labels={"box": "1"})
    orphan = link.create(name="orphan", labels={"box": "2"})
    w1 = link.worker("w1", labels={"box": "1"})
    w1.hello()
    w1.ready()
    job = w1.job()
    w2 = link.worker("w2", labels={"box": "2"})
    w2.hello()
    w2.ready()
    orphaned = w2.job()
    assert orphaned["id"] == orphan.id
    w2.started(orphaned)  # it ran: losing it with its worker spends its only attempt
    wait_until(lambda: link.store.get_job(orphan.id).executed_at, what="orphan started")
    w1.log(job, 1, lines(1, 2))
    assert w1.ack()["seq"] == 2

    # The coordinator restarts on the same store; w1 comes back, w2 never does.
    link.broker.stop()
    link.thread.join(timeout=5)
    restarted = link.start_broker()  # a fresh context; the same store, keys and allow list
    back = link.worker("w1", endpoint=restarted.endpoint, labels={"box": "1"})
    welcome = back.hello(running=[{"job_id": kept.id, "attempt": 1}])
    assert welcome.body["coordinator"] == restarted.coordinator_id
    assert restarted.coordinator_id != link.broker.coordinator_id
    back.wait_for(
        lambda: link.status(orphan.id) is not Status.RUNNING,
        timeout_s=LIVENESS_S + 3,
        what="the orphaned job to be released",
    )
    lost = link.store.get_job(orphan.id)
    assert lost.status is Status.ERROR
    assert lost.error is not None and "worker lost" in lost.error
    assert link.status(kept.id) is Status.RUNNING

    back.log(job, 3, lines(3, 2))
    assert back.ack()["seq"] == 4
    back.done(job, last_seq=4)
    assert back.ack()["done"] is True
    assert link.status(kept.id) is Status.FINISHED
    assert [line.seq for line in link.store.read_logs(kept.id)] == [1, 2, 3, 4]


def test_a_worker_back_after_a_coordinator_restart_is_logged_with_the_jobs_it_holds(
    link: Link, caplog: pytest.LogCaptureFixture
) -> None:
    """The HELLO line counts the jobs the worker still runs for us, and says how many others
    it was told to stop (it once said `0 jobs held` for a worker running a job)."""
    caplog.set_level(logging.INFO, logger="gpubox.coordinator.broker")

    def connected_lines() -> list[str]:  # logged right after the broker's answers go out
        return [r.getMessage() for r in caplog.records if "connected (" in r.getMessage()]

    kept, ended = link.create(name="kept"), link.create(name="ended")
    w1 = link.worker("w1", gpus=["GPU-a"], max_jobs=2)
    w1.hello()
    w1.ready(slots=2)
    jobs = {job["id"]: job for job in (w1.job(), w1.job())}
    w1.done(jobs[ended.id], last_seq=0)
    assert w1.ack()["done"] is True

    link.broker.stop()
    link.thread.join(timeout=5)
    restarted = link.start_broker()
    back = link.worker("w1", endpoint=restarted.endpoint, gpus=["GPU-a"])
    caplog.clear()
    # It still runs `kept`, and says it holds `ended` too (its container not yet removed).
    back.hello(running=[{"job_id": kept.id, "attempt": 1}, {"job_id": ended.id, "attempt": 1}])
    assert back.expect("CANCEL").body == {"job_id": ended.id, "attempt": 1}
    assert wait_until(connected_lines) == [
        "worker w1 connected (1 GPUs, 1 jobs held; 1 stale told to stop)"
    ]
    assert link.status(kept.id) is Status.RUNNING

    # Holding only its own job, it is said without the stale part.
    again = link.worker("w1", endpoint=restarted.endpoint)
    caplog.clear()
    again.hello(running=[{"job_id": kept.id, "attempt": 1}])
    assert wait_until(connected_lines) == ["worker w1 connected (0 GPUs, 1 jobs held)"]


def test_a_job_that_cannot_be_sent_stays_queued(link: Link) -> None:
    """A worker gone without a word: the JOB cannot be delivered, so the claim is undone."""
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    worker.quiet("JOB", 0.1)
    worker.sock.close(linger=0)
    time.sleep(0.3)  # let the ROUTER notice the closed connection
    created = link.create()
    link.broker.poke("schedule")
    time.sleep(0.3)
    job = link.store.get_job(created.id)
    assert job.status is Status.QUEUED
    assert job.attempts == 0
    assert job.worker is None
    # A worker that is there gets it, as its first attempt.
    other = link.worker("w2")
    other.hello()
    other.ready()
    wire = other.job()
    assert (wire["id"], wire["attempt"]) == (created.id, 1)


def test_a_job_lost_before_its_container_started_is_queued_again_for_free(link: Link) -> None:
    created = link.create(name="never started", max_retries=0)
    worker = link.worker("w1")
    worker.hello()
    worker.ready()
    job = worker.job()
    worker.ready(slots=0, running=[job["id"]])  # confirmed, but no STARTED ever comes
    worker.keepalive = False
    wait_until(
        lambda: link.status(created.id) is Status.QUEUED,
        timeout_s=LIVENESS_S + 3,
        what="the job back in the queue",
    )
    again = link.store.get_job(created.id)
    assert again.attempts == 0 and again.worker is None and again.error is None
