"""The Docker runtime: one job attempt as one container, from pull to removal.

`DockerRuntime.run` blocks for the whole attempt and reports through `emit`:
("started", {container, executed_at}) once the container runs, ("lines", {seq, lines}) for
each batch of output, and always exactly one ("done", {status, exit_code, error, …}) last.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from gpubox import errors, logfmt, models, protocol
from gpubox.config import Mount, check_mount_folders
from gpubox.worker.dockerlogs import DockerLogs
from gpubox.worker.logfile import JsonLogFile, usable_log_file
from gpubox.worker.policy import ContainerPolicy, pull_failure

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]

BATCH_LINES = 1000
BATCH_BYTES = 64 * 1024
FLUSH_S = 0.1
STALL_S = 10.0  # a log follow that takes nothing this long after the container exited
GATHER_S = 0.005
# Text a job's line buffer holds before its log readers wait for the runner to take some: the
# bound on a job's output in the worker's memory between Docker and the link. Without it, the
# reader of a job printing 60 KB lines outran the link and took the worker from 42 MiB to
# 2.5 GiB in 20 s (scripts/bench-flood).
BUFFER_BYTES = 4 * 1024 * 1024
CATCH_UP_TAIL = 1000  # entries read back from a log's end after the container exited
LABEL = "io.gpubox.job"
WORKER_LABEL = "io.gpubox.worker"
OWNER_LABEL = "io.gpubox.coordinator"  # keys.fingerprint of the coordinator's public key
MASK = "[MASKED]"


class JobRefused(errors.GpuboxError):
    """This worker cannot run the job as asked (a mount it does not declare, an image it
    could not pull)."""


def refusal(exc: docker.errors.APIError) -> str:
    """Docker's refusal of a container, in words a user can act on."""
    text = str(exc.explanation or exc)
    if "could not select device driver" in text:
        return (
            "this worker's Docker engine cannot give containers GPUs: install the NVIDIA"
            f" Container Toolkit and restart dockerd (Docker said: {text})"
        )
    return f"docker refused the container: {text}"


def normalize_ts(ts: str) -> str:
    """Docker's timestamp with exactly nine fraction digits (Docker drops trailing zeros), so
    that timestamps sort as text."""
    if len(ts) == 30:  # 2026-01-02T03:04:05.123456789Z already
        return ts
    head, _, frac = ts.rstrip("Z").partition(".")
    return f"{head}.{(frac + '000000000')[:9]}Z"


def ts_ns(ts: str) -> int:
    """Docker's RFC 3339 nanosecond timestamp as integer nanoseconds (trailing zeros vary)."""
    head, _, frac = ts.rstrip("Z").partition(".")
    whole = models.parse_time(head + "Z")
    assert whole is not None
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


def started_at(container: Any) -> str:
    """When a container started, as gpubox writes times."""
    container.reload()
    raw = container.attrs.get("State", {}).get("StartedAt") or ""
    started = models.parse_time(raw) if raw and not raw.startswith("0001") else None
    return models.format_time(started or models.utcnow())  # type: ignore[return-value]


class Masker:
    """Replaces every secret value in a line with [MASKED], longest value first."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = sorted(
            {v for v in values if len(v) >= models.MIN_SECRET}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text


def line_text(data: bytes, mask: Masker) -> str:
    """One line of output as stored: UTF-8 (bad bytes replaced), without its newline, NUL
    replaced (PostgreSQL text cannot hold it), secrets masked."""
    text = data.decode("utf-8", "replace").removesuffix("\n")
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return mask(text) if mask.values else text


def secret_values(job: dict[str, Any]) -> list[str]:
    """What must never show in a job's stored output: its secrets and its registry password."""
    values = list((job.get("secrets") or {}).values())
    if job.get("auth") and job["auth"].get("password"):
        values.append(job["auth"]["password"])
    return values


_TS, _TEXT = operator.itemgetter(0), operator.itemgetter(2)


class LineBuffer:
    """Lines from both streams, handed out in batches with consecutive sequence numbers.

    A reader in another thread than the one that takes (the Docker runtime's log readers)
    calls wait_for_room() before it adds: it then waits while the buffer holds max_bytes of
    text or more, so the buffer holds at most that plus one read."""

    def __init__(self, first_seq: int, max_bytes: int = BUFFER_BYTES) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # lines came: for take()
        self._room = threading.Condition(lock)  # take() made room: for wait_for_room()
        self._lines: list[tuple[str, str, str]] = []
        self._bytes = 0
        self._woken = False
        self.max_bytes = max_bytes
        self.next_seq = first_seq
        self.waiting = 0  # readers waiting for room now
        # Bytes of these lines copied to the worker's own log (send_lines); -1 once the copy
        # stopped at its bound.
        self.copied = 0

    def wait_for_room(self, give_up: Callable[[], bool] | None = None) -> None:
        """Wait while the buffer is full, until take() makes room, or until `give_up()` is
        true when looked at (after each take() or release())."""
        with self._room:
            self.waiting += 1
            try:
                self._room.wait_for(
                    lambda: self._bytes < self.max_bytes or (give_up is not None and give_up())
                )
            finally:
                self.waiting -= 1

    def release(self) -> None:
        """Make readers waiting for room look at their `give_up` again."""
        with self._room:
            self._room.notify_all()

    def wake(self) -> None:
        """End a take() waiting for lines now: something else happened (the job's process
        exited, its output ended), and the runner should look."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def add(self, ts: str, stream: str, text: str) -> None:
        self.add_many([(ts, stream, text)])

    def add_many(self, lines: list[tuple[str, str, str]]) -> None:
        """Lines as (timestamp, stream, text); a text over protocol.MAX_LINE is split."""
        if not lines:
            return
        if max(map(len, map(_TEXT, lines))) * 4 > protocol.MAX_LINE:
            lines = [(ts, s, piece) for ts, s, text in lines for piece in protocol.split_line(text)]
        size = sum(map(len, map(_TEXT, lines)))
        with self._cond:
            before = len(self._lines)
            self._lines += lines
            self._bytes += size
            self._wake(before)

    def _wake(self, before: int) -> None:
        count = len(self._lines)
        if before == 0 or count >= BATCH_LINES or self._bytes >= BATCH_BYTES:
            self._cond.notify()

    def take(self, wait_s: float) -> list[tuple[int, list[list[str]]]]:
        """Wait up to wait_s for lines, then return all pending ones as batches of
        (first seq, [[ts, stream, line], …]), ordered by timestamp within the take. With
        wait_s 0 it returns at once with what it holds."""
        with self._cond:
            # Wait for a first line, then briefly for its companions: a quiet job's line goes
            # out at once, a chatty job's lines still travel in full batches.
            self._cond.wait_for(lambda: self._lines or self._woken, wait_s)
            if (
                wait_s > 0
                and self._lines
                and not self._woken
                and len(self._lines) < BATCH_LINES
                and self._bytes < BATCH_BYTES
            ):
                self._cond.wait(GATHER_S)
            pending, self._lines, self._bytes, self._woken = self._lines, [], 0, False
            self._room.notify_all()
        # Timestamps are normalised (nine fraction digits, Z): as text they sort in time order.
        pending.sort(key=_TS)
        # Cut where a batch would pass BATCH_LINES lines or BATCH_BYTES of text (a batch has
        # one line at least), found on the running total of the lines' sizes.
        ends = list(itertools.accumulate(map(len, map(_TEXT, pending))))
        batches: list[tuple[int, list[list[str]]]] = []
        start, cut_bytes = 0, 0  # the first line of the next batch; the bytes before it
        while start < len(pending):
            fits = bisect.bisect_right(ends, cut_bytes + BATCH_BYTES)
            end = min(start + BATCH_LINES, max(start + 1, fits))
            batches.append((self.next_seq, list(map(list, pending[start:end]))))
            self.next_seq += end - start
            start, cut_bytes = end, ends[end - 1]
        return batches


def _skipped(entry: tuple[str, str, bytes], skips: dict[str, list[Any]]) -> bool:
    """Whether an entry is one already taken: stamped before its stream's [timestamp, count]
    mark, or one of the first `count` stamped with it (-1: all of those). The first entry
    not skipped clears the mark: the stream's timestamps only grow."""
    stream, ts, _ = entry
    skip = skips[stream]
    if not skip[0]:
        return False
    if ts < skip[0]:
        return True
    if ts == skip[0] and skip[1] != 0:
        skip[1] -= 1
        return True
    skip[0] = ""
    return False


class _Stream:
    """Where the reading of one stream stands: the last timestamp taken and how many of
    Docker's entries had it (`at_last`; -1: skip every entry with that timestamp), and a
    line still waiting for its end.

    A re-attach starts at the last timestamp stored (`drop_ts`): its entries are read again,
    and the first `drop` lines they make are dropped, being stored already (lines as stored:
    a line over protocol.MAX_LINE counts as its pieces, where `at_last` counts entries). When
    how many are stored is not known (-1), every entry with that timestamp is skipped."""

    def __init__(self, mark: tuple[str, int] = ("", 0)) -> None:
        self.last_ts, stored = mark
        self.at_last = -1 if self.last_ts and stored < 0 else 0
        self.drop = max(stored, 0) if self.last_ts else 0
        self.drop_ts = self.last_ts
        self.pending = b""
        self.pending_ts = ""


class LogReader:
    """Follows a container's log (stdout and stderr, one stream in Docker's order) into a
    LineBuffer.

    Docker splits lines over 16 KiB into pieces that share a timestamp and lack the newline;
    the pieces are joined here. Timestamps are normalised to nine fraction digits, so they
    sort as text. Per stream the reader remembers the last timestamp it took and how many
    entries had it, so `catch_up` reads what a live follow missed without repeating a line;
    `resume` (per stream, the last timestamp stored and how many lines had it) makes it skip
    what is stored, to re-attach to a container whose earlier lines are stored: the rest of
    a long line of which only some pieces were stored is taken, not lost.
    """

    def __init__(
        self, logs: Any, buffer: LineBuffer, mask: Masker, resume: models.LogMarks | None = None
    ) -> None:
        # .batches(follow, since, tail) of (stream, timestamp, data), .container_exited(),
        # .close(): a DockerLogs or a JsonLogFile
        self.logs = logs
        self.buffer = buffer
        self.mask = mask
        marks = resume or {}
        self.streams = {s: _Stream(marks.get(s, ("", 0))) for s in protocol.STREAMS}
        self._dropping = any(state.drop for state in self.streams.values())
        # Streams with a mark that nothing was taken from since: their skip is still to apply.
        self._resuming = {s for s, state in self.streams.items() if state.last_ts}
        self.last_stream: str | None = None  # the stream of the last entry taken
        self.taken = 0  # entries taken so far: how the runner sees the follow progress
        self._gaps = 0  # the log's gaps marked in the job's log so far
        self._lock = threading.Lock()
        self._abandoned = False
        self.thread = threading.Thread(target=self._follow, daemon=True, name="logs")

    def _since(self) -> float | None:
        """Where a read must start so that it misses nothing not taken: the earliest of the
        streams' marks (each stream's timestamps only grow), less a millisecond as Docker
        applies `since` only roughly; the start of the log while a stream has no mark (a
        stream whose entries were taken but not stored, a line still without its end, has
        none after a restart)."""
        marks = [state.last_ts for state in self.streams.values()]
        if not all(marks):
            return None
        return (min(ts_ns(mark) for mark in marks) - 1_000_000) / 1e9

    def _read(self, follow: bool) -> None:
        """Take every entry after the ones already taken (by timestamp and count, per
        stream). A follow that was abandoned takes nothing more: catch_up reads on from where
        it stopped."""
        skips: dict[str, list[Any]] = {n: [s.last_ts, s.at_last] for n, s in self.streams.items()}
        for batch in self.logs.batches(follow, self._since()):
            if getattr(self.logs, "gaps", 0) > self._gaps:
                self._mark_gap()
            fresh = [(s, normalize_ts(ts.decode("ascii", "replace")), d) for s, ts, d in batch]
            if any(skip[0] for skip in skips.values()):  # not yet past what was taken
                fresh = [entry for entry in fresh if not _skipped(entry, skips)]
            if not self._take_all(fresh, follow):
                return

    def _read_tail(self) -> bool:
        """Take the entries after the last one taken, found among the log's last
        CATCH_UP_TAIL entries (Docker finds those from the end, where `since` has it scan the
        whole log). By position in Docker's order, not by timestamp: an entry of the other
        stream stamped a little earlier but stored later is not missed. False, taking
        nothing, when the last entry taken is not among them, or when a stream re-attached
        to has had nothing taken yet (its entries after that one may be stored already: only
        its mark tells)."""
        if self.last_stream is None or self._resuming:
            return False
        state = self.streams[self.last_stream]
        found = 0
        last = [
            (stream, normalize_ts(raw_ts.decode("ascii", "replace")), data)
            for batch in self.logs.batches(False, tail=CATCH_UP_TAIL)
            for stream, raw_ts, data in batch
        ]
        # Each stream's timestamps only grow: once an earlier entry of that stream is in the
        # window (or the window is the whole log), every entry of its time is in it too, and
        # counting them finds the last one taken.
        complete = len(last) < CATCH_UP_TAIL
        for index, (stream, ts, _) in enumerate(last):
            if stream != self.last_stream or ts < state.last_ts:
                complete = complete or (stream == self.last_stream and ts < state.last_ts)
                continue
            if ts > state.last_ts or not complete:
                return False
            found += 1
            if found == state.at_last:
                self._take_all(last[index + 1 :], follow=False)
                return True
        return False

    def _take_all(self, entries: list[tuple[str, str, bytes]], follow: bool) -> bool:
        """Take entries (stream, normalised timestamp, data) in order, noting per stream the
        last timestamp taken and how many entries had it; False when a follow was abandoned
        meanwhile (nothing taken). Runs per log entry: kept to plain loops.

        First it waits for room in the buffer (not holding the lock, which abandon() takes):
        a reader never runs more than the buffer's bound ahead of the runner."""
        if entries:
            self.buffer.wait_for_room(self._abandon_follow if follow else None)
        with self._lock:
            if follow and self._abandoned:
                return False
            lines = []
            streams, mask = self.streams, self.mask
            for stream, ts, data in entries:
                state = streams[stream]
                if ts == state.last_ts and state.at_last >= 0:
                    state.at_last += 1
                else:
                    state.last_ts, state.at_last = ts, 1
                if not state.pending and data.endswith(b"\n"):
                    lines.append((ts, stream, line_text(data, mask)))  # a whole line: usual
                elif (line := self._join(stream, state, ts, data)) is not None:
                    lines.append(line)
            if entries:
                self.taken += len(entries)
                self.last_stream = entries[-1][0]
                if self._resuming:
                    self._resuming -= {stream for stream, _, _ in entries}
            self.buffer.add_many(self._drop_stored(lines) if self._dropping else lines)
        return True

    def _drop_stored(self, lines: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Of the lines a re-attach reads again, those not stored yet: per stream, the first
        `drop` lines (pieces, as LineBuffer cuts them) stamped with its mark are stored."""
        kept = []
        for ts, stream, text in lines:
            state = self.streams[stream]
            if state.drop and ts == state.drop_ts:
                pieces = protocol.split_line(text)
                stored = min(state.drop, len(pieces))
                state.drop -= stored
                kept += [(ts, stream, piece) for piece in pieces[stored:]]
                continue
            if ts > state.drop_ts:
                state.drop = 0  # past the mark: what had it is all read
            kept.append((ts, stream, text))
        self._dropping = any(state.drop for state in self.streams.values())
        return kept

    def _mark_gap(self) -> None:
        """Say in the job's log (a gpubox line) that lines may be missing here: Docker's log
        of the container rotated before they were read (gpubox.worker.logfile)."""
        self._gaps = self.logs.gaps
        taken = [state.last_ts for state in self.streams.values() if state.last_ts]
        ts = max(taken) if taken else normalize_ts(models.format_time(models.utcnow()) or "")
        text = (
            "[gpubox: lines may be missing here: Docker's log of the container rotated"
            " (worker settings container_log_max_bytes, container_log_files) before the"
            " worker read them; the job printed faster than the worker could send]"
        )
        self.buffer.add_many([(ts, models.GPUBOX_STREAM, text)])

    def _abandon_follow(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        """Stop the follow from taking anything more, and end its read."""
        with self._lock:
            self._abandoned = True
        self.buffer.release()  # a follow waiting for room gives up
        self.logs.close()

    def _follow(self) -> None:
        try:
            self._read(follow=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            if not self._abandoned:
                log.warning("following the log of %s stopped: %s", self.logs.container_id, exc)
        finally:
            self.buffer.wake()

    def _join(
        self, stream: str, state: _Stream, ts: str, data: bytes
    ) -> tuple[str, str, str] | None:
        """A piece of a line Docker split (over 16 KiB, or no newline yet): the line it
        completes, if any. Whole lines only are masked, so a secret across pieces is too."""
        if not state.pending:
            state.pending_ts = ts
        state.pending += data
        if state.pending.endswith(b"\n"):
            return self._pending_line(stream, state)
        return None

    def _pending_line(self, stream: str, state: _Stream) -> tuple[str, str, str]:
        data, state.pending = state.pending, b""
        return state.pending_ts, stream, line_text(data, self.mask)

    def catch_up(self) -> None:
        """After the container exited: read entries the follow missed (from the log's end
        when the follow got close to it, else from the marks), then flush a last line that
        had no newline."""
        try:
            if not self._read_tail():
                self._read(follow=False)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("reading the rest of the log of %s failed: %s", self.logs.container_id, exc)
        last = [self._pending_line(name, s) for name, s in self.streams.items() if s.pending]
        self.buffer.add_many(self._drop_stored(last) if self._dropping else last)
        self.buffer.wake()  # the runner waiting for lines looks now: the catch-up is over


class DockerRuntime:
    """Runs job attempts as Docker containers through the docker SDK."""

    outlives_worker = True  # dockerd owns the containers: they run on, and are re-attached
    owner = ""  # set by the agent (Runtime.owner)

    def __init__(
        self,
        worker_name: str,
        stop_grace_s: float = 10.0,
        client: docker.DockerClient | None = None,
        tee: IO[str] | OutputCopy | None = None,
        mounts: dict[str, Mount] | None = None,
        gpu_devices: bool = True,
        log_files: bool = True,
        log_max_bytes: int = 64 * 1024 * 1024,
        log_max_files: int = 2,
        policy: ContainerPolicy | None = None,
    ) -> None:
        """`mounts`: the host folders jobs may ask for by name. `gpu_devices`: give containers
        their GPUs through a device request (needs the NVIDIA runtime); off for fake GPUs,
        which get the environment only. `log_files`: read a container's json-file log from
        disk where possible (gpubox.worker.logfile), else always through the engine's API.
        `log_max_bytes`, `log_max_files`: the json-file log Docker keeps of each container,
        in that many files of that size (0 bytes: the engine's own log settings).
        `policy`: the limits every container gets and the registries images may come from
        (default: the worker settings' defaults)."""
        self.worker_name = worker_name
        self.stop_grace_s = stop_grace_s
        self.mounts = mounts or {}
        self.policy = policy or ContainerPolicy()
        self.gpu_devices = gpu_devices
        check_mount_folders(self.mounts)
        self.client = client or docker.from_env()
        self.tee = tee or sys.stderr
        self._tee_lock = threading.Lock()
        self._ended: dict[int, Any] = {}  # job id → its exited container, until forget()
        self._ended_lock = threading.Lock()
        self.log_files = log_files
        self.log_max_bytes = log_max_bytes
        self.log_max_files = log_max_files
        self._docker_root: str | None = None

    def run(
        self,
        job: dict[str, Any],
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event | None = None,
        container: Any = None,
        resume: models.LogMarks | None = None,
    ) -> None:
        """Run one attempt to its end; emits exactly one "done" last, unless `detach` is set
        first: then it returns at once and leaves the container running, for a later worker
        to re-attach to. With `container` (found by `recover`) it re-attaches: no pull, no
        start, and each stream resumes where `resume` says its stored output ends."""
        detach = detach or threading.Event()
        executed_at: str | None = None
        buffer = LineBuffer(job["first_seq"])
        outcome: dict[str, Any] | None
        try:
            if container is not None:
                container.reload()
                if container.status == "created":
                    # The last worker died between create and start: start it now.
                    container.start()
                    emit(
                        "started",
                        {
                            "container": container.id,
                            "executed_at": models.format_time(models.utcnow()),
                        },
                    )
                executed_at = started_at(container)
                outcome = self._watch(job, container, buffer, emit, cancel, detach, resume or {})
            elif cancel.is_set() or (container := self._create(job, cancel)) is None:
                outcome = {"status": "CANCELLED", "error": "cancelled before the container started"}
            else:
                container.start()
                executed_at = models.format_time(models.utcnow())
                emit("started", {"container": container.id, "executed_at": executed_at})
                outcome = self._watch(job, container, buffer, emit, cancel, detach, {})
        except JobRefused as exc:
            outcome = {"status": "ERROR", "error": str(exc)}
        except docker.errors.APIError as exc:
            outcome = {"status": "ERROR", "error": refusal(exc)}
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            outcome = {"status": "ERROR", "error": f"docker failed: {exc}"}
        if outcome is None:
            return  # detached: the container runs on
        if container is not None and executed_at is None:
            self.discard(container, stop=False)  # it never ran: nothing to keep
        elif container is not None:
            # It has exited, so its GPUs are free; it stays (stopped) until the coordinator
            # acknowledges DONE (forget): a worker killed before that finds it at its next
            # start and reports the exit code and the last lines from it.
            with self._ended_lock:
                self._ended[job["id"]] = container
        self._flush(job, buffer, emit, container, wait_s=0)
        emit_done(emit, outcome, executed_at, buffer)

    def recover(self) -> list[tuple[int, int, list[str], Any]]:
        """This worker's job containers left by an earlier run: (job id, attempt, GPU uuids,
        container) for each, running or exited."""
        found = []
        label = f"{WORKER_LABEL}={self.worker_name}"
        for container in self.client.containers.list(all=True, filters={"label": label}):
            labels = container.labels
            if labels.get(OWNER_LABEL, self.owner) != self.owner:
                continue  # another gpubox's worker of the same name on this engine
            try:
                job_id, attempt = int(labels[LABEL]), int(labels[f"{LABEL}.attempt"])
            except (KeyError, ValueError):
                continue
            gpus = [g for g in labels.get(f"{LABEL}.gpus", "").split(",") if g]
            found.append((job_id, attempt, gpus, container))
        return found

    def forget(self, job_id: int) -> None:
        """The coordinator has the job's DONE: remove its exited container (in the
        background: it is called from the agent's loop)."""
        with self._ended_lock:
            container = self._ended.pop(job_id, None)
        if container is not None:
            threading.Thread(target=self.discard, args=(container, False), daemon=True).start()

    def discard(self, container: Any, stop: bool = True) -> None:
        """Stop a container (SIGTERM, then SIGKILL after the grace period) and remove it,
        with the anonymous volumes its image declares (VOLUME): kept, they would fill the
        engine's disk one job at a time."""
        try:
            if stop:
                self._stop(container)
            container.remove(v=True, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not remove container %s: %s", container.short_id, exc)

    def _create(self, job: dict[str, Any], cancel: threading.Event) -> Any:
        """The job's container, created; its image is pulled first only when the engine says
        it has none (as `docker run` does: one API call fewer per job than asking before each
        create). None when cancelled during the pull; JobRefused when the pull fails."""
        spec = self.container_spec(job)
        try:
            return self.client.containers.create(job["image"], **spec)
        except docker.errors.ImageNotFound:
            pass
        # Checked before the pull, not before the create: an image the engine has already
        # needs no request to any registry.
        refused = self.policy.registry_refusal(job["image"])
        if refused is not None:
            raise JobRefused(f"could not pull image {job['image']!r}: {refused}")
        pull_error = self._pull(job["image"], job.get("auth"))
        if pull_error is not None:
            raise JobRefused(f"could not pull image {job['image']!r}: {pull_error}")
        if cancel.is_set():
            return None
        return self.client.containers.create(job["image"], **spec)

    def _pull(self, image: str, auth: dict[str, str] | None) -> str | None:
        """Pull the image; None on success, else why not, in a few fixed words."""
        auth_config = None
        if auth:
            auth_config = {"username": auth["username"], "password": auth["password"]}
            if auth.get("registry"):
                auth_config["serveraddress"] = auth["registry"]
        repo, _, tag = (
            image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
        )
        try:
            self.client.images.pull(repo, tag=tag or "latest", auth_config=auth_config)
            return None
        except docker.errors.APIError as exc:
            # Docker's explanation can quote what the registry answered, which may be any
            # server's page: the submitter gets its kind only, the worker's log the rest.
            # auth_config is never part of it.
            explanation = str(exc.explanation or exc)
            log.warning(
                "pulling %s failed: %s",
                logfmt.printable(image),
                logfmt.printable(explanation[:1000]),
            )
            return pull_failure(explanation)

    def container_spec(self, job: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of containers.create for a JOB: command, environment,
        labels to find it again, its GPUs (device request + NVIDIA_VISIBLE_DEVICES, with
        CUDA_DEVICE_ORDER=PCI_BUS_ID so indices inside match nvidia-smi outside), and its
        container options, with this worker's limits (policy). Raises JobRefused for a mount
        this worker does not declare, or /dev/shm over its max_shm_size."""
        options = models.ContainerOptions.from_dict(job.get("container"))
        kwargs: dict[str, Any] = {
            "command": job.get("command"),
            "environment": {**(job.get("env") or {}), **(job.get("secrets") or {})},
            "init": True,
            "detach": True,
            "labels": {
                LABEL: str(job["id"]),
                f"{LABEL}.attempt": str(job["attempt"]),
                f"{LABEL}.gpus": ",".join(job["gpus"]),
                WORKER_LABEL: self.worker_name,
                OWNER_LABEL: self.owner,
            },
        }
        if self.log_max_bytes:
            # Docker's own copy of the output, bounded on disk (a flood wrote 4.5 GB a minute
            # into an unbounded one): the worker follows its files across rotation.
            kwargs["log_config"] = docker.types.LogConfig(
                type="json-file",
                config={"max-size": str(self.log_max_bytes), "max-file": str(self.log_max_files)},
            )
        if job["gpus"] and self.gpu_devices:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(device_ids=list(job["gpus"]), capabilities=[["gpu"]])
            ]
        # Last, over the job's and the image's: a job sees its own GPUs and no other (on an
        # engine whose default runtime is nvidia, "void" keeps a GPU-less job from all).
        kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] = ",".join(job["gpus"]) or "void"
        if job["gpus"]:
            kwargs["environment"]["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        try:
            kwargs.update(self.policy.create_options(options.shm_size))
        except ValueError as exc:
            raise JobRefused(str(exc)) from None
        if options.shm_size is not None:
            kwargs["shm_size"] = options.shm_size
        if options.memory is not None:
            kwargs["mem_limit"] = options.memory
        if options.workdir is not None:
            kwargs["working_dir"] = options.workdir
        if options.user is not None:
            kwargs["user"] = options.user
        missing = [name for name in options.mounts if name not in self.mounts]
        if missing:
            raise JobRefused(f"this worker declares no mount named {', '.join(missing)}")
        if options.mounts:
            # Mount, not volumes: Docker refuses a missing source instead of creating it.
            kwargs["mounts"] = [
                docker.types.Mount(
                    target=self.mounts[name].container_path,
                    source=self.mounts[name].host_path,
                    type="bind",
                    read_only=self.mounts[name].read_only,
                )
                for name in options.mounts
            ]
        return kwargs

    def _watch(
        self,
        job: dict[str, Any],
        container: Any,
        buffer: LineBuffer,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event,
        resume: models.LogMarks,
    ) -> dict[str, Any] | None:
        exited = threading.Event()
        api_logs = DockerLogs(self.client.api, container.id)
        root = self._root_dir() if api_logs.socket_path and self.log_files else None
        path = usable_log_file(container, root)
        logs = JsonLogFile(path, container.id) if path else api_logs
        reader = LogReader(logs, buffer, Masker(secret_values(job)), resume)
        reader.thread.start()
        result: dict[str, Any] = {}

        def wait() -> None:
            try:
                result.update(container.wait())
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                result["Error"] = {"Message": str(exc)}
            exited.set()
            logs.container_exited()
            buffer.wake()

        threading.Thread(target=wait, daemon=True, name=f"wait-{job['id']}").start()
        deadline = None
        if job.get("timeout"):
            ran_s = (models.utcnow() - models.parse_time(started_at(container))).total_seconds()  # type: ignore[operator]
            deadline = time.monotonic() + job["timeout"] - max(0.0, ran_s)
        stopped_for: str | None = None
        while not exited.is_set():
            if detach.is_set():
                reader.abandon()  # nothing takes from the buffer any more
                return None
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
            if stopped_for is None and cancel.is_set():
                stopped_for = "cancel"
            elif stopped_for is None and deadline is not None and time.monotonic() >= deadline:
                stopped_for = "timeout"
            else:
                continue
            threading.Thread(target=self._stop, args=(container,), daemon=True).start()
        # The follows end by themselves once Docker has sent all the container's output, which
        # can take a while after it exited: keep sending what they read. Only a follow that
        # stalls is abandoned, and the rest is read from where it stopped, never both at once.
        progress, taken = time.monotonic(), -1
        while reader.thread.is_alive():
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
            if reader.taken != taken or buffer.waiting:  # (waiting for room is not stalling)
                progress, taken = time.monotonic(), reader.taken
            elif time.monotonic() - progress > STALL_S:
                break
        reader.abandon()
        # The catch-up reads in a thread of its own while this one keeps sending what it
        # reads: the buffer is bounded, and only this thread makes room in it.
        failed: list[BaseException] = []
        catch_up = threading.Thread(
            target=_capture, args=(reader.catch_up, failed), daemon=True, name="logs-catch-up"
        )
        catch_up.start()
        while catch_up.is_alive():
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
        if failed:
            raise failed[0]  # as if it had run here: the agent reports the job failed
        code = result.get("StatusCode")
        if stopped_for == "cancel":
            return {"status": "CANCELLED", "exit_code": code, "error": "cancelled"}
        if stopped_for == "timeout":
            return {"status": "ERROR", "exit_code": code, "error": "timeout"}
        if code == 0:
            return {"status": "FINISHED", "exit_code": 0}
        if code is None:
            message = (result.get("Error") or {}).get("Message", "unknown")
            return {"status": "ERROR", "error": f"lost track of the container: {message}"}
        return {"status": "ERROR", "exit_code": code, "error": f"exit code {code}"}

    def _root_dir(self) -> str | None:
        """The local engine's DockerRootDir (asked once), where it keeps container logs."""
        if self._docker_root is None:
            try:
                self._docker_root = str(self.client.info().get("DockerRootDir") or "")
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                return None  # asked again next time
        return self._docker_root or None

    def _stop(self, container: Any) -> None:
        try:
            container.stop(timeout=int(round(self.stop_grace_s)))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("stopping container %s failed: %s", container.short_id, exc)

    def _flush(
        self, job: dict[str, Any], buffer: LineBuffer, emit: Emit, container: Any, wait_s: float
    ) -> None:
        short = container.short_id if container is not None else "-"
        send_lines(
            buffer, emit, self.tee, self._tee_lock, f"job={job['id']} container={short}", wait_s
        )


def _capture(fn: Callable[[], None], failed: list[BaseException]) -> None:
    """Run fn, keeping what it raises in `failed` (for a thread whose starter re-raises it)."""
    try:
        fn()
    except BaseException as exc:
        failed.append(exc)


def emit_done(
    emit: Emit, outcome: dict[str, Any], executed_at: str | None, buffer: LineBuffer
) -> None:
    """The attempt's last report: how it ended, and the last line it sent."""
    emit(
        "done",
        {
            "exit_code": outcome.get("exit_code"),
            "status": outcome["status"],
            "error": outcome.get("error"),
            "executed_at": executed_at,
            "finished_at": models.format_time(models.utcnow()),
            "last_seq": buffer.next_seq - 1,
        },
    )


class OutputCopy:
    """The worker's own log (its stderr: the journal under systemd) as the place where it
    copies its jobs' lines, each tagged with the job and container: at most
    `max_bytes_per_job` of each job attempt's output, then one line saying the rest is not
    copied. A flood once wrote 4.5 GB a minute into a worker's journal."""

    def __init__(self, stream: IO[str], max_bytes_per_job: int) -> None:
        self.stream = stream
        self.max_bytes_per_job = max_bytes_per_job

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def send_lines(
    buffer: LineBuffer,
    emit: Emit,
    tee: IO[str] | OutputCopy,
    lock: threading.Lock,
    prefix: str,
    wait_s: float,
) -> None:
    """Take what the buffer holds (waiting up to wait_s), copy it to the worker's own log with
    `prefix` on each line (up to an OutputCopy's bound), and emit it as "lines" batches."""
    batches = buffer.take(wait_s)
    if not batches:
        return
    limit = tee.max_bytes_per_job if isinstance(tee, OutputCopy) else None
    with lock:
        for _, lines in batches:
            if buffer.copied < 0:
                break  # past the bound: nothing more of this job is copied
            text = "".join(f"{prefix} {s}: {text}\n" for _, s, text in lines)
            if limit is not None:
                data = text.encode("utf-8", "replace")
                if buffer.copied + len(data) > limit:
                    kept = data[: limit - buffer.copied]
                    text = kept[: kept.rfind(b"\n") + 1].decode("utf-8") + (
                        f"{prefix} gpubox: this job printed more than {limit} bytes; the rest"
                        " of its output is not copied to this log (worker setting"
                        " journal_bytes_per_job): `gpubox logs` shows it\n"
                    )
                    buffer.copied = -1
                else:
                    buffer.copied += len(data)
            tee.write(text)
        tee.flush()
    for seq, lines in batches:
        emit("lines", {"seq": seq, "lines": lines})
