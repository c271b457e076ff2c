"""The coordinator's HTTP processes (http_processes > 1).

The main process binds the HTTP port, keeps the store's schema, the broker (the worker link
and scheduling), the webhooks and the hub, and starts http_processes processes of this
module, each handed the listening socket: the kernel gives each new connection to one of
them. Each opens the store on its own (SQLite's locking, or PostgreSQL's, keeps their writes
apart), serves the whole API and dashboard with its own threads and interpreter, and asks
the broker process through the hub what only the broker knows. So submits, reads and log
streams no longer share one interpreter's lock with the broker.

One process ending takes the coordinator down: the main process watches each (an essential
thread per process), and each HTTP process dies with the main process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import zmq
from waitress import wasyncore

from gpubox import config as config_mod
from gpubox import errors, logfmt, supervise
from gpubox.coordinator import hub
from gpubox.coordinator.events import Changes
from gpubox.coordinator.streams import Streams

log = logging.getLogger(__name__)

ENV = "GPUBOX_HTTP_PROCESS"  # what an HTTP process is told: its settings, socket and hub
READY_S = 60.0  # how long the main process waits for every HTTP process to serve
STOP_S = 10.0  # how long an HTTP process has to finish its requests when stopped
PR_SET_PDEATHSIG = 1


def listen(config: config_mod.CoordinatorConfig) -> socket.socket:
    """The HTTP port, bound and listening, to hand to the HTTP processes."""
    host, port = config_mod.parse_address(config.http, "http")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise errors.ConfigError(f"http: cannot listen on {config.http}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


class Processes:
    """The HTTP processes of one coordinator, started at once."""

    def __init__(
        self, config: config_mod.CoordinatorConfig, listener: socket.socket, hub_folder: str
    ) -> None:
        self.listener = listener
        self.stopping = threading.Event()
        host, port = listener.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        told = json.dumps(
            {"config": dataclasses.asdict(config), "fd": listener.fileno(), "hub": hub_folder}
        )
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "gpubox.coordinator.httpproc", str(index)],
                pass_fds=(listener.fileno(),),
                env={**os.environ, ENV: told},
            )
            for index in range(config.http_processes)
        ]

    def essential_threads(self, the_hub: hub.Hub) -> list[supervise.Essential]:
        """The hub's thread, and one per HTTP process that ends (and so makes the coordinator
        end) when the process does, unless the coordinator is stopping."""
        threads = [supervise.Essential("gpubox-hub", the_hub.run, the_hub.loop)]
        for index, process in enumerate(self.processes):
            watch = functools.partial(self._watch, index, process)
            threads.append(supervise.Essential(f"gpubox-http-{index}", watch))
        return threads

    def _watch(self, index: int, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if not self.stopping.is_set():
            raise RuntimeError(
                f"HTTP process {index} (pid {process.pid}) exited with status {code}"
            )

    def wait_ready(self, the_hub: hub.Hub) -> None:
        """Return once every HTTP process serves; errors.GpuboxError if one ended first."""
        deadline = time.monotonic() + READY_S
        with the_hub.ready_changed:
            while len(the_hub.ready) < len(self.processes):
                ended = [p for p in self.processes if p.poll() is not None]
                if ended or time.monotonic() > deadline:
                    why = f"exited with status {ended[0].returncode}" if ended else "never served"
                    raise errors.GpuboxError(f"an HTTP process of the coordinator {why}")
                the_hub.ready_changed.wait(0.2)

    def stop(self) -> None:
        """Stop every HTTP process (SIGTERM: each finishes its requests), then close the port."""
        self.stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("HTTP process %d did not stop in %g s: killed", process.pid, STOP_S)
                process.kill()
                process.wait()
        self.listener.close()


def main() -> int:
    """An HTTP process: serve the API and dashboard on the socket it was handed until
    SIGTERM, or until its main process ends."""
    told = json.loads(os.environ.pop(ENV))
    parent = os.getppid()
    logfmt.setup()
    # Die with the main process, whatever kills it (a check too: it may be gone already).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return 1
    from gpubox.coordinator import server  # its imports are the HTTP process's too
    from gpubox.store import open_store

    config = config_mod.CoordinatorConfig(**told["config"])
    logfmt.set_level(config.log_level)
    stopping = threading.Event()
    # The handler only notes the signal; the loop below sets `stopping`. Setting an Event in
    # the handler deadlocked: a second SIGTERM (the main process's stop, then its death's
    # PR_SET_PDEATHSIG) ran the handler again inside the first one's Event.set(), on the lock
    # that one held, and the process hung for good.
    asked: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: asked.append(signum))
    # Ctrl-C and a terminal's hangup reach the whole process group: the main process stops us
    # (SIGINT) or reloads (SIGHUP, systemctl reload), and neither must end an HTTP process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    context: zmq.Context[Any] = zmq.Context()
    store = open_store(config.db, upgrade=False)
    remote = hub.RemoteLive(told["hub"], store, context)
    changes = Changes()
    streams = Streams(store, changes, stopping, config.http_streams)
    app = server.make_app(config, store, changes, remote.poke, remote, stopping, streams)
    http = server.create_http_server(app, config, socket.socket(fileno=told["fd"]))
    news_loop = supervise.Loop(stall_s=30.0)
    listen_for_news = functools.partial(remote.listen, changes, stopping, news_loop)
    news = supervise.Essential("gpubox-news", listen_for_news, news_loop)
    serving = supervise.Essential("gpubox-streams", streams.run, streams.loop)
    news.start()
    serving.start()
    remote.ready()
    status = 0
    while not stopping.is_set() and not asked:
        if (dead := supervise.first_dead([news, serving])) is not None:
            log.error("HTTP process %d: %s", os.getpid(), supervise.why(dead))
            status = 1
            break
        wasyncore.loop(timeout=0.2, use_poll=True, map=http._map, count=1)
    stopping.set()
    streams.wake()
    http.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
    wasyncore.close_all(http._map)
    news.join(timeout=5)
    serving.join(timeout=5)
    store.close()
    context.destroy(linger=0)
    return status


if __name__ == "__main__":
    sys.exit(main())
