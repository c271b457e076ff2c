"""The simulated fleet's processes: benchlib.fleet_workers.serve in PER_PROCESS-worker
shares, started, cued and stopped from the bench."""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import Any

from benchlib.fleet_workers import FLEET, Enrolled, Shape, Tally, serve
from benchlib.worker_rows import cpu_seconds
from gpubox import keys

PER_PROCESS = 250  # simulated workers driven by one process


class Fleet:
    """Simulated workers enrolled in a coordinator's state folder, PER_PROCESS to a process
    (spawned: a fork would copy this process's ZeroMQ state; the main module must be
    guarded by `if __name__ == "__main__"`). `report` and `go` move them on a stage (see
    fleet_workers' docstring); leaving the block stops them and adds up their tallies.
    `shape`: what each worker offers and how its jobs go."""

    def __init__(
        self, state: str, link: str, names: list[str], ramp_s: float, shape: Shape = FLEET
    ) -> None:
        server = keys.load_public(str(keys.coordinator_files(state)[0]))
        enrolled = [
            Enrolled(
                name,
                *keys.load_secret(keys.worker_secret_file(state, name)),
                {"zone": "eu"} if index % 2 else {},
            )
            for index, name in enumerate(names)
        ]
        mp = multiprocessing.get_context("spawn")
        self.report, self.go, self.stop = mp.Event(), mp.Event(), mp.Event()
        self.out: multiprocessing.Queue[tuple[str, Any]] = mp.Queue()
        self.processes = [
            mp.Process(
                target=serve,
                args=(link, server, enrolled[first : first + PER_PROCESS]),
                kwargs={
                    "report": self.report,
                    "go": self.go,
                    "stop": self.stop,
                    "out": self.out,
                    "seed": first,
                    "ramp_s": ramp_s,
                    "shape": shape,
                },
                daemon=True,
            )
            for first in range(0, len(enrolled), PER_PROCESS)
        ]
        self.tally = Tally()

    def cpu_s(self) -> float:
        """CPU seconds of the processes so far."""
        return sum(cpu_seconds(process.pid) for process in self.processes if process.pid)

    def __enter__(self) -> Fleet:
        for process in self.processes:
            process.start()
        return self

    def wait_welcomed(self, timeout_s: float) -> None:
        """Until every process says all its workers were welcomed."""
        deadline = time.monotonic() + timeout_s
        for _ in self.processes:
            kind, _ = self._next(deadline, "the simulated workers to connect")
            if kind != "welcomed":
                raise RuntimeError("a simulated worker process ended before its fleet connected")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        deadline = time.monotonic() + 30
        tallies = 0
        try:
            while tallies < len(self.processes):
                kind, value = self._next(deadline, "the simulated workers' tallies")
                if kind == "tally":
                    self.tally.add(value)
                    tallies += 1
        finally:
            for process in self.processes:
                process.join(5)
                if process.is_alive():
                    process.kill()

    def _next(self, deadline: float, what: str) -> tuple[str, Any]:
        while True:
            try:
                return self.out.get(timeout=0.5)  # type: ignore[no-any-return]
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gave up waiting for {what}") from None
                if not any(process.is_alive() for process in self.processes):
                    raise RuntimeError(f"no simulated worker process left: {what}") from None
