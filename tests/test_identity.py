"""Who may do what: each attack of issue 19 played against the real parts, and refused.

- A submit token cancels only the jobs it submitted (each job records its submitter).
- A process-runtime worker runs jobs as an unprivileged user, and gets only jobs whose
  token may use process workers: a label alone never sends a job there.
- A worker key claims at most what it was enrolled with (labels, GPUs, mounts); a worker
  that takes jobs and never confirms them is quarantined; HELLO and READY values are bounded.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from gpubox import errors, keys, models, validate
from gpubox.client import ApiError, Client
from gpubox.coordinator import tokens
from gpubox.worker import process, process_user
from tests.conftest import IMAGE, Cluster, wait_until
from tests.test_broker import FakeWorker, Link, serve

pytestmark = pytest.mark.timeout(60)

NO_IMAGE = "ignored-by-the-process-runtime"


def token_client(cluster: Cluster, name: str, **options: Any) -> Client:
    """A client holding a new token NAME (role submit unless `role` says otherwise)."""
    return Client(cluster.url, tokens.create(cluster.coordinator.store, name, **options))


def spec(command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    docker: dict[str, Any] = {"image": IMAGE}
    if command is not None:
        docker["command"] = command
    return {"name": "identity", "docker": docker, **fields}


# --- 12: a submit token cancels only its own jobs -------------------------------------------------


def test_a_submit_token_cannot_cancel_another_tokens_job(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    alice, bob = token_client(cluster, "a"), token_client(cluster, "b")
    job = alice.submit(spec(labels={"zone": "nowhere"}))  # stays queued
    with pytest.raises(ApiError) as refused:  # the attack
        bob.cancel(job["id"])
    assert (refused.value.status, refused.value.code) == (403, "not_your_job")
    assert "submitted by token 'a'" in refused.value.message
    assert alice.job(job["id"])["status"] == "QUEUED"

    assert job["submitter"] == "a"
    assert bob.job(job["id"])["submitter"] == "a"  # reads stay team-wide
    assert [j["submitter"] for j in bob.jobs(None, 10, None)["jobs"]] == ["a"]

    assert alice.cancel(job["id"])["status"] == "CANCELLED"
    # an admin token cancels anyone's
    other = bob.submit(spec(labels={"zone": "nowhere"}))
    assert cluster.client.cancel(other["id"])["status"] == "CANCELLED"
    # an unknown job is still a 404, not a 403
    with pytest.raises(ApiError) as missing:
        bob.cancel(999_999)
    assert missing.value.status == 404


def test_a_job_stored_before_submitters_were_recorded_is_cancelled_by_admins_only(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    old = store.create_job(
        validate.parse_spec({"name": "old", "docker": {"image": IMAGE}}), models.utcnow()
    )
    assert old.spec.submitter is None
    someone = token_client(cluster, "someone")
    assert someone.job(old.id)["submitter"] is None
    with pytest.raises(ApiError) as refused:
        someone.cancel(old.id)
    assert (refused.value.status, refused.value.code) == (403, "not_your_job")
    assert "only an admin token can cancel it" in refused.value.message
    assert cluster.client.cancel(old.id)["status"] == "CANCELLED"


# --- 5: a process worker runs jobs as an unprivileged user, for allowed tokens only ---------


def expected_uid() -> int:
    """The uid a process worker with the default process_user runs jobs as."""
    return pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()


def test_a_label_alone_never_sends_a_job_to_a_process_worker(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    cluster.add_worker(name="host-box", runtime="process", labels="box=host")
    plain = token_client(cluster, "plain")
    # The attack: a plain submit token names the process worker's label.
    attack = plain.submit(spec(["sh", "-c", "id -u; cat /etc/shadow"], labels={"box": "host"}))
    reason = wait_until(
        lambda: "token" in (why := plain.job(attack["id"]).get("queue_reason") or "") and why,
        10,
        "the scheduler's reason",
    )
    assert reason.endswith(
        "cannot run it: its token may not use process workers (an admin"
        " makes one that may with gpubox token create NAME --allow-process)"
    )
    assert "--allow-process" in reason
    trusted = token_client(cluster, "trusted", allow_process=True)
    allowed = trusted.submit(spec(["id", "-u"], labels={"box": "host"}))
    done = cluster.wait(allowed["id"])
    assert (done["status"], done["worker"]) == ("FINISHED", "host-box"), done
    assert done["allow_process"] is True
    assert [line["line"] for line in cluster.lines(allowed["id"])] == [str(expected_uid())]
    assert expected_uid() != 0
    job = plain.job(attack["id"])
    assert (job["status"], job["worker"], job["allow_process"]) == ("QUEUED", None, False)


def test_the_process_user_is_never_root() -> None:
    with pytest.raises(errors.ConfigError, match="never runs jobs as root"):
        process.job_user("root")
    with pytest.raises(errors.ConfigError, match="never runs jobs as root"):
        process.job_user("0")
    with pytest.raises(errors.ConfigError, match="no user 'no-such-user-here'"):
        process.job_user("no-such-user-here")
    default = process.job_user("")
    assert default.uid == expected_uid() and default.uid != 0
    assert default.switch is (os.geteuid() == 0)


def test_a_worker_that_cannot_switch_users_runs_jobs_only_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As the systemd unit runs it: user gpubox, no capabilities. Its own user is the default
    # and works; any other is refused with a message that says what to do.
    nobody = pwd.getpwnam("nobody")
    me = 4242 if nobody.pw_uid != 4242 else 4243
    monkeypatch.setattr(os, "geteuid", lambda: me)
    monkeypatch.setattr(process_user, "_can_switch_users", lambda: False)
    own = process.job_user("")
    assert (own.uid, own.switch) == (me, False)
    with pytest.raises(errors.ConfigError) as refused:
        process.job_user("nobody")
    assert "cannot run jobs as nobody" in str(refused.value)
    assert "leave process_user unset" in str(refused.value)


def test_a_process_worker_refuses_to_start_with_root_as_its_process_user(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    with pytest.raises(errors.ConfigError, match="process_user: root"):
        cluster.add_worker(name="rooted", runtime="process", process_user="root")


def test_an_admin_tokens_jobs_may_use_process_workers_and_tokens_say_so(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    token_client(cluster, "trusted", allow_process=True)
    token_client(cluster, "plain")
    listed = {t.name: t for t in store.list_tokens()}
    assert listed["trusted"].allow_process and listed["trusted"].may_use_process
    assert not listed["plain"].may_use_process
    local = cluster.local_token_name
    assert listed[local].may_use_process  # an admin token
    job = cluster.client.submit(spec(["true"]))
    assert (job["submitter"], job["allow_process"]) == (local, True)
    stored = store.get_job(job["id"])
    assert (stored.spec.submitter, stored.spec.allow_process) == (local, True)


# --- 13: a worker key claims no more than its enrolment; unconfirmed jobs quarantine ---------


@pytest.fixture()
def link(tmp_path: Path) -> Iterator[Link]:
    """A broker on a SQLite store with fake workers (tests/test_broker.py), liveness 1 s."""
    with serve(tmp_path) as state:
        yield state


def enrol(link: Link, name: str, **claims: Any) -> None:
    """Put worker NAME's key on the allow list with these claims."""
    keys.add_worker(link.keys.state_dir, name, keys.Claims(**claims))


def gpus(count: int, name: str = "NVIDIA H100 80GB HBM3") -> list[dict[str, Any]]:
    return [{"uuid": f"GPU-{i}", "name": name, "memory_mb": 81559} for i in range(count)]


def hello(fake: FakeWorker, **fields: Any) -> None:
    body = {
        "name": fake.name,
        "version": "test",
        "gpus": [],
        "labels": {},
        "max_jobs": 1,
        "running": [],
        **fields,
    }
    fake.send("HELLO", **body)


def test_a_worker_claiming_more_than_it_was_enrolled_with_is_refused(link: Link) -> None:
    enrol(link, "small", gpus=1, gpu_model="T4", labels={"zone": "a"}, mounts=["datasets"])
    job = link.create(gpus=1)  # with secrets, were it to be handed out
    cases = [
        ({"gpus": gpus(8, "Tesla T4")}, "8 GPUs, of the 1 it was enrolled with"),
        ({"gpus": gpus(1, "NVIDIA H100 80GB HBM3")}, "not of the model 'T4'"),
        ({"labels": {"zone": "a", "tier": "best"}}, "the labels tier=best"),
        ({"mounts": ["datasets", "bait"]}, "the mounts bait"),
    ]
    for fields, wanted in cases:
        liar = link.worker("small")
        liar.keepalive = False
        hello(liar, **fields)
        reason = liar.expect("REFUSED").body["reason"]
        assert wanted in reason, reason
        assert "gpubox keys worker NAME --labels" in reason
        liar.send("READY", free_gpus=["GPU-0"], slots=1, running=[])
        liar.quiet("JOB", 0.5)
        assert [p.name for p in list(link.broker.peers.values())] == []
    assert link.connected("small") is None  # never stored: its mounts count nowhere
    assert link.status(job.id) is models.Status.QUEUED

    # Within its claims it is welcome (a T4 whose name says so, fewer labels) and gets work.
    honest = link.worker("small", gpus=["GPU-0"])
    hello(honest, gpus=gpus(1, "Tesla T4"), labels={"zone": "a"}, mounts=["datasets"])
    honest.expect("WELCOME")
    honest.ready()
    assert honest.job()["id"] == job.id


def test_a_key_without_claims_may_claim_anything_as_before(link: Link) -> None:
    free = link.worker("free")
    hello(free, gpus=gpus(8), labels={"any": "thing"}, mounts=["x"])
    free.expect("WELCOME")
    assert keys.AllowList(keys.allowed_dir(link.keys.state_dir)).claims_for("free") is None


def test_claims_in_the_key_file_are_read_by_an_older_coordinator_as_a_plain_key(
    link: Link,
) -> None:
    enrol(link, "w", gpus=2, labels={"zone": "a"})
    path = keys.allowed_dir(link.keys.state_dir) / "w.key"
    public, secret = zmq.auth.load_certificate(str(path))  # what older coordinators do
    assert (
        secret is None
        and public == keys.load_secret(keys.worker_secret_file(link.keys.state_dir, "w"))[0]
    )
    assert keys.read_claims(path) == keys.Claims(labels={"zone": "a"}, gpus=2)
    # A claims line that cannot be read leaves the key out rather than without its limits.
    path.write_text(path.read_text().replace('"gpus":2', '"gpus":"lots"'))
    assert keys.AllowList(path.parent).names() == {}


def test_a_worker_that_never_confirms_a_job_is_quarantined_and_the_job_goes_elsewhere(
    link: Link, caplog: pytest.LogCaptureFixture
) -> None:
    collector = link.worker("collector", gpus=["GPU-0"])
    collector.hello()
    collector.ready()
    first = link.create(gpus=1, docker={"image": "i", "secrets": {"TOKEN": "s3cret"}})
    taken = collector.job()
    assert taken["id"] == first.id and taken["secrets"] == {"TOKEN": "s3cret"}
    # It never confirms it (no READY listing it) and keeps its session alive meanwhile.
    collector.wait_for(
        lambda: link.status(first.id) is models.Status.QUEUED, 5, "the job queued again"
    )
    errors_logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("never confirmed it" in r.getMessage() for r in errors_logged), errors_logged
    assert all(r.exc_info is None for r in errors_logged)
    (peer,) = list(link.broker.peers.values())
    assert peer.quarantined.startswith(f"it was sent job {first.id} and did not confirm it")
    assert link.broker.view.quarantine("collector") == peer.quarantined
    # Its owner sees where it went.
    (marker,) = list(link.store.read_logs(first.id))
    assert "worker collector was sent this job (attempt 1, with its secrets" in marker.line
    assert marker.stream == "gpubox"  # gpubox's own line, which no job can print

    collector.ready()  # asks again: gets nothing more this session
    honest = link.worker("honest", gpus=["GPU-1"])
    honest.hello()
    honest.ready()
    again = honest.job()
    assert (again["id"], again["attempt"]) == (first.id, 1)
    # It confirms the job, takes no other, and runs it to its end.
    honest.send("READY", free_gpus=[], slots=0, running=[first.id])
    honest.started(again)
    honest.done(again, last_seq=1)
    honest.wait_for(lambda: link.status(first.id) is models.Status.FINISHED, 3, "the job to finish")
    second = link.create()
    collector.ready()
    collector.quiet("JOB", 1.5)
    assert link.status(second.id) is models.Status.QUEUED
    # A new session starts clean.
    collector.session = "new-session"
    collector.hello()
    collector.ready()
    assert collector.job()["id"] == second.id


# --- lows: HELLO and READY values are bounded ---------------------------------------------------


def test_a_ready_with_absurd_slots_is_dropped_without_a_traceback(
    link: Link, caplog: pytest.LogCaptureFixture
) -> None:
    worker = link.worker("w")
    worker.hello()
    link.create()
    worker.send("READY", free_gpus=[], slots=2**64 - 1, running=[])
    worker.quiet("JOB", 1.5)  # a timer round came and went
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert link.broker.dropped_messages == 1
    worker.ready()  # and it still works
    worker.job()


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"gpus": gpus(100_000)}, "HELLO.gpus"),
        ({"labels": {f"k{i}": "v" for i in range(20_000)}}, "HELLO.labels"),
        ({"labels": {"k": "v" * 1000}}, "HELLO.labels"),
        ({"max_jobs": 2**40}, "HELLO.max_jobs"),
        ({"mounts": [f"m{i}" for i in range(1000)]}, "HELLO.mounts"),
    ],
    ids=["gpus", "labels", "label-length", "max-jobs", "mounts"],
)
def test_a_hello_that_claims_too_much_is_refused_and_stored_nowhere(
    link: Link, fields: dict[str, Any], what: str
) -> None:
    big = link.worker("big")
    big.keepalive = False
    hello(big, **fields)
    reason = big.expect("REFUSED", timeout_s=10).body["reason"]
    assert reason.startswith(f"its HELLO is malformed or claims too much: {what}")
    assert link.connected("big") is None


def test_a_gpu_keeps_only_the_fields_gpubox_knows(link: Link) -> None:
    worker = link.worker("w")
    padded = [{**gpu, "junk": "x" * 100_000} for gpu in gpus(2)]
    hello(worker, gpus=padded)
    worker.expect("WELCOME")
    (stored,) = link.store.list_workers()
    assert [set(gpu) for gpu in stored.gpus] == [{"uuid", "name", "memory_mb"}] * 2
    worker.send("HEARTBEAT", usage=[{"uuid": f"other-{i}", "utilization": 1} for i in range(9)])
    worker.send("HEARTBEAT", usage=[{"uuid": "GPU-0", "utilization": 50}])
    worker.wait_for(lambda: link.broker.view.gpu_usage("w"), 3, "the usage")
    assert set(link.broker.view.gpu_usage("w")) == {"GPU-0"}
