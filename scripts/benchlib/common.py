"""What every row of scripts/bench needs: a coordinator and workers as real processes on this
machine, a client, percentiles, and the Row it prints."""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpubox import keys  # noqa: E402
from gpubox.client import Client  # noqa: E402

GPUBOX = [sys.executable, "-m", "gpubox"]
IMAGE = "gpubox-busybox:latest"


@dataclasses.dataclass
class Context:
    """How this run goes: --quick (small sizes), the store (None: SQLite in a temporary
    folder), where temporary files go."""

    quick: bool
    db: str | None
    tmp: Path
    image: str = IMAGE

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclasses.dataclass
class Row:
    """One line of the table: the figure, what gpubox measured, the reference measured in the
    same run, and the target (with whether it was met, when there is one)."""

    figure: str
    value: str
    reference: str = "—"
    target: str = "—"
    met: bool | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    """A keep-alive HTTP connection to `url`'s host and port (http://HOST:PORT)."""
    address = urlsplit(url)
    host = address.hostname or "127.0.0.1"
    return http.client.HTTPConnection(host, address.port, timeout=timeout)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class Cluster:
    """`gpubox coordinator` and `gpubox worker` processes sharing a state folder."""

    def __init__(self, ctx: Context, enrol: Sequence[str] = (), **coordinator_env: str) -> None:
        """`enrol`: workers whose keys are made before the coordinator starts. (One that
        runs reads every key file again whenever one is added: 1,000 added one by one would
        cost it 1,000 reads of up to 1,000 files.)"""
        self.ctx = ctx
        self.state = Path(tempfile.mkdtemp(prefix="gpubox-bench-", dir=ctx.tmp))
        keys.init(str(self.state))
        for name in enrol:
            keys.add_worker(str(self.state), name)
        self.processes: list[subprocess.Popen[bytes]] = []
        # A port found free can be taken before the coordinator binds it: then it exits at
        # once, and a fresh pair of ports is tried.
        for _ in range(3):
            self.http = f"127.0.0.1:{free_port()}"
            self.link = f"tcp://127.0.0.1:{free_port()}"
            self.url = f"http://{self.http}"
            env = {
                **os.environ,
                "GPUBOX_STATE_DIR": str(self.state),
                "GPUBOX_HTTP": self.http,
                "GPUBOX_BIND": self.link,
                **coordinator_env,
            }
            if ctx.db:
                env["GPUBOX_DB"] = ctx.db
            self.coordinator = self._spawn(["coordinator"], env, "coordinator")
            if self._started(deadline=time.monotonic() + 60):
                break
            self.coordinator.kill()
            self.coordinator.wait()
            self.processes.remove(self.coordinator)
            print(f"bench: no coordinator on {self.http}; other ports", file=sys.stderr)
        else:
            log = (self.state / "coordinator.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the coordinator did not start ({self.state}):\n{log}")
        self.token = (self.state / "token").read_text().strip()
        self.client = Client(self.url, self.token)

    def _started(self, deadline: float) -> bool:
        """Wait until the coordinator answers /healthz (True) or has exited (False)."""
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return True
            except OSError:
                if self.coordinator.poll() is not None or time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        """`gpubox ARGS` from this checkout (whatever gpubox the Python has installed)."""
        env = {
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
        log = open(self.state / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([*GPUBOX, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes.append(proc)
        return proc

    def add_worker(
        self, name: str, runtime: str = "process", wait: bool = True, **env: str
    ) -> None:
        """Start a worker and (unless `wait` is false) wait until the coordinator lists it as
        connected."""
        keys.add_worker(str(self.state), name)
        self._spawn(
            ["worker", "--runtime", runtime, "--name", name, "--max-jobs", env.pop("jobs", "8")],
            {
                **os.environ,
                "GPUBOX_STATE_DIR": str(self.state),
                "GPUBOX_COORDINATOR": self.link,
                **env,
            },
            f"worker-{name}",
        )
        if wait:
            self.wait_connected(name)

    def wait_connected(self, *names: str) -> None:
        """Until the coordinator lists every one of these workers as connected."""
        deadline = time.monotonic() + 60
        while True:
            connected = {w["name"] for w in self.client.workers()["workers"] if w["connected"]}
            if connected >= set(names):
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(set(names) - connected))
                raise RuntimeError(f"worker(s) {missing} did not connect: see {self.state}")
            time.sleep(0.05)

    def submit(self, command: list[str], **fields: Any) -> dict[str, Any]:
        docker = {"image": self.ctx.image, "command": command, **fields.pop("docker", {})}
        return self.client.submit({"name": "bench", "docker": docker, **fields})

    def wait_idle(self, timeout_s: float = 600) -> None:
        """Until no job of this (fresh) cluster is QUEUED or RUNNING. Asked every 50 ms: two
        requests each time, served by the coordinator being measured."""
        deadline = time.monotonic() + timeout_s
        while any(self.client.jobs(status, limit=1)["jobs"] for status in ("QUEUED", "RUNNING")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still queued or running after {timeout_s} s")
            time.sleep(0.05)

    def all_jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first."""
        found: list[dict[str, Any]] = []
        before = None
        while True:
            page = self.client.jobs(None, 1000, before)
            found += page["jobs"]
            before = page["next"]
            if before is None:
                return found[::-1]

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def cluster(ctx: Context, enrol: Sequence[str] = (), **coordinator_env: str) -> Iterator[Cluster]:
    made = Cluster(ctx, enrol, **coordinator_env)
    try:
        yield made
    finally:
        made.stop()


def seconds_between(start: str, end: str) -> float:
    """Two of gpubox's RFC 3339 times apart, in seconds."""
    from gpubox import models

    a, b = models.parse_time(start), models.parse_time(end)
    assert a is not None and b is not None
    return (b - a).total_seconds()
