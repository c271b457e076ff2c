"""A container's log read straight from the file Docker's json-file log driver writes (the
LogPath `docker inspect` shows), where the worker can: on the engine's own machine, as a user
who may read it (root, as the systemd unit runs it), with the json-file driver and no
rotation (no max-size). Elsewhere, or when the file cannot be opened, the worker reads
through the engine's API (gpubox.worker.dockerlogs), as before.

Serving a log through its API costs Docker several times what writing it does: following a
container printing 1,000,000 short lines took dockerd about 10 CPU-seconds on a 2-core
machine, on top of the 3 it spent writing them. Reading the file costs dockerd nothing, and
the reader about 1.4 CPU-seconds per million lines (each read's lines parsed as one JSON
array).

The file holds one JSON object per entry, in the order Docker stored them:
{"log": "text\\n", "stream": "stdout", "time": "2024-05-01T12:00:00.123456789Z"}. A follow
reads to the end, then looks again (2 ms after output, up to 25 ms after a quiet while) until
told the container has exited (container_exited()); Docker has written the last entry by the
time it reports the exit, so one more read to the end finishes it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import docker.errors

log = logging.getLogger(__name__)

READ_BYTES = 256 * 1024
POLL_S = (0.002, 0.025)  # a follow at the file's end looks again after this, growing while idle
TAIL_BLOCK = 64 * 1024

Entry = tuple[str, bytes, bytes]  # stream, timestamp, data (newline kept)


def usable_log_file(container: Any, root_dir: str | None) -> str | None:
    """The path of the container's json-file log when it can be read directly (see the
    module docstring), else None. `root_dir`: the engine's DockerRootDir when the engine runs
    on this machine (None otherwise), where the log of a container not yet inspected since
    its start is (LogPath is empty until then)."""
    if not root_dir:
        return None
    attrs = getattr(container, "attrs", None) or {}
    config = (attrs.get("HostConfig") or {}).get("LogConfig") or {}
    if config.get("Type") != "json-file" or (config.get("Config") or {}).get("max-size"):
        return None  # another driver, or rotation: the file does not hold the whole log
    cid = container.id
    path = attrs.get("LogPath") or os.path.join(root_dir, "containers", cid, f"{cid}-json.log")
    if not os.access(path, os.R_OK):
        return None
    return str(path)


class JsonLogFile:
    """The log of one container in its json-file log, read as DockerLogs reads it through
    the API: batches(), container_exited(), close()."""

    def __init__(self, path: str, container_id: str) -> None:
        self.path = path
        self.container_id = container_id
        self._exited = False
        self._closed = False
        self._wake = threading.Event()

    def batches(
        self, follow: bool, since: float | None = None, tail: int | None = None
    ) -> Iterator[list[Entry]]:
        """Every entry (or the last `tail`), as (stream, timestamp, data), in lists of what
        each read brought; with `follow`, until the container has exited and the file has
        been read to its end. `since` is not applied: the caller skips what it has by
        timestamp anyway (and Docker, too, reads such a file from its start to apply it)."""
        try:
            with open(self.path, "rb") as fh:
                if tail is not None:
                    yield self._tail(fh, tail)
                    return
                yield from self._read(fh, follow)
        except OSError as exc:
            raise docker.errors.DockerException(f"reading {self.path}: {exc}") from exc

    def container_exited(self) -> None:
        """The container has exited: a follow reads to the end once more and ends."""
        self._exited = True
        self._wake.set()

    def close(self) -> None:
        """End a follow in progress (at its next look at the file)."""
        self._closed = True
        self._wake.set()

    def _read(self, fh: Any, follow: bool) -> Iterator[list[Entry]]:
        rest = b""
        last_look = False  # the container had exited before this pass to the end began
        wait_s = POLL_S[0]
        while not self._closed:
            block = fh.read(READ_BYTES)
            if block:
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if cut:
                    yield self._parse(block[: cut - 1])
                wait_s = POLL_S[0]
                continue
            if not follow or last_look:
                return
            if self._exited:
                last_look = True  # read once more to the end: Docker wrote all before
                continue
            self._wake.wait(wait_s)
            self._wake.clear()
            wait_s = min(POLL_S[1], wait_s * 2)

    def _tail(self, fh: Any, count: int) -> list[Entry]:
        """The last `count` complete entries, found by reading back from the end."""
        end = fh.seek(0, os.SEEK_END)
        data = b""
        start = end
        while start > 0 and data.count(b"\n") <= count:
            start = max(0, start - TAIL_BLOCK)
            fh.seek(start)
            data = fh.read(end - start)
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.split(b"\n")[:-1]
        if start > 0:
            lines = lines[1:]  # the first may have begun before the block
        return self._parse(b"\n".join(lines[-count:])) if lines else []

    def _parse(self, lines: bytes) -> list[Entry]:
        """Entries from complete lines (newline-separated JSON objects: a newline in a log
        text is always escaped), parsed as one JSON array; a line that is not an entry is
        skipped with a warning."""
        try:
            objects = json.loads(b"[" + lines.replace(b"\n", b",") + b"]")
        except ValueError:
            objects = []
            for line in lines.split(b"\n"):
                try:
                    objects.append(json.loads(line))
                except ValueError:
                    log.warning("%s: skipped a line that is not JSON: %r", self.path, line[:80])
        entries = []
        for entry in objects:
            try:
                stream = "stderr" if entry["stream"] == "stderr" else "stdout"
                text = entry["log"].encode("utf-8", "surrogatepass")
                entries.append((stream, entry["time"].encode("ascii"), text))
            except (KeyError, TypeError, AttributeError, UnicodeEncodeError):
                log.warning("%s: skipped an entry of another form: %r", self.path, entry)
        return entries
