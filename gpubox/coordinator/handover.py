"""How a follow stream or long poll leaves Waitress: `detachable`, around the WSGI app, lets
a route hand its connection over to a stream (streams.Streams.detach). The app's status and
headers then go to the stream, which sends them itself from the streams thread, and Waitress
lets go of the connection without writing a byte."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress.channel import ClientDisconnected

HANDOVER_S = 2.0  # the longest a hand-over waits for Waitress to send what it still holds
STREAM_KEY = "gpubox.stream"  # where a route leaves the stream it asks to detach
DETACHABLE_KEY = "gpubox.detachable"  # set by `detachable`: this server can detach streams


def detachable(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """`app` (WSGI) as served by Waitress, where a route may hand its connection over to a
    stream (Streams.detach): the app's status and headers then go to the stream, which sends
    them itself, and Waitress lets go of the connection."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[DETACHABLE_KEY] = True
        answered: list[tuple[str, list[tuple[str, str]]]] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if STREAM_KEY not in environ:
                return start_response(status, headers, exc_info)
            answered.append((status, headers))
            return lambda data: None

        body = app(environ, capture)
        if STREAM_KEY not in environ:
            return body
        if hasattr(body, "close"):
            body.close()
        streams, stream = environ[STREAM_KEY]
        if environ.get("REQUEST_METHOD") == "HEAD":  # the headers alone: nothing to stream
            streams.release(stream.kind)
            start_response(*answered[-1])
            return []
        channel = environ["waitress.client_disconnected"].__self__
        # Waitress may still hold the answer to an earlier request on this connection.
        waited = time.monotonic() + HANDOVER_S
        while channel.total_outbufs_len and time.monotonic() < waited:
            time.sleep(0.005)
        if channel.total_outbufs_len or not channel.connected:
            streams.release(stream.kind)
            raise ClientDisconnected("the connection went away before its stream began")
        status, headers = answered[-1]
        stream.start(environ.get("SERVER_PROTOCOL", "HTTP/1.0"), status, headers)
        # A socket of our own for the same connection: Waitress closes its descriptor when it
        # sees the exception below (without a byte written), the connection stays open on ours.
        try:
            stream.sock = channel.socket.dup()
        except OSError as exc:  # out of descriptors, say: the client sees the connection end
            streams.release(stream.kind)
            raise ClientDisconnected(f"cannot hand the connection over: {exc}") from exc
        stream.sock.setblocking(False)
        streams.adopt(stream)
        _quiet.handed_over = True
        raise ClientDisconnected("handed over to a stream")

    return serve


def quiet_waitress() -> None:
    """Keep Waitress from logging each hand-over as a client that went away (once is enough)."""
    waitress_log = logging.getLogger("waitress")
    if not any(isinstance(f, HandedOverFilter) for f in waitress_log.filters):
        waitress_log.addFilter(HandedOverFilter())


class _Quiet(threading.local):
    handed_over = False


_quiet = _Quiet()


class HandedOverFilter(logging.Filter):
    """Drops Waitress's "Client disconnected while serving" for a request that `detachable`
    handed over (Waitress logs it in the same thread, right after the exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _quiet.handed_over and str(record.msg).startswith("Client disconnected"):
            _quiet.handed_over = False
            return False
        return True
