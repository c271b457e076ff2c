"""The worker link of a standby coordinator: it answers every worker with REFUSED (standby),
so that the worker moves on to the next coordinator of its list at once instead of waiting
out a silence. The port is the one the broker binds once this coordinator leads.

Only workers on the allow list get the answer (the same CURVE handshake and ZAP check as the
broker's), so the port tells no one else anything."""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from gpubox import keys, protocol, supervise
from gpubox.coordinator.linkport import bind_router

log = logging.getLogger(__name__)

REASON = "this coordinator stands by and does not lead: try the next one"


class StandbyLink:
    """See the module's docstring. run() in a thread of its own; stop() ends it and waits
    until the port is closed."""

    def __init__(
        self,
        context: zmq.Context[Any],
        bind: str,
        server_keys: tuple[bytes, bytes],
        allow: keys.AllowList,
        coordinator_id: str,
    ) -> None:
        self.coordinator_id = coordinator_id
        self.authenticator: keys.CurveAuthenticator | None = keys.CurveAuthenticator(context, allow)
        try:
            self.router = bind_router(context, bind, server_keys)
        except BaseException:
            self.authenticator.stop()
            raise
        self.endpoint: str = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.loop = supervise.Loop(stall_s=60.0)
        self._stop = threading.Event()
        self._closed = threading.Event()
        self.refused = 0

    def run(self) -> None:
        answer = protocol.encode(
            protocol.Refused(coordinator=self.coordinator_id, reason=REASON, standby=True)
        )
        try:
            while not self._stop.is_set():
                self.loop.tick()
                if not self.router.poll(100):
                    continue
                while True:
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.router.send_multipart([frames[0], *answer], zmq.NOBLOCK)
                        self.refused += 1
                    except zmq.ZMQError:
                        pass  # gone already, or congested: it asks again
        finally:
            if not self._closed.is_set():
                self.router.close(linger=0)
                self._closed.set()

    def close(self, keep_authenticator: bool = False) -> None:
        """Close the port, and the authenticator unless it is kept (idempotent)."""
        if not self._closed.is_set():
            self.router.close(linger=0)
            self._closed.set()
        if self.authenticator is not None and not keep_authenticator:
            self.authenticator.stop()
            self.authenticator = None

    def stop(
        self, thread: threading.Thread | None, keep_authenticator: bool = False
    ) -> keys.CurveAuthenticator | None:
        """End run() (in `thread`, if it runs) and wait until the port is closed. With
        `keep_authenticator`, the CURVE authenticator stays up and is returned, for the
        broker that takes the port over (a new one could not bind ZAP's address on the same
        context until the old one's is released, which takes a moment)."""
        self._stop.set()
        if thread is not None and thread.is_alive():
            thread.join(timeout=5)
        self.close(keep_authenticator)
        kept, self.authenticator = self.authenticator, None
        return kept if keep_authenticator else None
