"""What the API's routes work with: the store, the broker, and the settings the app was made
with (see make_app, which builds one Context and hands it to each group of routes)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from gpubox import models
from gpubox.coordinator import sealing, webhooks
from gpubox.coordinator.events import Changes
from gpubox.coordinator.streams import Streams
from gpubox.store import Store


class LiveView(Protocol):
    """What the broker knows that the store does not (coordinator.brokerview.BrokerView)."""

    def queue_reason(self, job: models.Job) -> str: ...

    def queue_state(self, job: models.Job, place: bool, recent: bool) -> dict[str, Any]:
        """{"queue_reason": …} and, with `place`, {"queue_place": …} of a QUEUED job: one
        question, where an HTTP process of its own would ask the broker process twice."""
        ...

    def queue_in_order(self, limit: int) -> list[models.Job]: ...

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]: ...

    def metrics_page(self) -> str: ...

    def last_heard(self, worker: str) -> datetime | None: ...

    def quarantine(self, worker: str) -> str: ...

    def stalled(self) -> str: ...

    def last_turn_s(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class Context:
    """The parts and settings of one app (make_app's arguments say what each one is)."""

    store: Store
    changes: Changes
    poke: Callable[[str, int], None]
    sealer: sealing.Sealer
    state_dir: str
    max_body_bytes: int
    stopping: threading.Event
    live: LiveView | None
    streams: Streams  # serves log follow streams and long polls, without a thread each
    queue_timeout: float  # for a job that names none (0: never)
    webhooks: webhooks.Settings  # which URLs jobs' webhooks may call; the coordinator's own
