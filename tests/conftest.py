"""Fixtures that start the real parts: a coordinator (Waitress + ZeroMQ + SQLite) on free
loopback ports, and workers running real Docker containers from the local busybox image.

Two layers: `-m "not docker"` runs without a Docker engine. A test reaches Docker only through
the `docker_client` fixture (directly, through `image`, or through a cluster's Docker worker),
and only a test marked `docker` may: any other fails with a message saying so, and sees a
DOCKER_HOST that leads nowhere (for the programs it starts), so the markers stay true."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import zmq

from gpubox import config as cfg
from gpubox import keys, protocol, supervise
from gpubox.client import Client
from gpubox.coordinator import tokens
from gpubox.coordinator.server import Coordinator
from gpubox.store import open_store, sql
from gpubox.worker import gpu, wiring
from gpubox.worker.agent import Agent

IMAGE = os.environ.get("GPUBOX_TEST_IMAGE", "gpubox-busybox:latest")
TERMINAL = ("FINISHED", "ERROR", "CANCELLED")
# The PostgreSQL database the tests may use (scripts/test makes a fresh one per run); each test
# gets its own schema in it. GPUBOX_TEST_PG=skip runs only the SQLite half.
PG_URL = os.environ.get("GPUBOX_TEST_PG", "postgresql:///gpubox_test?host=/var/run/postgresql")
BACKENDS = ["sqlite", "postgresql"]


class PgAdmin:
    """Runs statements on the test database, each on a fresh connection (a test may restart
    the server under it)."""

    def execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_admin() -> PgAdmin:
    """The test database's administrator; fails the test when there is no PostgreSQL."""
    if PG_URL == "skip":
        pytest.skip("GPUBOX_TEST_PG=skip")
    import psycopg

    try:
        psycopg.connect(PG_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"no PostgreSQL at {PG_URL} ({exc}): run scripts/test, which starts one")
    return PgAdmin()


@pytest.fixture(scope="session")
def single_file() -> Path:
    """dist/gpubox, built from this checkout by scripts/build once per test run: the install
    and systemd tests share it."""
    from tests.single_file import build

    return build()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL for an empty store of each backend: a SQLite file in tmp_path, or a fresh
    schema in the PostgreSQL test database (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gpubox.db"
        return
    admin = request.getfixturevalue("pg_admin")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture()
def pg_url(pg_admin: PgAdmin) -> Iterator[str]:
    """A fresh, empty schema in the PostgreSQL test database (dropped after the test)."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    pg_admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    pg_admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture()
def store(db_url: str) -> Iterator[sql.SqlStore]:
    """An empty store of each backend (see db_url), closed after the test."""
    opened = open_store(db_url)
    assert isinstance(opened, sql.SqlStore)
    try:
        yield opened
    finally:
        opened.close()


# Where a test not marked docker finds "the Docker engine": a socket that does not exist.
NO_DOCKER_HOST = "unix:///nonexistent/test-not-marked-docker.sock"


def refuse_docker(node: pytest.Item, what: str = "the Docker engine") -> None:
    """Fail the test `node` unless it is marked docker: the not-docker layer must pass where
    there is no engine."""
    if node.get_closest_marker("docker") is None:
        pytest.fail(
            f"{node.nodeid} uses {what} but is not marked docker: add @pytest.mark.docker "
            '(`pytest -m "not docker"` must pass without an engine)',
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _docker_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """In a test not marked docker, docker.from_env fails the test, and DOCKER_HOST (which the
    programs it starts inherit) leads nowhere."""
    if request.node.get_closest_marker("docker") is not None:
        return

    def from_env(*args: Any, **kwargs: Any) -> docker.DockerClient:
        refuse_docker(request.node, "docker.from_env")
        raise AssertionError("unreachable")

    monkeypatch.setattr(docker, "from_env", from_env)
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER_HOST)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """The one client of the test run; tests ask for it through `docker_client`."""
    try:
        client = docker.DockerClient.from_env()
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"test image {IMAGE} is missing: run scripts/test (it builds it)")
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine ({exc}): run scripts/test, which starts dockerd")
    yield client
    client.close()


@pytest.fixture()
def docker_client(request: pytest.FixtureRequest) -> docker.DockerClient:
    """The Docker engine; only for tests marked docker."""
    refuse_docker(request.node)
    return request.getfixturevalue("docker_engine")  # type: ignore[no-any-return]


@pytest.fixture()
def image(docker_client: docker.DockerClient) -> str:
    return IMAGE


def wire_job(**fields: Any) -> protocol.WireJob:
    """A job as a worker receives it in JOB, for a runtime driven by a test alone: an id no
    other test uses, no GPUs, no secrets; `fields` set any of WireJob's fields."""
    values: dict[str, Any] = {
        "id": 1_000_000 + uuid.uuid4().int % 1_000_000_000,
        "attempt": 1,
        "name": "test",
        "image": IMAGE,
        "command": ["true"],
        "env": {},
        "secrets": {},
        "auth": None,
        "gpus": [],
        "timeout": None,
        "first_seq": 1,
        "container": {"mounts": []},
        "submitter": None,
    }
    return protocol.WireJob(**{**values, **fields})


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float = 30.0,
    what: str | Callable[[], str] = "",
    every_s: float = 0.02,
) -> Any:
    """Poll until predicate() is truthy; its value. Fails the test after timeout_s, saying
    `what` it waited for (a callable: asked then, to tell what it last saw). The tests' one
    polling helper."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout_s} s waiting for {said or predicate}")
        time.sleep(every_s)


def remove_containers(client: docker.DockerClient, workers: set[str], owner: str = "") -> None:
    """Remove the job containers these workers left running (a plain stop leaves them); with
    `owner` (a coordinator's key fingerprint) only those of that coordinator's jobs, so that
    tests running at once, whose workers have the same names, keep each their own.
    (The low-level list: `containers.list` inspects each container after listing them, and
    fails when one is removed in between, as a worker does once its DONE is acknowledged.)"""
    for name in workers:
        labels = [f"io.gpubox.worker={name}"]
        if owner:
            labels.append(f"io.gpubox.coordinator={owner}")
        for container in client.api.containers(all=True, filters={"label": labels}):
            try:
                client.api.remove_container(container["Id"], force=True)
            except docker.errors.NotFound:
                pass  # gone meanwhile
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: its worker is removing it right now
                    raise


@dataclasses.dataclass
class Cluster:
    """A running coordinator with its workers, and a client holding its admin token."""

    coordinator: Coordinator
    client: Client
    url: str
    token: str
    context: zmq.Context
    # How to reach the Docker engine, asked only once a Docker worker (or the test) needs it;
    # None for a cluster that never may.
    get_docker: Callable[[], docker.DockerClient] | None = None
    agents: list[tuple[Agent, supervise.Essential]] = dataclasses.field(default_factory=list)
    _docker_client: docker.DockerClient | None = dataclasses.field(default=None, repr=False)

    @property
    def docker_client(self) -> docker.DockerClient:
        if self._docker_client is None:
            if self.get_docker is None:
                pytest.fail("this cluster has no Docker engine", pytrace=False)
            self._docker_client = self.get_docker()
        return self._docker_client

    @property
    def local_token_name(self) -> str:
        """The name of the coordinator's local admin token (its own on a PostgreSQL store,
        which several coordinators may share)."""
        config = self.coordinator.config
        return tokens.local_name(config.state_dir, config.db.startswith("postgresql"))

    def add_worker(self, **settings: Any) -> Agent:
        """Start a worker on this coordinator; settings override WorkerConfig fields."""
        name = settings.get("name") or f"worker-{len(self.agents) + 1}"
        state = self.coordinator.config.state_dir
        if "key_file" not in settings:
            keys.add_worker(state, name)
        fields = {
            "coordinator": self.coordinator.link_endpoint,
            "name": name,
            "state_dir": state,
            "heartbeat_interval_s": 0.5,
            "liveness_s": 3.0,
            "resend_s": 1.0,
            "stop_grace_s": 2.0,
            "fake_gpus": "0",
            **settings,
        }
        config = cfg.WorkerConfig(**fields)
        config.validate()
        agent, thread = wiring.start_worker(
            config,
            source=gpu.FakeGpus(config.fake_gpus, config.name, config.state_dir),
            tee=io.StringIO(),
            docker_client=self.docker_client if config.runtime == "docker" else None,
            gpu_devices=False,  # fake GPUs: Docker here has no NVIDIA runtime
            context=self.context,
        )
        self.agents.append((agent, thread))
        wait_until(agent.connected.is_set, 10, "the worker to connect")
        return agent

    def submit(self, image: str, command: Any = None, **fields: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": fields.pop("name", "test"), "docker": {"image": image}}
        if command is not None:
            spec["docker"]["command"] = command
        spec["docker"].update(fields.pop("docker", {}))
        spec.update(fields)
        # Not sent again on a 5xx: a test that stops the store wants to see the refusal.
        return self.client.submit(spec, retry_for_s=0)

    def wait(
        self, job_id: int, statuses: tuple[str, ...] = TERMINAL, timeout_s: float = 60
    ) -> dict[str, Any]:
        """The job once its status is one of `statuses`."""
        return wait_until(  # type: ignore[no-any-return]
            lambda: (job := self.client.job(job_id))["status"] in statuses and job,
            timeout_s,
            f"job {job_id} to reach {statuses}",
        )

    def lines(self, job_id: int) -> list[dict[str, Any]]:
        return list(self.client.logs(job_id))

    def stop(self) -> None:
        for agent, _ in self.agents:
            agent.stop()
        for _, thread in self.agents:
            thread.join(timeout=30)
        self.coordinator.stop()
        # An agent thread that failed is logged, not raised: say so here, or a test could
        # pass on a worker that died along the way.
        failed = [
            f"{a.name}: {t.reason}" for a, t in self.agents if t.reason not in ("", "it returned")
        ]
        assert not failed, f"agent threads failed: {failed}"
        if self._docker_client is not None:
            owners = {agent.runtime.owner for agent, _ in self.agents}
            for owner in owners:
                remove_containers(
                    self._docker_client,
                    {agent.name for agent, _ in self.agents if agent.runtime.owner == owner},
                    owner,
                )


@pytest.fixture()
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str
) -> Iterator[Callable[..., Cluster]]:
    """A factory: make_cluster(workers=1, **coordinator_settings) → a started Cluster. Its
    workers run Docker containers (the test must be marked docker) unless worker_settings say
    runtime="process"; make_cluster(workers=0) needs no Docker."""
    clusters: list[Cluster] = []
    context = zmq.Context()

    def make(
        workers: int = 1, worker_settings: dict[str, Any] | None = None, **settings: Any
    ) -> Cluster:
        state = tmp_path / f"state-{len(clusters)}"
        fields = {
            "state_dir": str(state),
            "db": db_url if not clusters else f"sqlite:///{state}/gpubox.db",
            "http": "127.0.0.1:0",
            "bind": "tcp://127.0.0.1:*",
            "http_threads": 48,
            "heartbeat_interval_s": 0.5,
            "liveness_s": 3.0,
            **settings,
        }
        config = cfg.CoordinatorConfig(**fields)
        config.validate()
        keys.init(str(state))
        coordinator = Coordinator(config)
        coordinator.start()
        token = (state / "token").read_text().strip()
        cluster = Cluster(
            coordinator,
            Client(coordinator.http_url, token),
            coordinator.http_url,
            token,
            context,
            lambda: request.getfixturevalue("docker_client"),
        )
        clusters.append(cluster)
        for _ in range(workers):
            cluster.add_worker(**(worker_settings or {}))
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
    context.destroy(linger=0)


@pytest.fixture()
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A coordinator with one worker (max 4 jobs, no GPUs)."""
    return make_cluster()


@pytest.fixture()
def nosuid_dir() -> Iterator[Path]:
    """A folder on a filesystem mounted nosuid,nodev, as a worker's writable mount must be
    (config.check_mount_folders): a tmpfs of its own where the tests run as root, else a
    folder in one the box has (the user's runtime folder, /dev/shm)."""
    if os.geteuid() == 0:
        # Not in tmp_path, whose parents only root may enter: tests run programs from here
        # as other users.
        path = Path(tempfile.mkdtemp(prefix="gpubox-nosuid-"))
        options = "nosuid,nodev,size=64m"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        yield path
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()
        return
    for base in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if base and os.access(base, os.W_OK) and cfg.setuid_risk(base) is None:
            with tempfile.TemporaryDirectory(dir=base) as folder:
                yield Path(folder)
            return
    pytest.skip("no nosuid,nodev folder to write to: run the tests as root")
