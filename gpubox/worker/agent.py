"""The worker's link to the coordinator: the one thread that owns the DEALER socket.

It says HELLO, asks for work (READY), starts a runner thread per JOB, forwards what runners
report (STARTED, LOG, DONE) and what the GPU sampler measures (TELEMETRY), and keeps every LOG
batch, TELEMETRY batch and DONE until the coordinator acknowledges it, resending after a
reconnect or a quiet spell. Runner threads reach this thread only through an inproc PUSH
socket each; the sampler (worker.sampler) through a queue this loop empties at every turn.

Unacknowledged batches are held in memory up to max_unacked_lines (or MAX_UNACKED_BYTES);
later ones wait in the spill (worker.spill: files in <state>/spill/<name>/, bounded on disk)
and move into the window, oldest first, as acknowledgements free room. A job's DONE goes out
once its spill is empty and its points are stored.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import operator
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.utils.monitor

from gpubox import __version__, keys, models, protocol, supervise
from gpubox.config import WorkerConfig
from gpubox.logfmt import fields, printable
from gpubox.worker import runners
from gpubox.worker.link import CoordinatorLink
from gpubox.worker.points import PointWindow
from gpubox.worker.runners import Runners
from gpubox.worker.sampler import Sampler
from gpubox.worker.spill import Spill
from gpubox.worker.stopping import JobStop

log = logging.getLogger(__name__)

MAX_UNACKED_BYTES = 64 * 1024 * 1024  # the in-memory window's other bound
LINE_OVERHEAD = 48  # bytes a held line costs besides its text (timestamp, stream, list)
_STREAM = operator.itemgetter(1)
MOVE_EVERY_S = 0.2  # with several coordinators: the least time between two moves
# A prefetched job that waited this long for a slot is given back (see Agent._check_holds).
HOLD_S = 1.0


class Runtime(Protocol):
    """Runs job attempts, reporting through emit(kind, body); see worker.docker_runtime and
    worker.process."""

    outlives_worker: bool  # its jobs run on while the worker is stopped (Docker's containers)
    owner: str  # the coordinator its jobs are for (keys.fingerprint), set before recover()

    def run(
        self,
        job: protocol.WireJob,
        emit: Any,
        cancel: threading.Event,
        detach: threading.Event | None = None,
        container: Any = None,
        resume: models.LogMarks | None = None,
    ) -> None: ...

    def recover(self) -> list[tuple[int, int, list[str], Any]]: ...

    def discard(self, container: Any, stop: bool = True) -> None: ...

    def forget(self, job_id: int) -> None:
        """The coordinator has the job's DONE; must not block (the agent's loop calls it)."""
        ...

    def close(self) -> None:
        """The worker stops: let go of what the runtime holds (the process runtime's launch
        pad). It stops no job: the agent has stopped those it must (see outlives_worker)."""
        ...


@dataclasses.dataclass
class LocalJob:
    """A job attempt this worker holds, from JOB until the coordinator acknowledges DONE."""

    id: int
    attempt: int
    gpus: list[str]
    cancel: JobStop  # set to stop it: a cancel, or the idle-GPU policy
    # Set when its runner is done with it (and at first: nothing runs it yet).
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)
    running: bool = True
    # Prefetched: received while every slot was busy, held (not started) until one frees.
    prefetched: bool = False
    since: float = 0.0  # when it was held, then when it started (time.monotonic)
    # first seq → (lines, last seq covered, sent at): sent, not yet acknowledged
    unacked: dict[int, tuple[list[list[str]], int, float]] = dataclasses.field(default_factory=dict)
    done: protocol.Done | None = None  # its DONE, once the runner ended it (session: "")
    done_sent_at: float = 0.0
    # A container found at start, not yet re-attached (the coordinator sends JOB + resume).
    found: Any = None
    points: PointWindow = dataclasses.field(default_factory=PointWindow)  # TELEMETRY unacked
    spec: protocol.WireJob | None = None  # as JOB gave it

    def priority(self) -> int:
        return (self.spec.priority or 0) if self.spec is not None else 0


class Agent:
    """The worker's event loop. run() in one thread; stop() from any."""

    def __init__(
        self,
        config: WorkerConfig,
        runtime: Runtime,
        gpus: list[models.Gpu],
        context: zmq.Context | None = None,
        usage: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        """`usage` says how busy the GPUs are now (worker.gpu's GpuSource.usage), sent with
        each heartbeat for GET /workers."""
        self.config = config
        self.usage = usage
        self.name = keys.check_name(config.name or socket.gethostname())
        key_file = config.key_file or keys.worker_secret_file(config.state_dir, self.name)
        keypair = keys.load_secret(key_file)
        server_key = keys.load_public(
            config.coordinator_key or str(keys.coordinator_files(config.state_dir)[0])
        )
        self.runtime = runtime
        # What this worker's jobs are marked with, so a restart finds its own and never those
        # of another gpubox on this host under the same worker name: the coordinator's key.
        runtime.owner = keys.fingerprint(server_key)
        self.gpus = gpus
        self.labels = config.label_map
        self.context = context or zmq.Context.instance()
        self.jobs: dict[int, LocalJob] = {}
        self._prefetched: list[int] = []  # held jobs, in the order they came
        # No prefetch while slots do not free within HOLD_S (see _check_holds).
        self._prefetch_paused = False
        # Before any socket exists: a failure here leaves nothing open.
        for job_id, attempt, uuids, container in runtime.recover():
            log.info("found the container of job %d (attempt %d): re-attaching", job_id, attempt)
            self.jobs[job_id] = LocalJob(job_id, attempt, uuids, JobStop(), found=container)
        self.events_address = f"inproc://gpubox-worker-{uuid.uuid4().hex}"
        # Runner threads hand their events over in this deque (no copy, no pickling) and
        # send one empty message per event on `events`, which wakes the loop and bounds how
        # far they may run ahead of it (the PUSH high-water mark: back-pressure).
        self._handed: collections.deque[tuple[int, str, dict[str, Any]]] = collections.deque()
        self.events = self.context.socket(zmq.PULL)
        self.events.setsockopt(zmq.RCVHWM, runners.EVENTS_HWM)
        self.events.bind(self.events_address)
        self.runners = Runners(self.context, self.events_address)
        self.spill = Spill(Path(config.state_dir) / "spill" / self.name, config.spill_max_bytes)
        self.link = CoordinatorLink(
            self.context, config.coordinators, self.name, keypair, server_key
        )
        # Several coordinators: the one this talks to stands by or went away, so move on to
        # the next of the list (at most every MOVE_EVERY_S, while none of them leads).
        self._move_due = False
        self._next_move = 0.0
        self._moves = 0  # moves since the last WELCOME
        # The GPU sampler: points of each job's GPUs, and the idle-GPU policy.
        self.sampler = Sampler(
            usage or (lambda: []),
            {gpu.uuid: gpu.memory_mb for gpu in gpus},
            config.telemetry_interval_s,
            config.telemetry_point_s,
        )
        self.telemetry = False  # the coordinator takes TELEMETRY (its WELCOME says so)
        self.prefetch = 0  # jobs held beyond max_jobs: the setting, where WELCOME allows
        self._refused = ""  # the coordinator's reason for refusing our HELLO, logged once
        self._hello_at = 0.0  # when the last HELLO went out (time.monotonic)
        # Ticked at every turn of run()'s loop; the process ends if it stops turning.
        self.loop = supervise.Loop(stall_s=3 * config.heartbeat_interval_s)
        # What each message from the coordinator is handled by.
        self._handlers: dict[type[protocol.FromCoordinator], Callable[[Any, float], None]] = {
            protocol.Welcome: self._on_welcome,
            protocol.Refused: self._on_refused,
            protocol.CoordinatorHeartbeat: self._on_heartbeat,
            protocol.Job: self._on_job,
            protocol.Ack: self._on_ack,
            protocol.Cancel: self._on_cancel,
            protocol.Recall: self._on_recall,
        }
        self.session = ""
        self.coordinator_id = ""
        self.welcomed = False
        self.last_heard = 0.0
        self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._detach = threading.Event()
        self.draining = False
        self.unacked_lines = 0
        self.unacked_bytes = 0
        self._announce_drain = False
        self._ready_due = False  # see _ready
        self.connected = threading.Event()  # set while welcomed; for tests and `up`

    def stop(self, drain: bool = False) -> None:
        """Stop. Plainly: at once, leaving running containers for the next start to re-attach
        to. With `drain`: take no new job, and stop once every running job has ended and its
        DONE is acknowledged."""
        if drain and not self._stop.is_set():
            self.draining = True
            self._announce_drain = True
            log.info("draining: no new jobs; stopping once %d job(s) end", len(self.jobs))
            return
        self._stop.set()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); then stop running containers and close the sockets."""
        poller = zmq.Poller()
        poller.register(self.events, zmq.POLLIN)
        self._connect(time.monotonic(), poller)
        threading.Thread(target=self._sample, daemon=True, name="gpubox-sampler").start()
        try:
            while not self._stop.is_set():
                self.loop.tick()
                if self.draining and not self.jobs:
                    break
                events = dict(poller.poll(100))
                now = time.monotonic()
                if self.link.dealer in events:
                    self._drain_link(now)
                if self.link.monitor in events and self.link.check_handshakes():
                    self._move_due = True  # the coordinator dropped the connection
                if self.events in events:
                    self._drain_events(now)
                self.step(now, poller)
                if self._ready_due:
                    self._send_ready()
        finally:
            self._shutdown()

    def step(self, now: float, poller: zmq.Poller | None = None) -> None:
        """Timers: heartbeat, reconnect when the coordinator is silent, resend unacked."""
        if now - self.last_heard > self.config.liveness_s:
            log.warning(
                "no word from the coordinator for %.0f s: reconnecting", now - self.last_heard
            )
            self._connect(now, poller, move=self.link.several)
            return
        if self._move_due and now >= self._next_move:
            self._connect(now, poller, move=True)
            return
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            usage = None
            if self.usage is not None:
                offered = {gpu.uuid for gpu in self.gpus}
                usage = [item for item in self.usage() if item["uuid"] in offered]
            self._send(protocol.WorkerHeartbeat(session=self.session, usage=usage))
        for job_id, attempt, points in self.sampler.take():
            self._add_points(job_id, attempt, points, now)
        if self.welcomed:
            self._resend(now, older_than=self.config.resend_s)
            self._refill(now)
            # A slot that freed while the coordinator was silent: its held job starts now
            # that the coordinator is heard again (see _start_prefetched).
            self._start_prefetched()
            self._check_holds(now)
            if self._announce_drain:
                self._announce_drain = False
                for job_id in list(self._prefetched):
                    self._give_back(self.jobs[job_id], "this worker drains")
                self._ready()  # slots 0: no more work

    def _connect(self, now: float, poller: zmq.Poller | None, move: bool = False) -> None:
        """Connect anew: to the same coordinator, or with `move` to the next of the list."""
        pause = MOVE_EVERY_S
        if move:
            self.link.move(poller)
            self._moves += 1
            # Once around the list with no leader found: look less often, and say so less.
            if self._moves >= len(self.link.endpoints):
                pause = MOVE_EVERY_S * 5
            if self._moves <= len(self.link.endpoints) or self._moves % 100 == 0:
                log.info("trying the coordinator at %s", self.link.endpoint)
        else:
            self.link.connect(poller)
        self._move_due, self._next_move = False, now + pause
        self.last_heard = now
        self._hello()

    def _hello(self) -> None:
        # Held jobs do not outlive a session: the coordinator may have given them to
        # another worker meanwhile. Missing from this HELLO, they are queued again (they
        # never started, so no attempt is spent).
        for job_id in list(self._prefetched):
            self._prefetched.remove(job_id)
            self._forget(self.jobs[job_id])
        self.session = uuid.uuid4().hex
        self.welcomed = False
        self._hello_at = time.monotonic()
        self.connected.clear()
        self._send(
            protocol.Hello(
                name=self.name,
                version=__version__,
                session=self.session,
                gpus=[gpu.to_dict() for gpu in self.gpus],
                labels=self.labels,
                max_jobs=self.config.max_jobs,
                mounts=sorted(self.config.mount_map),
                runtime=self.config.runtime,
                liveness_s=self.config.liveness_s,
                prefetch=self.config.prefetch or None,
                running=[
                    protocol.Running(job_id=j.id, attempt=j.attempt, recovered=j.found is not None)
                    for j in self.jobs.values()
                ],
            )
        )

    def _drain_link(self, now: float) -> None:
        for msg in self.link.received():
            self.last_heard = now
            handler = self._handlers.get(type(msg))
            if handler is None:  # a type protocol knows and this worker does not handle
                log.warning("dropped a %s message from the coordinator: no handler", msg.TYPE)
                continue
            try:
                handler(msg, now)
            except Exception:
                # One message gone wrong must not end the agent, and with it every job here.
                log.exception("the %s message from the coordinator failed", msg.TYPE)

    # --- messages from the coordinator --------------------------------------------------------

    def _on_welcome(self, msg: protocol.Welcome, now: float) -> None:
        self.coordinator_id, self._moves = msg.coordinator, 0
        self.welcomed = True
        self.telemetry = bool(msg.telemetry)
        self.prefetch = self.config.prefetch if msg.prefetch else 0
        if not self.telemetry:  # an older coordinator: points have nowhere to go
            for job in self.jobs.values():
                job.points.drop()
        self._refused = ""
        self.connected.set()
        log.info("connected to the coordinator at %s as %s", self.link.endpoint, self.name)
        self._resend(now, older_than=0.0)
        self._ready()

    def _on_refused(self, msg: protocol.Refused, now: float) -> None:
        if msg.standby and self.link.several:
            self._move_due = True  # it does not lead: the next one may
            return
        if msg.reason != self._refused:
            self._refused = msg.reason
            log.error("the coordinator refused this worker: %s", msg.reason[:300])

    def _on_heartbeat(self, msg: protocol.CoordinatorHeartbeat, now: float) -> None:
        if not msg.known and not self.welcomed and now - self._hello_at < self.config.resend_s:
            # A HELLO is on its way. This answers a message sent before it (batches queued
            # while the coordinator was away all get one): another HELLO would start yet
            # another session, and the next such answer another, a HELLO per queued message.
            return
        if not msg.known or (self.welcomed and msg.coordinator != self.coordinator_id):
            if not self._refused:  # else it is known why, and said once
                log.info("the coordinator does not know this session (it restarted?): HELLO again")
            self._hello()

    def _on_job(self, msg: protocol.Job, now: float) -> None:
        spec = msg.job
        job = self.jobs.get(spec.id)
        marks = protocol.resume_marks(msg)  # a re-attach: where its stored output ends
        found = None
        if self.draining and job is None:
            # Not confirmed in READY: the coordinator queues it again for another worker.
            log.info("job %d: not taken, this worker is draining", spec.id)
            return
        if job is not None:
            if job.found is None or job.attempt != spec.attempt or marks is None:
                return  # a duplicate delivery
            found, job.found = job.found, None
            # Its points go on from the last batch the coordinator stored; its container
            # runs: sampling starts now (a new container starts it at STARTED).
            job.points = PointWindow(1 + (-1 if msg.resume_points is None else msg.resume_points))
            job.spec = spec
            self._track(job)
        else:
            job = LocalJob(spec.id, spec.attempt, list(spec.gpus), JobStop(), spec=spec)
            # Every slot is busy, or jobs are held already (a slot freed while the
            # coordinator was silent): a prefetched job, which starts in priority order.
            full = self._running() >= self.config.max_jobs or bool(self._prefetched)
            self.jobs[job.id] = job
            if full:
                job.running, job.prefetched = False, True
                job.since = time.monotonic()
                self._prefetched.append(job.id)
                self._start_prefetched()
                log.info(
                    "job %d (attempt %d) received, %s: %s",
                    job.id,
                    job.attempt,
                    "held until a slot frees" if job.prefetched else "started, first of those held",
                    printable(spec.image),
                    extra=fields(job=job.id, attempt=job.attempt, gpus=",".join(job.gpus) or "-"),
                )
                self._ready()
                return
        self._start(job, spec, found, marks)
        log.info(
            "job %d (attempt %d) %s: %s",
            job.id,
            job.attempt,
            "re-attached" if found else "received",
            printable(spec.image),
            extra=fields(job=job.id, attempt=job.attempt, gpus=",".join(job.gpus) or "-"),
        )
        self._ready()

    def _start(
        self,
        job: LocalJob,
        spec: protocol.WireJob,
        found: Any = None,
        marks: models.LogMarks | None = None,
    ) -> None:
        job.since = time.monotonic()
        run = functools.partial(self._run_job, spec, job.cancel, job.ended, found, marks)
        self.runners.start(f"job-{job.id}", run)

    def _running(self) -> int:
        return sum(1 for job in self.jobs.values() if job.running)

    def _start_prefetched(self) -> None:
        """Start held jobs while a slot is free: the highest priority first, then in the
        order they came (the coordinator's order)."""
        # Only while the coordinator is heard: past half its liveness window it may soon
        # count this worker lost and hand these jobs to another.
        heard = time.monotonic() - self.last_heard < self.config.liveness_s / 2
        while (
            self._prefetched
            and heard
            and not self.draining
            and self._running() < self.config.max_jobs
        ):
            job = self.jobs[max(self._prefetched, key=lambda i: self.jobs[i].priority())]
            self._prefetched.remove(job.id)
            job.running, job.prefetched = True, False
            assert job.spec is not None  # a prefetched job is one JOB gave
            self._start(job, job.spec)
            log.info("job %d (attempt %d): started from prefetch", job.id, job.attempt)
            self._ready()

    def _check_holds(self, now: float) -> None:
        """Prefetch pays where slots free within moments. A job held HOLD_S waits behind
        long ones, while another worker may be free to run it: it and the other held jobs
        are given back, and this worker holds none until one of its jobs ends within HOLD_S
        of its start."""
        if not self._prefetched or now - self.jobs[self._prefetched[0]].since < HOLD_S:
            return
        if not self._prefetch_paused:
            log.info(
                "no slot freed within %g s: prefetch paused until a job ends that fast", HOLD_S
            )
        self._prefetch_paused = True
        for job_id in list(self._prefetched):
            self._give_back(self.jobs[job_id], f"no slot freed within {HOLD_S:g} s")

    def _give_back(self, job: LocalJob, why: str) -> None:
        """Hand a prefetched job back unstarted (RELEASED): the coordinator queues it again,
        or ends it if it was cancelled."""
        log.info("job %d: given back unstarted: %s", job.id, why, extra=fields(job=job.id))
        self._prefetched.remove(job.id)
        self._forget(job)
        self._send(protocol.Released(session=self.session, job_id=job.id, attempt=job.attempt))
        self._ready()

    def _on_ack(self, msg: protocol.Ack, now: float) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None or job.attempt != msg.attempt:
            return
        for seq in [s for s, (_, last, _) in job.unacked.items() if last <= msg.seq]:
            self._release(job.unacked.pop(seq)[0])
        if msg.points is not None:
            job.points.ack(msg.points)
            if job.done is not None and not job.points:
                self._send_done(job, now)  # it was waiting for its points to be stored
        if msg.done:
            self._forget(job)
            # Now its exited container may go (kept until here for a restart to find).
            self.runtime.forget(job.id)
            self._ready()
        elif job.done is not None and job.id not in self.spill:
            # DONE was refused for missing lines: send what is left now, then DONE.
            self._resend(now, older_than=0.0, only=job)
        self._refill(now)

    def _on_cancel(self, msg: protocol.Cancel, now: float) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None or job.attempt != msg.attempt:
            return
        if job.found is not None:
            # A container found at start that is no longer ours to run: stop it, forget it.
            log.info(
                "job %d: its container is not ours to run any more; stopping it",
                job.id,
                extra=fields(job=job.id, container=getattr(job.found, "short_id", "-")),
            )
            threading.Thread(target=self.runtime.discard, args=(job.found,), daemon=True).start()
            self._forget(job)
            self._ready()
            return
        if job.prefetched:
            self._give_back(job, "cancelled before it started")
            return
        log.info("job %d: cancel requested", job.id, extra=fields(job=job.id))
        job.cancel.set()

    def _on_recall(self, msg: protocol.Recall, now: float) -> None:
        job = self.jobs.get(msg.job_id)
        if job is not None and job.attempt == msg.attempt and job.prefetched:
            self._give_back(job, "recalled: a job of higher priority waits")

    def _forget(self, job: LocalJob) -> None:
        del self.jobs[job.id]
        self.sampler.finish(job.id)
        for lines, _, _ in job.unacked.values():
            self._release(lines)
        self.spill.discard(job.id)

    # --- the in-flight window and the spill ---------------------------------------------------

    def _window_full(self) -> bool:
        return (
            self.unacked_lines >= self.config.max_unacked_lines
            or self.unacked_bytes >= MAX_UNACKED_BYTES
        )

    def _hold(self, job: LocalJob, seq: int, lines: list[list[str]], last: int, now: float) -> None:
        """Put a batch in the in-flight window and send it."""
        job.unacked[seq] = (lines, last, 0.0)
        self.unacked_lines += len(lines)
        self.unacked_bytes += sum(len(line[2]) for line in lines) + LINE_OVERHEAD * len(lines)
        self._send_log(job, seq, now)

    def _release(self, lines: list[list[str]]) -> None:
        self.unacked_lines -= len(lines)
        self.unacked_bytes -= sum(len(line[2]) for line in lines) + LINE_OVERHEAD * len(lines)

    def _refill(self, now: float) -> None:
        """Move spilled batches into the window while it has room, a batch per job in turn;
        send DONE for a job whose spill has emptied."""
        while not self._window_full():
            moved = False
            for job_id in self.spill.jobs():
                job = self.jobs.get(job_id)
                batch = self.spill.pop(job_id)
                if job is None or batch is None:
                    continue
                moved = True
                self._hold(job, batch.seq, batch.lines, batch.last, now)
                if job_id not in self.spill and job.done is not None:
                    self._send_done(job, now)
                if self._window_full():
                    break
            if not moved:
                return

    # --- runner threads -----------------------------------------------------------------------

    def _run_job(
        self,
        spec: protocol.WireJob,
        cancel: threading.Event,
        ended: threading.Event,
        found: Any,
        resume: models.LogMarks | None,
        push: zmq.Socket,
    ) -> None:
        def emit(kind: str, body: dict[str, Any]) -> None:
            # Blocks while the agent is behind (back-pressure on the container's output),
            # gives up once the agent has stopped.
            self._handed.append((spec.id, kind, body))
            while True:
                try:
                    push.send(b"")
                    return
                except zmq.Again:
                    if self._stop.is_set():
                        return

        try:
            self.runtime.run(spec, emit, cancel, self._detach, found, resume)
        except Exception as exc:  # a runtime bug must still end the job
            log.exception("job %d: the runtime failed", spec.id, extra=fields(job=spec.id))
            emit(
                "done",
                {
                    "status": "ERROR",
                    "exit_code": None,
                    "error": f"worker error: {exc}",
                    "executed_at": None,
                    "finished_at": models.format_time(models.utcnow()),
                    "last_seq": -1,
                },
            )
        finally:
            ended.set()

    def _drain_events(self, now: float) -> None:
        for _ in range(1000):  # then back to the poll: acknowledgements matter as much
            try:
                self.events.recv(zmq.NOBLOCK)
                job_id, kind, body = self._handed.popleft()
            except zmq.Again:
                return
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if kind == "started":
                self._track(job)
                self._send(
                    protocol.Started(
                        session=self.session, job_id=job.id, attempt=job.attempt, **body
                    )
                )
            elif kind == "lines":
                seq, lines = body["seq"], body["lines"]
                if job.id in self.spill or self._window_full():
                    self.spill.push(job.id, seq, lines)
                else:
                    self._hold(job, seq, lines, seq + len(lines) - 1, now)
            elif kind == "done":
                job.running = False
                if now - job.since < HOLD_S:
                    self._prefetch_paused = False  # slots turn over fast again
                last = self.sampler.finish(job.id)
                if last is not None:
                    self._add_points(job.id, last[0], last[1], now)
                if body["last_seq"] < 0:  # the runtime crashed: claim no lines it never sent
                    body["last_seq"] = max(
                        [last for _, last, _ in job.unacked.values()]
                        + [self.spill.last_seq(job.id) or 0]
                    )
                job.done = protocol.Done(session="", job_id=job.id, attempt=job.attempt, **body)
                self._send_done(job, now)
                self._start_prefetched()  # before READY, which counts the slots
                self._ready()

    # --- sending ------------------------------------------------------------------------------

    def _ready(self) -> None:
        """A READY is due: one goes out after this round of messages and events, however
        many jobs started or ended in it (each READY makes the coordinator plan its queue)."""
        self._ready_due = True

    def _send_ready(self) -> None:
        self._ready_due = False
        if not self.welcomed:
            return
        # A prefetched job holds its GPUs and a place as a running one does.
        taken = [job for job in self.jobs.values() if job.running or job.prefetched]
        busy = {uuid for job in taken for uuid in job.gpus}
        free = [gpu.uuid for gpu in self.gpus if gpu.uuid not in busy]
        prefetch = 0 if self._prefetch_paused else self.prefetch
        room = self.config.max_jobs + prefetch - len(taken)
        self._send(
            protocol.Ready(
                session=self.session,
                free_gpus=[] if self.draining else free,
                slots=0 if self.draining else max(0, room),
                running=list(self.jobs),
            )
        )

    def _send_log(self, job: LocalJob, seq: int, now: float) -> None:
        if not self.welcomed:
            return
        lines, last, _ = job.unacked[seq]
        sent, notes = lines, None
        if models.GPUBOX_STREAM in map(_STREAM, lines):
            # The worker's own lines (markers) travel as stderr, named in `notes`: a
            # coordinator that knows no gpubox stream still takes the batch.
            notes = [i for i, line in enumerate(lines) if line[1] == models.GPUBOX_STREAM]
            sent = [
                [line[0], "stderr", line[2]] if line[1] == models.GPUBOX_STREAM else line
                for line in lines
            ]
        msg = protocol.Log(
            session=self.session,
            job_id=job.id,
            attempt=job.attempt,
            seq=seq,
            lines=sent,
            last=last if last != seq + len(lines) - 1 else None,
            notes=notes,
        )
        if self._send(msg):
            job.unacked[seq] = (lines, last, now)

    def _send_done(self, job: LocalJob, now: float) -> None:
        if not self.welcomed or job.done is None or job.id in self.spill or job.points:
            return  # (its DONE goes once its lines are out and its points stored)
        if self._send(dataclasses.replace(job.done, session=self.session)):
            job.done_sent_at = now

    def _resend(self, now: float, older_than: float, only: LocalJob | None = None) -> None:
        for job in [only] if only is not None else list(self.jobs.values()):
            for seq in sorted(job.unacked):
                if now - job.unacked[seq][2] >= older_than:
                    self._send_log(job, seq, now)
            for batch in job.points.due(now, older_than):
                if self._send(batch.message(self.session, job.id, job.attempt)):
                    batch.sent_at = now
            if job.done is not None and now - job.done_sent_at >= older_than:
                self._send_done(job, now)

    def _send(self, msg: protocol.FromWorker) -> bool:
        return self.link.send(msg)

    # --- GPU telemetry ------------------------------------------------------------------------

    def _sample(self) -> None:
        """The sampler's thread. Not essential: should it fail, jobs run on unmeasured."""
        try:
            self.sampler.run()
        except Exception:
            log.exception("the GPU sampler failed: no more GPU telemetry nor idle stops")

    def _track(self, job: LocalJob) -> None:
        """Sample the job's GPUs from now on, under its idle-GPU policy."""
        spec = job.spec
        self.sampler.track(
            job.id,
            job.attempt,
            job.gpus,
            job.cancel,
            spec.idle_timeout if spec is not None else None,
            spec.idle_threshold if spec is not None and spec.idle_threshold is not None else 5.0,
        )

    def _add_points(self, job_id: int, attempt: int, points: list[Any], now: float) -> None:
        """Hold a job's new points for the coordinator and send them (when it takes them)."""
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or (self.welcomed and not self.telemetry):
            return
        batch = job.points.add(points)
        if (
            batch is not None
            and self.welcomed
            and self._send(batch.message(self.session, job.id, job.attempt))
        ):
            batch.sent_at = now

    # --- stopping -----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        # Runner threads let go of their containers, which run on: the next start of this
        # worker finds them and re-attaches. Child processes cannot run on: they are stopped.
        self._detach.set()
        for job_id in list(self._prefetched):
            self._give_back(self.jobs[job_id], "this worker stops")
        running = [job for job in self.jobs.values() if job.running and job.found is None]
        if running and self.runtime.outlives_worker:
            log.info("leaving %d running job(s) to re-attach to at the next start", len(running))
        elif running:
            log.warning(
                "stopping %d running job(s): the process runtime's jobs end with the worker"
                " (the coordinator queues each again while it has retries left, else it is"
                " an ERROR; --drain waits for them instead)",
                len(running),
            )
        for job in running:
            job.ended.wait(timeout=2)
        self.sampler.stop()
        self.runners.stop()
        self.runtime.close()
        self.link.close(None)
        self.events.close(linger=0)
        self.spill.close()
