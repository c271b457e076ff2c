"""The threads that run job attempts for the worker's agent, kept between jobs: starting a
thread and a ZeroMQ socket costs more CPU than a short job's whole run (about 0.2 and 0.1 ms
on a small VM), and a busy worker starts hundreds of jobs a second."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

Work = Callable[[zmq.Socket], None]
EVENTS_HWM = 64  # events a runner thread may have waiting for the agent (each side of the pipe)


class Runners:
    """Daemon threads, each with its own PUSH socket to `address` (ZeroMQ sockets are not
    shared between threads), that run what start() hands them; a new thread only when none
    is idle. stop() ends them once their work is done."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self._context = context
        self._address = address
        self._work: queue.SimpleQueue[tuple[str, Work] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def start(self, name: str, work: Work) -> None:
        """Run work(push) in an idle runner thread (renamed `name` meanwhile), or a new one."""
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._threads += 1
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        self._work.put((name, work))

    def stop(self) -> None:
        """Each runner thread ends after its current work (idle ones at once)."""
        with self._lock:
            count, self._threads, self._idle = self._threads, 0, 0
        for _ in range(count):
            self._work.put(None)

    def _serve(self) -> None:
        push = self._context.socket(zmq.PUSH)
        # Blocks while the agent is behind (back-pressure on a job's output), a bounded while.
        push.setsockopt(zmq.SNDTIMEO, 500)
        # Each event waiting hands over up to a batch of lines (64 KiB of text): this many
        # waiting (here and at the agent's end, which holds as many) bound what a runner
        # thread holds for the agent to 64 x 64 KiB x 2 = 8 MiB. ZeroMQ's default, 1,000, let
        # a flood hold 128 MiB per job.
        push.setsockopt(zmq.SNDHWM, EVENTS_HWM)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._address)
        thread = threading.current_thread()
        try:
            while (item := self._work.get()) is not None:
                thread.name, work = item
                try:
                    work(push)
                except Exception:  # work reports its own failures; this only keeps the thread
                    log.exception("a job runner failed")
                thread.name = "gpubox-runner-idle"
                with self._lock:
                    self._idle += 1
        finally:
            push.close()
