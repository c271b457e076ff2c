#!/usr/bin/env python3
"""Prints how long a line takes from `echo` inside a container to a `follow=1` client.

Starts a coordinator and a worker in this process (SQLite in a temporary folder, the local
busybox image), runs a job that prints a line every 20 ms, follows it over HTTP as NDJSON, and
reports p50/p95/max of (time received - Docker's timestamp of the line). That path includes
Docker's log copier, the worker's batching (at most 100 ms), the link, the store and the wake-up
of the follower. Also prints how long storing and reading back 20,000 lines takes.

    python3 scripts/bench_follow.py [--lines 200] [--image gpubox-busybox:latest]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpubox import config as cfg  # noqa: E402
from gpubox.client import Client  # noqa: E402
from gpubox.coordinator.server import Coordinator  # noqa: E402
from gpubox.worker.agent import Agent  # noqa: E402
from gpubox.worker.runner import DockerRuntime, ts_ns  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--image", default="gpubox-busybox:latest")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        coordinator = Coordinator(
            cfg.CoordinatorConfig(
                state_dir=state,
                db=f"sqlite:///{state}/gpubox.db",
                http="127.0.0.1:0",
                bind="tcp://127.0.0.1:*",
            )
        )
        coordinator.start()
        worker_config = cfg.WorkerConfig(coordinator=coordinator.link_endpoint, name="bench")
        agent = Agent(worker_config, DockerRuntime("bench", tee=io.StringIO()), [])
        threading.Thread(target=agent.run, daemon=True).start()
        agent.connected.wait(10)
        token = (Path(state) / "token").read_text().strip()
        client = Client(coordinator.http_url, token)
        try:
            latency(client, coordinator.http_url, token, args)
            volume(client, args.image)
        finally:
            agent.stop()
            coordinator.stop()


def latency(client: Client, url: str, token: str, args: argparse.Namespace) -> None:
    script = f"for i in $(seq 1 {args.lines}); do echo $i; sleep 0.02; done"
    job = client.submit(
        {"name": "bench", "docker": {"image": args.image, "command": ["sh", "-c", script]}}
    )
    request = urllib.request.Request(
        f"{url}/api/v1/jobs/{job['id']}/logs?follow=1&format=ndjson",
        headers={"Authorization": f"Bearer {token}"},
    )
    delays = []
    with urllib.request.urlopen(request, timeout=120) as stream:
        for raw in stream:
            if raw.strip():
                received = time.time_ns()
                delays.append((received - ts_ns(json.loads(raw)["ts"])) / 1e6)
    delays.sort()
    p95 = delays[int(len(delays) * 0.95) - 1]
    print(
        f"echo in container -> follow client: n={len(delays)}  "
        f"p50={statistics.median(delays):.1f} ms  p95={p95:.1f} ms  max={delays[-1]:.1f} ms"
    )


def volume(client: Client, image: str) -> None:
    started = time.monotonic()
    job = client.submit(
        {"name": "bench-20k", "docker": {"image": image, "command": ["seq", "1", "20000"]}}
    )
    while client.job(job["id"])["status"] not in ("FINISHED", "ERROR", "CANCELLED"):
        time.sleep(0.02)
    stored = time.monotonic() - started
    started = time.monotonic()
    count = sum(1 for _ in client.logs(job["id"]))
    read = time.monotonic() - started
    print(
        f"20,000-line job, submit -> FINISHED with all lines stored: {stored:.2f} s; "
        f"reading {count} lines back: {read:.2f} s"
    )


if __name__ == "__main__":
    main()
