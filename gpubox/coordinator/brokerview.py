"""The broker's state as the API reads it (api.context.LiveView): why a queued job waits and
where it stands, each connected worker's GPU usage, last word and quarantine, /metrics, and
whether the broker's loop turns. Any thread may ask. It changes nothing of the broker's
(only the broker thread does); poke() is its one message to the broker, and /metrics also
reads the store."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from gpubox import models
from gpubox.coordinator import metrics

if TYPE_CHECKING:
    from gpubox.coordinator.broker import Broker


class BrokerView:
    """A Broker, seen from the API's threads (Broker.view)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def poke(self, kind: str, job_id: int = 0) -> None:
        """Tell the broker the queue changed (Broker.poke). Any thread."""
        self._broker.poke(kind, job_id)

    def queue_reason(self, job: models.Job) -> str:
        """Why a QUEUED job waits, as of the last scheduling round. Any thread."""
        return self._broker.planner.queue_reason(job)

    def queue_in_order(self, limit: int) -> list[models.Job]:
        """The first queued jobs in the order they will start. Any thread."""
        return self._broker.planner.queue_in_order(limit)

    def queue_state(self, job: models.Job, place: bool, recent: bool) -> dict[str, Any]:
        """queue_reason and (with `place`) queue_place together (api.context.LiveView)."""
        state: dict[str, Any] = {"queue_reason": self.queue_reason(job)}
        if place:
            state["queue_place"] = self.queue_place(job, recent)
        return state

    def queue_place(self, job: models.Job, recent: bool = False) -> dict[str, Any]:
        """Where a QUEUED job stands in the fair order now. Any thread."""
        return self._broker.planner.queue_place(job, recent)

    def metrics_page(self) -> str:
        """GET /metrics. Any thread."""
        busy, free = self._broker.gpu_counts
        usage = [
            (peer.name, uuid, dict(now))
            for peer in list(self._broker.peers.values())
            for uuid, now in list(peer.usage.items())
        ]
        placements = self._broker.store.placements()
        holders = {uuid: placed.job_id for placed in placements for uuid in placed.gpu_ids}
        oldest = self._broker.store.oldest_queued()
        return metrics.render(
            self._broker.store.jobs_by_status(),
            (models.utcnow() - oldest).total_seconds() if oldest else 0.0,
            self._broker.counters,
            workers=len(self._broker.peers),
            gpus_busy=busy,
            gpus_free=free,
            dropped_messages=self._broker.dropped_messages,
            gpu_usage=usage,
            gpu_jobs=holders,
            submitters=self._broker.planner.submitters(),
        )

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]:
        """NVML's memory used, utilization, power and temperature per GPU uuid at worker's
        last heartbeat."""
        peer = self._broker.peer_named(worker)
        return {} if peer is None else dict(peer.usage)

    def last_heard(self, worker: str) -> datetime | None:
        """When a connected worker was last heard from (the store has when it connected)."""
        peer = self._broker.peer_named(worker)
        return None if peer is None else peer.heard_at()

    def stalled(self) -> str:
        """Why the broker is not serving ("" while its loop turns): its thread ended, or its
        loop has not turned for three heartbeat intervals. Any thread."""
        trouble = self._broker.loop.trouble()
        return f"the broker thread {trouble}" if trouble else ""

    def last_turn_s(self) -> float:
        """Seconds since the broker's loop last turned. Any thread."""
        return self._broker.loop.since()

    def quarantine(self, worker: str) -> str:
        """Why a connected worker gets no more jobs; "" if it may. Any thread."""
        peer = self._broker.peer_named(worker)
        return "" if peer is None else peer.quarantined
