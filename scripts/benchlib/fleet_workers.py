"""Simulated workers for the fleet rows: many CURVE-authenticated DEALERs driven by one
process with one poller, each speaking the real worker protocol (gpubox.protocol) as
gpubox.worker.agent does, with 8 made-up GPUs and jobs that "run" for a while and end
without running anything.

Each worker says HELLO, sends a HEARTBEAT every HEARTBEAT_S, and answers the coordinator as
the agent would. It goes through three stages, on the bench's cue (Fleet's events):
  connected   no READY at all: the broker has nothing to plan on it, only heartbeats;
  `report`    READY after every change (one a turn of the loop at most, as the agent),
              offering no slot: the fleet is there and busy elsewhere;
  `go`        READY offers what is free, from a moment drawn within ramp_s; for each JOB:
              READY (its receipt), STARTED and one LOG line at once, DONE once its run
              time is up, DONE again if it is not acknowledged within RESEND_S.
A Shape changes what each worker offers and how its jobs go: the follower rows give workers
100 slots and no GPU, and jobs that run until the bench ends and print a line a second."""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import zmq

from gpubox import __version__, protocol

HEARTBEAT_S = 2.0  # the worker's default heartbeat_interval_s
LIVENESS_S = 10.0  # the worker's default liveness_s, said in HELLO as a worker says it
RESEND_S = 3.0  # the worker's default resend_s
RUN_S = (1.0, 5.0)  # a job's simulated run time, drawn evenly
GPUS = 8
A100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81559}
TIMERS_EVERY_S = 0.05  # how often heartbeats and resends are looked at


@dataclasses.dataclass(frozen=True)
class Shape:
    """What each simulated worker offers and how its jobs go: its made-up GPUs, its slots
    (max_jobs), a job's run time (drawn evenly from the range), and the seconds between a
    job's log lines (0: one line as it starts, none after)."""

    gpus: int = GPUS
    slots: int = GPUS
    run_s: tuple[float, float] = RUN_S
    line_every_s: float = 0.0


FLEET = Shape()  # the fleet rows' workers


@dataclasses.dataclass(frozen=True)
class Enrolled:
    """A simulated worker's name, CURVE keypair (Z85) and labels."""

    name: str
    public: bytes
    secret: bytes
    labels: dict[str, str]


@dataclasses.dataclass
class Tally:
    """What one process's workers saw; the bench adds them up and checks the health ones."""

    welcomed: int = 0
    jobs: int = 0  # JOBs received
    done: int = 0  # DONEs acknowledged
    resent: int = 0  # DONEs sent again, unacknowledged after RESEND_S
    cancels: int = 0
    hellos_again: int = 0  # the coordinator did not know a session (HEARTBEAT known false)
    refused: int = 0
    lines: int = 0  # LOG lines sent
    dropped: int = 0  # messages the DEALER's full queue did not take
    silent_max_s: float = 0.0  # the longest the coordinator said nothing to one worker
    turn_max_s: float = 0.0  # the longest turn of a process's loop (what a reply may wait)

    def add(self, other: Tally) -> None:
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            merged = max(mine, theirs) if field.name.endswith("_max_s") else mine + theirs
            setattr(self, field.name, merged)


@dataclasses.dataclass
class Held:
    """A job a simulated worker holds: its attempt, GPUs, the seq of its last log line, and
    its DONE once sent."""

    attempt: int
    gpus: list[str]
    seq: int
    done: protocol.Done | None = None
    done_sent_at: float = 0.0


def stamp() -> str:
    return f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


class SimWorker:
    """One simulated worker: its DEALER, and what the real agent keeps of its session and jobs."""

    def __init__(
        self,
        context: zmq.Context[Any],
        link: str,
        server_key: bytes,
        who: Enrolled,
        index: int,
        tally: Tally,
        shape: Shape = FLEET,
    ) -> None:
        self.who = who
        self.index = index  # its place in its process's list
        self.tally = tally
        self.shape = shape
        self.gpus = [f"{who.name}-gpu{i}" for i in range(shape.gpus)]
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_publickey, self.sock.curve_secretkey = who.public, who.secret
        self.sock.curve_serverkey = server_key
        self.sock.connect(link)
        self.jobs: dict[int, Held] = {}
        self.session = ""
        self.welcomed = False
        self.reporting = False  # READY is sent (stage `report`)
        self.open = False  # READY offers what is free, else no slot (stage `go`)
        self.ready_due = False
        self.last_heard = time.monotonic()
        self.next_beat = time.monotonic() + random.uniform(0, HEARTBEAT_S)

    def send(self, msg: protocol.FromWorker) -> None:
        # As the agent's: what a full queue drops is sent again (DONE) or superseded (READY).
        try:
            self.sock.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.tally.dropped += 1

    def hello(self) -> None:
        self.session, self.welcomed = uuid.uuid4().hex, False
        gpus = [{"uuid": u, "index": i, **A100} for i, u in enumerate(self.gpus)]
        self.send(
            protocol.Hello(
                name=self.who.name,
                version=__version__,
                session=self.session,
                gpus=gpus,
                labels=self.who.labels,
                max_jobs=self.shape.slots,
                liveness_s=LIVENESS_S,
                running=[
                    protocol.Running(job_id=j, attempt=h.attempt) for j, h in self.jobs.items()
                ],
            )
        )

    def ready(self) -> None:
        self.ready_due = False
        if not self.welcomed or not self.reporting:
            return
        busy = {uuid for held in self.jobs.values() for uuid in held.gpus}
        free = [gpu for gpu in self.gpus if gpu not in busy] if self.open else []
        slots = self.shape.slots - len(self.jobs) if self.open else 0
        self.send(
            protocol.Ready(
                session=self.session, free_gpus=free, slots=slots, running=list(self.jobs)
            )
        )

    def received(
        self,
        frames: list[bytes],
        now: float,
        ends: list[tuple[float, int, int]],
        lines: list[tuple[float, int, int]],
    ) -> None:
        """Act on one message from the coordinator; a job's end goes on the `ends` heap as
        (when, this worker's index, job id), and its next log line (if its shape prints
        more) on the `lines` heap alike."""
        self.last_heard = now
        msg = protocol.decode_from_coordinator(frames)
        match msg:
            case protocol.Welcome():
                self.welcomed, self.ready_due = True, True
                self.tally.welcomed += 1
            case protocol.CoordinatorHeartbeat(known=False):
                self.tally.hellos_again += 1
                self.hello()
            case protocol.Job(job=job) if job.id not in self.jobs:
                self.tally.jobs += 1
                self.jobs[job.id] = Held(job.attempt, list(job.gpus), job.first_seq)
                self.ready_due = True  # its receipt
                self.send(
                    protocol.Started(
                        session=self.session,
                        job_id=job.id,
                        attempt=job.attempt,
                        container=f"sim-{job.id}",
                        executed_at=stamp(),
                    )
                )
                self._log(job.id)
                heapq.heappush(ends, (now + random.uniform(*self.shape.run_s), self.index, job.id))
                if every := self.shape.line_every_s:  # at a moment of its own in the period
                    heapq.heappush(lines, (now + random.uniform(0, every), self.index, job.id))
            case protocol.Ack(job_id=job_id, done=True) if job_id in self.jobs:
                del self.jobs[job_id]
                self.tally.done += 1
                self.ready_due = True
            case protocol.Ack(job_id=job_id, seq=seq) if job_id in self.jobs:
                held = self.jobs[job_id]
                if held.done is not None and seq < held.seq:  # DONE refused: its line first
                    self._log(job_id)
                    self._send_done(held, now)
            case protocol.Cancel(job_id=job_id) if job_id in self.jobs:
                self.tally.cancels += 1
                self.end(job_id, now, "CANCELLED")
            case protocol.Refused():
                self.tally.refused += 1

    def next_line(self, job_id: int, due: float, lines: list[tuple[float, int, int]]) -> None:
        """A held job's next log line (due at `due`), and the one after on the heap."""
        held = self.jobs.get(job_id)
        if held is None or held.done is not None:
            return
        held.seq += 1
        self._log(job_id)
        heapq.heappush(lines, (due + self.shape.line_every_s, self.index, job_id))

    def _log(self, job_id: int) -> None:
        held = self.jobs[job_id]
        self.tally.lines += 1
        line = [stamp(), "stdout", f"simulated job {job_id}"]
        self.send(
            protocol.Log(
                session=self.session,
                job_id=job_id,
                attempt=held.attempt,
                seq=held.seq,
                lines=[line],
            )
        )

    def end(self, job_id: int, now: float, status: str = "FINISHED") -> None:
        held = self.jobs.get(job_id)
        if held is None or held.done is not None:
            return
        held.done = protocol.Done(
            session=self.session,
            job_id=job_id,
            attempt=held.attempt,
            status=status,
            exit_code=0 if status == "FINISHED" else None,
            error=None,
            executed_at=stamp(),
            finished_at=stamp(),
            last_seq=held.seq,
        )
        self._send_done(held, now)

    def _send_done(self, held: Held, now: float) -> None:
        assert held.done is not None
        self.send(dataclasses.replace(held.done, session=self.session))
        held.done_sent_at = now

    def timers(self, now: float) -> None:
        """Heartbeat when due; DONEs not acknowledged within RESEND_S go again."""
        if self.welcomed:
            self.tally.silent_max_s = max(self.tally.silent_max_s, now - self.last_heard)
        if now >= self.next_beat:
            self.next_beat = now + HEARTBEAT_S
            self.send(protocol.WorkerHeartbeat(session=self.session))
        for held in self.jobs.values():
            if held.done is not None and now - held.done_sent_at >= RESEND_S:
                self.tally.resent += 1
                self._send_done(held, now)


def serve(
    link: str,
    server_key: bytes,
    fleet: list[Enrolled],
    report: Event,
    go: Event,
    stop: Event,
    out: Queue[tuple[str, Any]],
    seed: int,
    ramp_s: float,
    shape: Shape = FLEET,
) -> None:
    """Run these workers until `stop`; put ("welcomed", count) once every one was welcomed
    and ("tally", Tally) at the end on `out`. Once `report` is set they send READY; once
    `go` is, each opens at a moment drawn within ramp_s, as GPUs free up in life rather than
    all at once. A multiprocessing target."""
    random.seed(seed)
    context = zmq.Context()
    tally = Tally()
    workers = [
        SimWorker(context, link, server_key, who, index, tally, shape)
        for index, who in enumerate(fleet)
    ]
    poller = zmq.Poller()
    by_socket: dict[zmq.Socket[Any], SimWorker] = {}
    for worker in workers:
        poller.register(worker.sock, zmq.POLLIN)
        by_socket[worker.sock] = worker
        worker.hello()
    ends: list[tuple[float, int, int]] = []
    lines: list[tuple[float, int, int]] = []
    opening: list[tuple[float, int]] = []  # (when, worker index), once `go`
    said_welcomed = False
    next_timers = 0.0
    try:
        while not stop.is_set():
            turned = time.monotonic()
            for sock, _ in poller.poll(int(TIMERS_EVERY_S * 1000)):
                worker = by_socket[sock]
                now = time.monotonic()
                for _ in range(100):  # then the others' turn
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    worker.received(frames, now, ends, lines)
            now = time.monotonic()
            if report.is_set() and not workers[0].reporting:
                for worker in workers:
                    worker.reporting, worker.ready_due = True, True
            if go.is_set() and not opening and not workers[0].open:
                opening = sorted((now + random.uniform(0, ramp_s), i) for i in range(len(workers)))
                opening.reverse()  # the next to open last, to pop
            while opening and opening[-1][0] <= now:
                worker = workers[opening.pop()[1]]
                worker.open, worker.ready_due = True, True
            while ends and ends[0][0] <= now:
                _, index, job_id = heapq.heappop(ends)
                workers[index].end(job_id, now)
            while lines and lines[0][0] <= now:
                due, index, job_id = heapq.heappop(lines)
                workers[index].next_line(job_id, due, lines)
            if now >= next_timers:
                next_timers = now + TIMERS_EVERY_S
                for worker in workers:
                    worker.timers(now)
            for worker in workers:
                if worker.ready_due:
                    worker.ready()
            if said_welcomed:  # (HELLOs and handshakes before, at will)
                tally.turn_max_s = max(tally.turn_max_s, time.monotonic() - turned)
            if not said_welcomed and tally.welcomed >= len(workers):
                said_welcomed = True
                out.put(("welcomed", len(workers)))
    finally:
        out.put(("tally", tally))
        for worker in workers:
            worker.sock.close(linger=0)
        context.term()
