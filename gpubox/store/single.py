"""One coordinator per SQLite store: the lock a coordinator holds on its store for as long as
it runs.

A SQLite store lives in a file on one box, so it has one coordinator. A second one on the
same file would run a broker of its own: each would take the other's workers for lost and
end their running jobs as ERROR, and hand out the same queue twice. So a coordinator holds
an exclusive flock on `<database file>.coordinator` (which holds the holder's pid and host)
from its start, and a second one refuses to start, saying which one holds it. The kernel
lets the lock go when the process ends, however it ends.

Several coordinators share a PostgreSQL store under one leader instead: coordinator.leader.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from gpubox import errors
from gpubox.store import _sqlite_path

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0  # how often watch() ticks its loop


class Lock(Protocol):
    def watch(self, stopping: threading.Event, tick: Callable[[], None]) -> None: ...

    def release(self) -> None: ...


def who() -> str:
    """This process, as the lock's holder is named."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def hold(url: str) -> Lock:
    """Take the coordinator lock of the SQLite store at `url`, or errors.ConfigError naming
    the coordinator that holds it."""
    return FileLock(_sqlite_path(url))


class FileLock:
    """The lock of a SQLite store: see the module's docstring."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}.coordinator"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise errors.ConfigError(
                f"another gpubox coordinator already runs on the store {db_path} ({holder}):"
                " one coordinator per store; stop it first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{who()}\n".encode(), 0)

    def watch(self, stopping: threading.Event, tick: Callable[[], None]) -> None:
        """Nothing to watch: the kernel holds the lock until the process ends."""
        while not stopping.wait(WATCH_EVERY_S):
            tick()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
