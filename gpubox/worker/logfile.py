"""A container's log read straight from the file Docker's json-file log driver writes (the
LogPath `docker inspect` shows), where the worker can: on the engine's own machine, as a user
who may read it (root, as the systemd unit runs it), with the json-file driver, its rotated
files (max-size, max-file) not compressed. Elsewhere, or when the file cannot be opened, the
worker reads through the engine's API (gpubox.worker.dockerlogs), as before.

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

import collections
import contextlib
import dataclasses
import errno
import itertools
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


@dataclasses.dataclass
class _File:
    """One file of a container's log, open, and its inode (which a rename keeps)."""

    handle: Any
    inode: int
    gap_before: bool = False  # lines Docker wrote before this file may be lost unread


def usable_log_file(container: Any, root_dir: str | None) -> str | None:
    """The path of the container's json-file log when it can be read directly (see the
    module docstring), else None. `root_dir`: the engine's DockerRootDir when the engine runs
    on this machine (None otherwise), where the log of a container not yet inspected since
    its start is (LogPath is empty until then)."""
    if not root_dir:
        return None
    attrs = getattr(container, "attrs", None) or {}
    config = (attrs.get("HostConfig") or {}).get("LogConfig") or {}
    options = config.get("Config") or {}
    if config.get("Type") != "json-file" or options.get("compress") in ("true", "1"):
        return None  # another driver, or rotated files compressed: the API reads those
    cid = container.id
    path = attrs.get("LogPath") or os.path.join(root_dir, "containers", cid, f"{cid}-json.log")
    if not os.access(path, os.R_OK):
        return None
    return str(path)


class JsonLogFile:
    """The log of one container in its json-file log, read as DockerLogs reads it through
    the API: batches(), container_exited(), close().

    With rotation (max-size), Docker renames the file it writes to PATH.1 (PATH.1 to PATH.2,
    and so on, the oldest deleted past max-file) and starts a new PATH. A read holds the
    file it reads open, so a file renamed or deleted meanwhile is still read to its end,
    then goes on with the next one. It looks for new files after every read, and opens
    each as soon as it sees it; a file Docker deleted before the read got to it is lost,
    and so is any it never saw (the read fell behind Docker by more than max-file files):
    `gaps` counts the places where lines may be missing, each counted as the read reaches
    it (before the first batch after it), for the reader to mark in the job's log.
    """

    def __init__(self, path: str, container_id: str) -> None:
        self.path = path
        self.container_id = container_id
        self.gaps = 0
        self._gap_next = False  # the next file opened comes after lost lines
        self._exited = False
        self._closed = False
        self._wake = threading.Event()

    def batches(
        self, follow: bool, since: float | None = None, tail: int | None = None
    ) -> Iterator[list[Entry]]:
        """Every entry (or the last `tail`), as (stream, timestamp, data), in lists of what
        each read brought; with `follow`, until the container has exited and the log has
        been read to its end. `since` is not applied: the caller skips what it has by
        timestamp anyway (and Docker, too, reads such a file from its start to apply it)."""
        try:
            if tail is not None:
                yield self._tail(tail)
                return
            yield from self._read(follow)
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

    def _read(self, follow: bool) -> Iterator[list[Entry]]:
        held: collections.deque[_File] = collections.deque()
        try:
            for path, inode in self._files():
                found = self._open(path, inode)
                if found is not None:
                    held.append(found)
            if not held:
                raise FileNotFoundError(errno.ENOENT, "no such file", self.path)
            rest = b""
            last_look = False  # the container had exited before this pass to the end began
            wait_s = POLL_S[0]
            while not self._closed:
                block = held[0].handle.read(READ_BYTES)
                if block:
                    block = rest + block
                    cut = block.rfind(b"\n") + 1
                    rest = block[cut:]
                    if cut:
                        yield self._parse(block[: cut - 1])
                    self._look(held)
                    wait_s = POLL_S[0]
                    continue
                if len(held) > 1:  # Docker writes a newer file: this one is complete
                    held.popleft().handle.close()
                    rest = b""
                    if held[0].gap_before:
                        self.gaps += 1  # counted here, where the lines are missing
                    continue
                if self._look(held):
                    continue
                if not follow or last_look:
                    return
                if self._exited:
                    last_look = True  # read once more to the end: Docker wrote all before
                    continue
                self._wake.wait(wait_s)
                self._wake.clear()
                wait_s = min(POLL_S[1], wait_s * 2)
        finally:
            for file in held:
                file.handle.close()

    def _files(self) -> list[tuple[str, int]]:
        """The files of the log now, oldest first, as (path, inode): the rotated ones
        (PATH.N … PATH.1) and the one Docker writes (PATH). Listed until two lists agree: a
        rotation while listing could show one file twice, or miss one."""
        listed = None
        for _ in range(5):
            found = []
            for number in itertools.count(1):
                try:
                    found.append((f"{self.path}.{number}", os.stat(f"{self.path}.{number}").st_ino))
                except FileNotFoundError:
                    break
            found.reverse()
            with contextlib.suppress(FileNotFoundError):  # (between two files of a rotation)
                found.append((self.path, os.stat(self.path).st_ino))
            if found == listed:
                break
            listed = found
        return found

    def _open(self, path: str, inode: int) -> _File | None:
        """The file with this inode, opened where it was seen or, if Docker renamed it since,
        under its new name; None once it is gone."""
        for _ in range(3):
            with contextlib.suppress(FileNotFoundError):
                handle = open(path, "rb")  # noqa: SIM115
                if os.fstat(handle.fileno()).st_ino == inode:
                    return _File(handle, inode)
                handle.close()
            path = next((p for p, i in self._files() if i == inode), "")
            if not path:
                return None
        return None

    def _look(self, held: collections.deque[_File]) -> bool:
        """Open the files Docker started since the newest one held (True if any), and let go
        of held files it deleted before they were read (as it bounds the disk, so must this)."""
        try:
            if os.stat(self.path).st_ino == held[-1].inode:
                return False
        except FileNotFoundError:
            return False  # between two files of a rotation: look again later
        files = self._files()
        present = {inode for _, inode in files}
        for file in list(held)[1:]:
            if file.inode not in present:
                held.remove(file)
                file.handle.close()
                self._gap("Docker deleted a rotated log file before it was read")
            elif self._gap_next:
                file.gap_before, self._gap_next = True, False
        inodes = [inode for _, inode in files]
        if held[-1].inode in inodes:
            newer = files[inodes.index(held[-1].inode) + 1 :]
        else:
            newer = files  # the newest held is gone: the files after it may be gone too
            self._gap("Docker rotated its log past the file being read")
        opened = False
        for path, inode in newer:
            found = self._open(path, inode)
            if found is None:
                self._gap("Docker deleted a rotated log file before it was read")
            else:
                found.gap_before, self._gap_next = self._gap_next, False
                held.append(found)
                opened = True
        return opened

    def _gap(self, why: str) -> None:
        """Lines may be lost before the next file opened (see `gaps`)."""
        self._gap_next = True
        log.warning(
            "the log of container %s: some output may be lost: %s (the job printed faster"
            " than the worker could send it)",
            self.container_id[:12],
            why,
        )

    def _tail(self, count: int) -> list[Entry]:
        """The last `count` complete entries, found by reading back from the end, through
        the rotated files as far as needed."""
        lines: list[bytes] = []
        for path, _ in reversed(self._files()):
            try:
                with open(path, "rb") as fh:
                    lines = self._last_lines(fh, count - len(lines)) + lines
            except FileNotFoundError:
                break
            if len(lines) >= count:
                break
        return self._parse(b"\n".join(lines[-count:])) if lines else []

    @staticmethod
    def _last_lines(fh: Any, count: int) -> list[bytes]:
        """The last `count` complete lines of a file (fewer if it holds fewer)."""
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
        return lines[-count:] if count > 0 else []

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
