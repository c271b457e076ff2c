"""Several coordinators on one PostgreSQL store: one leads (runs the broker), the others stand
by, serve the HTTP API and take over; the epoch fences a deposed leader's writes; wake-ups
cross coordinators through LISTEN/NOTIFY; workers given every coordinator find the leader.
(The chaos run with SIGKILL and SIGSTOP is tests/test_failover.py.)"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from gpubox import cli, errors, keys, models
from gpubox import config as cfg
from gpubox.client import Client
from gpubox.coordinator import leader
from gpubox.coordinator.server import Coordinator
from gpubox.store import leases, open_store
from gpubox.worker import gpu, wiring
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture()
def coordinators(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Coordinator]]:
    """A factory of started coordinators on one store, sharing one key pair and allow list
    (as the README says to install them); all stopped after the test."""
    shared = tmp_path / "shared"
    keys.init(str(shared))
    started: list[Coordinator] = []

    def start(**settings: Any) -> Coordinator:
        state = tmp_path / f"c{len(started)}"
        (state / "keys").mkdir(parents=True)
        for name in ("coordinator.key", "coordinator.key_secret"):
            (state / "keys" / name).write_bytes((shared / "keys" / name).read_bytes())
        (state / "keys" / "allowed").symlink_to(shared / "keys" / "allowed")
        config = cfg.CoordinatorConfig(
            state_dir=str(state),
            db=pg_url,
            http="127.0.0.1:0",
            bind="tcp://127.0.0.1:*",
            heartbeat_interval_s=0.5,
            liveness_s=3.0,
            **settings,
        )
        coordinator = Coordinator(config)
        coordinator.start()
        started.append(coordinator)
        return coordinator

    yield start
    for coordinator in started:
        coordinator.stop()


def client(coordinator: Coordinator) -> Client:
    token = (Path(coordinator.config.state_dir) / "token").read_text().strip()
    return Client(coordinator.http_url, token)


def metrics(coordinator: Coordinator) -> str:
    with client(coordinator)._open("GET", "/metrics") as answer:
        return str(answer.read().decode())


def worker(coordinator: Coordinator, addresses: list[str], name: str = "w1") -> Any:
    state = coordinator.config.state_dir
    keys.add_worker(state, name)
    config = cfg.WorkerConfig(
        coordinator=",".join(addresses),
        coordinator_key=str(keys.coordinator_files(state)[0]),
        name=name,
        state_dir=state,
        runtime="process",
        heartbeat_interval_s=0.5,
        liveness_s=3.0,
        resend_s=1.0,
        stop_grace_s=2.0,
        fake_gpus="0",
    )
    config.validate()
    return wiring.start_worker(config, source=gpu.FakeGpus("0", name, state))


def submit(api: Client, command: str) -> int:
    spec = {"name": "t", "docker": {"image": "none", "command": ["sh", "-c", command]}}
    return int(api.submit(spec, retry_for_s=0)["id"])


def test_one_leads_the_others_stand_by_and_serve_http(
    coordinators: Callable[..., Coordinator],
) -> None:
    first, second = coordinators(), coordinators()
    assert first.leads and not second.leads
    listed = client(second).coordinators()
    assert listed["store"] == "postgresql"
    assert [c["leader"] for c in listed["coordinators"]] == [True, False]
    assert listed["leader"]["id"] == listed["coordinators"][0]["id"]
    assert listed["leader"]["epoch"] >= 1
    assert listed["coordinators"][1]["link"] == second.link_endpoint
    # The standby's /metrics says what it is; the leader's has the broker's too.
    standby_page = metrics(second)
    assert "gpubox_coordinator_leader 0" in standby_page
    leader_page = metrics(first)
    assert "gpubox_coordinator_leader 1" in leader_page and "gpubox_jobs" in leader_page


def test_gpubox_coordinators_lists_them_and_the_leader(
    coordinators: Callable[..., Coordinator],
) -> None:
    first, second = coordinators(), coordinators()
    token = (Path(second.config.state_dir) / "token").read_text().strip()
    # The first URL is a port where no coordinator answers: the client moves on.
    urls = f"http://127.0.0.1:1,{second.http_url}"
    result = CliRunner().invoke(
        cli.main, ["coordinators", "--url", urls, "--token", token], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    listed = client(first).coordinators()
    lead = listed["leader"]
    assert lines[0] == f"leader: {lead['id']}, epoch {lead['epoch']}, since {lead['since']}"
    assert lines[1].split() == [
        "ID",
        "ROLE",
        "HTTP",
        "WORKER",
        "LINK",
        "PID",
        "TAKEOVERS",
        "LAST",
        "SEEN",
    ]
    roles = {line.split()[0]: line.split()[1] for line in lines[2:]}
    assert roles == {
        c["id"]: ("leader" if c["leader"] else "standby") for c in listed["coordinators"]
    }
    assert roles[lead["id"]] == "leader" and len(roles) == 2


def test_a_job_submitted_through_a_standby_runs_and_its_follow_there_is_live(
    coordinators: Callable[..., Coordinator],
) -> None:
    first, second = coordinators(), coordinators()
    # The standby first in its list: it says "standby", and the worker moves on.
    agent, thread = worker(second, [second.link_endpoint, first.link_endpoint])
    try:
        wait_until(agent.connected.is_set, 10, "the worker to find the leader")
        assert agent.link.endpoint == first.link_endpoint
        job_id = submit(client(second), "for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done")
        seen: list[tuple[float, str]] = []
        for line in client(second)._records(job_id, 0, follow=True):
            if line.get("end"):
                break
            seen.append((time.monotonic(), line["line"]))
        assert [text for _, text in seen] == [f"line {i}" for i in range(1, 6)]
        # Live, not at the end: the lines came about 0.3 s apart, through the standby.
        assert seen[-1][0] - seen[0][0] > 0.8
        assert client(second).job(job_id)["status"] == "FINISHED"
    finally:
        agent.stop()
        thread.join(timeout=30)


def test_a_standby_with_http_processes_serves_and_follows_live(
    coordinators: Callable[..., Coordinator],
) -> None:
    first, second = coordinators(), coordinators(http_processes=2)
    assert not second.leads
    agent, thread = worker(first, [first.link_endpoint])
    try:
        wait_until(agent.connected.is_set, 10, "the worker to connect")
        job_id = submit(client(second), "for i in 1 2 3 4; do echo n$i; sleep 0.3; done")
        seen = []
        for line in client(second)._records(job_id, 0, follow=True):
            if line.get("end"):
                assert line["status"] == "FINISHED"
                break
            seen.append((time.monotonic(), line["line"]))
        assert [text for _, text in seen] == ["n1", "n2", "n3", "n4"]
        assert seen[-1][0] - seen[0][0] > 0.6  # live, through the standby's HTTP processes
        queued = client(second).call("GET", "/api/v1/jobs", status="QUEUED")
        assert queued["jobs"] == []
    finally:
        agent.stop()
        thread.join(timeout=30)


def test_a_clean_stop_of_the_leader_hands_over_at_once(
    coordinators: Callable[..., Coordinator],
) -> None:
    first, second = coordinators(), coordinators()
    agent, thread = worker(first, [first.link_endpoint, second.link_endpoint])
    try:
        wait_until(agent.connected.is_set, 10, "the worker to connect")
        stopped = time.monotonic()
        first.stop()
        wait_until(lambda: second.leads, 5, "the standby to lead")
        took = time.monotonic() - stopped
        assert took < 2.0, took
        wait_until(
            lambda: agent.connected.is_set() and agent.link.endpoint == second.link_endpoint,
            15,
            "the worker to move to the new leader",
        )
        job_id = submit(client(second), "echo after")
        job = wait_until(
            lambda: (j := client(second).job(job_id))["status"] == "FINISHED" and j, 20, "the job"
        )
        assert [line["line"] for line in client(second).logs(job_id)] == ["after"]
        assert job["worker"] == "w1"
        page = metrics(second)
        assert "gpubox_coordinator_takeovers_total 1" in page
    finally:
        agent.stop()
        thread.join(timeout=30)


def test_a_deposed_leaders_writes_are_refused(pg_url: str) -> None:
    """The fence: the broker thread of an old epoch cannot claim, start or end anything once
    another epoch leads, whatever the clocks say; other threads' writes go on."""
    old, new = open_store(pg_url), open_store(pg_url)
    assert isinstance(old, leases.LeaseStore) and isinstance(new, leases.LeaseStore)
    try:
        epoch = old.take_lead("old", 30.0)
        assert epoch is not None
        assert new.take_lead("new", 30.0) is None  # the lease runs
        outcome: list[BaseException | None] = []

        def fenced_write() -> None:
            old.fence(epoch)
            try:
                old.coordinator_seen("old")  # any write of this thread
                outcome.append(None)
            except errors.Deposed as exc:
                outcome.append(exc)

        thread = threading.Thread(target=fenced_write)
        thread.start()
        thread.join()
        assert outcome == [None]  # it leads: it writes
        # It froze past its lease: the lease ran out, and another took over.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE leadership SET lease_until = now() - interval '1 second'")
        assert new.take_lead("new", 30.0) == epoch + 1
        assert not old.renew_lead(epoch, 30.0)
        thread = threading.Thread(target=fenced_write)
        thread.start()
        thread.join()
        assert isinstance(outcome[-1], errors.Deposed), outcome
        old.coordinator_seen("old")  # an unfenced thread (the HTTP API's) still writes
    finally:
        old.close()
        new.close()


def frozen_in_a_transaction(
    store: leases.LeaseStore, epoch: int, seconds: float
) -> tuple[threading.Thread, list[errors.StoreError]]:
    """A thread of `store`'s leader (in `epoch`) idle inside a fenced transaction for
    `seconds`, as a process under SIGSTOP; it is in the transaction when this returns. Its
    list gets the StoreError that ended it, if the server ended its session."""
    inside, outcome = threading.Event(), []

    def frozen() -> None:
        store.fence(epoch)
        try:
            with store.batch():
                inside.set()
                time.sleep(seconds)
        except errors.StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=frozen)
    thread.start()
    assert inside.wait(10)
    return thread, outcome


def test_a_leader_frozen_inside_a_transaction_does_not_hold_off_the_takeover(
    pg_url: str,
) -> None:
    """A fenced transaction holds the leadership row FOR SHARE; frozen inside it, the old
    leader would block the new one's UPDATE for as long as it stays frozen. PostgreSQL ends
    the idle transaction once the guard (the lease's length, here 1 s) has passed."""
    old, new = open_store(pg_url, idle_transaction_s=1.0), open_store(pg_url)
    assert isinstance(old, leases.LeaseStore) and isinstance(new, leases.LeaseStore)
    try:
        epoch = old.take_lead("old", 30.0)
        assert epoch is not None
        thread, outcome = frozen_in_a_transaction(old, epoch, 5.0)
        asked = time.monotonic()
        expire_the_lease(pg_url)  # this waits for the row as a takeover's does
        assert new.take_lead("new", 30.0) == epoch + 1
        assert time.monotonic() - asked < 3.5  # the guard (1 s), not the whole freeze (5 s)
        thread.join()
        assert outcome and isinstance(outcome[0], errors.StoreError)  # its session was ended
    finally:
        old.close()
        new.close()


def test_two_standbys_waiting_on_a_frozen_leader_make_one_takeover(pg_url: str) -> None:
    """Two standbys find the lease run out while a frozen leader's fenced transaction holds
    the row; both wait until the server ends that session (the 1 s guard). One takes the
    lead, with a lease that starts when it got the row, not when it began to wait: the other,
    which gets the row just after, finds that lease running and stays a standby."""
    old = open_store(pg_url, idle_transaction_s=1.0)
    a, b = open_store(pg_url), open_store(pg_url)
    assert isinstance(old, leases.LeaseStore)
    assert isinstance(a, leases.LeaseStore) and isinstance(b, leases.LeaseStore)
    try:
        epoch = old.take_lead("old", 0.2)
        assert epoch is not None
        holder, _ = frozen_in_a_transaction(old, epoch, 2.5)
        time.sleep(0.4)  # the lease runs out
        taken: dict[str, int | None] = {}
        standbys = [
            threading.Thread(target=lambda s=store, n=name: taken.update({n: s.take_lead(n, 0.6)}))
            for store, name in ((a, "a"), (b, "b"))
        ]
        for thread in standbys:
            thread.start()
        for thread in standbys:
            thread.join(10)
        assert sorted(taken.values(), key=str) == [epoch + 1, None], taken
        holder.join()
    finally:
        for store in (old, a, b):
            store.close()


def test_a_renewal_waits_for_the_row_a_quarter_of_the_lease_at_most(pg_url: str) -> None:
    """A renewal that finds the row held (here by a fenced transaction frozen for 3 s) gives
    up after a quarter of the lease (2 s: 0.5 s) and says the store is unavailable; the next
    turn tries again. Had it waited, it would have got the row once the server ended the
    frozen one (the 1 s guard), and held it itself if it froze meanwhile."""
    store = open_store(pg_url, idle_transaction_s=1.0)
    assert isinstance(store, leases.LeaseStore)
    try:
        epoch = store.take_lead("old", 2.0)
        assert epoch is not None
        holder, _ = frozen_in_a_transaction(store, epoch, 3.0)
        began = time.monotonic()
        with pytest.raises(errors.StoreUnavailable, match="lock timeout"):
            store.renew_lead(epoch, 2.0)
        assert 0.4 < time.monotonic() - began < 0.9
        holder.join()
        assert store.renew_lead(epoch, 2.0)  # the row is free again
    finally:
        store.close()


def test_a_batch_whose_session_the_server_ended_never_says_it_committed(pg_url: str) -> None:
    """The broker's reports are stored in one batch, a report that fails alone left out, and
    acknowledged once the batch committed. A leader frozen inside one, its session ended by
    the server (the guard), woke, failed its next report, and left the batch without an
    error: psycopg commits nothing, quietly, on a broken connection. It acknowledged the
    others, and their workers forgot jobs the store still held as running. Now the batch
    raises, and the error of the session's end is StoreUnavailable, not one report's."""
    store = open_store(pg_url, idle_transaction_s=1.0)
    assert isinstance(store, leases.LeaseStore)
    try:
        epoch = store.take_lead("old", 60.0)
        assert epoch is not None
        store.fence(epoch)
        failed: list[errors.StoreError] = []
        lost = pytest.raises(errors.StoreUnavailable, match="nothing of it was committed")
        with lost, store.batch():
            store.give_up_lead(epoch)  # a write that would show
            time.sleep(1.5)  # idle in the transaction past the guard
            try:
                store.coordinator_seen("old")
            except errors.StoreError as exc:  # as a report that fails alone is
                failed.append(exc)
        assert [type(exc) for exc in failed] == [errors.StoreUnavailable], failed
        store.fence(None)
        assert store.leader().live  # the lease was not given up: nothing was committed
    finally:
        store.close()


def test_a_renewal_under_way_when_the_leader_stops_does_not_undo_its_give_up(
    pg_url: str,
) -> None:
    """A clean stop gives the lease up so that another coordinator leads at once. A renewal
    that began just before the stop, and ended after the give-up, renewed the lease given
    up: the others waited for it to run out (a takeover of 2.04 s against 2). give_up() now
    waits for the turn under way, and no turn renews after it."""
    store = open_store(pg_url)
    assert isinstance(store, leases.LeaseStore)
    renewing, stopping = threading.Event(), threading.Event()

    class SlowRenewals:
        """The store, each renewal taking 0.3 s before it is sent."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def renew_lead(self, epoch: int, lease_s: float) -> bool:
            renewing.set()
            time.sleep(0.3)
            return store.renew_lead(epoch, lease_s)

    now = models.utcnow()
    me = leases.CoordinatorRow("me", "host", 1, "http://x", "tcp://x", now, now, 0)
    lead = leader.Leadership(SlowRenewals(), me, 30.0, lambda epoch: None, stopping)  # type: ignore[arg-type]
    try:
        lead.start()
        assert lead.epoch is not None
        lead.every_s = 0.01
        thread = threading.Thread(target=lead.run)
        thread.start()
        assert renewing.wait(5)  # a renewal is under way
        stopping.set()
        lead.give_up()
        thread.join(5)
        assert not store.leader().live  # given up, and not renewed since
    finally:
        stopping.set()
        store.close()


def expire_the_lease(pg_url: str) -> None:
    """End the leader's lease now, waiting at most 10 s for the leadership row."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("UPDATE leadership SET lease_until = now() - interval '1 second'")


# A leader that writes log lines as fast as it can, in batches of 1,000, in its fenced
# transactions (as the broker does while jobs print).
LOG_WRITER = """
import sys
from datetime import datetime, timezone
from gpubox.store import open_store
from gpubox import validate
store = open_store(sys.argv[1], idle_transaction_s=1.0)
now = datetime.now(timezone.utc)
job = store.create_job(validate.parse_spec({"name": "log", "docker": {"image": "none"}}), now)
store.claim_job(job.id, "w1", [], now)
epoch = store.take_lead("writer", 30.0)
store.fence(epoch)
print(epoch, flush=True)
lines = [("2026-12-07T00:00:00.000000Z", "stdout", "x" * 80)] * 1000
seq = 1
while True:
    store.append_logs(job.id, 1, seq, lines)
    seq += len(lines)
"""


def test_a_leader_frozen_at_any_moment_of_its_log_writes_is_taken_over_in_time(
    pg_url: str,
) -> None:
    """Frozen halfway through a statement, a leader is not idle, and idle_in_transaction's
    guard does not end its session: a COPY of log lines waits for its rows, a pipeline
    (psycopg's executemany) for its next statement, and either held the fence's row, and so
    every takeover, for as long as the freeze lasted. The store sends neither. A leader
    writing log lines is frozen at five moments picked at random; each time, another
    coordinator takes over within the guard (1 s) and a margin."""
    new = open_store(pg_url)
    assert isinstance(new, leases.LeaseStore)
    rng = random.Random(7)
    waits = []
    try:
        for _ in range(5):
            expire_the_lease(pg_url)  # the last round's, held by `new`
            writer = subprocess.Popen(
                [sys.executable, "-c", LOG_WRITER, pg_url], stdout=subprocess.PIPE, text=True
            )
            try:
                assert writer.stdout is not None
                epoch = int(writer.stdout.readline())
                time.sleep(rng.uniform(0.2, 0.5))
                writer.send_signal(signal.SIGSTOP)
                asked = time.monotonic()
                expire_the_lease(pg_url)  # this waits for the row as a takeover's does
                assert new.take_lead("new", 30.0) == epoch + 1
                waits.append(round(time.monotonic() - asked, 2))
            finally:
                writer.kill()
                writer.wait(10)
        assert max(waits) < 2.5, waits
    finally:
        new.close()


def test_a_leader_that_finds_another_epoch_ends(
    coordinators: Callable[..., Coordinator], pg_url: str
) -> None:
    first = coordinators()
    assert first.leadership is not None
    # What a frozen leader finds when it wakes: another epoch leads.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE leadership SET epoch = epoch + 1, holder = 'someone-else'")
    dead = wait_until(
        lambda: next((t for t in first.threads if not t.is_alive()), None), 10, "a thread to end"
    )
    assert dead.name in ("gpubox-leadership", "gpubox-broker")
    assert "Deposed" in dead.reason


def test_a_standby_answers_a_worker_that_knows_only_it(
    coordinators: Callable[..., Coordinator], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = coordinators(), coordinators()
    agent, thread = worker(second, [second.link_endpoint])
    try:
        wait_until(lambda: "stands by" in caplog.text, 10, "the refusal in the log")
        assert not agent.connected.is_set()
        assert first.leads
    finally:
        agent.stop()
        thread.join(timeout=30)


def test_the_sqlite_store_lists_no_coordinators(tmp_path: Path) -> None:
    state = tmp_path / "s"
    keys.init(str(state))
    config = cfg.CoordinatorConfig(
        state_dir=str(state),
        db=f"sqlite:///{state}/gpubox.db",
        http="127.0.0.1:0",
        bind="tcp://127.0.0.1:*",
    )
    coordinator = Coordinator(config)
    coordinator.start()
    try:
        token = (state / "token").read_text().strip()
        request = urllib.request.Request(
            f"{coordinator.http_url}/api/v1/coordinators",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer) == {"store": "sqlite", "leader": None, "coordinators": []}
    finally:
        coordinator.stop()
