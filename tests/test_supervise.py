"""The threads a gpubox process cannot go on without: every message type has its handler,
a broker that is dead or stuck shows in /healthz, and a dead one ends the process."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpubox import protocol
from tests.conftest import Cluster, wait_until
from tests.test_http_attacks import exit_once_triggered, start


def healthz(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{cluster.url}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_every_message_type_has_exactly_one_handler(make_cluster: Callable[..., Cluster]):
    cluster = make_cluster(workers=1, worker_settings={"runtime": "process"})
    broker = cluster.coordinator.broker
    assert broker is not None
    # One entry per message class, and every class protocol decodes has one.
    assert set(broker._handlers) == set(protocol.FROM_WORKER.values())
    assert len(broker._handlers) == len(protocol.FROM_WORKER)
    agent, _ = cluster.agents[0]
    assert set(agent._handlers) == set(protocol.FROM_COORDINATOR.values())
    assert len(agent._handlers) == len(protocol.FROM_COORDINATOR)


def test_healthz_says_how_long_since_the_brokers_last_turn(make_cluster: Callable[..., Cluster]):
    cluster = make_cluster(workers=0)
    status, body = healthz(cluster)
    assert status == 200 and body["status"] == "ok"
    assert 0 <= body["broker_last_turn_s"] < 1


def test_a_dead_broker_makes_healthz_503_with_why(
    make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
):
    cluster = make_cluster(workers=0)
    broker = cluster.coordinator.broker
    assert broker is not None

    def broken(now: float) -> None:
        raise RuntimeError("injected")

    # step() runs outside any guard, at every turn: this ends the broker thread.
    monkeypatch.setattr(broker, "step", broken)
    wait_until(lambda: healthz(cluster)[0] == 503, 10, "/healthz to say 503")
    status, body = healthz(cluster)
    assert body["status"] == "unavailable"
    assert body["reason"] == "the broker thread stopped (RuntimeError: injected)"


def test_a_stuck_broker_makes_healthz_503_until_it_turns_again(
    make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
):
    cluster = make_cluster(workers=0, heartbeat_interval_s=0.3, liveness_s=2.0)
    broker = cluster.coordinator.broker
    assert broker is not None
    real_step = broker.step
    stuck = {"left": 1}

    def slow(now: float) -> None:
        if stuck["left"]:
            stuck["left"] = 0
            time.sleep(3)  # three heartbeat intervals are 0.9 s
        real_step(now)

    monkeypatch.setattr(broker, "step", slow)
    wait_until(lambda: healthz(cluster)[0] == 503, 5, "/healthz to say 503")
    assert "the broker thread has not turned its loop for" in healthz(cluster)[1]["reason"]
    wait_until(lambda: healthz(cluster)[0] == 200, 10, "/healthz to say ok again")


@pytest.mark.slow
@pytest.mark.serial
def test_a_dead_broker_thread_ends_the_process_with_its_reason(tmp_path: Path):
    trigger = tmp_path / "fail-now"
    prelude = f"""
import os
from gpubox.coordinator import broker
real_step = broker.Broker.step
def step(self, now):
    if os.path.exists({str(trigger)!r}):
        raise RuntimeError("injected")
    return real_step(self, now)
broker.Broker.step = step
"""
    said = exit_once_triggered(start(tmp_path, prelude), trigger)
    assert "the gpubox-broker thread stopped (RuntimeError: injected)" in said


def test_a_message_type_without_a_handler_is_dropped_not_fatal(
    make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
):
    # A type that protocol accepts but the broker has no handler for (as when one is added
    # to protocol.FROM_WORKER alone): dropped and counted, and the broker serves on.
    cluster = make_cluster(workers=1, worker_settings={"runtime": "process"})
    broker = cluster.coordinator.broker
    assert broker is not None
    monkeypatch.delitem(broker._handlers, protocol.WorkerHeartbeat)
    before = broker.dropped_messages
    wait_until(lambda: broker.dropped_messages > before, 10, "a heartbeat to be dropped")
    assert healthz(cluster)[0] == 200
