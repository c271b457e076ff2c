"""The broker: the one thread that owns the ROUTER socket and talks to workers.

It admits workers (HELLO), hands them jobs when they have room (READY → JOB), stores what they
report (STARTED, LOG, DONE), forwards cancels, exchanges heartbeats, and declares silent workers
lost. Other threads reach it only through `poke`, which sends on an inproc socket.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import zmq

from gpubox import errors, keys, models, protocol, supervise
from gpubox.coordinator import metrics, scheduler, sealing
from gpubox.coordinator.events import Changes
from gpubox.logfmt import fields
from gpubox.store import Store
from gpubox.store.base import Finish

log = logging.getLogger(__name__)

SCHEDULE_EVERY_S = 1.0
STORE_BACKOFF_MAX_S = 5.0
FAILED = object()  # a report that could not be stored
MAX_BURST_LINES = 50_000  # log lines stored in one transaction, at most (about 0.5 s)
FLAP_HELLOS, FLAP_WINDOW_S = 4, 30.0  # this many HELLOs of one name within the window: warn
QUARANTINE_S = 300.0  # no jobs for a worker that was sent one and never confirmed it
HANDSHAKE_MS = 5000  # how long a connection to the worker link may go without a CURVE handshake


@dataclasses.dataclass
class Peer:
    """A connected worker, as the broker sees it."""

    name: str
    routing_id: bytes
    session: str
    key: str
    version: str
    gpus: list[dict[str, Any]]
    labels: dict[str, str]
    max_jobs: int
    last_seen: float
    mounts: list[str] = dataclasses.field(default_factory=list)
    runtime: str = "docker"
    usage: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # uuid → NVML now
    ready: bool = False
    free_gpus: list[str] = dataclasses.field(default_factory=list)
    slots: int = 0
    known: set[int] = dataclasses.field(default_factory=set)  # job ids the worker said it holds
    assigned: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # job id → GPU uuids
    # Jobs sent whose receipt the worker has not confirmed yet: job id → (attempt, sent at).
    unconfirmed: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    # Why this session gets no more jobs ("" while it may): it was sent a job and never
    # confirmed it. A new HELLO (a new session) starts clean.
    quarantined: str = ""  # why it gets no jobs, until quarantined_until (time.monotonic)
    quarantined_until: float = 0.0

    def capacity(self) -> tuple[list[str], int]:
        """Free GPUs and job slots, counting jobs sent since the worker's last READY."""
        pending = [job_id for job_id in self.assigned if job_id not in self.known]
        taken = {uuid for job_id in pending for uuid in self.assigned[job_id]}
        return [g for g in self.free_gpus if g not in taken], self.slots - len(pending)

    def heard_at(self) -> datetime:
        """When this worker was last heard from, as a wall-clock time."""
        return models.utcnow() - timedelta(seconds=time.monotonic() - self.last_seen)

    def info(self, connected: bool) -> models.WorkerInfo:
        return models.WorkerInfo(
            name=self.name,
            version=self.version,
            gpus=self.gpus,
            labels=self.labels,
            max_jobs=self.max_jobs,
            connected=connected,
            last_seen=self.heard_at(),  # a lost worker's: not when it was declared lost
            mounts=self.mounts,
        )


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
    ) -> None:
        """`server_keys` is the coordinator's (public, secret) Z85 CURVE keypair; `allow` the
        worker keys it accepts. The context must not carry another ZAP authenticator."""
        self.store = store
        self.changes = changes
        self.allow = allow
        self.sealer = sealer
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_s = liveness_s
        self.max_log_lines = max_log_lines
        self.max_log_bytes = max_log_bytes
        self.context = context or zmq.Context()
        self.coordinator_id = uuid.uuid4().hex
        # ZAP must run on this context before the ROUTER binds, or CURVE lets any key in.
        self.authenticator: keys.CurveAuthenticator | None = keys.CurveAuthenticator(
            self.context, allow
        )
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BODY + 4096)
        # A connection that has not finished its CURVE handshake within this is closed:
        # idle sockets opened to this port by anyone (no key needed) go away on their own
        # instead of piling up until the process runs out of file descriptors.
        self.router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = server_keys
        self.router.zap_domain = keys.ZAP_DOMAIN.encode()
        try:
            self.router.bind(bind)
        except zmq.ZMQError as exc:
            self.router.close(linger=0)
            self.authenticator.stop()
            raise errors.ConfigError(f"bind: cannot listen on {bind}: {exc}") from exc
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
        self._hellos: dict[str, list[float]] = {}  # worker name → its recent HELLOs (monotonic)
        self._flap_warned: dict[str, float] = {}  # worker name → no warning again before
        self.started_at = time.monotonic()
        self._next_heartbeat = 0.0
        self._next_expiry = 0.0
        self._next_schedule = 0.0
        # A READY, DONE or new job asks for a round; one round serves them all (see step).
        self._schedule_due = False
        # Why queued jobs wait, as of the last scheduling round (read by HTTP threads): by job
        # for the jobs it planned one by one, by shape for the others.
        self.reasons: dict[int, str] = {}
        self.shape_reasons: dict[str, str] = {}
        self._needs: dict[str, models.Needs] = {}  # queued shapes read back, by shape
        self._matches = scheduler.Matches()  # which workers can run each shape
        self.counters = metrics.BrokerCounters()
        self.gpu_counts = (0, 0)  # GPUs of ready workers: (busy, free), as of the last round
        self._sent_at: dict[int, tuple[int, float]] = {}  # job id → (attempt, JOB sent at)
        self._stored: dict[int, int] = {}  # job id → last stored seq, to count new lines
        self._queued: dict[int, models.Job] = {}  # queued jobs read last round, by id
        # STARTED, LOG and DONE of this burst, not stored yet: (type, sender, body).
        self._reports: list[tuple[str, Peer, dict[str, Any]]] = []
        self._report_lines = 0  # log lines among them
        self.dropped_messages = 0
        self._store_backoff_s = 0.0
        self._store_paused_until = 0.0
        # Ticked at every turn of run()'s loop: /healthz and the process watch it.
        self.loop = supervise.Loop(stall_s=3 * heartbeat_interval_s)
        # What each message from a connected worker is handled by (HELLO, which makes the
        # connection, is handled before a session exists).
        self._handlers: dict[str, Callable[[Peer, dict[str, Any], float], None]] = {
            "READY": self._on_ready,
            "STARTED": self._on_started,
            "LOG": self._on_log,
            "DONE": self._on_done,
            "HEARTBEAT": self._on_heartbeat,
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
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        # The key CURVE authenticated this very message with.
                        key = frames[-1].get("User-Id") if frames else None
                        self.handle(
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
            self._next_heartbeat = now + self.heartbeat_interval_s
            for peer in list(self.peers.values()):
                self._send(peer, "HEARTBEAT", {"coordinator": self.coordinator_id, "known": True})
        if now < self._store_paused_until:
            return
        if now >= self._next_expiry:
            self._next_expiry = now + min(1.0, self.heartbeat_interval_s)
            self._guard(self._expire, now)
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
        if name is None:
            # Not (or no longer) on the allow list: whatever it says, it gets nothing.
            self.dropped_messages += 1
            self._guard(self._store_reports)  # what came before, first
            for peer in [p for p in self.peers.values() if p.routing_id == routing_id]:
                self._guard(self._lose, peer, f"worker {peer.name}: its key was revoked")
            return
        try:
            msg = protocol.decode_from_worker(rest)
        except errors.ProtocolError as exc:
            self.dropped_messages += 1
            log.warning("dropped a malformed message from worker %s: %s", name, exc)
            if len(rest) > 1 and rest[1] == b"HELLO":  # say why, so its own log shows it
                reason = f"its HELLO is malformed or claims too much: {exc}"
                self._send_raw(
                    routing_id, "REFUSED", {"coordinator": self.coordinator_id, "reason": reason}
                )
            return
        body = msg.body
        if msg.type != "HEARTBEAT" and now < self._store_paused_until:
            return  # unacknowledged: the worker sends it again
        if msg.type == "HELLO":
            self._guard(self._store_reports)  # what it sent before goes first
            if body["name"] != name:
                self.dropped_messages += 1
                claimed = body["name"][:64]
                log.warning(
                    "refused HELLO: the key of worker %s claimed the name %r", name, claimed
                )
                reason = (
                    f"it calls itself {claimed!r}, but its key is worker {name}'s: start it as"
                    f" {name} (--name {name}), or give it a key of its own (gpubox keys worker"
                    " NAME on the coordinator's box)"
                )
                self._send_raw(
                    routing_id, "REFUSED", {"coordinator": self.coordinator_id, "reason": reason}
                )
                return
            claims = self.allow.claims_for(name)
            mounts = body.get("mounts") or []
            if claims and (excess := claims.excess(body["labels"], body["gpus"], mounts)):
                # Misconfigured, or a key trying to look like the best place for jobs (and
                # their secrets) it was never meant to get.
                self.dropped_messages += 1
                log.error(
                    "refused HELLO of worker %s: it claims %s",
                    name,
                    excess,
                    extra=fields(worker=name),
                )
                reason = (
                    f"it claims {excess}: start it with no more than that, or enrol it again"
                    " with what it has (gpubox keys worker NAME --labels … --gpus N"
                    " --gpu-model X --mounts … on the coordinator's box)"
                )
                self._send_raw(
                    routing_id, "REFUSED", {"coordinator": self.coordinator_id, "reason": reason}
                )
                return
            self._guard(self._on_hello, routing_id, key, body, now)
            return
        known = self.peers.get(body["session"])
        if known is None or known.routing_id != routing_id or known.name != name:
            # An unknown session (we restarted, or declared it lost): ask it to say HELLO again.
            self._send_raw(
                routing_id, "HEARTBEAT", {"coordinator": self.coordinator_id, "known": False}
            )
            return
        known.last_seen = now
        handler = self._handlers.get(msg.type)
        if handler is None:  # a type protocol knows and this broker does not handle: drop it
            self.dropped_messages += 1
            log.warning("dropped a %s message from worker %s: no handler", msg.type, name)
            return
        self._guard(handler, known, body, now)

    def _on_hello(self, routing_id: bytes, key: str, body: dict[str, Any], now: float) -> None:
        name = body["name"]
        for old in [p for p in self.peers.values() if p.name == name]:
            del self.peers[old.session]
        self._note_hello(name, now)
        peer = Peer(
            name=name,
            routing_id=routing_id,
            session=body["session"],
            key=key,
            version=body["version"],
            gpus=[protocol.gpu_record(gpu) for gpu in body["gpus"]],
            labels=body["labels"],
            max_jobs=body["max_jobs"],
            last_seen=now,
            mounts=list(body.get("mounts") or []),
            runtime=body.get("runtime") or "docker",
        )
        self.peers[peer.session] = peer
        # Stored before WELCOME: once connected, its mounts count at submit.
        self.store.save_worker(peer.info(connected=True))
        self._send(
            peer,
            "WELCOME",
            {
                "coordinator": self.coordinator_id,
                "heartbeat_interval_s": self.heartbeat_interval_s,
                "liveness_s": self.liveness_s,
            },
        )
        held = {item["job_id"]: item for item in body["running"]}
        for job in self.store.running_jobs(worker=name):
            item = held.pop(job.id, None)
            if item is None or item["attempt"] != job.attempts:
                self._release(job, f"worker {name} came back without it")
                if item is not None:
                    held[job.id] = item  # a stale attempt: stopped below
                continue
            peer.assigned[job.id] = list(job.gpu_ids)
            if item.get("recovered"):
                # The worker restarted and found the container: send the job again, with how
                # far its log is stored, so it re-attaches without a gap or a repeat.
                self._send_job(peer, job, resume=self.store.log_marks(job.id))
            if job.cancel_requested:
                self._send(peer, "CANCEL", {"job_id": job.id, "attempt": job.attempts})
        for job_id, item in held.items():
            # Held by the worker but not its to run (ended, lost, or another attempt): stop it.
            self._send(peer, "CANCEL", {"job_id": job_id, "attempt": item["attempt"]})
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

    def _on_ready(self, peer: Peer, body: dict[str, Any], now: float) -> None:
        peer.ready = True
        peer.free_gpus = list(body["free_gpus"])
        peer.slots = min(body["slots"], peer.max_jobs)
        peer.known = set(body["running"])
        for job_id in peer.known:
            peer.unconfirmed.pop(job_id, None)
        self._schedule_due = True

    def _foreign(self, peer: Peer, job_id: int) -> bool:
        """A report on a job this worker does not hold (never sent to it, or already ended):
        counted and not applied, so no worker can speak for another's job."""
        if job_id in peer.assigned:
            peer.unconfirmed.pop(job_id, None)
            return False
        self.dropped_messages += 1
        return True

    # STARTED, LOG and DONE are stored together: those of one burst of messages in one
    # transaction (one commit, one fsync, for many), and acted on (acknowledged, followers
    # woken) only once it committed. A report that fails alone is not acted on; if the commit
    # fails, none is. Unacknowledged, the workers send them again.

    def _on_started(self, peer: Peer, body: dict[str, Any], now: float) -> None:
        if self._foreign(peer, body["job_id"]):
            self._send(peer, "CANCEL", {"job_id": body["job_id"], "attempt": body["attempt"]})
            return
        self._reports.append(("STARTED", peer, body))

    def _on_log(self, peer: Peer, body: dict[str, Any], now: float) -> None:
        job_id, attempt = body["job_id"], body["attempt"]
        if self._foreign(peer, job_id):
            # Acknowledged as if stale, so an honest worker with a lost job stops resending.
            end = max(body["seq"] + len(body["lines"]) - 1, body.get("last") or 0)
            self._send(
                peer, "ACK", {"job_id": job_id, "attempt": attempt, "seq": end, "done": False}
            )
            self._send(peer, "CANCEL", {"job_id": job_id, "attempt": attempt})
            return
        self._reports.append(("LOG", peer, body))
        self._report_lines += len(body["lines"])

    def _on_done(self, peer: Peer, body: dict[str, Any], now: float) -> None:
        job_id, attempt = body["job_id"], body["attempt"]
        if self._foreign(peer, job_id):
            # A repeated DONE after ours was applied, or a forgery: acknowledge, change nothing.
            done = {"job_id": job_id, "attempt": attempt, "seq": body["last_seq"], "done": True}
            self._send(peer, "ACK", done)
            return
        self._reports.append(("DONE", peer, body))

    def _store_reports(self) -> None:
        """Store the reports of this burst in one transaction, then act on each."""
        pending, self._reports, self._report_lines = self._reports, [], 0
        if not pending:
            return
        outcomes: list[Any] = []
        with self.store.batch():
            for kind, _, body in pending:
                try:
                    outcomes.append(self._store_report(kind, body))
                except errors.StoreUnavailable:
                    raise
                except Exception:  # this report only: the others still count
                    log.exception("broker: could not store a %s of job %s", kind, body["job_id"])
                    outcomes.append(FAILED)
        for (kind, peer, body), outcome in zip(pending, outcomes, strict=True):
            if outcome is not FAILED:
                self._guard(self._stored_report, kind, peer, body, outcome)  # each on its own

    def _store_report(self, kind: str, body: dict[str, Any]) -> Any:
        job_id, attempt = body["job_id"], body["attempt"]
        if kind == "STARTED":
            executed_at = models.parse_time(body["executed_at"]) or models.utcnow()
            return self.store.mark_started(job_id, attempt, executed_at)
        if kind == "LOG":
            lines = [tuple(line) for line in body["lines"]]
            for index in _worker_notes(body):
                ts, _, text = lines[index]
                lines[index] = (ts, models.GPUBOX_STREAM, text)
            return self.store.append_logs(
                job_id,
                attempt,
                body["seq"],
                lines,
                self.max_log_lines,
                body.get("last"),
                self.max_log_bytes,
            )
        return self.store.finish_job(
            job_id,
            attempt,
            models.Status(body["status"]),
            body["exit_code"],
            body["error"],
            models.parse_time(body["executed_at"]),
            models.parse_time(body["finished_at"]) or models.utcnow(),
            body["last_seq"],
        )

    def _stored_report(self, kind: str, peer: Peer, body: dict[str, Any], outcome: Any) -> None:
        job_id, attempt = body["job_id"], body["attempt"]
        if kind == "STARTED":
            if outcome:
                self.changes.notify(job_id)
                sent = self._sent_at.pop(job_id, None)
                if sent is not None and sent[0] == attempt:
                    self.counters.dispatch.observe(time.monotonic() - sent[1])
        elif kind == "LOG":
            self._send(
                peer, "ACK", {"job_id": job_id, "attempt": attempt, "seq": outcome, "done": False}
            )
            self.counters.log_lines += max(0, outcome - self._stored.get(job_id, body["seq"] - 1))
            self._stored[job_id] = outcome
            self.changes.notify(job_id)
        elif outcome is Finish.MISSING_LINES:
            # Tell the worker which lines we have; it resends the rest, then DONE again.
            stored = self.store.get_job(job_id).log_seq
            self._send(
                peer, "ACK", {"job_id": job_id, "attempt": attempt, "seq": stored, "done": False}
            )
        else:
            peer.assigned.pop(job_id, None)
            done = {"job_id": job_id, "attempt": attempt, "seq": body["last_seq"], "done": True}
            self._send(peer, "ACK", done)
            if outcome is Finish.APPLIED:
                log.info(
                    "job %d ended %s on %s",
                    job_id,
                    body["status"],
                    peer.name,
                    extra=fields(
                        job=job_id, attempt=attempt, worker=peer.name, status=body["status"]
                    ),
                )
                self._ended(job_id)
            self._schedule_due = True

    def _on_heartbeat(self, peer: Peer, body: dict[str, Any], now: float) -> None:
        offered = {gpu["uuid"] for gpu in peer.gpus}
        for item in body.get("usage") or []:
            if item["uuid"] not in offered:
                continue  # kept only for the GPUs it offers: the map stays bounded
            peer.usage[item["uuid"]] = {
                "memory_used_mb": item.get("memory_used_mb"),
                "utilization": item.get("utilization"),
            }
        # Answered at once: a worker's liveness is its own setting, which the coordinator's
        # own interval need not fit.
        self._send(peer, "HEARTBEAT", {"coordinator": self.coordinator_id, "known": True})

    # --- pokes from other threads -------------------------------------------------------------

    def _on_poke(self, kind: str, job_id: int) -> None:
        if kind == "schedule":
            self._schedule_poked = False
            self._schedule_due = True
        elif kind == "cancel":
            job = self.store.get_job(job_id)
            for peer in self.peers.values():
                if peer.name == job.worker and job.status is models.Status.RUNNING:
                    self._send(peer, "CANCEL", {"job_id": job.id, "attempt": job.attempts})

    # --- scheduling and expiry ----------------------------------------------------------------

    def _schedule(self, now: float, timer: bool = False) -> None:
        """Plan the whole queue on the ready workers (scheduler.plan_shapes) and send what
        starts. The timer runs a round every SCHEDULE_EVERY_S; events (READY, DONE, a new
        job) ask for one sooner, which is skipped while no worker has a free slot."""
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
            views.append(
                scheduler.WorkerView(
                    peer.name,
                    peer.gpus,
                    free,
                    slots,
                    peer.labels,
                    frozenset(peer.mounts),
                    peer.runtime,
                )
            )
        free_now = sum(len(view.free) for view in views)
        self.gpu_counts = (sum(len(view.gpus) for view in views) - free_now, free_now)
        slots = sum(max(0, view.slots) for view in views)
        if not timer and not slots:
            return
        plan = self.plan(views)
        with self.store.batch():  # one commit for the round's claims
            claimed = [
                self.store.claim_job(a.job.id, a.worker, a.gpus, models.utcnow())
                for a in plan.assignments
            ]
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

    def plan(self, views: list[scheduler.WorkerView]) -> scheduler.Plan:
        """Plan the whole queue on these workers, reading only the jobs the plan needs
        (scheduler.plan_shapes), and keep why each job waits. Claims nothing."""
        # What a job asks for never changes: the shapes and jobs read are kept for the next
        # round, which reads only those it did not have.
        shapes = self.store.queued_shapes()
        self._needs = {s: self._needs.get(s) or models.Needs.from_shape(s) for s in shapes}
        known, self._queued = self._queued, {}

        def read(shape: str, count: int) -> list[models.Job]:
            jobs = self.store.queued_jobs(count, known, shape)
            self._queued.update((job.id, job) for job in jobs)
            return jobs

        plan = scheduler.plan_shapes(self._needs, read, views, self._matches)
        self.reasons, self.shape_reasons = plan.reasons, plan.shape_reasons
        return plan

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
        if self.store.get_job(job.id).status is models.Status.RUNNING:
            self.store.unclaim_job(job.id, job.attempts, models.utcnow())

    def queue_reason(self, job_id: int) -> str:
        """Why a QUEUED job waits, as of the last scheduling round. Any thread."""
        why = self.reasons.get(job_id)
        if why is None:
            why = self.shape_reasons.get(self.store.get_job(job_id).spec.needs.shape)
        return why or "waiting to be scheduled (submitted since the last scheduling round)"

    def metrics_page(self) -> str:
        """GET /metrics. Any thread."""
        busy, free = self.gpu_counts
        usage = [
            (peer.name, uuid, dict(now))
            for peer in list(self.peers.values())
            for uuid, now in list(peer.usage.items())
        ]
        oldest = self.store.oldest_queued()
        return metrics.render(
            self.store.jobs_by_status(),
            (models.utcnow() - oldest).total_seconds() if oldest else 0.0,
            self.counters,
            workers=len(self.peers),
            gpus_busy=busy,
            gpus_free=free,
            dropped_messages=self.dropped_messages,
            gpu_usage=usage,
        )

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]:
        """NVML's memory used and utilization per GPU uuid at worker's last heartbeat."""
        for peer in list(self.peers.values()):
            if peer.name == worker:
                return dict(peer.usage)
        return {}

    def last_heard(self, worker: str) -> datetime | None:
        """When a connected worker was last heard from (the store has when it connected)."""
        for peer in list(self.peers.values()):
            if peer.name == worker:
                return peer.heard_at()
        return None

    def _send_job(self, peer: Peer, job: models.Job, resume: models.LogMarks | None = None) -> bool:
        """Send JOB (its credentials unsealed); the worker must confirm receipt in time."""
        try:
            wire = protocol.wire_job(job, self.sealer.credentials(job))
        except errors.GpuboxError as exc:
            self._fail(job, str(exc))
            return False
        body: dict[str, Any] = {"coordinator": self.coordinator_id, "job": wire}
        if resume is not None:
            body.update(protocol.resume_fields(resume))
        if not self._send(peer, "JOB", body):
            return False
        peer.assigned[job.id] = list(job.gpu_ids)
        if resume is None:
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
                    self._send(peer, "CANCEL", {"job_id": job_id, "attempt": attempt})
                    self._unconfirmed(peer, job_id, attempt, now)
            if now - peer.last_seen > self.liveness_s:
                self._lose(peer, f"worker lost: no word from {peer.name} for {self.liveness_s:g} s")
        if now - self.started_at < self.liveness_s:
            return  # give workers a chance to reconnect after our own start
        connected = {peer.name for peer in self.peers.values()}
        for job in self.store.running_jobs():
            if job.worker not in connected:
                self._release(job, f"worker lost: {job.worker} did not reconnect")

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
        job = self.store.get_job(job_id)
        if job.status is not models.Status.RUNNING or job.attempts != attempt:
            return
        at = models.utcnow()
        marker = (
            f"[gpubox: worker {peer.name} was sent this job (attempt {attempt}, with its secrets"
            f" and registry credentials) and did not confirm it within {self.liveness_s:g} s;"
            " the job is queued again]"
        )
        stamp = f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}000Z"
        self.store.append_logs(
            job_id,
            attempt,
            job.log_seq + 1,
            [(stamp, models.GPUBOX_STREAM, marker)],
            self.max_log_lines,
            keep_bytes=self.max_log_bytes,
        )
        if self.store.unclaim_job(job_id, attempt, at):
            log.warning(
                "job %d: %s never confirmed it; queued again",
                job_id,
                peer.name,
                extra=fields(job=job_id, worker=peer.name),
            )
            self.changes.notify(job_id)

    def stalled(self) -> str:
        """Why the broker is not serving ("" while its loop turns): its thread ended, or its
        loop has not turned for three heartbeat intervals. Any thread."""
        trouble = self.loop.trouble()
        return f"the broker thread {trouble}" if trouble else ""

    def last_turn_s(self) -> float:
        """Seconds since the broker's loop last turned. Any thread."""
        return self.loop.since()

    def quarantine(self, worker: str) -> str:
        """Why a connected worker gets no more jobs; "" if it may. Any thread."""
        for peer in list(self.peers.values()):
            if peer.name == worker:
                return peer.quarantined
        return ""

    def _lose(self, peer: Peer, reason: str) -> None:
        del self.peers[peer.session]
        log.warning("%s", reason, extra=fields(worker=peer.name))
        self.store.save_worker(peer.info(connected=False))
        for job in self.store.running_jobs(worker=peer.name):
            self._release(job, reason)

    def _fail(self, job: models.Job, reason: str) -> None:
        """End a claimed job that cannot be sent at all."""
        log.error("job %d: %s", job.id, reason, extra=fields(job=job.id))
        now = models.utcnow()
        self.store.finish_job(
            job.id, job.attempts, models.Status.ERROR, None, reason, None, now, job.log_seq
        )
        self._ended(job.id)

    def _release(self, job: models.Job, reason: str) -> None:
        if job.executed_at is None:
            # Its container never started: nothing ran, so no attempt is spent on it.
            if self.store.unclaim_job(job.id, job.attempts, models.utcnow()):
                log.warning(
                    "job %d: %s before it started; queued again",
                    job.id,
                    reason,
                    extra=fields(job=job.id, worker=job.worker),
                )
                self.changes.notify(job.id)
            return
        released = self.store.release_job(job.id, job.attempts, reason, models.utcnow())
        if released is not None:
            log.warning(
                "job %d: %s; now %s",
                job.id,
                reason,
                released.status.value,
                extra=fields(job=job.id, worker=job.worker, status=released.status.value),
            )
            if released.status.terminal:
                self._ended(job.id)
            else:
                self.changes.notify(job.id)

    def _ended(self, job_id: int) -> None:
        """Wake the job's followers for the last time and drop its change counter, which
        would otherwise be kept for every job ever run."""
        self.changes.notify(job_id)
        self.changes.forget(job_id)
        self._stored.pop(job_id, None)
        self._sent_at.pop(job_id, None)

    # --- sending ------------------------------------------------------------------------------

    def _send(self, peer: Peer, msg_type: str, body: dict[str, Any]) -> bool:
        ok = self._send_raw(peer.routing_id, msg_type, body)
        if not ok and peer.session in self.peers:
            # The connection is gone; its jobs stay until the worker returns or liveness ends.
            peer.ready = False
        return ok

    def _send_raw(self, routing_id: bytes, msg_type: str, body: dict[str, Any]) -> bool:
        try:
            self.router.send_multipart([routing_id, *protocol.encode(msg_type, body)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer congested)
            log.debug("could not send %s: %s", msg_type, exc)
            return False


def _worker_notes(body: dict[str, Any]) -> list[int]:
    """The indices of a LOG batch's lines that are the worker's own, not the job's: those it
    names in `notes`, or, from a worker that sends no notes, the last line of a batch that
    covers more sequence numbers than it has lines (its marker for lines it dropped)."""
    count = len(body["lines"])
    notes = body.get("notes")
    if notes is None:
        last = body.get("last")
        notes = [count - 1] if last is not None and count and last > body["seq"] + count - 1 else []
    return [index for index in notes if 0 <= index < count]
