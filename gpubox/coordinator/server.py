"""The coordinator process: store, broker thread and HTTP server, started and stopped together."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import threading
from typing import Any

import waitress
import zmq
from waitress import wasyncore

from gpubox import config as config_mod
from gpubox import errors, keys, supervise
from gpubox.coordinator import (
    api,
    handover,
    httpproc,
    hub,
    leader,
    relay,
    sealing,
    standby,
    tokens,
    webhooks,
)
from gpubox.coordinator.broker import Broker
from gpubox.coordinator.events import Changes
from gpubox.coordinator.streams import Streams
from gpubox.store import Store, leases, open_store, single

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
# Open HTTP connections at once. Each idle one costs a file descriptor and a little memory,
# no thread (a thread serves a request only once it is complete), so the bound is high: a few
# hundred slow or idle clients must not lock everyone else out. Capped below by the file
# descriptors the process may open (see raise_fd_limit).
MAX_HTTP_CONNECTIONS = 10_000
# File descriptors kept for the store, the worker link's connections and the rest.
RESERVED_FDS = 1024


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit and return it. systemd and most
    shells start services at 1,024: a burst of connections past that (to either port) would
    make every accept() and open() fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


def make_app(
    config: config_mod.CoordinatorConfig,
    store: Store,
    changes: Changes,
    poke: Any,
    live: Any,
    stopping: threading.Event,
    streams: Streams,
) -> Any:
    """The WSGI app of a coordinator with these settings (in its one process, or in each of
    its HTTP processes); `streams` serves its log streams and long polls (its thread, an
    essential one, is the caller's to run)."""
    hooks = webhooks.Settings.load(config.webhook_allow, config.webhooks, config.state_dir)
    return api.make_app(
        store,
        changes,
        poke,
        sealing.Sealer(config.state_dir),
        config.state_dir,
        config.max_body_bytes,
        stopping,
        live=live,
        streams=streams,
        dashboard=config.dashboard,
        public_url=config.public_url,
        queue_timeout=config.queue_timeout,
        webhook_settings=hooks,
    )


def create_http_server(app: Any, config: config_mod.CoordinatorConfig, sock: Any = None) -> Any:
    """Waitress serving `app` on config.http, or on the listening socket `sock` (an HTTP
    process's, bound by the coordinator's main process)."""
    where: dict[str, Any] = {"sockets": [sock]} if sock is not None else {}
    if sock is None:
        host, port = config_mod.parse_address(config.http, "http")
        where = {"host": host, "port": port}
    connections = max(100, min(MAX_HTTP_CONNECTIONS, raise_fd_limit() - RESERVED_FDS))
    handover.quiet_waitress()
    try:
        return waitress.create_server(
            handover.detachable(app),
            **where,
            threads=config.http_threads,
            # Waitress reads a whole body before the app can look at the token: past
            # max_body_bytes it refuses it itself, from the Content-Length alone (a plain-text
            # 413), so no one without a token makes it buffer more than that. (It refuses a
            # body of this size or more, hence the + 1.)
            max_request_body_size=config.max_body_bytes + 1,
            ident="gpubox",
            clear_untrusted_proxy_headers=True,
            max_request_header_size=MAX_HEADER_BYTES,
            # Idle keep-alive connections are closed after this; streams in flight are not idle.
            channel_timeout=60,
            connection_limit=connections,
            # poll(), not select(): select() fails outright on a descriptor numbered past 1,023
            # (ValueError), which a burst of idle connections to either port reaches.
            asyncore_use_poll=True,
        )
    except OSError as exc:
        raise errors.ConfigError(f"http: cannot listen on {config.http}: {exc.strerror}") from exc


class Coordinator:
    """One coordinator: `start()` returns once both listeners are bound; `stop()` undoes it."""

    def __init__(self, config: config_mod.CoordinatorConfig):
        self.config = config
        # Its own context: the CURVE authenticator it carries must be the only one there.
        self.context = zmq.Context()
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.http_server: Any = None
        self.threads: list[supervise.Essential] = []
        self.webhooks: webhooks.Dispatcher | None = None
        self.hub: hub.Hub | None = None  # with http_processes > 1: the HTTP processes' calls
        self.http_processes: httpproc.Processes | None = None
        self.streams: Streams | None = None  # with one process: its log streams and long polls
        self.store_lock: single.Lock | None = None  # SQLite: one coordinator per store
        # PostgreSQL: several coordinators, one leading (coordinator.leader); this one's lease,
        # its wake-ups to and from the others, and the API's view of the broker it may run.
        self.leadership: leader.Leadership | None = None
        self.relay: relay.Relay | None = None
        self.switch: leader.LiveSwitch | None = None
        self.standby_link: standby.StandbyLink | None = None
        self._standby_thread: supervise.Essential | None = None
        self._broker_args: dict[str, Any] = {}
        self._serving = False  # _start has started the threads: a promotion starts its own
        self._promote_lock = threading.Lock()
        self._stopping = threading.Event()
        self._http_done = threading.Event()
        self._http_loop = supervise.Loop(stall_s=3 * config.heartbeat_interval_s)

    @property
    def http_url(self) -> str:
        if self.http_processes is not None:
            return self.http_processes.url
        host, port = self.http_server.effective_host, self.http_server.effective_port
        return f"http://{host}:{port}"

    @property
    def link_endpoint(self) -> str:
        if self.broker is not None:
            return self.broker.endpoint
        assert self.standby_link is not None
        return self.standby_link.endpoint

    @property
    def leads(self) -> bool:
        """This coordinator runs the broker (always, on SQLite)."""
        return self.broker is not None

    def start(self) -> None:
        """Open the store, bind both listeners, start the threads; on failure undo it all."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config_mod.private_state_dir(self.config.state_dir)
        _, secret = keys.coordinator_files(self.config.state_dir)
        if not secret.exists():
            raise errors.ConfigError(
                f"no coordinator key in {secret.parent}: run `gpubox keys init` (and"
                " `gpubox keys worker NAME` for each worker)"
            )
        server_keys = keys.load_secret(secret)
        sealer = sealing.Sealer(self.config.state_dir)
        # A session idle in a transaction for a whole lease is one frozen mid-way: PostgreSQL
        # ends it, or a frozen leader would hold the leadership row (store.leases).
        self.store = open_store(self.config.db, idle_transaction_s=self.config.liveness_s / 2)
        changes = Changes()
        self._broker_args = dict(
            store=self.store,
            changes=changes,
            bind=self.config.bind,
            server_keys=server_keys,
            allow=keys.AllowList(keys.allowed_dir(self.config.state_dir)),
            sealer=sealer,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            liveness_s=self.config.liveness_s,
            context=self.context,
            max_log_lines=self.config.max_log_lines,
            max_log_bytes=self.config.max_log_bytes,
            telemetry_max_points=self.config.telemetry_max_points,
            idle_timeout=self.config.idle_timeout,
            idle_threshold=self.config.idle_threshold,
            fair_share_half_life=self.config.fair_share_half_life,
        )
        if isinstance(self.store, leases.LeaseStore):
            self._start_leadership(self.store, changes)
        else:
            self.store_lock = single.hold(self.config.db)  # before anything is written
            self.store.drop_sessions()  # a restart signs everyone out of the dashboard
            self.broker = Broker(**self._broker_args)
        live = self._live()
        if self.config.http_processes > 1:
            self._start_http_processes(changes)
        else:
            self.streams = Streams(self.store, changes, self._stopping, self.config.http_streams)
            app = make_app(
                self.config, self.store, changes, live.poke, live, self._stopping, self.streams
            )
            self.http_server = create_http_server(app, self.config)
        # Only with both ports bound: a coordinator that cannot start (its port taken, say by
        # the one already serving this state folder) must not replace its clients' token.
        shared = self.leadership is not None  # a store several coordinators may share
        tokens.ensure_local(
            self.store, self.config.state_dir, tokens.local_name(self.config.state_dir, shared)
        )
        if self.leadership is not None:  # the addresses it is reached at, now that it knows
            me = self.leadership.me
            self.leadership.me = dataclasses.replace(
                me, http=self.http_url, link=self.link_endpoint
            )
            self.leadership.store.register_coordinator(self.leadership.me)
        self.threads += self._role_threads()
        if self.store_lock is not None:
            lock, lock_loop = self.store_lock, supervise.Loop(stall_s=60.0)
            self.threads.append(
                supervise.Essential(
                    "gpubox-store-lock",
                    lambda: lock.watch(self._stopping, lock_loop.tick),
                    lock_loop,
                )
            )
        if self.relay is not None and self.leadership is not None:
            self.threads += [
                supervise.Essential("gpubox-relay-in", self.relay.listen, self.relay.listen_loop),
                supervise.Essential("gpubox-relay-out", self.relay.send, self.relay.send_loop),
                supervise.Essential("gpubox-leadership", self.leadership.run, self.leadership.loop),
            ]
        if self.streams is not None:
            self.threads += [
                supervise.Essential("gpubox-http", self._serve_http, self._http_loop),
                supervise.Essential("gpubox-streams", self.streams.run, self.streams.loop),
            ]
        elif self.hub is not None and self.http_processes is not None:
            self.threads += self.http_processes.essential_threads(self.hub)
        with self._promote_lock:
            for thread in self.threads:
                thread.start()
            self._serving = True
        if self.hub is not None and self.http_processes is not None:
            self.http_processes.wait_ready(self.hub)
        log.info("coordinator serving HTTP on %s, workers on %s", self.http_url, self.link_endpoint)

    def _start_leadership(self, store: leases.LeaseStore, changes: Changes) -> None:
        """PostgreSQL: register with the store's other coordinators, lead if no one does
        (the broker is made here then), else stand by (the worker link answers "standby")."""
        host, port = config_mod.parse_address(self.config.http, "http")
        me = leader.this_coordinator(f"http://{host}:{port}", self.config.bind)
        self.leadership = leader.Leadership(
            store, me, self.config.liveness_s / 2, self._promote, self._stopping
        )
        self.relay = relay.Relay(
            self.config.db, store.channel(), me.id, self._on_notice, self._stopping
        )
        self.switch = leader.LiveSwitch(
            store, self.relay.publish, self.leadership, self.config.fair_share_half_life
        )
        changes.listeners.append(self._publish_change)
        self.leadership.start()
        if self.broker is None:
            args = self._broker_args
            self.standby_link = standby.StandbyLink(
                self.context, self.config.bind, args["server_keys"], args["allow"], me.id
            )
            log.info("another coordinator leads: this one stands by (%s)", me.id)

    def _publish_change(self, kind: str, job_id: int) -> None:
        """A Changes listener: tell the other coordinators' followers."""
        if self.relay is not None:
            self.relay.publish("n" if kind == "notify" else "f", job_id)

    def _on_notice(self, kind: str, job_id: int) -> None:
        """A notice from another coordinator (coordinator.relay)."""
        changes = self._broker_args["changes"]
        if kind == "n":
            changes.notify(job_id)
        elif kind == "f":
            changes.forget(job_id)
        elif kind in ("schedule", "cancel"):
            if (broker := self.broker) is not None:
                broker.poke(kind, job_id)
        elif kind == "leader" and self.leadership is not None and self.broker is None:
            self.leadership.wake.set()

    def _role_threads(self) -> list[supervise.Essential]:
        """The threads of what this coordinator is now: the leader's broker (and webhook
        deliveries), or a standby's worker link."""
        if self.broker is None:
            link = self.standby_link
            assert link is not None
            self._standby_thread = supervise.Essential("gpubox-standby-link", link.run, link.loop)
            return [self._standby_thread]
        broker, epoch = self.broker, self.leadership.epoch if self.leadership else None
        assert self.store is not None
        store = self.store
        fenced = store if isinstance(store, leases.LeaseStore) else None

        def run_broker() -> None:
            if fenced is not None and epoch is not None:
                fenced.fence(epoch)  # its writes go on only while this epoch leads
            try:
                broker.run()
            except errors.Deposed:
                if not self._stopping.is_set():
                    raise
                log.info("the broker stopped: another coordinator leads now")

        threads = [supervise.Essential("gpubox-broker", run_broker, broker.loop)]
        hooks = webhooks.Settings.load(
            self.config.webhook_allow, self.config.webhooks, self.config.state_dir
        )
        if hooks.active:
            # Its loop turns at least every webhooks.IDLE_S, and between two deliveries,
            # each of which may take webhooks.TIMEOUT_S.
            dispatcher = webhooks.Dispatcher(
                store,
                sealing.Sealer(self.config.state_dir),
                self._stopping,
                supervise.Loop(stall_s=60.0),
            )
            self.webhooks = dispatcher

            def run_webhooks() -> None:
                if fenced is not None and epoch is not None:
                    fenced.fence(epoch)
                try:
                    dispatcher.run()
                except errors.Deposed:
                    if not self._stopping.is_set():
                        raise

            threads.append(supervise.Essential("gpubox-webhooks", run_webhooks, dispatcher.loop))
        return threads

    def _promote(self, epoch: int) -> None:
        """This coordinator leads from now on (Leadership calls this in epoch `epoch`): make
        the broker on the worker link's port, in place of the standby's answer."""
        with self._promote_lock:
            if self._stopping.is_set():
                return
            if self.standby_link is not None:
                thread = self._standby_thread
                if thread is not None and thread in self.threads:
                    self.threads.remove(thread)  # it ends now, and that is no failure
                authenticator = self.standby_link.stop(thread, keep_authenticator=True)
                # The same port (a bind to port * got one of its own).
                self._broker_args["bind"] = self.standby_link.endpoint
                self._broker_args["authenticator"] = authenticator
                self.standby_link = None
            self.broker = Broker(**self._broker_args)
            if self.switch is not None:
                self.switch.view = self.broker.view
            if self._serving:  # a standby taking over: start the leader's threads now
                started = self._role_threads()
                for thread in started:
                    thread.start()
                self.threads.extend(started)
            log.info("leading in epoch %d: the worker link is on %s", epoch, self.link_endpoint)

    def _live(self) -> Any:
        """What the API reads the broker through (api.context.LiveView): the LiveSwitch on a
        store several coordinators share, else the broker's view."""
        if self.switch is not None:
            return self.switch
        assert self.broker is not None
        return self.broker.view

    def _start_http_processes(self, changes: Changes) -> None:
        """Bind the HTTP port here, and start http_processes processes that serve it (see
        httpproc): this process keeps the broker, the worker link and the hub they call."""
        assert self.store is not None
        listener = httpproc.listen(self.config)
        live = self._live()
        self.hub = hub.Hub(live, self.store, changes, self.context, self._stopping)
        self.http_processes = httpproc.Processes(self.config, listener, self.hub.folder)

    def reload(self) -> None:
        """SIGHUP (systemctl reload): read the worker allow list again at once. Tokens need
        nothing: one revoked in the store is refused within a second
        (store.tokens.TOKEN_CACHE_S)."""
        if self.broker is not None:
            count = self.broker.allow.reload()
            log.info("reloaded: %d worker key(s) on the allow list", count)

    def _serve_http(self) -> None:
        """Waitress's loop, run until stop() says so; then its sockets are closed here, in the
        loop's own thread (closing them from another thread races its select())."""
        server = self.http_server
        while not self._http_done.is_set():
            self._http_loop.tick()
            wasyncore.loop(timeout=0.2, use_poll=True, map=server._map, count=1)
        wasyncore.close_all(server._map)

    def stop(self) -> None:
        """Finish requests in flight (follow streams end), close listeners, join threads.
        A leader first stops its broker and gives its lease up, so that another coordinator
        leads at once."""
        self._stopping.set()
        with self._promote_lock:  # a promotion under way ends first
            pass
        if self.leadership is not None:
            # The lease first: another coordinator leads at once, whatever this one's broker
            # is doing. Its transaction under way ends first (the takeover waits for it); any
            # later one meets the new epoch and ends the broker's thread (quietly: it stops).
            if self.broker is not None:
                self.broker.stop()
            self.leadership.give_up()
            for thread in self.threads:
                if thread.name in ("gpubox-broker", "gpubox-webhooks"):
                    thread.join(timeout=10)
            self.leadership.leave()
        if self.standby_link is not None:
            self.standby_link.stop(self._standby_thread)
        if self.relay is not None:
            self.relay.stop()
        if self.webhooks is not None:
            self.webhooks.wake.set()
        if self.streams is not None:
            self.streams.wake()  # it cuts the follow streams and answers the long polls
        server = self.http_server
        if server is not None:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
            if not self.threads:
                wasyncore.close_all(server._map)  # bound, but its loop never ran to close it
        self._http_done.set()
        if server is not None and self.threads:
            # Its loop sees _http_done now, not at its next poll timeout. A loop that already
            # ended has closed the trigger: nothing to wake.
            with contextlib.suppress(OSError):
                server.pull_trigger()
        if self.http_processes is not None:
            self.http_processes.stop()
        if self.broker is not None:
            self.broker.stop()
        for thread in self.threads:
            thread.join(timeout=10)
        if self.hub is not None:
            self.hub.close()
        if self.store is not None:
            self.store.close()
        if self.store_lock is not None:
            self.store_lock.release()  # last: another coordinator may start from here on
        if self.broker is not None:
            self.broker.close()  # in case its thread never ran
        self.context.destroy(linger=0)
