"""Attacks on a coordinator's two ports by someone with no credentials at all, against a real
`gpubox coordinator` process: floods of idle and slow connections, a large body sent
without a token, and what happens when its HTTP thread dies anyway."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until

GPUBOX = [sys.executable, "-m", "gpubox"]
# systemd starts services with this soft limit on open files (its hard limit is far higher).
SYSTEMD_SOFT_LIMIT = 1024

pytestmark = [pytest.mark.slow, pytest.mark.serial]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    proc: subprocess.Popen[str]
    http: int
    link: int
    log: Path

    def healthz_ms(self) -> float:
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=5) as r:
            assert r.status == 200
        return (time.perf_counter() - started) * 1000


def start(
    tmp_path: Path, prelude: str = "", soft_limit: int | None = SYSTEMD_SOFT_LIMIT
) -> Running:
    """`gpubox coordinator` on free loopback ports, started with the open-file limit systemd
    gives a service; `prelude` is Python run in that process before gpubox starts."""
    state = tmp_path / "state"
    env = {**os.environ, "GPUBOX_STATE_DIR": str(state), "PYTHONUNBUFFERED": "1"}
    subprocess.run([*GPUBOX, "keys", "init"], env=env, check=True, capture_output=True)
    http, link = free_port(), free_port()

    def limit() -> None:
        if soft_limit is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, hard))

    code = f"{prelude}\nimport sys\nfrom gpubox.cli import main\nsys.argv[0] = 'gpubox'\nmain()"
    args = ["coordinator", "--http", f"127.0.0.1:{http}", "--bind", f"tcp://127.0.0.1:{link}"]
    log = tmp_path / "coordinator.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
    )
    running = Running(proc, http, link, log)

    def answers() -> bool:
        with contextlib.suppress(OSError):
            running.healthz_ms()
            return True
        assert proc.poll() is None, log.read_text()
        return False

    wait_until(answers, 30, "the coordinator to start", every_s=0.1)
    return running


def exit_once_triggered(running: Running, trigger: Path) -> str:
    """Touch `trigger` (the coordinator's prelude breaks a thread once it exists) and wait
    for the process to end with exit status 1; what it logged."""
    trigger.touch()
    try:
        running.proc.wait(15)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        pytest.fail("the coordinator stayed up with a dead thread")
    said = running.log.read_text()
    assert running.proc.returncode == 1, said
    return said


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path)
    yield running
    running.proc.terminate()
    running.proc.wait(30)


@pytest.fixture(autouse=True)
def enough_files() -> None:
    """The attacker side (this process) holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 8192, f"these attacks need 8,192 open files here; the limit is {soft}"


def idle(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


class Slowloris:
    """`count` HTTP requests whose headers never end: a header line every second."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = idle(port, count)
        for sock in self.socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        n = 0
        while not self.done.wait(1.0):
            n += 1
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.sendall(f"X-Slow-{n}: 1\r\n".encode())

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99) - 1]


@pytest.mark.parametrize("soft_limit", [SYSTEMD_SOFT_LIMIT, None], ids=["systemd", "inherited"])
def test_idle_and_slow_connections_to_both_ports_leave_healthz_fast(
    tmp_path: Path, soft_limit: int | None
):
    # 2,000 idle connections to each port and 300 slow requests: together far past the
    # 1,024 file descriptors a service starts with (systemd's soft limit), and past the
    # numbers select() can watch (with a higher limit, as from a shell).
    coordinator = start(tmp_path, soft_limit=soft_limit)
    try:
        held = idle(coordinator.link, 2000) + idle(coordinator.http, 2000)
        slow = Slowloris(coordinator.http, 300)
        try:
            time.sleep(1.0)  # let the coordinator accept them all
            samples = [coordinator.healthz_ms() for _ in range(200)]
            assert coordinator.proc.poll() is None, coordinator.log.read_text()
            assert p99(samples) < 100, f"p99 {p99(samples):.0f} ms, max {max(samples):.0f} ms"
        finally:
            slow.close()
            for sock in held:
                sock.close()
        # and once the attackers leave, it serves as before
        assert coordinator.healthz_ms() < 1000
        assert coordinator.proc.poll() is None
        coordinator.proc.terminate()
        assert coordinator.proc.wait(30) == 0
    finally:
        if coordinator.proc.poll() is None:  # a failed check above: no process left behind
            coordinator.proc.kill()
            coordinator.proc.wait(30)


def test_connections_that_never_handshake_on_the_worker_link_are_closed(coordinator: Running):
    held = idle(coordinator.link, 1100)
    try:
        time.sleep(6)  # past the 5 s CURVE handshake allowance
        closed = 0
        for sock in held:
            sock.settimeout(0.5)
            # the coordinator's ZMTP greeting, then the end of the stream
            try:
                while sock.recv(4096):
                    pass
            except TimeoutError:
                continue  # still open
            except ConnectionResetError:
                pass
            closed += 1
        assert closed == len(held)
        assert coordinator.healthz_ms() < 1000
    finally:
        for sock in held:
            sock.close()


def test_a_large_body_without_a_token_is_refused_before_it_is_sent(coordinator: Running):
    with socket.create_connection(("127.0.0.1", coordinator.http), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 15000000\r\n\r\n"
        )
        # Nothing of the body is sent: the answer comes from the headers alone.
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_dead_http_thread_ends_the_process_with_its_reason(tmp_path: Path):
    # The HTTP loop fails the way select() did past 1,024 descriptors, once told to.
    trigger = tmp_path / "fail-now"
    prelude = f"""
import os
from waitress import wasyncore
real_loop = wasyncore.loop
def loop(*args, **kwargs):
    if os.path.exists({str(trigger)!r}):
        raise ValueError("filedescriptor out of range in select()")
    return real_loop(*args, **kwargs)
wasyncore.loop = loop
"""
    said = exit_once_triggered(start(tmp_path, prelude), trigger)
    assert "the gpubox-http thread stopped (ValueError: filedescriptor out of range" in said
