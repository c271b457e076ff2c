"""Webhooks over real HTTP: a job's start and end POSTed to a receiver on this machine,
signed with HMAC-SHA256, retried after a 5xx, given up at a 4xx, never redirected; the
coordinator's allow list and its own webhooks; every attempt visible on the job. Both
stores."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox.coordinator import webhooks
from tests.conftest import Cluster, wait_until
from tests.test_api import JOBS, request

SECRET = "a-receivers-secret-0123"
WORKER = {"runtime": "process"}


class Receiver(http.server.ThreadingHTTPServer):
    """Records each POST (path, headers, body); answers the statuses in `answers` in turn
    (then 200), or redirects where `redirect` is set."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.redirect = ""
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def events(self) -> list[str]:
        return [headers["X-Gpubox-Event"] for _, headers, _ in self.got]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append((self.path, dict(self.headers), body))
        if self.server.redirect:
            self.send_response(302)
            self.send_header("Location", self.server.redirect)
        else:
            self.send_response(self.server.answers.pop(0) if self.server.answers else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.shutdown()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "FIRST_RETRY_S", 0.2)


def hook(url: str, *events: str) -> dict[str, Any]:
    return {"url": url, "secret": SECRET, "events": list(events or ["end"])}


def signed(secret: str, headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Gpubox-Signature-256"], expected)


def deliveries(cluster: Cluster, job_id: int) -> list[dict[str, Any]]:
    return list(cluster.client.call("GET", f"{JOBS}/{job_id}/webhooks")["deliveries"])


def test_a_jobs_start_and_end_reach_its_webhook_signed(
    make_cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    cluster = make_cluster(
        workers=1, worker_settings=WORKER, webhook_allow=f"{receiver.url}/hooks/"
    )
    url = f"{receiver.url}/hooks/ci-42"
    job = cluster.submit("-", ["sh", "-c", "exit 3"], webhooks=[hook(url, "start", "end")])
    assert job["webhooks"] == [{"url": url, "events": ["start", "end"]}]  # no secret shown
    wait_until(lambda: len(receiver.got) == 2, 20, "both deliveries")
    assert receiver.events() == ["job.started", "job.ended"]
    for path, headers, body in receiver.got:
        assert path == "/hooks/ci-42" and signed(SECRET, headers, body)
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["delivery"] == headers["X-Gpubox-Delivery"]
    ended = json.loads(receiver.got[1][2])
    assert ended["event"] == "job.ended" and ended["job"]["id"] == job["id"]
    assert ended["job"]["status"] == "ERROR" and ended["job"]["result"]["exit_code"] == 3
    shown = deliveries(cluster, job["id"])
    assert [(d["event"], d["state"], d["attempts"]) for d in shown] == [
        ("job.started", "delivered", 1),
        ("job.ended", "delivered", 1),
    ]
    store = cluster.coordinator.store
    assert store is not None
    assert all(d.secret is None for d in store.job_deliveries(job["id"]))  # erased when done
    assert SECRET not in json.dumps(cluster.client.job(job["id"]))


def test_a_failed_delivery_is_retried_a_refused_one_is_not_and_redirects_are_not_followed(
    make_cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    other = Receiver()
    try:
        cluster = make_cluster(workers=1, worker_settings=WORKER, webhook_allow=receiver.url)
        receiver.answers = [503, 500]
        retried = cluster.submit("-", ["true"], webhooks=[hook(f"{receiver.url}/a")])
        wait_until(
            lambda: [d["state"] for d in deliveries(cluster, retried["id"])] == ["delivered"],
            30,
            "the third attempt",
        )
        [shown] = deliveries(cluster, retried["id"])
        assert shown["attempts"] == 3 and shown["last_status"] == 200
        assert len({headers["X-Gpubox-Delivery"] for _, headers, _ in receiver.got}) == 1

        receiver.answers = [404]
        refused = cluster.submit("-", ["true"], webhooks=[hook(f"{receiver.url}/b")])
        wait_until(lambda: deliveries(cluster, refused["id"]), 20, "the delivery")
        wait_until(
            lambda: deliveries(cluster, refused["id"])[0]["state"] == "failed", 20, "given up"
        )
        [shown] = deliveries(cluster, refused["id"])
        assert shown["attempts"] == 1 and shown["last_status"] == 404

        receiver.redirect = f"{other.url}/internal"
        moved = cluster.submit("-", ["true"], webhooks=[hook(f"{receiver.url}/c")])
        wait_until(
            lambda: [d["state"] for d in deliveries(cluster, moved["id"])] == ["failed"],
            20,
            "the redirect refused",
        )
        assert other.got == []
    finally:
        other.shutdown()


def test_webhooks_only_to_allowed_prefixes_and_off_without_an_allow_list(
    make_cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    off = make_cluster(workers=0)
    body = {"name": "x", "docker": {"image": "i"}, "webhooks": [hook(f"{receiver.url}/hooks/a")]}
    answer = request(off, "POST", JOBS, body)
    assert answer.status == 400 and "webhooks are off" in answer.body["error"]["message"]
    cluster = make_cluster(workers=0, webhook_allow=f"{receiver.url}/hooks")
    for url, status in (
        (f"{receiver.url}/hooks/a", 201),
        (f"{receiver.url}/hooks", 201),
        (f"{receiver.url}/hooks-evil/a", 400),
        ("http://169.254.169.254/latest/meta-data", 400),
        (f"{receiver.url}.evil.example/hooks/a", 400),
    ):
        body["webhooks"] = [hook(url)]
        answer = request(cluster, "POST", JOBS, body)
        assert answer.status == status, (url, answer.body)
        if status == 400:
            assert answer.body["error"]["field"] == "webhooks[0].url"
    for bad in (
        [{"url": f"{receiver.url}/hooks/a", "secret": "short"}],
        [{"url": f"{receiver.url}/hooks/a", "secret": SECRET, "events": ["queued"]}],
        [{"url": "ftp://x/hooks", "secret": SECRET}],
        [hook(f"{receiver.url}/hooks/{i}") for i in range(6)],
    ):
        body["webhooks"] = bad
        assert request(cluster, "POST", JOBS, body).status == 400, bad


def test_the_coordinators_own_webhooks_hear_of_every_jobs_end(
    make_cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    cluster = make_cluster(workers=1, worker_settings=WORKER, webhooks=f"{receiver.url}/all")
    jobs = [cluster.submit("-", ["true"]) for _ in range(3)]
    wait_until(lambda: len(receiver.got) == 3, 20, "three deliveries")
    secret = (Path(cluster.coordinator.config.state_dir) / "webhook.secret").read_text().strip()
    seen = sorted(json.loads(body)["job"]["id"] for _, _, body in receiver.got)
    assert seen == sorted(j["id"] for j in jobs)
    assert all(signed(secret, headers, body) for _, headers, body in receiver.got)
    assert set(receiver.events()) == {"job.ended"}


def test_submit_webhook_from_the_cli_and_show_lists_its_deliveries(
    make_cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    import os
    import subprocess
    import sys

    cluster = make_cluster(workers=1, worker_settings=WORKER, webhook_allow=receiver.url)
    env = {**os.environ, "GPUBOX_URL": cluster.url, "GPUBOX_TOKEN": cluster.token}

    def gpubox(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpubox", *args],
            env={**env, **more},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    unset = gpubox("submit", "--webhook", f"{receiver.url}/x", "-", "true")
    assert unset.returncode == 2 and "GPUBOX_WEBHOOK_SECRET" in unset.stderr
    done = gpubox(
        "submit",
        "--follow",
        "--webhook",
        f"{receiver.url}/x",
        "--webhook-events",
        "start,end",
        "-",
        "true",
        GPUBOX_WEBHOOK_SECRET=SECRET,
    )
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(receiver.got) == 2, 20, "both deliveries")
    assert all(signed(SECRET, headers, body) for _, headers, body in receiver.got)
    job_id = json.loads(receiver.got[0][2])["job"]["id"]
    wait_until(
        lambda: all(d["state"] == "delivered" for d in deliveries(cluster, job_id)), 10, "done"
    )
    shown = gpubox("show", str(job_id))
    assert f"job.ended    {receiver.url}/x  delivered, 1 attempt(s), last: HTTP 200" in shown.stdout
