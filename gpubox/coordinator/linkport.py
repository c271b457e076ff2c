"""The worker link's listening socket: a CURVE ROUTER, as the broker and a standby bind it."""

from __future__ import annotations

import time
from typing import Any

import zmq

from gpubox import errors, keys, protocol

# A connection that has not finished its CURVE handshake within this is closed: idle sockets
# opened to this port by anyone (no key needed) go away on their own instead of piling up
# until the process runs out of file descriptors.
HANDSHAKE_MS = 5000
BIND_TRIES_S = 5.0  # a port just given up by another socket may take a moment to free


def bind_router(context: zmq.Context[Any], bind: str, server_keys: tuple[bytes, bytes]) -> Any:
    """A CURVE ROUTER bound to `bind`, trying again for BIND_TRIES_S while the port is busy
    (closing a socket frees its port in ZeroMQ's I/O thread, a little later)."""
    deadline = time.monotonic() + BIND_TRIES_S
    while True:
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BODY + 4096)
        router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = server_keys
        router.zap_domain = keys.ZAP_DOMAIN.encode()
        try:
            router.bind(bind)
            return router
        except zmq.ZMQError as exc:
            router.close(linger=0)
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise errors.ConfigError(f"bind: cannot listen on {bind}: {exc}") from exc
            time.sleep(0.05)
