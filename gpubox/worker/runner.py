"""The Docker runtime: one job attempt as one container, from pull to removal.

`DockerRuntime.run` blocks for the whole attempt and reports through `emit`:
("started", {container, executed_at}) once the container runs, ("lines", {seq, lines}) for
each batch of output, and always exactly one ("done", {status, exit_code, error, …}) last.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from gpubox import models, protocol

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]

BATCH_LINES = 100
BATCH_BYTES = 64 * 1024
FLUSH_S = 0.1
GATHER_S = 0.005
LABEL = "io.gpubox.job"
MASK = "[MASKED]"


def ts_ns(ts: str) -> int:
    """Docker's RFC 3339 nanosecond timestamp as integer nanoseconds (trailing zeros vary)."""
    head, _, frac = ts.rstrip("Z").partition(".")
    whole = models.parse_time(head + "Z")
    assert whole is not None
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


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


def secret_values(job: dict[str, Any]) -> list[str]:
    """What must never show in a job's stored output: its secrets and its registry password."""
    values = list((job.get("secrets") or {}).values())
    if job.get("auth") and job["auth"].get("password"):
        values.append(job["auth"]["password"])
    return values


class LineBuffer:
    """Lines from both streams, handed out in batches with consecutive sequence numbers."""

    def __init__(self, first_seq: int) -> None:
        self._cond = threading.Condition()
        self._lines: list[tuple[int, str, str, str]] = []
        self._bytes = 0
        self.next_seq = first_seq

    def add(self, ts: str, stream: str, text: str) -> None:
        with self._cond:
            for piece in protocol.split_line(text):
                self._lines.append((ts_ns(ts), ts, stream, piece))
                self._bytes += len(piece)
            count = len(self._lines)
            if count == 1 or count >= BATCH_LINES or self._bytes >= BATCH_BYTES:
                self._cond.notify()

    def take(self, wait_s: float) -> list[tuple[int, list[list[str]]]]:
        """Wait up to wait_s for lines, then return all pending ones as batches of
        (first seq, [[ts, stream, line], …]), ordered by timestamp within the take."""
        with self._cond:
            # Wait for a first line, then briefly for its companions: a quiet job's line goes
            # out at once, a chatty job's lines still travel in full batches.
            self._cond.wait_for(lambda: self._lines, wait_s)
            if self._lines and len(self._lines) < BATCH_LINES and self._bytes < BATCH_BYTES:
                self._cond.wait(GATHER_S)
            pending, self._lines, self._bytes = self._lines, [], 0
        pending.sort(key=lambda item: item[0])
        batches: list[tuple[int, list[list[str]]]] = []
        current: list[list[str]] = []
        size = 0
        for _, ts, stream, text in pending:
            if current and (len(current) >= BATCH_LINES or size + len(text) > BATCH_BYTES):
                batches.append((self.next_seq, current))
                self.next_seq += len(current)
                current, size = [], 0
            current.append([ts, stream, text])
            size += len(text)
        if current:
            batches.append((self.next_seq, current))
            self.next_seq += len(current)
        return batches


class StreamReader:
    """Follows one stream (stdout or stderr) of a container into a LineBuffer.

    Docker splits lines over 16 KiB into pieces that share a timestamp and lack the newline;
    the pieces are joined here. It remembers the last timestamp seen and how many entries had
    it, so `catch_up` can read what a live follow missed without repeating a line.
    """

    def __init__(self, container: Any, stream: str, buffer: LineBuffer, mask: Masker) -> None:
        self.container = container
        self.stream = stream
        self.buffer = buffer
        self.mask = mask
        self.last_ns = 0
        self.at_last = 0
        self.last_ts = ""
        self._pending = b""
        self._pending_ts = ""
        self.thread = threading.Thread(target=self._follow, daemon=True, name=f"logs-{stream}")

    def _entries(self, **kwargs: Any) -> Iterable[bytes]:
        return self.container.logs(  # type: ignore[no-any-return]
            stdout=self.stream == "stdout",
            stderr=self.stream == "stderr",
            stream=True,
            timestamps=True,
            **kwargs,
        )

    def _follow(self) -> None:
        try:
            for entry in self._entries(follow=True):
                self._take(entry)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("following %s of %s stopped: %s", self.stream, self.container.short_id, exc)

    def _take(self, entry: bytes) -> None:
        raw_ts, _, data = entry.partition(b" ")
        ts = raw_ts.decode("ascii", "replace")
        ns = ts_ns(ts)
        if ns == self.last_ns:
            self.at_last += 1
        else:
            self.last_ns, self.at_last, self.last_ts = ns, 1, ts
        if not self._pending:
            self._pending_ts = ts
        self._pending += data
        if self._pending.endswith(b"\n"):
            self._emit_pending()

    def _emit_pending(self) -> None:
        # Whole lines only: Docker's 16 KiB pieces are joined first, so a secret across a
        # piece boundary is masked too. NUL cannot be stored in PostgreSQL text.
        text = self._pending.decode("utf-8", "replace").replace("\x00", "\ufffd")
        self._pending = b""
        self.buffer.add(self._pending_ts, self.stream, self.mask(text.removesuffix("\n")))

    def catch_up(self) -> None:
        """After the container exited: read entries the follow missed, then flush a last
        line that had no newline."""
        since = self.last_ns / 1e9 - 0.001 if self.last_ns else None
        skip_ns, skip = self.last_ns, self.at_last
        try:
            for entry in self._entries(follow=False, since=since) if since else self._entries():
                ns = ts_ns(entry.partition(b" ")[0].decode("ascii", "replace"))
                if ns < skip_ns:
                    continue
                if ns == skip_ns and skip > 0:
                    skip -= 1
                    continue
                self._take(entry)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning(
                "reading the rest of %s of %s failed: %s", self.stream, self.container.short_id, exc
            )
        if self._pending:
            self._emit_pending()


class DockerRuntime:
    """Runs job attempts as Docker containers through the docker SDK."""

    def __init__(
        self,
        worker_name: str,
        stop_grace_s: float = 10.0,
        client: docker.DockerClient | None = None,
        tee: IO[str] | None = None,
    ) -> None:
        self.worker_name = worker_name
        self.stop_grace_s = stop_grace_s
        self.client = client or docker.from_env()
        self.tee = tee or sys.stderr
        self._tee_lock = threading.Lock()

    def run(self, job: dict[str, Any], emit: Emit, cancel: threading.Event) -> None:
        """Run one attempt to its end; always emits exactly one "done" last."""
        executed_at: str | None = None
        buffer = LineBuffer(job["first_seq"])
        outcome: dict[str, Any]
        container = None
        try:
            pull_error = self._ensure_image(job["image"], job.get("auth"))
            if pull_error is not None:
                outcome = {
                    "status": "ERROR",
                    "error": f"could not pull image {job['image']!r}: {pull_error}",
                }
            elif cancel.is_set():
                outcome = {"status": "CANCELLED", "error": "cancelled before the container started"}
            else:
                container = self._create(job)
                container.start()
                executed_at = models.format_time(models.utcnow())
                emit("started", {"container": container.id, "executed_at": executed_at})
                outcome = self._watch(job, container, buffer, emit, cancel)
        except docker.errors.APIError as exc:
            outcome = {
                "status": "ERROR",
                "error": f"docker refused the container: {exc.explanation or exc}",
            }
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            outcome = {"status": "ERROR", "error": f"docker failed: {exc}"}
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except docker.errors.DockerException as exc:
                    log.warning("could not remove container %s: %s", container.short_id, exc)
        self._flush(job, buffer, emit, container, wait_s=0)
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

    def _ensure_image(self, image: str, auth: dict[str, str] | None) -> str | None:
        """Pull the image unless it is here already; None on success, else Docker's reason."""
        try:
            self.client.images.get(image)
            return None
        except docker.errors.ImageNotFound:
            pass
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
            # Docker's own explanation; auth_config is never part of it or of any log line.
            return str(exc.explanation or exc)

    def _create(self, job: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {
            "command": job.get("command"),
            "environment": {**(job.get("env") or {}), **(job.get("secrets") or {})},
            "init": True,
            "detach": True,
            "labels": {
                LABEL: str(job["id"]),
                f"{LABEL}.attempt": str(job["attempt"]),
                "io.gpubox.worker": self.worker_name,
            },
        }
        if job["gpus"]:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(device_ids=list(job["gpus"]), capabilities=[["gpu"]])
            ]
            kwargs["environment"] = {
                **kwargs["environment"],
                "NVIDIA_VISIBLE_DEVICES": ",".join(job["gpus"]),
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            }
        return self.client.containers.create(job["image"], **kwargs)

    def _watch(
        self,
        job: dict[str, Any],
        container: Any,
        buffer: LineBuffer,
        emit: Emit,
        cancel: threading.Event,
    ) -> dict[str, Any]:
        mask = Masker(secret_values(job))
        readers = [StreamReader(container, s, buffer, mask) for s in protocol.STREAMS]
        for reader in readers:
            reader.thread.start()
        exited = threading.Event()
        result: dict[str, Any] = {}

        def wait() -> None:
            try:
                result.update(container.wait())
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                result["Error"] = {"Message": str(exc)}
            exited.set()

        threading.Thread(target=wait, daemon=True, name=f"wait-{job['id']}").start()
        deadline = time.monotonic() + job["timeout"] if job.get("timeout") else None
        stopped_for: str | None = None
        while not exited.is_set():
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
            if stopped_for is None and cancel.is_set():
                stopped_for = "cancel"
            elif stopped_for is None and deadline is not None and time.monotonic() >= deadline:
                stopped_for = "timeout"
            else:
                continue
            threading.Thread(target=self._stop, args=(container,), daemon=True).start()
        for reader in readers:
            reader.thread.join(timeout=10)
            reader.catch_up()
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

    def _stop(self, container: Any) -> None:
        try:
            container.stop(timeout=int(round(self.stop_grace_s)))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("stopping container %s failed: %s", container.short_id, exc)

    def _flush(
        self, job: dict[str, Any], buffer: LineBuffer, emit: Emit, container: Any, wait_s: float
    ) -> None:
        batches = buffer.take(wait_s)
        if not batches:
            return
        short = container.short_id if container is not None else "-"
        prefix = f"job={job['id']} container={short}"
        with self._tee_lock:
            for _, lines in batches:
                self.tee.write("".join(f"{prefix} {s}: {text}\n" for _, s, text in lines))
            self.tee.flush()
        for seq, lines in batches:
            emit("lines", {"seq": seq, "lines": lines})
