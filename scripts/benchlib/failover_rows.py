"""The failover rows, on PostgreSQL only (--db postgresql://…; the rows say "not measured"
without it): three `gpubox coordinator` processes on one store (a schema of their own in
that database, dropped afterwards), with the default liveness window (10 s, so a 5 s lease;
--quick: 4 s).

- takeover after SIGKILL: from the kill until a standby says it leads (GET
  /api/v1/coordinators on a standby, every 20 ms); the killed one is started again as
  systemd would, and the next try kills whoever leads then;
- takeover after a clean stop (SIGTERM): the same, where the leader gives its lease up;
- the submit rate through two coordinators at once (4 keep-alive clients on the leader, 4
  on a standby) beside 8 clients on the leader alone, the same store and minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchlib.common import GPUBOX, ROOT, Context, Row, free_port
from benchlib.http_rows import SUBMIT_BODY, hammer
from gpubox import keys
from gpubox.client import Client

NOT_MEASURED = "not measured: give --db postgresql://… (several coordinators need PostgreSQL)"


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """`url` with a new schema of its database as the search path; dropped afterwards."""
    import psycopg

    schema = f"bench_failover_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    try:
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Trio:
    """Three coordinators on one store, on fixed ports (a restart is the same coordinator)."""

    def __init__(self, tmp: Path, db: str, liveness_s: float) -> None:
        self.tmp = tmp
        shared = tmp / "shared"
        keys.init(str(shared))
        self.http = [free_port() for _ in range(3)]
        self.env: list[dict[str, str]] = []
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]
        for index in range(3):
            state = tmp / f"c{index}"
            (state / "keys").mkdir(parents=True)
            for name in ("coordinator.key", "coordinator.key_secret"):
                shutil.copy(shared / "keys" / name, state / "keys" / name)
            self.env.append(
                {
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "GPUBOX_STATE_DIR": str(state),
                    "GPUBOX_DB": db,
                    "GPUBOX_HTTP": f"127.0.0.1:{self.http[index]}",
                    "GPUBOX_BIND": f"tcp://127.0.0.1:{free_port()}",
                    "GPUBOX_LIVENESS": str(liveness_s),
                }
            )
            self.start(index)
            if index == 0:
                self.wait(lambda: self.leader() is not None, "a first leader")
        self.token = (tmp / "c0" / "token").read_text().strip()
        self.wait(lambda: len(self.listed()["coordinators"]) == 3, "three coordinators")

    def start(self, index: int) -> None:
        with open(self.tmp / f"c{index}.log", "ab") as log:
            self.procs[index] = subprocess.Popen(
                [*GPUBOX, "coordinator"], env=self.env[index], stdout=log, stderr=log
            )

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.http[index]}"

    def listed(self, index: int = 0) -> dict[str, Any]:
        token = (self.tmp / "c0" / "token").read_text().strip()
        return Client(self.url(index), token, timeout_s=2).coordinators()

    def leader(self, asked: int = 0) -> tuple[int, int] | None:
        """(index of the leader, its epoch) as coordinator `asked` says; None: no one."""
        try:
            answer = self.listed(asked)
        except Exception:  # noqa: BLE001 - not up yet, or its token not written yet
            return None
        lead = answer["leader"]
        for item in answer["coordinators"] if lead else []:
            port = int(item["http"].rsplit(":", 1)[1])
            if item["id"] == lead["id"] and port in self.http:
                return self.http.index(port), int(lead["epoch"])
        return None

    def wait(self, done: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := done()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: see {self.tmp}")
            time.sleep(0.02)
        return value

    def takeover(self, sig: int) -> float:
        """Send `sig` to the leader; seconds until another coordinator leads. The one signalled
        is started again afterwards."""
        index, epoch = self.wait(self.leader, "a leader")
        other = (index + 1) % 3
        proc = self.procs[index]
        assert proc is not None
        began = time.monotonic()
        proc.send_signal(sig)
        self.wait(
            lambda: (lead := self.leader(other)) is not None and lead[1] > epoch, "a takeover"
        )
        took = time.monotonic() - began
        proc.wait(30)
        self.start(index)
        # Up again when its own API answers (it is listed a moment before it serves HTTP).
        self.wait(lambda: self.leader(index) is not None, "the restart")
        return took

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def submit_rates(trio: Trio, seconds: float) -> tuple[float, float]:
    """Submits/s from 8 keep-alive clients on the leader alone, then 4 on the leader and 4 on
    a standby at once."""
    import json

    body = json.dumps(SUBMIT_BODY).encode()
    leader, _ = trio.wait(trio.leader, "a leader")
    standby = (leader + 1) % 3
    pids = [proc.pid if proc else 0 for proc in trio.procs]
    one = hammer(trio.url(leader), trio.token, body, 8, seconds, pids[leader]).rate
    rates: list[float] = []

    def run(index: int) -> None:
        rates.append(hammer(trio.url(index), trio.token, body, 4, seconds, pids[index]).rate)

    threads = [threading.Thread(target=run, args=(i,)) for i in (leader, standby)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(rates) != 2:
        raise RuntimeError("a submitting client failed")
    return one, sum(rates)


def failover(ctx: Context) -> list[Row]:
    kill_row, stop_row = (
        "takeover after the leader is killed (SIGKILL)",
        ("takeover after the leader stops cleanly (SIGTERM)"),
    )
    rate_row = "submit rate through two coordinators at once (4 + 4 keep-alive clients)"
    if not ctx.db or not ctx.db.startswith("postgresql"):
        return [Row(kill_row, NOT_MEASURED), Row(stop_row, NOT_MEASURED), Row(rate_row, "—")]
    liveness = 4.0 if ctx.quick else 10.0
    tries, seconds = ctx.size(3, 1), ctx.size(5, 1)
    with fresh_schema(ctx.db) as db:
        trio = Trio(ctx.tmp / f"failover-{uuid.uuid4().hex[:6]}", db, liveness)
        try:
            kills = [trio.takeover(signal.SIGKILL) for _ in range(tries)]
            stops = [trio.takeover(signal.SIGTERM) for _ in range(tries)]
            one, two = submit_rates(trio, seconds)
        finally:
            trio.stop()
    window = f"the liveness window ({liveness:g} s)"
    return [
        Row(
            kill_row,
            _seconds(kills),
            f"lease {liveness / 2:g} s + ≤ 1 s",
            f"≤ {window}",
            max(kills) <= liveness,
        ),
        Row(stop_row, _seconds(stops), "the lease given up at once", "≤ 2 s", max(stops) <= 2.0),
        Row(rate_row, f"{two:,.0f} submits/s", f"8 clients on the leader alone: {one:,.0f}/s"),
    ]


def _seconds(values: list[float]) -> str:
    text = f"{statistics.median(values):.2f} s"
    if len(values) > 1:
        text += f" [{min(values):.2f}–{max(values):.2f}] (median of {len(values)})"
    return text


ROWS: dict[str, Callable[[Context], list[Row]]] = {"failover": failover}
