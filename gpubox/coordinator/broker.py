"""The broker: the one thread that owns the ROUTER socket and talks to workers.

It admits workers (HELLO), hands them jobs when they have room (READY → JOB), stores what they
report (STARTED, LOG, DONE), forwards cancels, exchanges heartbeats, and declares silent workers
lost. Other threads reach it only through `poke`, which sends on an inproc socket.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from gpubox import errors, keys, models, protocol, supervise, zmqio
from gpubox.coordinator import (
    admission,
    linkport,
    metrics,
    recall,
    reports,
    scheduler,
    sealing,
)
from gpubox.coordinator.brokerview import BrokerView
from gpubox.coordinator.collector import collection
from gpubox.coordinator.events import Changes
from gpubox.coordinator.lifecycle import Lifecycle
from gpubox.coordinator.peers import Link, Peer
from gpubox.coordinator.planner import Planner
from gpubox.logfmt import fields
from gpubox.store import Store
from gpubox.store.base import Finish

log = logging.getLogger(__name__)

SCHEDULE_EVERY_S = 1.0
STORE_BACKOFF_MAX_S = 5.0
MAX_BURST_LINES = 50_000  # log lines stored in one transaction, at most (about 0.5 s)
FLAP_HELLOS, FLAP_WINDOW_S = 4, 30.0  # this many HELLOs of one name within the window: warn
# A worker whose liveness (from its HELLO) is at least this many heartbeat intervals hears
# often enough from step()'s beats (at least every 1.25 intervals): its HEARTBEATs go
# unanswered. step() looks for workers due a beat BEAT_TURNS times an interval.
BEATS_PER_LIVENESS = 3
BEAT_TURNS = 8
QUARANTINE_S = 300.0  # no jobs for a worker that was sent one and never confirmed it


class Broker:
    """Owns the ROUTER socket; run() in its own thread, stop() from any thread."""

    def __init__(
        self,
        store: Store,
        changes: Changes,
        bind: str,
        server_keys: tuple[bytes, bytes],
        allow: keys.AllowList,
        sealer: sealing.Sealer,
        heartbeat_interval_s: float = 2.0,
        liveness_s: float = 10.0,
        context: zmq.Context[Any] | None = None,
        max_log_lines: int | None = None,
        max_log_bytes: int | None = None,
        telemetry_max_points: int = 2000,
        idle_timeout: float = 0.0,
        idle_threshold: float = 5.0,
        fair_share_half_life: float = 86400.0,
        authenticator: keys.CurveAuthenticator | None = None,
    ) -> None:
        """`server_keys` is the coordinator's (public, secret) Z85 CURVE keypair; `allow` the
        worker keys it accepts. The context must not carry another ZAP authenticator, but
        `authenticator`, one already running on it (a standby's, handed over), which the
        broker then owns.
        `idle_timeout` and `idle_threshold`: the idle-GPU policy of jobs that set no
        idle_timeout of their own (0: none). `fair_share_half_life`: see fairshare (0: off)."""
        self.store = store
        self.changes = changes
        self.allow = allow
        self.sealer = sealer
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_s = liveness_s
        self.log_limits = reports.LogLimits(max_log_lines, max_log_bytes, telemetry_max_points)
        self.idle_timeout = idle_timeout
        self.idle_threshold = idle_threshold
        self.context = context or zmq.Context()
        self.coordinator_id = uuid.uuid4().hex
        # The heartbeat it sends, and answers each worker's with: the same frames every time,
        # encoded once (at 1,000 workers, 500 a second).
        self._beat = protocol.encode(
            protocol.CoordinatorHeartbeat(coordinator=self.coordinator_id, known=True)
        )
        # ZAP must run on this context before the ROUTER binds, or CURVE lets any key in.
        self.authenticator: keys.CurveAuthenticator | None = (
            authenticator or keys.CurveAuthenticator(self.context, allow)
        )
        try:
            self.router = linkport.bind_router(self.context, bind, server_keys)
        except errors.ConfigError:
            self.authenticator.stop()
            raise
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint: str = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inbox_address = f"inproc://gpubox-broker-{self.coordinator_id}"
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.bind(self.inbox_address)
        self._pokers = threading.local()
        self._all_pokers: list[zmq.Socket[Any]] = []
        self._pokers_lock = threading.Lock()
        self._stop = threading.Event()
        self._allow_fresh = False  # run() looked at the allow list for this burst
        self._schedule_poked = False  # a 'schedule' poke is on its way (see poke())
        self.peers: dict[str, Peer] = {}  # by session
        # The same peers by worker name (one session per name: a HELLO replaces the last),
        # so other threads find a worker in one step: GET /workers asks for each, and a
        # scan of peers each time cost it 340 ms at 1,000 workers. Kept by _on_hello and
        # _lose; peer_named() checks an entry is still in peers.
        self._by_name: dict[str, Peer] = {}
        self._hellos: dict[str, list[float]] = {}  # worker name → its recent HELLOs (monotonic)
        self._flap_warned: dict[str, float] = {}  # worker name → no warning again before
        self.started_at = time.monotonic()
        self._next_heartbeat = 0.0
        self._next_expiry = 0.0
        self._next_schedule = 0.0
        # A READY, DONE or new job asks for a round; one round serves them all (see step).
        self._schedule_due = False
        self.planner = Planner(store, fair_share_half_life)
        self.lifecycle = Lifecycle(
            store, changes, self.log_limits, on_end=self._forget, on_requeue=self.planner.requeued
        )
        self.counters = metrics.BrokerCounters()
        self.view = BrokerView(self)  # what the API reads (api.context.LiveView)
        self.gpu_counts = (0, 0)  # GPUs of ready workers: (busy, free), as of the last round
        self._sent_at: dict[int, tuple[int, float]] = {}  # job id → (attempt, JOB sent at)
        self._recalled: set[int] = set()  # held jobs recalled (see _recall), until they end
        self._stored: dict[int, int] = {}  # job id → last stored seq, to count new lines
        # STARTED, LOG and DONE of this burst, not stored yet, with their senders.
        self._reports: list[tuple[Peer, reports.Report]] = []
        self._report_lines = 0  # log lines among them
        self.dropped_messages = 0
        self._store_backoff_s = 0.0
        self._store_paused_until = 0.0
        # Ticked at every turn of run()'s loop: /healthz and the process watch it.
        self.loop = supervise.Loop(stall_s=3 * heartbeat_interval_s)
        # What each message from a worker is handled by: HELLO with the link it came on
        # (it starts a session), the others with the session's Peer.
        self._handlers: dict[type[protocol.FromWorker], Callable[[Any, Any, float], None]] = {
            protocol.Hello: self._on_hello,
            protocol.Ready: self._on_ready,
            protocol.Started: self._on_started,
            protocol.Log: self._on_log,
            protocol.Telemetry: self._on_telemetry,
            protocol.Done: self._on_done,
            protocol.Released: self._on_released,
            protocol.WorkerHeartbeat: self._on_heartbeat,
        }

    # --- called from other threads ------------------------------------------------------------

    def poke(self, kind: str, job_id: int = 0) -> None:
        """Tell the broker something changed: 'schedule' (a job was queued) or 'cancel'.

        A 'schedule' while another is still on its way is not sent: the broker clears the
        mark when it takes that one, before its round reads the queue, so the round sees
        every job committed before the mark was seen."""
        if kind == "schedule":
            if self._schedule_poked:
                return
            self._schedule_poked = True
        sock = getattr(self._pokers, "sock", None)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.inbox_address)
            self._pokers.sock = sock
            with self._pokers_lock:
                self._all_pokers.append(sock)
        sock.send_multipart([kind.encode(), str(job_id).encode()])

    def stop(self) -> None:
        self._stop.set()
        # Wake its poll, so it ends now rather than at the poll's timeout (never blocking: a
        # broker that ended already has no inbox to take it).
        try:
            waker = self.context.socket(zmq.PUSH)
        except zmq.ZMQError:
            return  # the context is gone: so is the broker
        try:
            waker.connect(self.inbox_address)
            waker.send_multipart([b"stop", b"0"], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        finally:
            waker.close(linger=0)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); then close the sockets this thread owns."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self.loop.tick()
                events = dict(poller.poll(100))
                woke, woke_cpu = time.perf_counter(), time.thread_time()
                with collection.deferred():
                    if self.router in events:
                        # A bounded burst (messages, and log lines to store in one transaction),
                        # then the timers run: heartbeats must go out. The allow list is looked
                        # at once per burst, not once per message.
                        self.allow.refresh()
                        self._allow_fresh = True
                        for _ in range(1000):
                            if self._report_lines >= MAX_BURST_LINES:
                                break
                            try:
                                frames = zmqio.recv(self.router)
                            except zmq.Again:
                                break
                            # The key CURVE authenticated this very message with.
                            key = frames[-1].get("User-Id") if frames else None
                            self._guard(
                                self.handle,
                                [f.bytes for f in frames],
                                time.monotonic(),
                                key if isinstance(key, str) else None,
                            )
                        self._allow_fresh = False
                        self._guard(self._store_reports)
                    if self.inbox in events:
                        while True:
                            try:
                                kind, job_id = self.inbox.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self._guard(self._on_poke, kind.decode(), int(job_id))
                    self.step(time.monotonic())
                self.counters.busy_s += time.perf_counter() - woke
                self.counters.cpu_s += time.thread_time() - woke_cpu
        finally:
            self.close()

    def close(self) -> None:
        """Close the sockets and stop the authenticator (before the context ends, or the
        process hangs on exit). Idempotent; run() does it when it returns."""
        self.router.close(linger=0)
        self.inbox.close(linger=0)
        with self._pokers_lock:
            for sock in self._all_pokers:
                sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def step(self, now: float) -> None:
        """Timers: heartbeats out, silent workers lost, orphaned jobs released, scheduling."""
        if now >= self._next_heartbeat:
            # Every BEAT_TURNS-th of an interval, a beat to each worker sent nothing for an
            # interval (any message tells a worker the coordinator is there): one hears from
            # the broker at least every 1 + 1/BEAT_TURNS intervals. The beats due go out
            # together, so the ZeroMQ I/O thread wakes once for them, where answering each
            # worker's own HEARTBEAT as it came woke it once per worker per interval (at
            # 1,000 workers, 500 times a second). Not all at once either: a burst of 1,000
            # beats, each encrypted, made the scheduling round beside it wait for a core.
            self._next_heartbeat = now + self.heartbeat_interval_s / BEAT_TURNS
            for peer in list(self.peers.values()):
                if now - peer.last_sent >= self.heartbeat_interval_s:
                    self._send(peer, self._beat)
        if now < self._store_paused_until:
            return
        if now >= self._next_expiry:
            self._next_expiry = now + min(1.0, self.heartbeat_interval_s)
            self._guard(self._expire, now)
            self._guard(self.lifecycle.end_overdue, self.planner.queue_reason)
        if now >= self._next_schedule:
            self._guard(self._schedule, now, True)
        elif self._schedule_due:
            self._guard(self._schedule, now)

    def _guard(self, fn: Any, *args: Any) -> None:
        """Run one unit of work; a failure is logged, never fatal to the broker.

        When the store is unreachable, store work pauses for a growing while (1 s, doubling,
        at most STORE_BACKOFF_MAX_S): each try blocks this thread, and heartbeats must flow.
        Messages dropped meanwhile were not acknowledged, so workers send them again."""
        try:
            fn(*args)
            self._store_backoff_s = 0.0
        except errors.StoreUnavailable as exc:
            if not self._store_backoff_s:
                log.warning("store unavailable, pausing store work: %s", exc)
            self._store_backoff_s = min(STORE_BACKOFF_MAX_S, 2 * self._store_backoff_s or 1.0)
            self._store_paused_until = time.monotonic() + self._store_backoff_s
        except errors.Deposed:
            raise  # another coordinator leads: this broker must stop (coordinator.leader)
        except Exception:
            log.exception("broker: unexpected error in %s", getattr(fn, "__name__", fn))

    # --- messages from workers ----------------------------------------------------------------

    def handle(self, frames: list[bytes], now: float, key: str | None) -> None:
        """One message from the ROUTER, authenticated by CURVE key `key`: check who sent it,
        decode, dispatch. A bad or unauthorised message is logged and dropped."""
        if len(frames) < 2:
            self.dropped_messages += 1
            return
        routing_id, rest = frames[0], frames[1:]
        name = self.allow.name_for(key, refresh=not self._allow_fresh) if key else None
        if key is None or name is None:
            # Not (or no longer) on the allow list: whatever it says, it gets nothing.
            self.dropped_messages += 1
            self._guard(self._store_reports)  # what came before, first
            for peer in [p for p in self.peers.values() if p.routing_id == routing_id]:
                self._guard(self._lose, peer, f"worker {peer.name}: its key was revoked")
            return
        link = Link(routing_id, key, name)
        try:
            msg = protocol.decode_from_worker(rest)
        except errors.ProtocolError as exc:
            self.dropped_messages += 1
            log.warning("dropped a malformed message from worker %s: %s", name, exc)
            if len(rest) > 1 and rest[1] == b"HELLO":  # say why, so its own log shows it
                self._refuse(link, f"its HELLO is malformed or claims too much: {exc}")
            return
        if not isinstance(msg, protocol.WorkerHeartbeat) and now < self._store_paused_until:
            return  # unacknowledged: the worker sends it again
        handler = self._handlers.get(type(msg))
        if handler is None:  # a type protocol knows and this broker does not handle: drop it
            self.dropped_messages += 1
            log.warning("dropped a %s message from worker %s: no handler", msg.TYPE, name)
            return
        if isinstance(msg, protocol.Hello):
            self._guard(handler, link, msg, now)
            return
        known = self.peers.get(msg.session)
        if known is None or known.routing_id != routing_id or known.name != name:
            # An unknown session (we restarted, or declared it lost): ask it to say HELLO again.
            self._send_raw(
                routing_id,
                protocol.CoordinatorHeartbeat(coordinator=self.coordinator_id, known=False),
            )
            return
        known.last_seen = now
        self._guard(handler, known, msg, now)

    def _refuse(self, link: Link, reason: str) -> None:
        self._send_raw(
            link.routing_id, protocol.Refused(coordinator=self.coordinator_id, reason=reason)
        )

    def _on_hello(self, link: Link, msg: protocol.Hello, now: float) -> None:
        self._guard(self._store_reports)  # what it sent before goes first
        reason = admission.refusal(link, msg, self.allow)
        if reason:
            self.dropped_messages += 1
            self._refuse(link, reason)
            return
        name = msg.name
        for old in [p for p in self.peers.values() if p.name == name]:
            del self.peers[old.session]
        self._note_hello(name, now)
        peer = Peer(
            name=name,
            routing_id=link.routing_id,
            session=msg.session,
            key=link.key,
            version=msg.version,
            gpus=[protocol.gpu_record(gpu) for gpu in msg.gpus],
            labels=msg.labels,
            max_jobs=msg.max_jobs,
            last_seen=now,
            mounts=list(msg.mounts or []),
            runtime=msg.runtime or "docker",
            answer_beats=(msg.liveness_s or 0) < BEATS_PER_LIVENESS * self.heartbeat_interval_s,
            prefetch=msg.prefetch or 0,
        )
        self.peers[peer.session] = peer
        self._by_name[name] = peer
        # Stored before WELCOME: once connected, its mounts count at submit.
        self.store.save_worker(peer.info(connected=True))
        self._send(
            peer,
            protocol.Welcome(
                coordinator=self.coordinator_id,
                heartbeat_interval_s=self.heartbeat_interval_s,
                liveness_s=self.liveness_s,
                telemetry=True,
                prefetch=True,
            ),
        )
        held = {item.job_id: item for item in msg.running}
        for job in self.store.running_jobs(worker=name):
            item = held.pop(job.id, None)
            if item is None or item.attempt != job.attempts:
                self.lifecycle.release(job, f"worker {name} came back without it")
                if item is not None:
                    held[job.id] = item  # a stale attempt: stopped below
                continue
            peer.assigned[job.id] = list(job.gpu_ids)
            if job.executed_at is None and not item.recovered:
                peer.unstarted[job.id] = (job.spec.priority, job.attempts)  # held, or starting
            if item.recovered:
                # The worker restarted and found the container: send the job again, with how
                # far its log is stored, so it re-attaches without a gap or a repeat.
                self._send_job(peer, job, resume=self.store.log_marks(job.id))
            if job.cancel_requested:
                self._cancel(peer, job.id, job.attempts)
        for job_id, item in held.items():
            # Held by the worker but not its to run (ended, lost, or another attempt): stop it.
            self._cancel(peer, job_id, item.attempt)
        # The loop above took the worker's own jobs out of `held`: what is left are the stale
        # ones it was just told to stop.
        stale = f"; {len(held)} stale told to stop" if held else ""
        log.info(
            "worker %s connected (%d GPUs, %d jobs held%s)",
            name,
            len(peer.gpus),
            len(peer.assigned),
            stale,
            extra=fields(worker=name),
        )

    def _note_hello(self, name: str, now: float) -> None:
        """Warn (once a minute) about a worker name that keeps saying HELLO: two workers
        started with one name and key take its place from each other, silently otherwise."""
        recent = [t for t in self._hellos.get(name, []) if now - t < FLAP_WINDOW_S] + [now]
        self._hellos[name] = recent
        if len(recent) >= FLAP_HELLOS and now >= self._flap_warned.get(name, 0.0):
            self._flap_warned[name] = now + 60.0
            log.warning(
                "worker %s connected %d times in %g s: are two workers running with that name"
                " and key? Each takes its place from the other",
                name,
                len(recent),
                FLAP_WINDOW_S,
                extra=fields(worker=name),
            )

    def _on_ready(self, peer: Peer, msg: protocol.Ready, now: float) -> None:
        peer.ready = True
        peer.free_gpus = list(msg.free_gpus)
        peer.slots = min(msg.slots, peer.max_jobs + peer.prefetch)
        peer.known = set(msg.running)
        for job_id in peer.known:
            peer.unconfirmed.pop(job_id, None)
        self._schedule_due = True
        # A job it confirmed before and holds no more, not started: given back, and its
        # RELEASED lost (sent while the link was down or full).
        if not peer.unstarted:
            return
        held = peer.known | peer.unconfirmed.keys()
        for job_id in [job_id for job_id in peer.unstarted if job_id not in held]:
            attempt = peer.unstarted.pop(job_id)[1]
            peer.assigned.pop(job_id, None)
            self.lifecycle.unclaim(job_id, attempt, f"{peer.name} holds it no more, unstarted")

    def _foreign(self, peer: Peer, job_id: int) -> bool:
        """A report on a job this worker does not hold (never sent to it, or already ended):
        counted and not applied, so no worker can speak for another's job."""
        if job_id in peer.assigned:
            peer.unconfirmed.pop(job_id, None)
            return False
        self.dropped_messages += 1
        return True

    # STARTED, LOG and DONE are stored together, a burst at a time (see coordinator.reports).

    def _on_started(self, peer: Peer, msg: protocol.Started, now: float) -> None:
        if self._foreign(peer, msg.job_id):
            self._cancel(peer, msg.job_id, msg.attempt)
            return
        self._reports.append((peer, msg))

    def _on_log(self, peer: Peer, msg: protocol.Log, now: float) -> None:
        if self._foreign(peer, msg.job_id):
            # Acknowledged as if stale, so an honest worker with a lost job stops resending.
            end = max(msg.seq + len(msg.lines) - 1, msg.last or 0)
            self._ack(peer, msg.job_id, msg.attempt, end, done=False)
            self._cancel(peer, msg.job_id, msg.attempt)
            return
        self._reports.append((peer, msg))
        self._report_lines += len(msg.lines)

    def _on_telemetry(self, peer: Peer, msg: protocol.Telemetry, now: float) -> None:
        if self._foreign(peer, msg.job_id):
            # Acknowledged whole, so an honest worker with a lost job holds it no more.
            self._ack_points(peer, msg.job_id, msg.attempt, max(msg.seq, msg.last or 0))
            return
        self._reports.append((peer, msg))

    def _on_done(self, peer: Peer, msg: protocol.Done, now: float) -> None:
        if self._foreign(peer, msg.job_id):
            # A repeated DONE after ours was applied, or a forgery: acknowledge, change nothing.
            self._ack(peer, msg.job_id, msg.attempt, msg.last_seq, done=True)
            return
        self._reports.append((peer, msg))

    def _on_released(self, peer: Peer, msg: protocol.Released, now: float) -> None:
        """A prefetched job given back unstarted: queued again without spending an attempt
        (or ended, if it was cancelled meanwhile)."""
        if msg.job_id not in peer.unstarted or peer.unstarted[msg.job_id][1] != msg.attempt:
            self.dropped_messages += 1  # not a job it holds unstarted: nothing to give back
            return
        peer.assigned.pop(msg.job_id, None)
        peer.unstarted.pop(msg.job_id, None)
        peer.unconfirmed.pop(msg.job_id, None)
        self._sent_at.pop(msg.job_id, None)
        self.lifecycle.unclaim(msg.job_id, msg.attempt, f"given back unstarted by {peer.name}")
        self._schedule_due = True

    def _store_reports(self) -> None:
        """Store the reports of this burst in one transaction, then act on each."""
        pending, self._reports, self._report_lines = self._reports, [], 0
        if not pending:
            return
        for peer, stored in reports.store_burst(self.store, pending, self.log_limits):
            self._guard(self._stored_report, peer, stored)  # each on its own

    def _stored_report(self, peer: Peer, stored: reports.Stored) -> None:
        """Act on a report once it is stored: acknowledge it, wake the job's followers."""
        match stored:
            case reports.StartStored(report, applied, executed_at):
                peer.unstarted.pop(report.job_id, None)
                if applied:
                    self.planner.started(report.job_id, executed_at)
                    self.changes.notify(report.job_id)
                    sent = self._sent_at.pop(report.job_id, None)
                    if sent is not None and sent[0] == report.attempt:
                        self.counters.dispatch.observe(time.monotonic() - sent[1])
            case reports.LogStored(report, seq):
                job_id = report.job_id
                self._ack(peer, job_id, report.attempt, seq, done=False)
                self.counters.log_lines += max(0, seq - self._stored.get(job_id, report.seq - 1))
                self._stored[job_id] = seq
                self.changes.notify(job_id)
            case reports.PointsStored(report, seq):
                self._ack_points(peer, report.job_id, report.attempt, seq)
                self.changes.notify(report.job_id)
            case reports.DoneStored(report, Finish.MISSING_LINES):
                # Tell the worker which lines we have; it resends the rest, then DONE again.
                stored_seq = self.store.get_job(report.job_id).log_seq
                self._ack(peer, report.job_id, report.attempt, stored_seq, done=False)
            case reports.DoneStored(report, finish):
                job_id, attempt = report.job_id, report.attempt
                peer.assigned.pop(job_id, None)
                peer.unstarted.pop(job_id, None)
                self._ack(peer, job_id, attempt, report.last_seq, done=True)
                if finish is Finish.APPLIED:
                    log.info(
                        "job %d ended %s on %s",
                        job_id,
                        report.status,
                        peer.name,
                        extra=fields(
                            job=job_id, attempt=attempt, worker=peer.name, status=report.status
                        ),
                    )
                    self.lifecycle.ended(job_id)
                self._schedule_due = True

    def _on_heartbeat(self, peer: Peer, msg: protocol.WorkerHeartbeat, now: float) -> None:
        offered = {gpu["uuid"] for gpu in peer.gpus}
        for item in msg.usage or []:
            if item["uuid"] not in offered:
                continue  # kept only for the GPUs it offers: the map stays bounded
            peer.usage[item["uuid"]] = {
                "memory_used_mb": item.get("memory_used_mb"),
                "utilization": item.get("utilization"),
                "power_w": item.get("power_w"),
                "temperature_c": item.get("temperature_c"),
            }
        # A worker's liveness is its own setting: one that said none in its HELLO (an older
        # worker), or one too short for the beats of step() alone, gets an answer at once.
        if peer.answer_beats:
            self._send(peer, self._beat)

    # --- pokes from other threads -------------------------------------------------------------

    def _on_poke(self, kind: str, job_id: int) -> None:
        if kind == "schedule":
            self._schedule_poked = False
            self._schedule_due = True
            self.planner.queue_changed()
        elif kind == "cancel":
            job = self.store.get_job(job_id)
            for peer in self.peers.values():
                if peer.name == job.worker and job.status is models.Status.RUNNING:
                    self._cancel(peer, job.id, job.attempts)

    # --- scheduling and expiry ----------------------------------------------------------------

    def _schedule(self, now: float, timer: bool = False) -> None:
        """Plan the whole queue on the ready workers (scheduler.plan_shapes) and send what
        starts. The timer runs a round every SCHEDULE_EVERY_S; events (READY, DONE, a new
        job) ask for one sooner, which is skipped while no worker has a free slot."""
        started = time.perf_counter()
        self._schedule_due = False
        if timer:
            self._next_schedule = now + SCHEDULE_EVERY_S
        peers, views = {}, []
        self.allow.refresh()
        for peer in list(self.peers.values()):
            if not peer.ready:
                continue
            if self.allow.name_for(peer.key, refresh=False) != peer.name:
                self._lose(peer, f"worker {peer.name}: its key was revoked")
                continue
            if peer.quarantined and now < peer.quarantined_until:
                continue
            if peer.quarantined:
                log.warning(
                    "worker %s may get jobs again", peer.name, extra=fields(worker=peer.name)
                )
                peer.quarantined = ""
            free, slots = peer.capacity()
            peers[peer.name] = peer
            view = scheduler.WorkerView(
                peer.name,
                peer.gpus,
                free,
                slots,
                peer.labels,
                frozenset(peer.mounts),
                peer.runtime,
                peer.offer_key,
            )
            peer.offer_key = view.offer()
            views.append(view)
        free_now = sum(len(view.free) for view in views)
        self.gpu_counts = (sum(len(view.gpus) for view in views) - free_now, free_now)
        slots = sum(max(0, view.slots) for view in views)
        if not timer and not slots:
            return
        decided, decided_cpu = time.perf_counter(), time.thread_time()
        plan = self.planner.plan(views)
        self.counters.decisions.observe(time.perf_counter() - decided)
        self.counters.decisions_cpu.observe(time.thread_time() - decided_cpu)
        claimed: list[models.Job | None] = []
        # A round with nothing to start (most rounds on a quiet queue: a READY or a DONE with
        # nothing queued) opens no transaction: it would take the write lock to commit nothing.
        if plan.assignments:
            with self.store.batch():  # one commit for the round's claims
                claimed = [
                    self.store.claim_job(a.job.id, a.worker, a.gpus, models.utcnow())
                    for a in plan.assignments
                ]
        self.planner.claimed(
            [job for job in claimed if job is not None],
            [a.job.id for a, job in zip(plan.assignments, claimed, strict=True) if job is None],
        )
        for assignment, job in zip(plan.assignments, claimed, strict=True):
            if job is None:
                # Cancelled since, or a GPU the worker called free is still held by a job
                # the store has RUNNING there (the next READY settles it).
                continue
            peer = peers[assignment.worker]
            # Until the worker confirms it: should this send fail in a way that leaves the
            # job claimed and unsent, expiry queues it again.
            peer.unconfirmed[job.id] = (job.attempts, time.monotonic())
            self._guard(self._dispatch, peer, job)
        if any(peer.prefetch and peer.unstarted for peer in peers.values()):
            self._recall(peers, views)
        # Rounds skipped above are not counted: they cost next to nothing, and would hide the
        # rounds that plan. A round that failed part way is not counted either.
        self.counters.rounds.observe(time.perf_counter() - started)

    def _recall(self, peers: dict[str, Peer], views: list[scheduler.WorkerView]) -> None:
        """Keep priority order with prefetch (see coordinator.recall): RECALL, answered by
        RELEASED. A job is recalled once at most, so one whose place the waiting job could
        not take after all (its GPUs are busy, say) is sent again and stays."""
        held = {
            name: [h for h in peer.held() if h[0] not in self._recalled]
            for name, peer in peers.items()
        }
        least, top = recall.lowest(held), self.planner.top_priority()
        if least is None or top is None or top <= least:
            return  # the common case: nothing queued outranks what is held
        # Listed again after this round's claims: only the jobs that still wait count.
        waiting: dict[tuple[int, str], int] = {}
        for group in self.store.queue_groups():
            if group.priority > least:
                key = (group.priority, group.shape)
                waiting[key] = waiting.get(key, 0) + group.jobs
        for chosen in recall.choose(held, waiting, views):
            self._recalled.add(chosen.job_id)
            log.info(
                "job %d: recalled from %s, where it waits for a slot: a job of priority %d waits",
                chosen.job_id,
                chosen.worker,
                chosen.for_priority,
                extra=fields(job=chosen.job_id, worker=chosen.worker),
            )
            self._send(
                peers[chosen.worker], protocol.Recall(job_id=chosen.job_id, attempt=chosen.attempt)
            )

    def _dispatch(self, peer: Peer, job: models.Job) -> None:
        """Send a claimed job to its worker, or put it back."""
        if self._send_job(peer, job):
            # DEBUG: at hundreds of jobs a second, a line per job costs the broker thread
            # ~40 µs; "ended … on WORKER" (INFO) names the worker, and the worker logs each
            # job it receives.
            log.debug(
                "job %d (attempt %d) sent to %s",
                job.id,
                job.attempts,
                peer.name,
                extra=fields(job=job.id, attempt=job.attempts, worker=peer.name),
            )
            return
        peer.unconfirmed.pop(job.id, None)
        running = self.store.get_job(job.id).status is models.Status.RUNNING
        if running and self.store.unclaim_job(job.id, job.attempts, models.utcnow()):
            self.planner.requeued(job.id)

    def _send_job(self, peer: Peer, job: models.Job, resume: models.LogMarks | None = None) -> bool:
        """Send JOB (its credentials unsealed); the worker must confirm receipt in time."""
        try:
            wire = protocol.wire_job(job, self.sealer.credentials(job), *self._idle_policy(job))
        except errors.GpuboxError as exc:
            self.lifecycle.fail(job, str(exc))
            return False
        marks: dict[str, Any] = {}
        if resume is not None:  # a re-attach: where its log and its points go on from
            marks = protocol.resume_fields(resume)
            marks["resume_points"] = self.store.points_seq(job.id, job.attempts)
        if not self._send(peer, protocol.Job(coordinator=self.coordinator_id, job=wire, **marks)):
            return False
        peer.assigned[job.id] = list(job.gpu_ids)
        if resume is None:
            peer.unstarted[job.id] = (job.spec.priority, job.attempts)
            peer.unconfirmed[job.id] = (job.attempts, time.monotonic())
            self._sent_at[job.id] = (job.attempts, time.monotonic())
            self.counters.jobs_sent += 1
        return True

    def _expire(self, now: float) -> None:
        for peer in list(self.peers.values()):
            for job_id, (attempt, sent_at) in list(peer.unconfirmed.items()):
                # While the store was away, READY messages (the confirmations) were not read:
                # a job sent before an outage gets its whole window again after it.
                if now - max(sent_at, self._store_paused_until) > self.liveness_s:
                    # The JOB never arrived (or its receipt did not): queue it again without
                    # counting an attempt, and stop it should it arrive after all.
                    del peer.unconfirmed[job_id]
                    peer.assigned.pop(job_id, None)
                    peer.unstarted.pop(job_id, None)
                    self._cancel(peer, job_id, attempt)
                    self._unconfirmed(peer, job_id, attempt, now)
            if now - peer.last_seen > self.liveness_s:
                self._lose(peer, f"worker lost: no word from {peer.name} for {self.liveness_s:g} s")
        if now - self.started_at < self.liveness_s:
            return  # give workers a chance to reconnect after our own start
        # The workers that hold running jobs, a name each (not every running job's row, each
        # second: 8,000 of them on a 1,000-worker fleet); the jobs of those gone, then.
        connected = {peer.name for peer in self.peers.values()}
        for worker in self.store.running_workers() - connected:
            for job in self.store.running_jobs(worker=worker):
                self.lifecycle.release(job, f"worker lost: {job.worker} did not reconnect")

    def _unconfirmed(self, peer: Peer, job_id: int, attempt: int, now: float) -> None:
        """A worker was sent a job, with its secrets, and never confirmed it: it gets no more
        jobs this session, and a line in the job's log tells its owner where it went. The
        job is queued again."""
        if not peer.quarantined:
            # For a while, not for good: a broken link loses a JOB too, and an honest worker
            # should not sit idle for the rest of its session because of it.
            peer.quarantined_until = now + QUARANTINE_S
            peer.quarantined = (
                f"it was sent job {job_id} and did not confirm it within {self.liveness_s:g} s:"
                f" it gets no jobs for {QUARANTINE_S:g} s or until it connects again"
            )
            log.error(
                "worker %s was sent job %d and never confirmed it: it gets no jobs for %g s or"
                " until it connects again (a buggy or hostile worker, or a broken link)",
                peer.name,
                job_id,
                QUARANTINE_S,
                extra=fields(job=job_id, worker=peer.name),
            )
        self.lifecycle.requeue_unconfirmed(peer.name, job_id, attempt, self.liveness_s)

    def peer_named(self, worker: str) -> Peer | None:
        """The connected worker of that name, if any. Any thread."""
        peer = self._by_name.get(worker)
        # None once lost; a peer whose session another HELLO took over is gone too.
        return peer if peer is not None and self.peers.get(peer.session) is peer else None

    def _lose(self, peer: Peer, reason: str) -> None:
        del self.peers[peer.session]
        if self._by_name.get(peer.name) is peer:
            del self._by_name[peer.name]
        log.warning("%s", reason, extra=fields(worker=peer.name))
        self.store.save_worker(peer.info(connected=False))
        for job in self.store.running_jobs(worker=peer.name):
            self.lifecycle.release(job, reason)

    def _forget(self, job_id: int) -> None:
        """Drop what the broker kept about a job that ended (Lifecycle's on_end)."""
        self._stored.pop(job_id, None)
        self._sent_at.pop(job_id, None)
        self._recalled.discard(job_id)
        self.planner.ended(job_id)

    # --- sending ------------------------------------------------------------------------------

    def _idle_policy(self, job: models.Job) -> tuple[float | None, float | None]:
        """The job's idle_timeout (its own, else this coordinator's; None: none) and
        idle_threshold. Jobs without GPUs have none: they are never stopped for idling."""
        timeout = job.spec.idle_timeout
        if timeout is None:
            timeout = self.idle_timeout
        if not timeout or not job.spec.gpus:
            return None, None
        return timeout, self.idle_threshold

    def _ack(self, peer: Peer, job_id: int, attempt: int, seq: int, done: bool) -> None:
        self._send(peer, protocol.Ack(job_id=job_id, attempt=attempt, seq=seq, done=done))

    def _ack_points(self, peer: Peer, job_id: int, attempt: int, stored: int) -> None:
        """ACK of TELEMETRY: `stored` is the last batch stored (seq -1: nothing of lines)."""
        self._send(
            peer, protocol.Ack(job_id=job_id, attempt=attempt, seq=-1, done=False, points=stored)
        )

    def _cancel(self, peer: Peer, job_id: int, attempt: int) -> None:
        self._send(peer, protocol.Cancel(job_id=job_id, attempt=attempt))

    def _send(self, peer: Peer, msg: protocol.FromCoordinator | list[bytes]) -> bool:
        """Send a message, or its frames already encoded, to a worker."""
        ok = self._send_raw(peer.routing_id, msg)
        if ok:
            peer.last_sent = time.monotonic()
        elif peer.session in self.peers:
            # The connection is gone; its jobs stay until the worker returns or liveness ends.
            peer.ready = False
        return ok

    def _send_raw(self, routing_id: bytes, msg: protocol.FromCoordinator | list[bytes]) -> bool:
        frames = msg if isinstance(msg, list) else protocol.encode(msg)
        try:
            zmqio.send(self.router, [routing_id, *frames])
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer congested)
            log.debug("could not send %s: %s", frames[1].decode(errors="replace"), exc)
            return False
