"""The workers the broker is connected to, as it sees them."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta
from typing import Any

from gpubox import models


@dataclasses.dataclass(frozen=True)
class Link:
    """Who sent a message: its connection (the ROUTER's routing id) and the worker whose
    CURVE key it was authenticated with."""

    routing_id: bytes
    key: str
    name: str


@dataclasses.dataclass
class Peer:
    """A connected worker: one session, from its HELLO until it is lost or says HELLO again."""

    name: str
    routing_id: bytes
    session: str
    key: str
    version: str
    gpus: list[dict[str, Any]]
    labels: dict[str, str]
    max_jobs: int
    last_seen: float
    prefetch: int = 0  # jobs it holds ready beyond max_jobs (its HELLO says)
    last_sent: float = 0.0  # when the coordinator last sent it anything (time.monotonic)
    mounts: list[str] = dataclasses.field(default_factory=list)
    runtime: str = "docker"
    # Whether each of its HEARTBEATs gets an answer: its liveness (from HELLO) is unknown or
    # too short for the broker's own beats alone (see Broker.step).
    answer_beats: bool = True
    usage: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # uuid → NVML now
    ready: bool = False
    free_gpus: list[str] = dataclasses.field(default_factory=list)
    slots: int = 0
    known: set[int] = dataclasses.field(default_factory=set)  # job ids the worker said it holds
    assigned: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # job id → GPU uuids
    # Jobs sent and not started yet, in the order sent: job id → (priority, attempt). With
    # prefetch, those beyond its free slots are the ones it holds (see held()).
    unstarted: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Jobs sent whose receipt the worker has not confirmed yet: job id → (attempt, sent at).
    unconfirmed: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    # Why this session gets no more jobs ("" while it may): it was sent a job and never
    # confirmed it. A new HELLO (a new session) starts clean.
    quarantined: str = ""  # why it gets no jobs, until quarantined_until (time.monotonic)
    quarantined_until: float = 0.0
    offer_key: tuple[Any, ...] | None = None  # scheduler.WorkerView.offer(), once known

    def capacity(self) -> tuple[list[str], int]:
        """Free GPUs and job slots, counting jobs sent since the worker's last READY."""
        pending = [job_id for job_id in self.assigned if job_id not in self.known]
        taken = {uuid for job_id in pending for uuid in self.assigned[job_id]}
        return [g for g in self.free_gpus if g not in taken], self.slots - len(pending)

    def held(self) -> list[tuple[int, tuple[int, int]]]:
        """The prefetched jobs it holds until a slot frees, as (job id, (priority, attempt)),
        lowest priority last: of the jobs not started yet, those beyond its free slots (it
        starts them highest priority first, then in the order sent)."""
        if not self.prefetch or not self.unstarted:
            return []
        running = len(self.assigned) - len(self.unstarted)
        waiting = len(self.unstarted) - max(0, self.max_jobs - running)
        if waiting <= 0:
            return []
        # The worker starts its highest priority first: those left are the lowest.
        ordered = sorted(self.unstarted.items(), key=lambda item: -item[1][0])
        return ordered[-waiting:]

    def heard_at(self) -> datetime:
        """When this worker was last heard from, as a wall-clock time."""
        return models.utcnow() - timedelta(seconds=time.monotonic() - self.last_seen)

    def info(self, connected: bool) -> models.WorkerInfo:
        return models.WorkerInfo(
            name=self.name,
            version=self.version,
            gpus=self.gpus,
            labels=self.labels,
            max_jobs=self.max_jobs,
            connected=connected,
            last_seen=self.heard_at(),  # a lost worker's: not when it was declared lost
            mounts=self.mounts,
        )
