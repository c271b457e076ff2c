"""GPU telemetry part by part (tests/test_telemetry.py has it end to end): the points' merge
and summary, the worker's sampler and its idle-GPU policy, the worker's window of batches,
the store's points (both backends), the API's route, and a worker on an older coordinator."""

from __future__ import annotations

import dataclasses
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpubox import models, protocol, telemetry
from gpubox.client import ApiError
from gpubox.store import base
from gpubox.telemetry import Point
from gpubox.worker import stopping
from gpubox.worker.gpu import write_fake_readings
from gpubox.worker.lines import LineBuffer
from gpubox.worker.points import Batch, PointWindow
from gpubox.worker.sampler import Sampler
from gpubox.worker.stopping import JobStop
from tests.conftest import Cluster, wait_until
from tests.test_store import make_spec

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SUMMED = ("gpu_seconds", "util_mean", "util_max", "memory_max_mb", "memory_max_pct", "energy_wh")


def point(start: float, end: float, gpu: str = "GPU-a", **fields: Any) -> Point:
    """A point of `gpu` from start to end; `fields` replace the made-up readings."""
    values: dict[str, Any] = {
        "samples": 10,
        "util_mean": 50.0,
        "util_max": 70.0,
        "memory_max_mb": 1000,
        "memory_total_mb": 16384,
        "power_mean_w": 100.0,
        "temperature_max_c": 60.0,
    }
    return Point(gpu=gpu, start=start, end=end, **{**values, **fields})


def energy_j(points: list[Point]) -> float:
    return sum(p.power_mean_w * p.seconds for p in points if p.power_mean_w is not None)


def weighted_util(points: list[Point]) -> float:
    return sum(p.util_mean * p.samples for p in points) / sum(p.samples for p in points)


def assert_same_summary(got: dict[str, Any] | None, want: dict[str, Any] | None) -> None:
    """Two summaries alike up to their rounding (to 0.1, energy to 0.001), job and GPUs."""
    assert got is not None and want is not None
    for part, whole in [(got, want), *((got["gpus"][g], u) for g, u in want["gpus"].items())]:
        assert set(part) >= set(SUMMED)
        for name in SUMMED:
            if whole[name] is None:
                assert part[name] is None, name
            else:
                assert part[name] == pytest.approx(whole[name], abs=0.11), name
    assert set(got["gpus"]) == set(want["gpus"])


# --- gpubox.telemetry: merge, coarsen, summarize ------------------------------------------------


def test_merge_keeps_the_energy_the_weighted_mean_and_the_maxima() -> None:
    a = point(0, 10, samples=10, util_mean=20, util_max=30, memory_max_mb=1000, power_mean_w=100)
    b = point(
        10,
        40,
        samples=5,
        util_mean=80,
        util_max=90,
        memory_max_mb=3000,
        power_mean_w=200,
        temperature_max_c=70,
    )
    merged = telemetry.merge(a, b)
    assert (merged.start, merged.end, merged.samples) == (0, 40, 15)
    assert merged.util_mean == pytest.approx(weighted_util([a, b])) == pytest.approx(40)
    assert merged.power_mean_w * merged.seconds == pytest.approx(energy_j([a, b]))  # 7000 J
    assert merged.power_mean_w == pytest.approx(175)
    assert (merged.util_max, merged.memory_max_mb, merged.temperature_max_c) == (90, 3000, 70)
    assert merged.memory_total_mb == 16384
    assert_same_summary(telemetry.summarize([merged]), telemetry.summarize([a, b]))
    # Merging is symmetric in what it keeps.
    assert telemetry.merge(b, a) == merged


def test_merge_with_a_side_without_power_keeps_the_energy_of_the_other() -> None:
    """A point whose readings had no power adds no energy to the summary; merged into a
    neighbour, it must not gain the neighbour's draw over its own seconds."""
    unknown = point(0, 10, power_mean_w=None, temperature_max_c=None)
    known = point(10, 40, power_mean_w=200.0, temperature_max_c=55.0)
    for merged in (telemetry.merge(unknown, known), telemetry.merge(known, unknown)):
        assert merged.power_mean_w is not None
        assert merged.power_mean_w * merged.seconds == pytest.approx(200.0 * 30)
        assert merged.temperature_max_c == 55.0
        assert_same_summary(telemetry.summarize([merged]), telemetry.summarize([unknown, known]))
    neither = telemetry.merge(unknown, point(10, 20, power_mean_w=None, temperature_max_c=None))
    assert neither.power_mean_w is None and neither.temperature_max_c is None
    assert telemetry.summarize([neither])["energy_wh"] is None  # type: ignore[index]


def test_coarsen_leaves_a_series_within_the_bound_and_halves_the_older_part_past_it() -> None:
    def pair(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
        return x + y

    items = [(i,) for i in range(10)]
    assert telemetry.coarsen(items, 10, pair) == items
    assert telemetry.coarsen(items, 10, pair) is not items  # a new list either way
    eleven = [(i,) for i in range(11)]
    # Four of the oldest (half of 11, made even) merge into two; the rest stay as they were.
    assert telemetry.coarsen(eleven, 10, pair) == [(0, 1), (2, 3), *eleven[4:]]
    twenty = [(i,) for i in range(20)]
    assert telemetry.coarsen(twenty, 10, pair) == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
        (8, 9),
        *twenty[10:],
    ]


def test_coarsening_at_every_append_keeps_the_span_the_bound_and_the_summary() -> None:
    rng = random.Random(21)
    bound, step_s = 100, 10.0
    series: list[Point] = []
    every: list[Point] = []
    for i in range(10_000):
        # Many samples where the GPU is busy, few where it is not: a mean weighted by anything
        # but samples would be far off. Some points have no power reading.
        busy = rng.random() < 0.5
        new = point(
            i * step_s,
            (i + 1) * step_s,
            samples=rng.randint(8, 12) if busy else rng.randint(1, 2),
            util_mean=rng.uniform(70, 100) if busy else rng.uniform(0, 5),
            util_max=rng.uniform(90, 100) if busy else rng.uniform(0, 10),
            memory_max_mb=rng.randint(0, 16000),
            power_mean_w=None if rng.random() < 0.05 else rng.uniform(50, 300),
            temperature_max_c=rng.uniform(30, 80),
        )
        every.append(new)
        series = telemetry.coarsen([*series, new], bound, telemetry.merge)
        assert len(series) <= bound + 1
    assert series[0].start == 0 and series[-1].end == 10_000 * step_s
    for before, after in zip(series, series[1:], strict=False):
        assert after.start == before.end  # whole: no gap, no overlap
    assert max(p.seconds for p in series) > 100 * step_s  # the oldest became coarse
    assert series[-1].seconds == step_s  # the newest did not
    assert sum(p.samples for p in series) == sum(p.samples for p in every)
    got, want = telemetry.summarize(series), telemetry.summarize(every)
    assert_same_summary(got, want)
    assert got is not None and want is not None
    # Rounding aside, the sums are the same to float precision.
    assert energy_j(series) == pytest.approx(energy_j(every), rel=1e-9)
    assert weighted_util(series) == pytest.approx(weighted_util(every), rel=1e-9)
    assert got["util_mean"] > 60  # weighted by samples: the busy points dominate


def test_summarize_sums_each_gpu_and_the_job_over_cards_of_different_sizes() -> None:
    small = [
        point(0, 10, "GPU-s", samples=10, util_mean=20, util_max=40, memory_max_mb=8192),
        point(10, 20, "GPU-s", samples=10, util_mean=40, util_max=60, memory_max_mb=4096),
    ]
    big = [
        point(
            0,
            20,
            "GPU-b",
            samples=30,
            util_mean=80,
            util_max=95,
            memory_max_mb=20480,
            memory_total_mb=81920,
            power_mean_w=None,
        )
    ]
    summary = telemetry.summarize(big + small)
    assert summary is not None
    assert summary["gpu_seconds"] == 40
    assert summary["util_mean"] == pytest.approx((200 + 400 + 2400) / 50)  # 60, by samples
    assert summary["util_max"] == 95
    assert summary["memory_max_mb"] == 20480  # the most any one GPU used...
    assert summary["memory_max_pct"] == 50.0  # ...while the fullest card was the small one
    assert summary["energy_wh"] == pytest.approx(100 * 20 / 3600, abs=0.001)  # small's only
    assert list(summary["gpus"]) == ["GPU-b", "GPU-s"]
    s, b = summary["gpus"]["GPU-s"], summary["gpus"]["GPU-b"]
    assert (s["gpu_seconds"], s["util_mean"], s["util_max"]) == (20, 30, 60)
    assert (s["memory_max_mb"], s["memory_max_pct"]) == (8192, 50.0)
    assert (b["memory_max_mb"], b["memory_max_pct"], b["energy_wh"]) == (20480, 25.0, None)
    assert telemetry.summarize([]) is None
    assert telemetry.summarize(iter(())) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (45, "45 s"), (119, "119 s"), (120, "2 min"), (1800, "30 min")]
    + [(7199, "120 min"), (7200, "2 h"), (9000, "2.5 h"), (86400, "24 h")],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert telemetry.duration_text(seconds) == text


def test_idle_error() -> None:
    assert telemetry.idle_error(5, 1800) == "idle: its GPUs stayed under 5 % for 30 min"
    assert telemetry.idle_error(2.5, 7200) == "idle: its GPUs stayed under 2.5 % for 2 h"


# --- gpubox.worker.sampler: points ------------------------------------------------------------


class Readings:
    """The GPUs' readings a test sets, as a Sampler's `usage`; counts its calls. A keyword
    GPU_a sets the readings of GPU-a."""

    def __init__(self, **readings: dict[str, Any]) -> None:
        self.now = {uuid.replace("_", "-"): r for uuid, r in readings.items()}
        self.calls = 0

    def set(self, uuid: str, **reading: Any) -> None:
        self.now[uuid] = reading

    def __call__(self) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"uuid": uuid, **reading} for uuid, reading in self.now.items()]


MEMORY = {"GPU-a": 16384, "GPU-b": 81920}


def reading(
    util: float, memory_mb: int = 0, power_w: float | None = None, temp: Any = None
) -> dict[str, Any]:
    """One GPU's reading as GpuSource.usage gives it (without its uuid)."""
    return {
        "utilization": util,
        "memory_used_mb": memory_mb,
        "power_w": power_w,
        "temperature_c": temp,
    }


def test_the_sampler_folds_each_gpus_readings_into_points_that_follow_each_other() -> None:
    usage = Readings()
    sampler = Sampler(usage, MEMORY, interval_s=0.01, point_s=0.2)
    sampler.sample()
    assert usage.calls == 0  # nothing tracked: the GPUs are not read
    sampler.track(1, 3, ["GPU-a", "GPU-b"])
    sampler.track(2, 1, [])  # no GPUs: never tracked
    assert sampler.finish(2) is None
    tracked_at = time.time()

    usage.set("GPU-a", **reading(10, 1000, 100.0, 50))
    usage.set("GPU-b", **reading(0, 500))
    usage.set("GPU-c", **reading(99, 99))  # no tracked job holds it
    sampler.sample()
    assert sampler.take() == []  # the point is not due yet
    usage.set("GPU-a", **reading(30, 3000, 200.0, 65))
    usage.set("GPU-b", **reading(50, 400))
    time.sleep(0.25)
    sampler.sample()
    (job_id, attempt, first), *rest = sampler.take()
    assert (job_id, attempt, rest) == (1, 3, [])
    a, b = sorted(first, key=lambda p: p.gpu)
    assert (a.gpu, a.samples, a.util_mean, a.util_max) == ("GPU-a", 2, 20, 30)
    assert (a.memory_max_mb, a.memory_total_mb) == (3000, 16384)
    assert (a.power_mean_w, a.temperature_max_c) == (150.0, 65)
    assert (b.gpu, b.samples, b.util_mean, b.util_max) == ("GPU-b", 2, 25, 50)
    assert (b.memory_max_mb, b.memory_total_mb) == (500, 81920)
    assert (b.power_mean_w, b.temperature_max_c) == (None, None)
    assert a.start == b.start == pytest.approx(tracked_at, abs=0.05)
    assert a.end == b.end and a.seconds >= 0.2
    assert sampler.samples == 4  # two readings of each tracked GPU; GPU-c's not taken

    # Two more points, then the last part up to now: each starts where the one before ended.
    points = list(first)
    for _ in range(2):
        time.sleep(0.21)
        sampler.sample()
        for _, _, made in sampler.take():
            points += made
    time.sleep(0.05)
    calls = usage.calls
    last = sampler.finish(1)
    assert usage.calls == calls  # finish reads nothing: the last part holds what was read
    assert last is not None and last[0] == 3
    finished_at = time.time()
    points += last[1]
    for gpu in MEMORY:
        mine = sorted((p for p in points if p.gpu == gpu), key=lambda p: p.start)
        assert len(mine) == 4
        for before, after in zip(mine, mine[1:], strict=False):
            assert after.start == before.end
        assert mine[-1].end == pytest.approx(finished_at, abs=0.05)
        assert mine[-1].samples == 0 and mine[-1].util_mean == 0.0  # nothing read since
    assert sampler.finish(1) is None  # untracked
    sampler.sample()
    assert usage.calls == calls and sampler.take() == []


def test_the_sampler_keeps_each_jobs_points_and_attempt_apart() -> None:
    usage = Readings(GPU_a=reading(80), GPU_b=reading(20))
    sampler = Sampler(usage, MEMORY, interval_s=0.01, point_s=0.05)
    sampler.track(7, 1, ["GPU-a"])
    sampler.track(8, 2, ["GPU-b"])
    time.sleep(0.06)
    sampler.sample()
    made = {job_id: (attempt, points) for job_id, attempt, points in sampler.take()}
    assert made.keys() == {7, 8}
    assert made[7][0] == 1 and [(p.gpu, p.util_mean) for p in made[7][1]] == [("GPU-a", 80)]
    assert made[8][0] == 2 and [(p.gpu, p.util_mean) for p in made[8][1]] == [("GPU-b", 20)]
    sampler.track(7, 2, ["GPU-a"])  # a new attempt of job 7: its points begin again
    finished = sampler.finish(7)
    assert finished is not None and finished[0] == 2
    assert finished[1][0].start > made[7][1][0].end - 0.001


# --- gpubox.worker.sampler: the idle-GPU policy ---------------------------------------------------


def notes(buffer: LineBuffer) -> list[str]:
    """The worker's own lines the buffer holds now (taking them)."""
    lines = [line for _, batch in buffer.take(0) for line in batch]
    assert all(stream == models.GPUBOX_STREAM for _, stream, _ in lines), lines
    return [text for _, _, text in lines]


def idle_job(
    timeout_s: float, usage: Readings, gpu: str = "GPU-a"
) -> tuple[Sampler, JobStop, LineBuffer]:
    """A sampler tracking job 1 on `gpu` with this idle timeout (threshold 5 %), its stop
    attached to a line buffer."""
    sampler = Sampler(usage, MEMORY, interval_s=0.01, point_s=10.0)
    buffer = LineBuffer(1)
    stop = JobStop()
    stop.attach(buffer)
    sampler.track(1, 1, [gpu], stop, idle_timeout=timeout_s, idle_threshold=5.0)
    return sampler, stop, buffer


def sample_until(sampler: Sampler, done: Any, timeout_s: float, every_s: float = 0.01) -> float:
    """Sample every `every_s` until done() or timeout_s; the seconds that took."""
    began = time.monotonic()
    while not done() and time.monotonic() - began < timeout_s:
        sampler.sample()
        time.sleep(every_s)
    return time.monotonic() - began


def test_an_idle_job_is_warned_then_stopped_as_an_error() -> None:
    usage = Readings(GPU_a=reading(4.9))  # under the 5 % threshold
    began = time.monotonic()
    sampler, stop, buffer = idle_job(1.0, usage)
    seen: list[tuple[float, bool, str]] = []  # (seconds since the start, stopped, line)
    while not stop.is_set() and time.monotonic() - began < 3:
        sampler.sample()
        now = time.monotonic() - began
        seen += [(now, stop.is_set(), text) for text in notes(buffer)]
        time.sleep(0.01)
    error = telemetry.idle_error(5, 1.0)
    assert [text for _, _, text in seen] == [
        "[gpubox: warning: this job's GPUs have stayed under 5 % for 1 s; it will be stopped"
        " if they stay so for 0 s more (idle_timeout)]",
        f"[gpubox: stopped: {error} (idle_timeout)]",
    ]
    # The warning comes a fifth of the timeout before the stop, and only then; the stop
    # comes at the timeout (the upper bounds allow for a slow machine).
    (warned_at, stopped_then, _), (stopped_at, stopped, _) = seen
    assert 0.8 <= warned_at < 1.2 and not stopped_then, seen
    assert 1.0 <= stopped_at < 1.3 and stopped, seen
    assert stop.error == error == "idle: its GPUs stayed under 5 % for 1 s"
    assert stopping.outcome(stop, 137) == {"status": "ERROR", "exit_code": 137, "error": error}
    # Stopped once: further idle samples add nothing.
    sample_until(sampler, lambda: False, 0.05)
    assert notes(buffer) == [] and stop.error == error


def test_a_busy_reading_resets_the_idle_clock_and_the_warning() -> None:
    usage = Readings(GPU_a=reading(1))
    began = time.monotonic()
    sampler, stop, buffer = idle_job(0.5, usage)
    found: list[str] = []
    sample_until(sampler, lambda: found.extend(notes(buffer)) or found or stop.is_set(), 2)
    assert not stop.is_set() and len(found) == 1 and "warning:" in found[0], found
    usage.set("GPU-a", **reading(5))  # at the threshold: busy
    sampler.sample()
    busy_at = time.monotonic()
    usage.set("GPU-a", **reading(1))
    # Idle for over 0.7 s in all now, but only 0.3 s since the busy reading: not stopped.
    sample_until(sampler, lambda: False, 0.3)
    assert not stop.is_set() and time.monotonic() - began > 0.7
    sample_until(sampler, stop.is_set, 2)
    assert stop.is_set() and time.monotonic() - busy_at >= 0.5
    assert stop.error == telemetry.idle_error(5, 0.5)
    found = notes(buffer)
    assert len(found) == 2, found
    assert found[0].startswith("[gpubox: warning:")  # given again after the busy reading
    assert found[1] == f"[gpubox: stopped: {telemetry.idle_error(5, 0.5)} (idle_timeout)]"


def test_missing_readings_never_count_as_idle() -> None:
    usage = Readings(GPU_b=reading(0))  # only another GPU reads (the job's NVML fails)
    sampler, stop, buffer = idle_job(0.3, usage, gpu="GPU-a")
    sample_until(sampler, lambda: False, 0.5)
    assert usage.calls > 10
    assert not stop.is_set() and stop.error is None
    assert notes(buffer) == []
    usage.now = {}  # no readings at all
    sample_until(sampler, lambda: False, 0.4)
    assert not stop.is_set() and notes(buffer) == []


def test_a_cancel_stays_a_cancel_when_the_idle_policy_comes_after_it() -> None:
    usage = Readings(GPU_a=reading(0))
    sampler, stop, buffer = idle_job(0.2, usage)
    stop.set()  # the submitter's cancel
    assert stopping.outcome(stop, 137) == {
        "status": "CANCELLED",
        "exit_code": 137,
        "error": "cancelled",
    }
    # Idle past the timeout while its runtime stops it: no idle warning nor idle stop.
    sample_until(sampler, lambda: False, 0.35)
    assert stop.error is None and notes(buffer) == []
    stop.because("too late")
    assert stop.error is None
    assert stopping.outcome(stop, None)["status"] == "CANCELLED"


def test_a_job_without_an_idle_timeout_or_a_stop_is_never_stopped() -> None:
    usage = Readings(GPU_a=reading(0))
    sampler = Sampler(usage, MEMORY, interval_s=0.01, point_s=10.0)
    without_timeout, buffer = JobStop(), LineBuffer(1)
    without_timeout.attach(buffer)
    sampler.track(1, 1, ["GPU-a"], without_timeout, idle_timeout=None)
    sampler.track(2, 1, ["GPU-a"], without_timeout, idle_timeout=0)  # 0: never
    sampler.track(3, 1, ["GPU-a"], None, idle_timeout=0.1)  # nothing to stop it with
    sample_until(sampler, lambda: False, 0.3)
    assert not without_timeout.is_set() and notes(buffer) == []


# --- gpubox.worker.points: the window of batches ----------------------------------------------


def batch_points(i: int) -> list[Point]:
    """Batch i's points: GPU-a and GPU-b from i to i + 1 s, with readings that tell them apart."""
    return [
        point(i, i + 1, "GPU-a", samples=2, util_mean=i, util_max=i, memory_max_mb=i),
        point(i, i + 1, "GPU-b", samples=1, util_mean=2 * i, util_max=2 * i, power_mean_w=i),
    ]


def test_the_window_numbers_batches_and_releases_them_when_acknowledged() -> None:
    window = PointWindow(next_seq=5)
    assert not window
    assert window.add([]) is None and window.next_seq == 5
    made = [window.add(batch_points(i)) for i in range(4)]
    assert [(b.seq, b.last) for b in made if b is not None] == [(5, 5), (6, 6), (7, 7), (8, 8)]
    assert window and window.next_seq == 9
    window.ack(6)
    assert [b.seq for b in window.held] == [7, 8]
    window.ack(4)  # an old ack: nothing more
    assert [b.seq for b in window.held] == [7, 8]
    assert [b.seq for b in window.due(100.0, 10.0)] == [7, 8]  # never sent: due
    window.held[0].sent_at = 95.0
    assert [b.seq for b in window.due(100.0, 10.0)] == [8]
    window.ack(8)
    assert not window


def test_past_max_held_the_unsent_batches_merge_pairwise_and_still_cover_their_seqs() -> None:
    window = PointWindow(max_held=4)
    for i in range(5):
        window.add(batch_points(i))
    assert [(b.seq, b.last) for b in window.held] == [(0, 1), (2, 2), (3, 3), (4, 4)]
    merged = window.held[0]
    assert [p.gpu for p in merged.points] == ["GPU-a", "GPU-b"]  # one point a GPU
    a, b = merged.points
    assert (a.start, a.end, a.samples, a.util_mean, a.util_max) == (0, 2, 4, 0.5, 1)
    assert (b.start, b.end, b.samples, b.util_mean, b.power_mean_w) == (0, 2, 2, 1.0, 0.5)
    assert merged.sent_at == 0.0
    # However long it goes on, the window holds at most max_held + 1 and covers every seq.
    for i in range(5, 200):
        window.add(batch_points(i))
        assert len(window.held) <= 4
        spans = [(b.seq, b.last) for b in window.held]
        assert spans[0][0] == 0 and spans[-1][1] == i
        for (_, last), (seq, _) in zip(spans, spans[1:], strict=False):
            assert seq == last + 1
    for gpu in ("GPU-a", "GPU-b"):
        mine = [p for b in window.held for p in b.points if p.gpu == gpu]
        assert mine[0].start == 0 and mine[-1].end == 200
        assert sum(p.samples for p in mine) == 200 * (2 if gpu == "GPU-a" else 1)


def test_sent_batches_are_never_merged() -> None:
    window = PointWindow(max_held=4)
    for i in range(3):
        window.add(batch_points(i))
    sent = list(window.held)
    for b in sent:
        b.sent_at = 1.0
    for i in range(3, 12):
        window.add(batch_points(i))
        assert window.held[:3] == sent  # the coordinator may store them as they were sent
    unsent = window.held[3:]
    assert all(b.sent_at == 0.0 for b in unsent)
    assert len(unsent) < 9 and unsent[0].seq == 3 and unsent[-1].last == 11
    window.ack(2)
    assert window.held == unsent


def test_a_batch_travels_as_a_telemetry_message_with_the_same_points() -> None:
    for batch in (Batch(4, 4, batch_points(4)), Batch(4, 9, batch_points(4))):
        message = batch.message("session-1", 17, 2)
        decoded = protocol.decode_from_worker(protocol.encode(message))
        assert isinstance(decoded, protocol.Telemetry)
        assert (decoded.session, decoded.job_id, decoded.attempt) == ("session-1", 17, 2)
        assert decoded.seq == 4
        assert decoded.last == (None if batch.last == batch.seq else 9)
        assert [Point.from_row(row) for row in decoded.points] == batch.points


# --- the store ----------------------------------------------------------------------------------


def running_job(store: base.Store, **overrides: Any) -> models.Job:
    job = store.create_job(make_spec(**overrides), T0)
    # A worker of its own: two running jobs of one worker could not hold the same GPUs.
    worker = f"w{job.id}"
    claimed = store.claim_job(job.id, worker, ["GPU-a", "GPU-b"], T0 + timedelta(seconds=1))
    assert claimed is not None
    return claimed


def stored(store: base.Store, job_id: int) -> list[Point]:
    return [p for _, p in store.read_points(job_id)]


def test_the_store_takes_each_batch_once_and_in_order(store) -> None:
    job = running_job(store)
    jid, attempt = job.id, job.attempts

    def add(seq: int, last: int | None = None, i: int | None = None) -> int:
        i = seq if i is None else i
        return store.add_points(jid, attempt, seq, seq if last is None else last, batch_points(i))

    assert store.points_seq(jid, attempt) == -1
    assert add(1) == -1  # the first batch is seq 0
    assert stored(store, jid) == []
    assert add(0) == 0
    assert len(stored(store, jid)) == 2
    assert add(0) == 0  # a repeat: acknowledged, not stored again
    assert len(stored(store, jid)) == 2
    assert add(1) == 1 and add(2) == 2
    assert add(4) == 2  # after a gap: the worker sends seq 3 first
    assert len(stored(store, jid)) == 6
    assert add(3, 5) == 5  # a merged batch: 3..5
    assert store.points_seq(jid, attempt) == 5
    assert add(3, 5) == 5 and add(4) == 5  # repeats of what it covers
    assert len(stored(store, jid)) == 8
    assert store.points_seq(jid, attempt + 1) == -1
    # What is stored comes back as it was sent, by start then GPU.
    want = [p for i in range(4) for p in batch_points(i)]
    assert store.read_points(jid) == [(attempt, p) for p in want]


def test_points_of_a_stale_attempt_or_an_ended_job_are_taken_but_not_stored(store) -> None:
    job = running_job(store)
    assert store.add_points(job.id, job.attempts + 1, 0, 0, batch_points(0)) == 0
    assert store.add_points(job.id, job.attempts + 1, 0, 3, batch_points(0)) == 3
    assert store.add_points(999_999, 1, 0, 2, batch_points(0)) == 2
    assert stored(store, job.id) == []
    ended = running_job(store)
    assert store.add_points(ended.id, 1, 0, 0, batch_points(0)) == 0
    finish = store.finish_job(
        ended.id, 1, models.Status.FINISHED, 0, None, T0, T0 + timedelta(seconds=2), 0
    )
    assert finish is base.Finish.APPLIED
    assert store.add_points(ended.id, 1, 1, 4, batch_points(1)) == 4
    assert len(stored(store, ended.id)) == 2
    assert store.points_seq(ended.id, 1) == 0


def test_past_max_points_a_gpus_points_merge_and_still_span_the_whole_run(store) -> None:
    job = running_job(store)
    count, max_points = 40, 10
    # GPU-b only in the first 8 batches: each GPU is bound on its own, so its points stay.
    every = [p for seq in range(count) for p in batch_points(seq)[: 2 if seq < 8 else 1]]
    for seq in range(count):
        points = [p for p in every if p.start == seq]
        assert store.add_points(job.id, job.attempts, seq, seq, points, max_points) == seq
        assert len(stored(store, job.id)) <= max_points + 1 + 8
    kept = stored(store, job.id)
    mine = [p for p in kept if p.gpu == "GPU-a"]
    assert len(mine) <= max_points + 1, len(mine)
    assert mine[0].start == 0 and mine[-1].end == count
    for before, after in zip(mine, mine[1:], strict=False):
        assert after.start == before.end
    assert mine[0].seconds > 2 and mine[-1].seconds == 1  # the oldest merged more than once
    assert [p for p in kept if p.gpu == "GPU-b"] == [p for p in every if p.gpu == "GPU-b"]
    assert store.points_seq(job.id, job.attempts) == count - 1
    assert_same_summary(telemetry.summarize(kept), telemetry.summarize(every))


def test_read_points_since_returns_only_points_ending_after_it_in_order(store) -> None:
    job = running_job(store)
    for seq in range(5):
        store.add_points(job.id, job.attempts, seq, seq, batch_points(seq))
    assert [(p.end, p.gpu) for _, p in store.read_points(job.id, since=2.5)] == [
        (3, "GPU-a"),
        (3, "GPU-b"),
        (4, "GPU-a"),
        (4, "GPU-b"),
        (5, "GPU-a"),
        (5, "GPU-b"),
    ]
    assert [p.end for _, p in store.read_points(job.id, since=3)] == [4, 4, 5, 5]
    assert store.read_points(job.id, since=5) == []
    assert [p.start for _, p in store.read_points(job.id, limit=3)] == [0, 0, 1]
    assert store.read_points(999_999) == []


def test_a_job_ends_with_the_summary_of_its_stored_points(store) -> None:
    job = running_job(store)
    for seq in range(3):
        store.add_points(job.id, job.attempts, seq, seq, batch_points(seq))
    assert store.get_job(job.id).telemetry is None  # summed up only at the end
    finish = store.finish_job(
        job.id, job.attempts, models.Status.FINISHED, 0, None, T0, T0 + timedelta(seconds=9), 0
    )
    assert finish is base.Finish.APPLIED
    summary = store.get_job(job.id).telemetry
    assert summary is not None
    assert summary == telemetry.summarize(stored(store, job.id))
    assert summary["gpu_seconds"] == 6 and set(summary["gpus"]) == {"GPU-a", "GPU-b"}
    without = running_job(store)
    store.finish_job(without.id, 1, models.Status.FINISHED, 0, None, T0, T0, 0)
    assert store.get_job(without.id).telemetry is None  # no points: no summary


def test_a_job_lost_with_no_retries_left_ends_with_its_summary(store) -> None:
    job = running_job(store)  # max_retries 0
    store.add_points(job.id, job.attempts, 0, 0, batch_points(0))
    store.add_points(job.id, job.attempts, 1, 1, batch_points(1))
    ended = store.release_job(job.id, job.attempts, "worker w1 lost", T0 + timedelta(seconds=5))
    assert ended is not None and ended.status is models.Status.ERROR
    assert ended.telemetry is not None
    assert ended.telemetry == telemetry.summarize(stored(store, job.id))
    retried = running_job(store, max_retries=1)
    store.add_points(retried.id, 1, 0, 0, batch_points(0))
    again = store.release_job(retried.id, 1, "worker w1 lost", T0 + timedelta(seconds=5))
    assert again is not None and again.status is models.Status.QUEUED
    assert again.telemetry is None  # it has not ended


# --- the API -------------------------------------------------------------------------------------


def test_the_telemetry_route_pages_by_since_and_refuses_bad_input(make_cluster) -> None:
    # A long liveness: the job the test claims for a worker that never comes is left RUNNING.
    cluster: Cluster = make_cluster(workers=0, liveness_s=60.0)
    client = cluster.client
    with pytest.raises(ApiError) as missing:
        client.telemetry(999_999)
    assert missing.value.status == 404
    job = cluster.submit("ignored", ["true"], gpus=0)  # no worker: it stays QUEUED
    for bad in ("abc", "-1", "nan", "inf"):
        with pytest.raises(ApiError) as refused:
            client.call("GET", f"/api/v1/jobs/{job['id']}/telemetry", since=bad)
        assert refused.value.status == 400, bad
        assert refused.value.field == "since", bad
    empty = client.telemetry(job["id"])
    assert empty["points"] == [] and empty["next"] is None and empty["status"] == "QUEUED"
    assert client.telemetry(job["id"], 1234.5)["next"] == 1234.5

    # Points in the coordinator's own store, as the broker stores them.
    store = cluster.coordinator.store
    assert store is not None
    claimed = store.claim_job(job["id"], "elsewhere", ["GPU-a", "GPU-b"], datetime.now(UTC))
    assert claimed is not None
    for seq in range(3):
        store.add_points(job["id"], claimed.attempts, seq, seq, batch_points(100 + seq))
    first = client.telemetry(job["id"])
    assert [(p["gpu"], p["start"], p["attempt"]) for p in first["points"]][:2] == [
        ("GPU-a", 100, 1),
        ("GPU-b", 100, 1),
    ]
    assert first["points"][0] == {"attempt": 1, **batch_points(100)[0].to_dict()}
    assert len(first["points"]) == 6 and first["next"] == 103 and first["more"] is False
    later = client.telemetry(job["id"], 101.5)
    assert [p["end"] for p in later["points"]] == [102, 102, 103, 103] and later["next"] == 103
    nothing_new = client.telemetry(job["id"], 103)
    assert nothing_new["points"] == [] and nothing_new["next"] == 103


# --- a new worker on an older coordinator -------------------------------------------------------


def test_a_worker_on_a_coordinator_without_telemetry_sends_done_without_waiting(
    make_cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older coordinator's WELCOME has no `telemetry` and it takes no TELEMETRY: the worker
    must neither send points nor hold the job's DONE for acknowledgements that never come."""
    cluster: Cluster = make_cluster(workers=0)
    broker = cluster.coordinator.broker
    assert broker is not None
    sent_welcome: list[list[bytes]] = []
    real_send = broker._send

    def send_as_older(peer: Any, msg: Any) -> bool:
        if isinstance(msg, protocol.Welcome):
            msg = dataclasses.replace(msg, telemetry=None)
            sent_welcome.append(protocol.encode(msg))
        return real_send(peer, msg)

    monkeypatch.setattr(broker, "_send", send_as_older)
    write_fake_readings(
        cluster.coordinator.config.state_dir, {"*": {"utilization": 80, "power_w": 100.0}}
    )
    agent = cluster.add_worker(
        runtime="process", fake_gpus="1", telemetry_interval_s=0.1, telemetry_point_s=0.3
    )
    assert sent_welcome and b"telemetry" not in b"".join(sent_welcome[0])
    assert agent.telemetry is False
    job = cluster.submit("ignored", ["sleep", "1"], gpus=1)
    cluster.wait(job["id"], ("RUNNING",), timeout_s=10)
    began = time.monotonic()
    done = cluster.wait(job["id"], timeout_s=10)
    assert done["status"] == "FINISHED", done
    assert time.monotonic() - began < 4  # not held: a one-second job, a DONE sent at once
    assert agent.sampler.samples > 5  # it did measure: points were made, and went nowhere
    assert broker.dropped_messages == 0
    # This coordinator would store any TELEMETRY that came: none did.
    assert cluster.client.telemetry(job["id"])["points"] == []
    assert done["result"].get("telemetry") is None
    wait_until(lambda: job["id"] not in agent.jobs, 5, "the worker to forget the job")


def test_points_of_gpus_the_job_does_not_hold_are_dropped_and_the_batch_still_counts(
    store,
) -> None:
    """A worker cannot make up series of its own; a batch left with no point is still the
    last one stored, so the next one is no gap (the worker's DONE waits on its ack)."""
    job = running_job(store)  # holds GPU-a and GPU-b
    made_up = [point(0, 1, "GPU-zz"), point(0, 1, "GPU-a")]
    assert store.add_points(job.id, job.attempts, 0, 0, made_up) == 0
    assert [p.gpu for p in stored(store, job.id)] == ["GPU-a"]
    assert store.add_points(job.id, job.attempts, 1, 1, [point(1, 2, "GPU-zz")]) == 1
    assert store.points_seq(job.id, job.attempts) == 1
    assert store.add_points(job.id, job.attempts, 2, 2, batch_points(2)) == 2
    assert len(stored(store, job.id)) == 3
