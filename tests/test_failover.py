"""The failover chaos run, on PostgreSQL: three coordinators (`gpubox coordinator` processes),
two process-runtime workers that know all three, 300 jobs printing numbered lines. The
leader is killed (SIGKILL), frozen (SIGSTOP, resumed once another leads: it must do
nothing, and end) and stopped cleanly, several times during the run; each one disrupted
is started again, as systemd would.

Asserted: every job ends FINISHED, in its first attempt, having run once (a job makes a
folder named for its id, and fails if it is there already); every line is stored once, in
order; each takeover raises the epoch by exactly one (no moment had two leaders: a second
one would have taken an epoch of its own), and the frozen leader, woken, is refused by the
epoch check and ends; each takeover took at most the liveness window, a clean stop's at
most 2 s; `gpubox tail`, `gpubox submit --follow` and a curl follow through a standby saw
every line of their job once, in order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox import keys
from gpubox.client import Client, Unreachable
from tests.conftest import wait_until
from tests.test_recovery import GPUBOX, Process, free_port

# Serial: it times each takeover against its limit (the liveness window; 2 s for a clean
# stop), which other tests' load on a 2-core machine would stretch.
pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(420)]

JOBS = int(os.environ.get("GPUBOX_FAILOVER_JOBS", "300"))
LINES = 10  # each job's lines, PAUSE_S apart
PAUSE_S = 0.05
LONG_LINES = 200  # the jobs tail and submit --follow follow: through several takeovers
CURL_LINES = 80  # the job curl follows through a standby: through one takeover
ENDED = ("FINISHED", "ERROR", "CANCELLED")
LOUD = ("WARNING", "ERROR", "CRITICAL")  # the log levels a failure's message quotes
LIVENESS_S = 4.0  # the coordinators' and workers' liveness window: the lease is half
FAST = {
    "GPUBOX_HEARTBEAT_INTERVAL": "0.5",
    "GPUBOX_LIVENESS": str(LIVENESS_S),
    "GPUBOX_RESEND": "1",
    "GPUBOX_STOP_GRACE": "2",
}


class Fleet:
    """Three coordinators on one store, each on fixed ports so that a restart is the same
    coordinator to its workers and clients."""

    def __init__(self, root: Path, db: str) -> None:
        self.root = root
        self.shared = root / "shared"
        keys.init(str(self.shared))
        self.http = [free_port() for _ in range(3)]
        self.link = [free_port() for _ in range(3)]
        self.coordinators: list[Process] = []
        self.token = ""  # c0's, once it wrote it
        self.poller: Client | None = None
        self.urls = ",".join(f"http://127.0.0.1:{port}" for port in self.http)
        for index in range(3):
            state = root / f"c{index}"
            (state / "keys").mkdir(parents=True)
            for name in ("coordinator.key", "coordinator.key_secret"):
                shutil.copy(self.shared / "keys" / name, state / "keys" / name)
            (state / "keys" / "allowed").symlink_to(self.shared / "keys" / "allowed")
            env = {**os.environ, **FAST, "GPUBOX_STATE_DIR": str(state), "GPUBOX_DB": db}
            args = ["coordinator", "--http", f"127.0.0.1:{self.http[index]}"]
            args += ["--bind", f"tcp://127.0.0.1:{self.link[index]}"]
            self.coordinators.append(Process(args, env, root / f"c{index}.log"))
            if index == 0:  # the first leads: the others start once it does
                wait_until(lambda: self.leader(quiet=True) is not None, 30, "a first leader")
        self.token = (root / "c0" / "token").read_text().strip()
        self.client = Client(self.urls, self.token)
        wait_until(lambda: len(self.listed()["coordinators"]) == 3, 30, "three coordinators")

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.http[index]}"

    def listed(self, index: int | None = None) -> dict[str, Any]:
        """GET /api/v1/coordinators, from coordinator `index` (or any that answers)."""
        token = self.token or (self.root / "c0" / "token").read_text().strip()
        if index is None:  # one client, which stays with a coordinator that answers
            self.poller = self.poller or Client(self.urls, token, timeout_s=2)
            return self.poller.coordinators()
        return Client(self.url(index), token, timeout_s=2).coordinators()

    def leader(self, quiet: bool = False, asked: int | None = None) -> tuple[int, int] | None:
        """(index of the leading coordinator, its epoch), or None while no one leads; as
        coordinator `asked` says (None: any that answers)."""
        try:
            answer = self.listed(0 if quiet else asked)
        except (Unreachable, OSError, ValueError):
            return None
        except Exception:  # noqa: BLE001 - a token not written yet, at the very start
            if quiet:
                return None
            raise
        lead = answer["leader"]
        if lead is None:
            return None
        for item in answer["coordinators"]:
            if item["id"] == lead["id"]:
                port = int(item["http"].rsplit(":", 1)[1])
                if port in self.http:
                    return self.http.index(port), int(lead["epoch"])
        return None

    def workers(self) -> list[Process]:
        link = ",".join(f"tcp://127.0.0.1:{port}" for port in self.link)
        started = []
        for name in ("w1", "w2"):
            secret = keys.add_worker(str(self.shared), name)
            env = {
                **os.environ,
                **FAST,
                "GPUBOX_STATE_DIR": str(self.root / name),
                "GPUBOX_WORKER_NAME": name,
                "GPUBOX_COORDINATOR": link,
                "GPUBOX_COORDINATOR_KEY": str(self.shared / "keys" / "coordinator.key"),
                "GPUBOX_KEY_FILE": str(secret),
                "GPUBOX_RUNTIME": "process",
                "GPUBOX_MAX_JOBS": "8",
                "GPUBOX_GPUS": "none",
            }
            started.append(Process(["worker"], env, self.root / f"{name}.log"))
        return started


@pytest.fixture()
def fleet(tmp_path: Path, pg_url: str) -> Iterator[Fleet]:
    made = Fleet(tmp_path, pg_url)
    try:
        yield made
    finally:
        for process in made.coordinators:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.send_signal(signal.SIGCONT)
            process.stop()


def script(runs: Path, lines: int) -> str:
    """A job that runs once (a second run of it fails at mkdir) and prints `lines` lines."""
    return (
        f"mkdir {runs}/$GPUBOX_JOB_ID || exit 3;"
        f" for i in $(seq 1 {lines}); do echo $GPUBOX_JOB_ID-$i; sleep {PAUSE_S}; done"
    )


def spec(runs: Path, lines: int, priority: int = 0) -> dict[str, Any]:
    command = ["sh", "-c", script(runs, lines)]
    return {"name": "chaos", "priority": priority, "docker": {"image": "none", "command": command}}


def takeover(fleet: Fleet, before: tuple[int, int], began: float) -> tuple[float, int, int]:
    """Wait for a new leader after `before` (index, epoch); (seconds since `began`, its index,
    its epoch). Asked of a coordinator that was not disrupted: the one stopping may hold a
    request until its HTTP server has closed."""
    asked = (before[0] + 1) % 3
    seen = wait_until(
        lambda: (lead := fleet.leader(asked=asked)) is not None and lead[1] > before[1] and lead,
        30,
        lambda: f"a leader after {before} (index, epoch); now {fleet.listed(asked)}",
    )
    return time.monotonic() - began, seen[0], seen[1]


def test_300_jobs_while_the_leader_is_killed_frozen_and_stopped(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Where each job marks its run: a folder its user (nobody) can write, outside the
    # test's private tmp_path.
    runs = Path(tempfile.mkdtemp(prefix="gpubox-failover-runs-"))
    runs.chmod(0o777)
    workers = fleet.workers()
    try:
        ids = [int(fleet.client.submit(spec(runs, LINES), f"chaos-{n}")["id"]) for n in range(JOBS)]
        env = {**os.environ, "GPUBOX_URL": fleet.urls, "GPUBOX_TOKEN": fleet.token}
        # `gpubox submit --follow` of a long job, through any coordinator.
        command = [*GPUBOX, "submit", "--follow", "--priority", "10", "--name", "follow"]
        command += ["none", "sh", "-c", script(runs, LONG_LINES)]
        submit_follow = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        tail_id = int(fleet.client.submit(spec(runs, LONG_LINES, priority=10), "tail")["id"])
        tail = subprocess.Popen(
            [*GPUBOX, "tail", str(tail_id)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        epochs, times, frozen_log = [fleet.leader()], [], ""
        curl_id, curl = 0, None
        curl_out: str | None = None
        curl_err = ""
        for event in ("kill", "freeze", "stop", "kill", "stop", "freeze"):
            before = epochs[-1]
            assert before is not None
            index = before[0]
            process = fleet.coordinators[index]
            assert process.proc is not None
            if curl is None:
                # A curl follow through a standby, of a job that runs through this event.
                standby = next(i for i in range(3) if i != index)
                curl_id = int(
                    fleet.client.submit(spec(runs, CURL_LINES, priority=10), "curl")["id"]
                )
                url = f"{fleet.url(standby)}/api/v1/jobs/{curl_id}/logs?follow=1&format=ndjson"
                curl = subprocess.Popen(
                    ["curl", "-sSN", "-H", f"Authorization: Bearer {fleet.token}", url],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            time.sleep(1.0)  # jobs run, lines flow
            began = time.monotonic()
            if event == "kill":
                process.kill9()
            elif event == "stop":
                process.signal(signal.SIGTERM)
            else:
                process.signal(signal.SIGSTOP)
            took, new_index, epoch = takeover(fleet, before, began)
            times.append((event, took))
            epochs.append((new_index, epoch))
            assert new_index != index
            if event == "freeze":
                # Woken after another took over: its first write, or its lease's renewal,
                # meets the new epoch, and it ends.
                time.sleep(1.0)
                process.signal(signal.SIGCONT)
                assert process.proc.wait(20) != 0
                frozen_log = process.log.read_text()
            elif event == "stop":
                assert process.proc.wait(20) == 0
            process.start()  # as systemd would
            if curl is not None and curl_out is None:
                # It followed through one takeover: let it end before the next one, which
                # might be of the coordinator it follows through (a standby until now).
                curl_out, curl_err = curl.communicate(timeout=60)
        # Every job ends, each FINISHED in its first attempt, every line once and in order.
        everything = [*ids, tail_id, curl_id]

        def all_ended() -> bool:
            return all(fleet.client.job(job_id)["status"] in ENDED for job_id in everything)

        def not_ended() -> str:
            """What a timeout tells: the jobs still going, and the logs' latest complaints."""
            left = [job for job in map(fleet.client.job, everything) if job["status"] not in ENDED]
            said = [
                f"{job['id']} {job['status']} on {job['worker']} (attempts {job['attempts']})"
                for job in left[:8]
            ]
            return f"every job to end; {len(left)} did not: {', '.join(said)}\n" + complaints(
                [process.log for process in [*fleet.coordinators, *workers]]
            )

        wait_until(all_ended, 240, not_ended, every_s=1.0)
        for job_id in everything:
            job = fleet.client.job(job_id)
            assert (job["status"], job["attempts"]) == ("FINISHED", 1), (job_id, job["result"])
            lines = list(fleet.client.logs(job_id))
            count = LINES if job_id in ids else (LONG_LINES if job_id == tail_id else CURL_LINES)
            assert [r["line"] for r in lines] == [f"{job_id}-{i}" for i in range(1, count + 1)]
            assert [r["seq"] for r in lines] == list(range(1, count + 1))
        ran = sorted(int(p.name) for p in runs.iterdir())
        expected = sorted([*everything, *follow_id(submit_follow)])
        odd = sorted(set(ran) ^ set(expected))
        assert ran == expected, (odd, [fleet.client.job(i) for i in odd if i in everything])
        # One epoch per takeover: never two leaders at once.
        assert [e[1] for e in epochs] == list(range(epochs[0][1], epochs[0][1] + len(epochs)))
        assert "no longer leads" in frozen_log or "was taken over" in frozen_log, frozen_log[-3000:]
        for event, took in times:
            assert took <= (2.0 if event == "stop" else LIVENESS_S), times
        # The clients saw each line once, in order.
        out, err = tail.communicate(timeout=150)
        assert tail.returncode == 0, err
        assert out.split() == [f"{tail_id}-{i}" for i in range(1, LONG_LINES + 1)]
        assert curl is not None and curl_out is not None
        assert curl.returncode == 0, curl_err
        records = [json.loads(line) for line in curl_out.splitlines() if line.strip()]
        assert [r.get("line") for r in records[:-1]] == [
            f"{curl_id}-{i}" for i in range(1, CURL_LINES + 1)
        ]
        assert records[-1]["end"] and records[-1]["status"] == "FINISHED"
        print(f"takeovers: {times}")
    finally:
        for worker in workers:
            worker.stop()
        shutil.rmtree(runs, ignore_errors=True)


def complaints(logs: list[Path], last: int = 8) -> str:
    """Each log's last warnings and errors, for a failure's message."""
    told = []
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        bad = [line for line in lines if any(f" {level} " in line for level in LOUD)]
        told += [f"{log.name}: {line[:300]}" for line in bad[-last:]]
    return "\n".join(told)


def follow_id(submit_follow: subprocess.Popen[str]) -> list[int]:
    """The id of the job `gpubox submit --follow` made, once it printed every line."""
    out, err = submit_follow.communicate(timeout=150)
    assert submit_follow.returncode == 0, err
    job_id = int(out.split()[0].split("-")[0])
    assert out.split() == [f"{job_id}-{i}" for i in range(1, LONG_LINES + 1)]
    return [job_id]
