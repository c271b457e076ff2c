"""The fleet rows: one coordinator and a fleet far bigger than this machine, simulated. 100,
300 and 1,000 workers of 8 made-up GPUs each, 100,000 queued jobs (quick: 20 and 50
workers, 2,000 jobs).

The coordinator is a real `gpubox coordinator` process on SQLite, its queue filled through
the store before it starts (jobs of scheduling_rows' kinds and submitters, caps on a fifth
of them). The workers are simulated (benchlib.fleet_workers), PER_PROCESS to a process,
speaking the real protocol over real ZeroMQ with CURVE; so the coordinator's CPU, read from
/proc, is its own. For each size, in turn, over a window each:
  alone        no worker connected: the coordinator's own timers over the queue;
  connected    the fleet connected, no READY yet: heartbeats both ways and the broker's
               per-worker bookkeeping, with nothing more to plan than alone. "Heartbeats
               alone" is the CPU this adds to alone's;
  idle         every READY offers no slot: the timer's round, once a second, now plans the
               queue on the whole fleet;
  rounds       the workers open (their READYs offer what is free) at moments spread over
               half the warm-up, and jobs run and end; after the warm-up (long enough for
               the coordinator to fill every GPU once), the broker's own rounds from
               gpubox_schedule_round_seconds and gpubox_schedule_decision_seconds
               (fleet_probe.rounds: a percentile is off by at most its bucket's width; the
               targets are bounds, so whether one is met is exact). A job's run time grows
               with the fleet (1-5 s at 100 workers, 10-50 s at 1,000), so every size offers
               the coordinator the same ~270 starts a second: the rows show what the fleet's
               size costs, not a load that grows with it past what this machine can start;
  RSS          the coordinator's with the fleet idle, after the rounds, and its peak.
The growth row gives each figure's ratio per step next to the fleet's, and flags what grew
faster than the fleet."""

from __future__ import annotations

import dataclasses
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import fleet_workers, scheduling_rows
from benchlib.common import Context, Row, cluster, ms
from benchlib.fleet_probe import (
    DECISIONS,
    DECISIONS_CPU,
    Rounds,
    Share,
    memory_mb,
    rounds,
    share,
)
from benchlib.fleet_sims import Fleet
from gpubox import models
from gpubox.store import open_store

SIZES, QUICK_SIZES = (100, 300, 1000), (20, 50)
QUEUED, QUICK_QUEUED = 100_000, 2000
CONNECTED = "gpubox_workers_connected"
# Seconds: settle, alone, connected, idle, warm-up, rounds; full and quick. The connected
# window is a whole number of heartbeat intervals.
PHASES, QUICK_PHASES = (3.0, 10.0, 20.0, 10.0, 20.0, 20.0), (0.2, 1.0, 2.0, 0.5, 1.0, 1.5)
LAGGING_S = 1.0  # a simulated worker process's turn longer than this: the machine is the limit
# A job's run time at 100 workers; it grows with the fleet, so that the starts a second
# every size asks for stay the same (GPUS × 100 / 3 s ≈ 270).
RUN_S_AT_100 = fleet_workers.RUN_S
FILL_PER_S = 250  # starts a second the warm-up allows for filling every GPU once


@dataclasses.dataclass
class Measured:
    """One fleet size's figures (see the module's docstring for the windows)."""

    workers: int
    alone: Share
    connected: Share
    idle: Share
    idle_rounds: Rounds
    busy: Share
    busy_rounds: Rounds
    busy_decisions: Rounds  # the same rounds' plans alone
    busy_decisions_cpu: Rounds  # the broker thread's CPU time in them
    run_s: tuple[float, float]  # a job's run time, drawn evenly
    ended_per_s: float
    sims_cores: float  # CPU of the simulated workers over the rounds' window, in cores
    idle_mb: float
    rss_mb: float  # after the rounds' window
    peak_mb: float
    list_workers_s: float  # GET /api/v1/workers, the fleet idle
    stayed: int  # workers connected at the end of each window, the fewest
    tally: fleet_workers.Tally

    @property
    def heartbeats(self) -> float:
        return max(0.0, self.connected.cpu - self.alone.cpu)


def fleet(ctx: Context) -> list[Row]:
    sizes = QUICK_SIZES if ctx.quick else SIZES
    queued = QUICK_QUEUED if ctx.quick else QUEUED
    base = ctx.tmp / "fleet.db"
    started = time.monotonic()
    fill(base, queued)
    _say(f"{queued:,} jobs queued in {time.monotonic() - started:.1f} s")
    rows, measured = [], []
    for workers in sizes:
        got = measure(ctx, base, workers)
        measured.append(got)
        rows += size_rows(got, queued)
    return [*rows, growth_row(measured)]


def fill(path: Path, queued: int) -> None:
    """A SQLite store at `path` with `queued` queued jobs of 50 submitters, caps on a fifth."""
    store = open_store(f"sqlite:///{path}")
    rng = random.Random(25)
    names = [f"user{n:02d}" for n in range(scheduling_rows.SUBMITTERS)]
    now = models.utcnow()
    try:
        for name in names[::5]:
            caps = models.Caps(max_gpus=64)
            store.add_token(models.Token(name, f"{name:0<64}", "submit", now, caps=caps))
        for first in range(0, queued, 5000):
            with store.batch():
                for _ in range(first, min(queued, first + 5000)):
                    fields = rng.choice(scheduling_rows.KINDS)
                    priority = rng.choice([0, 0, 0, 1])
                    spec = scheduling_rows._spec(fields, rng.choice(names), priority)
                    store.create_job(spec, now)
    finally:
        store.close()


def measure(ctx: Context, base: Path, workers: int) -> Measured:
    """A coordinator on a copy of the filled store, then a fleet of `workers`: each window."""
    settle_s, alone_s, connected_s, idle_s, warm_s, window_s = QUICK_PHASES if ctx.quick else PHASES
    db = ctx.tmp / f"fleet-{workers}.db"
    shutil.copy(base, db)
    names = [f"sim-{index:04d}" for index in range(workers)]
    started = time.monotonic()
    with cluster(dataclasses.replace(ctx, db=f"sqlite:///{db}"), enrol=names) as made:
        pid = made.coordinator.pid
        time.sleep(settle_s)
        alone, _, _ = share(made, alone_s)
        scale = workers / 100
        shape = fleet_workers.Shape(run_s=(RUN_S_AT_100[0] * scale, RUN_S_AT_100[1] * scale))
        if not ctx.quick:
            warm_s = max(warm_s, fleet_workers.GPUS * workers / FILL_PER_S)
        fleet = Fleet(str(made.state), made.link, names, ramp_s=warm_s / 2, shape=shape)
        with fleet as sims:
            sims.wait_welcomed(timeout_s=60 + workers / 10)
            _say(f"{workers} workers connected in {time.monotonic() - started:.1f} s")
            time.sleep(settle_s)
            connected, _, there = share(made, connected_s)
            list_workers_s = statistics.median(timed(made.client.workers) for _ in range(3))
            sims.report.set()  # READY, with no slot
            time.sleep(settle_s)
            idle, before, after = share(made, idle_s)
            idle_mb = memory_mb(pid)[0]
            sims.go.set()  # the workers open within warm_s / 2
            time.sleep(warm_s)
            sims_before = sims.cpu_s()
            busy, start, end = share(made, window_s)
            sims_cores = (sims.cpu_s() - sims_before) / window_s
            rss, peak = memory_mb(pid)
            stayed = int(min(there[CONNECTED], after[CONNECTED], end[CONNECTED]))
    ended = end['gpubox_jobs{status="FINISHED"}'] - start['gpubox_jobs{status="FINISHED"}']
    return Measured(
        workers=workers,
        alone=alone,
        connected=connected,
        idle=idle,
        idle_rounds=rounds(before, after),
        busy=busy,
        busy_rounds=rounds(start, end),
        busy_decisions=rounds(start, end, DECISIONS),
        busy_decisions_cpu=rounds(start, end, DECISIONS_CPU),
        run_s=shape.run_s,
        ended_per_s=ended / window_s,
        sims_cores=sims_cores,
        idle_mb=idle_mb,
        rss_mb=rss,
        peak_mb=peak,
        list_workers_s=list_workers_s,
        stayed=stayed,
        tally=sims.tally,
    )


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def trouble(got: Measured) -> str:
    """What went wrong with the fleet itself, if anything: the figures mean less then."""
    tally, found = got.tally, []
    if got.stayed < got.workers:
        found.append(f"only {got.stayed} of {got.workers} stayed connected")
    if tally.hellos_again:
        found.append(f"{tally.hellos_again} sessions forgotten (HELLO again)")
    if tally.refused:
        found.append(f"{tally.refused} HELLOs refused")
    if tally.cancels:
        found.append(f"{tally.cancels:,} jobs cancelled: sent and taken back unconfirmed")
    if tally.turn_max_s > LAGGING_S:
        found.append(f"the simulated workers lagged up to {tally.turn_max_s:.1f} s")
    return "; ".join(found)


def size_rows(got: Measured, queued: int) -> list[Row]:
    low, high = got.run_s
    fleet = (
        f"{got.workers:,} workers × {fleet_workers.GPUS} GPUs, {queued:,} queued, jobs of"
        f" {low:g}-{high:g} s"
    )
    busy, idle, decided = got.busy_rounds, got.idle_rounds, got.busy_decisions
    slowest = "past 2.5 s" if busy.slowest == float("inf") else f"≤ {ms(busy.slowest)}"
    tally = got.tally
    health = trouble(got) or (
        f"no session lost, silence ≤ {tally.silent_max_s:.1f} s, {tally.resent} DONEs resent"
    )
    hb_broker = max(0.0, got.connected.broker - got.alone.broker)
    return [
        Row(
            f"fleet scheduling round, {fleet}",
            f"p50 {ms(busy.p50)}, p99 {ms(busy.p99)}, slowest {slowest} ({busy.count:,}"
            f" rounds, {got.busy.rounds:.0%} of the wall clock; {got.ended_per_s:,.0f} jobs"
            f" ended/s)",
            f"fleet idle: timer round p50 {ms(idle.p50)}; machine {got.busy.machine:.0%} busy,"
            f" simulated workers {got.sims_cores:.2f} cores; {health}",
            "—",
        ),
        Row(
            f"fleet scheduling decision, {fleet}",
            f"p50 {ms(decided.p50)}, p99 {ms(decided.p99)} (the same rounds' plans alone:"
            " which jobs go where and why the rest wait)",
            f"the broker thread's CPU in them: p50 {ms(got.busy_decisions_cpu.p50)}, p99"
            f" {ms(got.busy_decisions_cpu.p99)} (the rest of the wall time: waiting for a"
            " core or the GIL)",
            "p50 ≤ 5 ms, p99 ≤ 50 ms",
            decided.p50 <= 0.005 and decided.p99 <= 0.05 and not trouble(got),
        ),
        Row(
            f"fleet heartbeats alone, {fleet}",
            f"{got.heartbeats:.1%} of a core (broker thread {hb_broker:.1%}): connected"
            f" {got.connected.cpu:.1%}, none connected {got.alone.cpu:.1%}",
            f"fleet idle with READY: {got.idle.cpu:.1%} (timer rounds {got.idle.rounds:.1%});"
            f" GET /api/v1/workers {ms(got.list_workers_s)}",
            "≤ 5 % of a core",
            got.heartbeats <= 0.05,
        ),
        Row(
            f"fleet coordinator RSS, {fleet}",
            f"{got.idle_mb:.0f} MB idle, {got.rss_mb:.0f} MB after the rounds"
            f" (peak {got.peak_mb:.0f} MB)",
            target="≤ 500 MB",
            met=got.peak_mb <= 500,
        ),
    ]


# (name, figure, the least value a ratio is taken from: below it, noise). CPU is read in
# ticks of 10 ms: 0.5 % of a core is a tick every 2 s.
FIGURES: list[tuple[str, Callable[[Measured], float], float]] = [
    ("round p50", lambda m: m.busy_rounds.p50, 0.0005),
    ("round p99", lambda m: m.busy_rounds.p99, 0.0005),
    ("decision p50", lambda m: m.busy_decisions.p50, 0.0005),
    ("decision p99", lambda m: m.busy_decisions.p99, 0.0005),
    ("timer round p50", lambda m: m.idle_rounds.p50, 0.0005),
    ("heartbeats alone", lambda m: m.heartbeats, 0.005),
    ("RSS idle", lambda m: m.idle_mb, 1.0),
    ("RSS peak", lambda m: m.peak_mb, 1.0),
    ("GET /workers", lambda m: m.list_workers_s, 0.0005),
]


def growth_row(measured: list[Measured]) -> Row:
    """Each figure's ratio from one size to the next, next to the fleet's ("–": too small to
    tell); a figure that grew faster than the fleet (by more than a tenth, for noise) is
    flagged."""
    steps = list(zip(measured, measured[1:], strict=False))
    fleet = [b.workers / a.workers for a, b in steps]
    parts, faster = [], []
    for name, figure, least in FIGURES:
        ratios = [figure(b) / figure(a) if figure(a) >= least else None for a, b in steps]
        parts.append(f"{name} " + ", ".join("–" if r is None else f"×{r:.1f}" for r in ratios))
        faster += [
            f"{name} ×{r:.1f} for ×{f:.1f} workers"
            for r, f in zip(ratios, fleet, strict=True)
            if r is not None and r > 1.1 * f
        ]
    sizes = "→".join(f"{m.workers:,}" for m in measured)
    return Row(
        f"fleet growth per step, {sizes} workers (×{', ×'.join(f'{f:.1f}' for f in fleet)})",
        "; ".join(parts),
        "faster than the fleet: " + ("; ".join(faster) if faster else "none"),
        "none faster than the fleet",
        not faster,
    )


def _say(text: str) -> None:
    print(f"bench: fleet: {text}", file=sys.stderr, flush=True)


ROWS: dict[str, Callable[[Context], list[Row]]] = {"fleet": fleet}
