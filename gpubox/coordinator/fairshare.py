"""Fair share between submitters: each one's recent use of the GPUs, and what its running
jobs hold now (which its token's caps limit).

Within one priority, the scheduler starts first the jobs of the submitter that used the GPUs
least lately (equal use: the earlier job first). A submitter's use is its GPU-seconds,
each counted less the longer ago it was used:

    use = Σ over its jobs of  w × s × 2^(−a / H)

    w  the GPUs the job holds; a job with `gpus: 0` counts as CPU_JOB_SHARE of one
    s  the seconds its last attempt ran (from its container's start to its end; a job still
       running: so far)
    a  the seconds since it ended (0 while it runs)
    H  fair_share_half_life: use from one half-life ago counts half, from two a quarter

An attempt that a lost worker cut short and that was queued again is not counted. With H 0,
fair share is off: the queue is in submission order within a priority, as before it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gpubox import models

if TYPE_CHECKING:
    from gpubox.store import Store, base

CPU_JOB_SHARE = 0.1  # the part of a GPU that a job with `gpus: 0` counts as
HORIZON_HALF_LIVES = 10  # use older than this counts less than 0.1 %: not read at start
# How often a round reads the running jobs from the store: the net under the changes the
# broker does not tell (Tracker). A read takes ~20 ms for 8,000 running jobs on SQLite, so it
# is not done every second: at 1,000 workers that made the slowest 3 % of decisions.
READ_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class Held:
    """What one submitter's running jobs hold now."""

    jobs: int = 0
    gpus: int = 0


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Fair share at one moment: every submitter's use, what its jobs hold, and its caps."""

    at: float = 0.0  # Unix time
    half_life_s: float = 0.0  # 0: fair share is off (use is empty)
    use: dict[str | None, float] = dataclasses.field(default_factory=dict)  # GPU-seconds
    held: dict[str | None, Held] = dataclasses.field(default_factory=dict)
    caps: dict[str, models.Caps] = dataclasses.field(default_factory=dict)
    # Whether a job that ran is queued again since the refresh before (its worker was lost):
    # the queue may have a group the scheduler did not list.
    requeued: bool = False

    def use_of(self, submitter: str | None) -> float:
        return self.use.get(submitter, 0.0)

    def order(self, priority: int, submitter: str | None) -> tuple[int, float]:
        """Where jobs of this priority and submitter stand: lower goes first; the job's id
        breaks ties."""
        return -priority, self.use_of(submitter)

    def key(self, job: models.Job) -> tuple[int, float, int]:
        """A queued job's place in the fair order: lower goes first."""
        return (*self.order(job.spec.priority, job.spec.submitter), job.id)

    def caps_of(self, submitter: str | None) -> models.Caps:
        return self.caps.get(submitter or "", NO_CAPS)


NO_CAPS = models.Caps()


def weight(gpus: int) -> float:
    """The GPUs a job counts as for its submitter's use."""
    return float(gpus) if gpus else CPU_JOB_SHARE


def over_cap(caps: models.Caps, held: Held, gpus: int) -> str:
    """Which cap a job of `gpus` GPUs would pass if it started now, in words ("" if none)."""
    if caps.max_running is not None and held.jobs + 1 > caps.max_running:
        return f"runs {_count(held.jobs, 'job')} of its max_running {caps.max_running}"
    if caps.max_gpus is not None and gpus and held.gpus + gpus > caps.max_gpus:
        return f"holds {_count(held.gpus, 'GPU')} of its max_gpus {caps.max_gpus}"
    return ""


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def allowance(caps: models.Caps, held: Held, gpus: int) -> int | None:
    """How many more jobs of `gpus` GPUs the caps let start (None: no limit)."""
    left = []
    if caps.max_running is not None:
        left.append(caps.max_running - held.jobs)
    if caps.max_gpus is not None and gpus:
        left.append((caps.max_gpus - held.gpus) // gpus)
    return max(0, min(left)) if left else None


def place(
    job: models.Job,
    groups: Iterable[base.QueueGroup],
    tied_before: Callable[[], dict[str | None, int]],
    sharing: Snapshot,
) -> dict[str, Any]:
    """Where a queued job stands in the fair order, for people: its place (1: next), the
    jobs ahead of it by submitter with each one's use, and its own submitter's use (use in
    GPU-hours). Of the submitters that tie with its own, the jobs with a lower id are ahead:
    counted from the groups when no tied group holds a later job than this one (a submit's
    own answer, the usual case), else read: `tied_before()` gives, by submitter, the queued
    jobs of its priority with a lower id (a count over the queue: 2 ms at 10,000 jobs)."""
    mine = sharing.order(job.spec.priority, job.spec.submitter)
    ahead: dict[str | None, int] = {}
    tied: dict[str | None, int] = {}  # the tied groups' jobs with a lower id than this one
    later = False  # whether a tied group holds a job after this one
    for group in groups:
        order = sharing.order(group.priority, group.submitter)
        if order < mine:
            ahead[group.submitter] = ahead.get(group.submitter, 0) + group.jobs
        elif order == mine:
            itself = 1 if group.last == job.id else 0
            tied[group.submitter] = tied.get(group.submitter, 0) + group.jobs - itself
            later = later or group.last > job.id
    if later:
        tied = {who: count for who, count in tied_before().items() if who in tied}
    for submitter, count in tied.items():
        if count:
            ahead[submitter] = ahead.get(submitter, 0) + count
    ranked = sorted(ahead.items(), key=lambda item: (-item[1], item[0] or ""))
    return {
        "place": sum(ahead.values()) + 1,
        "ahead": [
            {"submitter": who, "jobs": count, "use_gpu_hours": _hours(sharing.use_of(who))}
            for who, count in ranked
        ],
        "use_gpu_hours": _hours(sharing.use_of(job.spec.submitter)),
        "half_life_s": sharing.half_life_s,
    }


def _hours(gpu_seconds: float) -> float:
    return round(gpu_seconds / 3600, 6)


@dataclasses.dataclass
class _Run:
    """A running job as the tracker keeps it between reads."""

    submitter: str | None
    gpus: int
    executed_at: str | None  # as stored, to see whether it changed
    started: float | None  # executed_at as Unix time


@dataclasses.dataclass
class _Holding:
    """What one submitter's running jobs hold, and what their use grows by: `weight` GPUs
    counted since, on average, `since` (use now = weight × now − weighted_start)."""

    jobs: int = 0
    gpus: int = 0
    weight: float = 0.0  # Σ weight(gpus) of its started jobs
    weighted_start: float = 0.0  # Σ weight(gpus) × start

    def add(self, run: _Run, sign: int = 1) -> None:
        self.jobs += sign
        self.gpus += sign * run.gpus
        if run.started is not None:
            self.weight += sign * weight(run.gpus)
            self.weighted_start += sign * weight(run.gpus) * run.started


class Tracker:
    """Keeps every submitter's use and holdings up to date for the broker's rounds.

    Each round reads the tokens' caps. Every READ_EVERY_S, it reads the running jobs too:
    those gone since the last read that ended are counted as ended (read by id), and a job
    that ran and is queued again says the queue changed. Between reads, the broker tells
    what it claimed (claimed), what started (started: its use counts from then), and what
    ended or was queued again (ended), so a cap is never passed: a job that ended in a way
    the broker did not see still counts as held until the next read, which errs on the safe
    side. The jobs that ended before the coordinator started are read once, at the first
    read. The broker's thread refreshes; any thread may read
    `snapshot`."""

    def __init__(
        self, store: Store, half_life_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.half_life_s = half_life_s
        self.clock = clock
        self.snapshot = Snapshot(half_life_s=half_life_s)
        self._ended: dict[str | None, float] = {}  # use of ended jobs, as of self._as_of
        self._as_of = 0.0
        self._running: dict[int, _Run] = {}
        self._unread: list[int] = []  # jobs that ended before a read saw them start
        self._holding: dict[str | None, _Holding] = {}
        self._read_at = -math.inf
        self._loaded = False
        self._caps: dict[str, models.Caps] = {}
        self._lock = threading.Lock()  # one change at a time

    def refresh(self, read: bool = False) -> Snapshot:
        """The snapshot as of now (also kept in `snapshot`), reading the running jobs when
        READ_EVERY_S have passed since the last read, or when `read` is true."""
        with self._lock:
            now = self.clock()
            requeued = False
            if read or now - self._read_at >= READ_EVERY_S:
                requeued = self._read(now)
            # Every round: a token made or changed a moment ago has its caps in force at once
            # (a read of the few tokens that have caps: ~50 µs).
            self._caps = self.store.token_caps()
            if self.half_life_s:
                self._decay(now)
            self.snapshot = self._snapshot(now, requeued)
            return self.snapshot

    def claimed(self, jobs: Iterable[models.Job]) -> None:
        """Jobs the broker just claimed: they hold their GPUs from now on."""
        with self._lock:
            for job in jobs:
                if job.id not in self._running:
                    run = _Run(job.spec.submitter, job.spec.gpus, None, None)
                    self._running[job.id] = run
                    self._holding.setdefault(run.submitter, _Holding()).add(run)

    def started(self, job_id: int, executed_at: datetime) -> None:
        """A job the broker saw start (its STARTED stored): its use counts from then on."""
        with self._lock:
            run = self._running.get(job_id)
            if run is None or run.started is not None:
                return
            holding = self._holding[run.submitter]
            holding.add(run, -1)
            run.executed_at = models.format_time(executed_at)  # as a read would find it
            run.started = executed_at.timestamp()
            holding.add(run)

    def ended(self, job_id: int) -> None:
        """A job the broker saw end: it holds nothing from now on, and the use it had
        (to now) is counted as ended."""
        with self._lock:
            run = self._running.pop(job_id, None)
            if run is None:
                return
            self._holding[run.submitter].add(run, -1)
            if run.started is None:
                # Claimed and ended between two reads: when it started is read with the rest.
                self._unread.append(job_id)
            elif self.half_life_s:
                now = self.clock()
                self._decay(now)
                used = weight(run.gpus) * max(0.0, now - run.started)
                self._ended[run.submitter] = self._ended.get(run.submitter, 0.0) + used

    def _read(self, now: float) -> bool:
        """Read the running jobs; whether one that ran was queued again since."""
        self._read_at = now
        running = {}
        for row in self.store.running_use():
            before = self._running.get(row.id)
            if before is not None and before.executed_at == row.executed_at:
                started = before.started
            else:
                started = _unix(row.executed_at)
            running[row.id] = _Run(row.submitter, row.gpus, row.executed_at, started)
        if self.half_life_s:
            self._decay(now)
            if not self._loaded:
                self._load(now, running)
        self._loaded = True
        gone = [job_id for job_id in self._running if job_id not in running]
        gone, self._unread = gone + self._unread, []
        ended = self.store.ended_use(gone) if gone else []
        if self.half_life_s:
            self._add_ended(ended, now)
        self._running = running
        self._holding = {}
        for run in running.values():
            self._holding.setdefault(run.submitter, _Holding()).add(run)
        return len(ended) < len(gone)

    def _snapshot(self, now: float, requeued: bool) -> Snapshot:
        use = dict(self._ended)
        held = {}
        for who, holding in self._holding.items():
            if holding.jobs:
                held[who] = Held(holding.jobs, holding.gpus)
            if self.half_life_s and holding.weight:
                running = max(0.0, holding.weight * now - holding.weighted_start)
                use[who] = use.get(who, 0.0) + running
        return Snapshot(now, self.half_life_s, use, held, self._caps, requeued)

    def _decay(self, now: float) -> None:
        if now > self._as_of:
            factor = 2.0 ** (-(now - self._as_of) / self.half_life_s)
            self._ended = {who: use * factor for who, use in self._ended.items() if use > 1e-9}
        self._as_of = max(self._as_of, now)

    def _load(self, now: float, running: dict[int, _Run]) -> None:
        """Count the jobs that ended within the horizon. A job read as running that ended
        since is counted here, and no longer as running."""
        since = now - HORIZON_HALF_LIVES * self.half_life_s
        ended = self.store.ended_use_since(datetime.fromtimestamp(since, UTC))
        for use in ended:
            running.pop(use.id, None)
        self._add_ended(ended, now)

    def _add_ended(self, ended: Iterable[base.Use], now: float) -> None:
        for use in ended:
            started, finished = _unix(use.executed_at), _unix(use.finished_at)
            if started is None or finished is None:
                continue
            seconds = max(0.0, finished - started)
            age = max(0.0, now - finished)
            value = weight(use.gpus) * seconds * 2.0 ** (-age / self.half_life_s)
            self._ended[use.submitter] = self._ended.get(use.submitter, 0.0) + value


def _unix(text: str | None) -> float | None:
    when = models.parse_time(text)
    return None if when is None else when.timestamp()
