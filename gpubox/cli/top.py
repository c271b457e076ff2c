"""`gpubox top`: the fleet's GPUs, refreshed live, one line per GPU with the job holding it.

Two API answers make each refresh: GET /workers (each worker's GPUs, with what NVML read at the
worker's last heartbeat) and the running jobs (the GPU UUIDs each one holds). `frame` and
`screen` turn them into text without I/O, so tests check the lines without a coordinator;
`top` fetches, draws and waits.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from datetime import datetime
from typing import Any

import click

from gpubox import errors
from gpubox.cli import failures, options
from gpubox.cli.jobs import make_client
from gpubox.cli.tables import printable
from gpubox.client import ApiError, Client

# Home the cursor, then clear the screen: a terminal redraws in place, as `watch` does.
CLEAR = "\x1b[H\x1b[2J"
SHORT_UUID = 12  # "GPU-" and the first 8 hex digits of NVML's UUID
PAGE = 1000  # running jobs asked for at once (the API's most)
# Each column's title and alignment: numbers to the right, words to the left.
COLUMNS = (
    ("WORKER", "<"),
    ("GPU", ">"),
    ("UUID", "<"),
    ("UTIL", ">"),
    ("MEMORY", ">"),
    ("POWER", ">"),
    ("JOB", ">"),
    ("SUBMITTER", "<"),
    ("NAME", "<"),
)


@dataclasses.dataclass(frozen=True)
class GpuState:
    """One GPU as top shows it: where it is, NVML's readings (None: none), its job."""

    worker: str
    connected: bool
    index: int
    uuid: str
    memory_mb: float | None
    memory_used_mb: float | None
    utilization: float | None
    power_w: float | None
    job: dict[str, Any] | None


def _number(value: Any) -> float | None:
    """A reading as a number, or None where the worker sent none (or something else)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def holders(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each held GPU's UUID → the running job that holds it."""
    return {uuid: job for job in jobs for uuid in (job.get("result") or {}).get("gpus") or []}


def gpu_states(workers: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[GpuState]:
    """Every GPU of every worker the API lists, by worker name and index, joined by UUID to
    the running job holding it."""
    held = holders(jobs)
    found = []
    for worker in workers:
        for position, gpu in enumerate(worker.get("gpus") or []):
            uuid = str(gpu.get("uuid") or "")
            index = gpu.get("index")
            found.append(
                GpuState(
                    worker=str(worker["name"]),
                    connected=bool(worker.get("connected")),
                    index=index if isinstance(index, int) else position,
                    uuid=uuid,
                    memory_mb=_number(gpu.get("memory_mb")),
                    memory_used_mb=_number(gpu.get("memory_used_mb")),
                    utilization=_number(gpu.get("utilization")),
                    power_w=_number(gpu.get("power_w")),
                    job=held.get(uuid),
                )
            )
    return sorted(found, key=lambda state: (state.worker, state.index))


def header(states: list[GpuState], now: datetime) -> str:
    """The line above the table: the time, how many GPUs a job holds, their mean utilization
    (over the GPUs with a reading)."""
    busy = sum(1 for state in states if state.job is not None)
    readings = [state.utilization for state in states if state.utilization is not None]
    mean = f"{sum(readings) / len(readings):.0f} %" if readings else "-"
    stamp = now.strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp}  GPUs busy {busy}/{len(states)}  mean utilization {mean}"


def _cells(state: GpuState) -> tuple[str, ...]:
    job = state.job or {}
    used = "-" if state.memory_used_mb is None else f"{state.memory_used_mb:.0f}"
    total = "-" if state.memory_mb is None else f"{state.memory_mb:.0f}"
    return (
        printable(state.worker) + ("" if state.connected else " (lost)"),
        str(state.index),
        printable(state.uuid[:SHORT_UUID]) or "-",
        "-" if state.utilization is None else f"{state.utilization:.0f} %",
        f"{used}/{total} MiB",
        "-" if state.power_w is None else f"{state.power_w:.0f} W",
        str(job.get("id", "-")),
        printable(job.get("submitter") or "-"),
        printable(job.get("name") or "-"),
    )


def table(states: list[GpuState]) -> list[str]:
    """The column titles and one line per GPU, each column as wide as its widest cell."""
    rows = [tuple(title for title, _ in COLUMNS), *(_cells(state) for state in states)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return [
        "  ".join(
            f"{cell:{align}{width}}"
            for cell, width, (_, align) in zip(row, widths, COLUMNS, strict=True)
        ).rstrip()
        for row in rows
    ]


def frame(workers: list[dict[str, Any]], jobs: list[dict[str, Any]], now: datetime) -> list[str]:
    """One refresh: the header line, then the table (or why there is none)."""
    states = gpu_states(workers, jobs)
    if not states:
        return [header(states, now), "no GPUs: no worker the coordinator knows offers any"]
    return [header(states, now), *table(states)]


def screen(lines: list[str], tty: bool, columns: int = 80, rows: int = 24) -> str:
    """The text one refresh writes. On a terminal of `columns` × `rows`: the screen cleared
    and the lines cut to fit it, with no newline after the last (which would scroll the
    header away). Elsewhere: the lines as they are, each ending in a newline."""
    if not tty:
        return "".join(line + "\n" for line in lines)
    if len(lines) > rows:
        hidden = len(lines) - rows + 1
        lines = [*lines[: rows - 1], f"… {hidden} more lines (a taller window shows them)"]
    return CLEAR + "\n".join(line[:columns] for line in lines)


def fetch(client: Client) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The workers and every running job, as the API gives them."""
    workers: list[dict[str, Any]] = client.workers()["workers"]
    jobs: list[dict[str, Any]] = []
    before = None
    while True:
        page = client.jobs("RUNNING", PAGE, before)
        jobs += page["jobs"]
        before = page["next"]
        if before is None:
            return workers, jobs


def watch(client: Client, interval_s: float, iterations: int | None, tty: bool) -> None:
    """Draw a refresh every `interval_s` until `iterations` are drawn (None: until Ctrl-C).
    The first refresh fails at once if the coordinator cannot be reached or refuses the token;
    a later one that cannot reach it says so on screen and tries again at the next."""
    due = time.monotonic()
    drawn = 0
    while True:
        now = datetime.now().astimezone()
        try:
            lines = frame(*fetch(client), now)
        except errors.GpuboxError as exc:
            if drawn == 0 or (isinstance(exc, ApiError) and exc.status < 500):
                raise  # a wrong URL or token should not look like an outage
            lines = [f"{now:%Y-%m-%d %H:%M:%S}  {exc}; trying again in {interval_s:g} s"]
        if drawn and not tty:
            click.echo("")  # a blank line between refreshes in a log
        size = shutil.get_terminal_size()
        click.echo(screen(lines, tty, size.columns, size.lines), nl=False)
        drawn += 1
        if iterations is not None and drawn >= iterations:
            if tty:
                click.echo("")  # the shell's prompt goes below the table
            return
        # Refreshes keep their pace however long a fetch takes, and never bunch up after a
        # slow one.
        due = max(due + interval_s, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))


def _interval(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    # click's FloatRange lets NaN through: every comparison with it is false.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=2.0,
    show_default=True,
    callback=_interval,
    help="seconds between refreshes",
)
@click.option(
    "-n",
    "--iterations",
    type=click.IntRange(min=1),
    help="stop after this many refreshes [default: run until Ctrl-C]",
)
@click.option("--once", is_flag=True, help="print one refresh and exit (same as -n 1)")
@options.client_options
@failures.friendly
def top(
    interval: float,
    iterations: int | None,
    once: bool,
    config_path: str | None,
    **flags: Any,
) -> None:
    """Show the fleet's GPUs live, one line per GPU, with the job holding each; refreshed
    every 2 s until Ctrl-C.

    \b
    Columns:
      WORKER     the worker that offers the GPU; "(lost)": it is not connected now
      GPU        the GPU's index on that worker, as NVML numbers them
      UUID       the start of the GPU's UUID (`gpubox gpus` on the worker shows it whole)
      UTIL       how busy the GPU was, in % of the time (NVML's utilization)
      MEMORY     GPU memory in use, of its total, in MiB
      POWER      power drawn, in watts
      JOB        the id of the running job that holds the GPU
      SUBMITTER  the name of the API token that submitted that job
      NAME       that job's name
    "-" means none: a free GPU has no job, a GPU that does not report its power has no
    POWER, a worker that is not connected has no readings.

    The readings are what NVML said at each worker's last heartbeat (every 2 s by default),
    not at this instant. The header line gives the time, the GPUs a job holds of all GPUs,
    and the mean utilization of the GPUs with a reading.

    On a terminal the screen is redrawn in place. Otherwise (a pipe, a file) each refresh
    prints its header line and GPU lines, with no escape codes, a blank line between them.

    \b
    Examples:
      gpubox top
      gpubox top --once
      gpubox top --interval 10 >> gpus.log
    """
    client = make_client(config_path, flags)
    tty = sys.stdout.isatty()
    try:
        watch(client, interval, 1 if once else iterations, tty)
    except KeyboardInterrupt:
        if tty:
            click.echo("")  # the shell's prompt goes below the table, not after ^C
