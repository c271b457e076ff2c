"""Webhooks: a job's start and end told to the URLs it named (and the coordinator's own),
each delivery a JSON POST signed with HMAC-SHA256, retried with backoff for a day.

The dispatcher works from the store alone, so that no code path that starts or ends a job
needs to know of it: it turns the events of jobs that have started or ended (jobs.hooks_due)
into deliveries, then sends those due. A delivery is done at a 2xx answer; a connection error,
a timeout, or an answer of 408, 429 or 5xx is tried again after 10 s, 20 s, 40 s … (at most
an hour apart) until a day has passed; any other answer is final (the receiver refused it).

Each POST carries, as GitHub's webhooks do:
    X-Gpubox-Event: job.started | job.ended
    X-Gpubox-Delivery: a UUID, the same in every attempt (for the receiver's duplicate check)
    X-Gpubox-Signature-256: sha256=<HMAC-SHA256 of the body with the webhook's secret, hex>
Redirects are not followed: the URL the allow list let through is the one called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from gpubox import __version__, errors, models
from gpubox.coordinator.sealing import Sealer
from gpubox.logfmt import fields
from gpubox.store import Store
from gpubox.supervise import Loop

log = logging.getLogger(__name__)

START, END = 1, 2  # jobs.hooks_due bits
EVENTS = {"start": ("job.started", START), "end": ("job.ended", END)}
TIMEOUT_S = 10.0  # one attempt's connect-and-answer time
FIRST_RETRY_S = 10.0
MAX_RETRY_S = 3600.0
GIVE_UP_S = 24 * 3600.0
RETRIED = {408, 429}  # and every 5xx
IDLE_S = 1.0  # how often the dispatcher looks for new events when nothing is due sooner


# In the state folder: the key the coordinator's own webhooks (the setting `webhooks`) sign with.
SECRET_FILE = "webhook.secret"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the API needs to accept a job's webhooks: the URL prefixes they may call (none:
    webhooks off), and the coordinator's own webhooks with their signing secret."""

    allow: tuple[str, ...] = ()
    defaults: tuple[str, ...] = ()
    secret: str = ""

    @property
    def active(self) -> bool:
        """Whether any job can have a webhook (and so the dispatcher must run)."""
        return bool(self.allow or self.defaults)

    @classmethod
    def load(cls, allow: str, defaults: str, state_dir: str) -> Settings:
        """From the settings' comma-separated lists; the secret from <state_dir>/webhook.secret,
        made (random, mode 0600) when there are default webhooks and it does not exist."""
        split = lambda text: tuple(u.strip() for u in text.split(",") if u.strip())  # noqa: E731
        secret = ""
        if defaults:
            path = Path(state_dir) / SECRET_FILE
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32) + "\n")
            secret = path.read_text().strip()
        return cls(split(allow), split(defaults), secret)

    def add_to(self, spec: models.JobSpec) -> models.JobSpec:
        """The spec with its webhooks checked against the allow list (errors.BadInput naming
        the first refused), and the coordinator's own webhooks added."""
        for index, hook in enumerate(spec.webhooks):
            if not self.allow:
                raise errors.BadInput(
                    "webhooks are off on this coordinator (its webhook_allow setting is empty)",
                    "webhooks",
                )
            if not allowed(hook["url"], list(self.allow)):
                raise errors.BadInput(
                    f"webhooks[{index}].url {hook['url']!r} is not under one of the coordinator's"
                    f" webhook_allow prefixes: {', '.join(self.allow)}",
                    f"webhooks[{index}].url",
                )
        if not self.defaults:
            return spec
        own = [{"url": url, "secret": self.secret, "events": ["end"]} for url in self.defaults]
        return dataclasses.replace(spec, webhooks=[*spec.webhooks, *own])


def allowed(url: str, allow: list[str]) -> bool:
    """Whether `url` starts with one of the coordinator's allowed prefixes (webhook_allow).
    A prefix ends at a "/" boundary, so https://ci.example.com allows neither
    https://ci.example.com.evil.net nor https://ci.example.com:8443."""
    for prefix in allow:
        if prefix.endswith("/") and url.startswith(prefix):
            return True
        if url == prefix or url.startswith(prefix + "/"):
            return True
    return False


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx is an answer like any other: not followed


_OPENER = urllib.request.build_opener(_NoRedirect())


class Dispatcher:
    """The webhook thread's work: events into deliveries, deliveries out. (The coordinator's
    own webhooks, the setting `webhooks`, were added to each job when it was submitted.)"""

    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        stopping: threading.Event,
        loop: Loop,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.stopping = stopping
        self.loop = loop
        self.wake = threading.Event()

    def run(self) -> None:
        """Until the coordinator stops. A turn that fails (the store away, most often) is
        logged, and the next one tries again a second later."""
        while not self.stopping.is_set():
            self.loop.tick()
            try:
                self.turn_events_into_deliveries()
                self.send_due(models.utcnow())
                wait = self._seconds_to_next()
            except errors.Deposed:
                raise  # another coordinator leads and delivers now
            except Exception as exc:  # the store away, most often: the next turn retries
                log.warning("webhooks: %s", exc)
                wait = IDLE_S
            self.wake.wait(wait)
            self.wake.clear()

    def _seconds_to_next(self) -> float:
        due = self.store.next_delivery_at()
        if due is None:
            return IDLE_S
        return max(0.0, min(IDLE_S, (due - models.utcnow()).total_seconds()))

    def turn_events_into_deliveries(self) -> None:
        """One delivery per webhook and event for each job that has started or ended."""
        for job, due in self.store.webhook_events_due():
            happened = (START if job.executed_at is not None else 0) | (
                END if job.status.terminal else 0
            )
            now_due = due & happened
            if not now_due:
                continue
            secrets = self.sealer.webhook_secrets(job)
            deliveries = []
            for hook, secret in zip(job.spec.webhooks, secrets, strict=False):
                for name in hook.get("events", ()):
                    event, bit = EVENTS[name]
                    if now_due & bit:
                        deliveries.append(self._delivery(job, hook["url"], event, secret))
            self.store.add_deliveries(job.id, due, due & ~now_due, deliveries)

    def _delivery(
        self, job: models.Job, url: str, event: str, secret: str
    ) -> models.WebhookDelivery:
        delivery = str(uuid.uuid4())
        now = models.utcnow()
        body = {"event": event, "delivery": delivery, "job": job.to_dict()}
        return models.WebhookDelivery(
            job_id=job.id,
            url=url,
            event=event,
            delivery=delivery,
            payload=json.dumps(body),
            secret=self.sealer.seal_text(secret),
            next_at=now,
            created_at=now,
        )

    def send_due(self, now: datetime) -> None:
        for delivery in self.store.due_deliveries(now):
            if self.stopping.is_set():
                return
            self.loop.tick()
            self.attempt(delivery)

    def attempt(self, delivery: models.WebhookDelivery) -> None:
        """One POST of one delivery, and what it gave, recorded."""
        body = delivery.payload.encode()
        secret = self.sealer.unseal_text(delivery.secret) if delivery.secret else ""
        request = urllib.request.Request(delivery.url, data=body, method="POST")
        for name, value in (
            ("Content-Type", "application/json"),
            ("User-Agent", f"gpubox/{__version__}"),
            ("X-Gpubox-Event", delivery.event),
            ("X-Gpubox-Delivery", delivery.delivery),
            ("X-Gpubox-Signature-256", signature(secret, body)),
        ):
            request.add_header(name, value)
        status: int | None = None
        error: str | None = None
        try:
            with _OPENER.open(request, timeout=TIMEOUT_S) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:  # refused, reset, timed out, no such host
            error = str(getattr(exc, "reason", exc))[:500]
        now = models.utcnow()
        if status is not None and 200 <= status < 300:
            state, error = "delivered", None
        elif status is not None and status < 500 and status not in RETRIED:
            state = "failed"  # the receiver refused it: trying again would not help
        elif (now - delivery.created_at).total_seconds() >= GIVE_UP_S:
            state = "failed"
        else:
            state = "pending"
        wait = min(MAX_RETRY_S, FIRST_RETRY_S * 2**delivery.attempts)
        self.store.record_attempt(
            delivery.id, state, status, error, now + timedelta(seconds=wait), now
        )
        if state != "delivered":
            log.warning(
                "webhook %s of job %d to %s: %s (%s)",
                delivery.event,
                delivery.job_id,
                delivery.url,
                error or f"HTTP {status}",
                "given up" if state == "failed" else f"again in {wait:g} s",
                extra=fields(job=delivery.job_id),
            )
