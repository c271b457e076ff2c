"""Rows about GPU telemetry: what sampling 8 busy GPUs costs a worker (its sampler thread
and the agent's work on the points), and what storing their points costs the coordinator
(benchlib.telemetry_store)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from benchlib.common import Context, Row, ms
from benchlib.telemetry_store import GPUS, points_batch, store_rows
from gpubox import protocol
from gpubox.telemetry import Point
from gpubox.worker.gpu import FakeGpus, write_fake_readings
from gpubox.worker.points import PointWindow
from gpubox.worker.sampler import Sampler

READING = {"utilization": 97, "memory_used_mb": 61_440, "power_w": 412.5, "temperature_c": 71}


def telemetry(ctx: Context) -> list[Row]:
    """The worker's rows, then the store's."""
    return [*sampler_rows(ctx), *store_rows(ctx)]


# --- the worker -------------------------------------------------------------------------------


def sampler_rows(ctx: Context) -> list[Row]:
    """A real Sampler thread over 8 made-up GPUs, each held by a job of 1 GPU and reading 97 %,
    at the default 1 s interval, for a measured window; its CPU three ways (its own busy_s,
    the thread's CPU clock, the whole process), and the agent's CPU per point taken."""
    window_s = ctx.size(30, 2)
    point_s = 10.0 if not ctx.quick else 1.0
    state = ctx.tmp / "fake-gpus"
    state.mkdir(exist_ok=True)
    write_fake_readings(str(state), {"*": READING})
    gpus = FakeGpus(str(GPUS), "bench", str(state))
    sampler = Sampler(gpus.usage, {g.uuid: g.memory_mb for g in gpus.list()}, 1.0, point_s)
    for job_id, gpu in enumerate(gpus.list(), 1):
        sampler.track(job_id, 1, [gpu.uuid])
    windows = {job_id: PointWindow() for job_id in range(1, GPUS + 1)}
    thread = threading.Thread(target=sampler.run, name="sampler", daemon=True)
    thread.start()
    clock = time.pthread_getcpuclockid(thread.ident or 0)
    # The first samples (and the first read of the readings file) settle.
    time.sleep(1.1 if ctx.quick else 1.5)
    busy, samples = sampler.busy_s, sampler.samples
    thread_cpu, process_cpu = time.clock_gettime(clock), time.process_time()
    started = time.monotonic()
    agent_cpu, points = 0.0, 0
    # The agent's side as its loop does it: take the points made, hold them, send them.
    while time.monotonic() - started < window_s:
        time.sleep(0.25)
        before = time.thread_time()
        points += _send(sampler.take(), windows)
        agent_cpu += time.thread_time() - before
    elapsed = time.monotonic() - started
    busy, samples = sampler.busy_s - busy, sampler.samples - samples
    thread_cpu = time.clock_gettime(clock) - thread_cpu
    process_cpu = time.process_time() - process_cpu
    sampler.stop()
    thread.join(5)
    usage_us = _usage_call_us(gpus)
    per_point_us = _agent_us_per_point(ctx.size(2000, 200))
    passes = samples // GPUS
    share = thread_cpu / elapsed
    return [
        Row(
            f"worker telemetry CPU, {GPUS} made-up GPUs busy (sampler thread)",
            f"{share:.3%} of a core: thread CPU clock {ms(thread_cpu)} in {elapsed:.1f} s"
            f" ({passes} passes of {GPUS} GPUs, {thread_cpu / max(passes, 1) * 1e6:.0f} µs"
            f" each); busy_s {ms(busy)} ({busy / elapsed:.3%}); whole process"
            f" {process_cpu / elapsed:.2%} (incl. the agent side below and this bench's loop)",
            f"FakeGpus.usage() alone {usage_us:.0f} µs a call. {GPUS} jobs of 1 GPU each,"
            f" 1 s interval, {point_s:g} s points. The fake source reads a JSON file (a stat a"
            " sample, parsed once); NVML's readings are ioctls to the driver instead",
            "≤ 1 % of a core",
            share <= 0.01,
        ),
        Row(
            "worker telemetry, agent side per point",
            f"{per_point_us:.1f} µs a point (PointWindow.add, Batch.message, protocol.encode,"
            f" batches of {GPUS}; the ZeroMQ send not counted); in the window above: {points}"
            f" points, {ms(agent_cpu)}",
            f"a busy {GPUS}-GPU worker makes {GPUS / point_s:g} points/s",
        ),
    ]


def _send(taken: list[tuple[int, int, list[Point]]], windows: dict[int, PointWindow]) -> int:
    """What the agent does with the points the sampler made: hold each job's as a batch,
    encode it as a TELEMETRY message, and (as an acknowledgement would) let it go."""
    count = 0
    for job_id, attempt, points in taken:
        window = windows[job_id]
        batch = window.add(points)
        if batch is not None:
            protocol.encode(batch.message("0" * 32, job_id, attempt))
            window.ack(batch.last)
            count += len(points)
    return count


def _usage_call_us(gpus: FakeGpus, calls: int = 2000) -> float:
    """µs of one FakeGpus.usage() call, the readings file unchanged (as in the window)."""
    started = time.thread_time()
    for _ in range(calls):
        gpus.usage()
    return (time.thread_time() - started) / calls * 1e6


def _agent_us_per_point(batches: int) -> float:
    """CPU µs per point of `batches` batches of 8 points through _send."""
    windows = {1: PointWindow()}
    made = [(1, 1, points_batch(i)) for i in range(batches)]
    started = time.thread_time()
    for taken in made:
        _send([taken], windows)
    return (time.thread_time() - started) / (batches * GPUS) * 1e6


ROWS: dict[str, Callable[[Context], list[Row]]] = {"telemetry": telemetry}
