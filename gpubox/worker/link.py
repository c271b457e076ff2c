"""The worker's end of the worker link: one DEALER socket to the coordinator, CURVE client,
and a monitor that turns a failed handshake into a log line saying what to check.

A worker may know several coordinators (they share one PostgreSQL store, and one of them
leads): the link talks to one at a time, and `move()` goes on to the next of the list, when
the one it talks to stands by, goes silent or drops the connection."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import zmq
import zmq.utils.monitor

from gpubox import errors, protocol, zmqio

log = logging.getLogger(__name__)

HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
GONE = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED  # no coordinator there now


class CoordinatorLink:
    """A DEALER to the coordinator at `endpoint`, made anew by connect() (after a silence).
    Owned by the agent's thread; `name` is the worker's, for the log lines. `endpoints` are
    the coordinators' addresses, the first one used first."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoints: list[str],
        name: str,
        keypair: tuple[bytes, bytes],
        server_key: bytes,
    ) -> None:
        self.context = context
        self.endpoints = endpoints
        self.endpoint = endpoints[0]
        self.name = name
        self.public_key, self.secret_key = keypair
        self.server_key = server_key
        self.dealer: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self._handshake_warned = False

    def connect(self, poller: zmq.Poller | None) -> None:
        """A new connection (the old one closed), its sockets registered with `poller`."""
        self.close(poller)
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.curve_secretkey = self.secret_key
        dealer.curve_publickey = self.public_key
        dealer.curve_serverkey = self.server_key
        dealer.setsockopt(zmq.RECONNECT_IVL, 200)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        # A refused key or a wrong server key only shows as a failed handshake: watch for it.
        # With several coordinators, a dropped or refused connection too: the next one may
        # lead now.
        watched = HANDSHAKE_FAILURES | (GONE if self.several else 0)
        self.monitor = dealer.get_monitor_socket(watched)
        self._handshake_warned = False
        dealer.connect(self.endpoint)
        self.dealer = dealer
        if poller is not None:
            poller.register(self.dealer, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)

    @property
    def several(self) -> bool:
        return len(self.endpoints) > 1

    def move(self, poller: zmq.Poller | None) -> None:
        """Connect to the next coordinator of the list."""
        index = self.endpoints.index(self.endpoint)
        self.endpoint = self.endpoints[(index + 1) % len(self.endpoints)]
        self.connect(poller)

    def close(self, poller: zmq.Poller | None) -> None:
        if self.dealer is None or self.monitor is None:
            return
        if poller is not None:
            poller.unregister(self.dealer)
            poller.unregister(self.monitor)
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=0)
        self.dealer = self.monitor = None

    def send(self, msg: protocol.FromWorker) -> bool:
        """Send without blocking; False when not connected or the link is congested (the
        agent's resend timer tries again)."""
        if self.dealer is None:
            return False
        try:
            zmqio.send(self.dealer, protocol.encode(msg))
            return True
        except zmq.Again:
            return False

    def received(self) -> Iterator[protocol.FromCoordinator]:
        """The messages waiting, decoded; a malformed one is logged and skipped."""
        while self.dealer is not None:
            try:
                frames = zmqio.recv(self.dealer)
            except zmq.Again:
                return
            try:
                yield protocol.decode_from_coordinator([frame.bytes for frame in frames])
            except errors.ProtocolError as exc:
                log.warning("dropped a malformed message from the coordinator: %s", exc)

    def check_handshakes(self) -> bool:
        """Log, once per connection, why a CURVE handshake failed; True if the coordinator
        dropped the connection or refused it (watched only with several coordinators)."""
        dropped = False
        while self.monitor is not None:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            if event["event"] & GONE:
                dropped = True
                continue
            if self._handshake_warned:
                continue
            self._handshake_warned = True
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.error(
                    "the coordinator refused this worker's key: is %s on its allow list"
                    " (gpubox keys worker %s on the coordinator's box)?",
                    self.name,
                    self.name,
                )
            else:
                log.error(
                    "the CURVE handshake with %s failed: is coordinator_key the coordinator's"
                    " public key (its keys/coordinator.key)?",
                    self.endpoint,
                )
        return dropped
