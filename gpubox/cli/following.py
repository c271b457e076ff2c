"""Staying with a job until it ends: following its output (`submit --follow`, `tail`) and
waiting without it (`wait`), each exiting with the code gpubox.exits gives the job's end, and
each able to cancel the job when the CI step running it is stopped."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

import click

from gpubox import exits
from gpubox.cli import failures, options
from gpubox.client import Client, exit_code_for

QUEUED_NOTE_S = 5.0  # tail says why a job is still queued after this many seconds
CANCEL_ON_EXIT_HELP = (
    "cancel the job(s) when this command is stopped: SIGTERM or SIGHUP (a CI runner stopping"
    " the step), and SIGINT when stdin is not a terminal (GitHub Actions sends it first, to"
    " the step's shell alone: run gpubox with `exec` there); Ctrl-C at a terminal stops only"
    " the command"
)


class Stopped(Exception):
    """This process got a signal that stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stopping_signals(cancel_on_exit: bool) -> Iterator[None]:
    """With `cancel_on_exit`, SIGTERM and SIGHUP (and SIGINT when stdin is not a terminal)
    raise Stopped in the main thread while the block runs."""
    if not cancel_on_exit:
        yield
        return
    wanted = [signal.SIGTERM, signal.SIGHUP]
    if not sys.stdin.isatty():
        wanted.append(signal.SIGINT)
    before = {signum: signal.signal(signum, _raise) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def cancel_and_exit(client: Client, job_ids: list[int], stopped: Stopped) -> NoReturn:
    """Cancel the jobs (the step running them was stopped), say so, and exit as a process
    killed by that signal would (128 + its number)."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cancel short
    for job_id in job_ids:
        try:
            job = client.cancel(job_id)
            state = "cancelled" if job["status"] == "CANCELLED" else "cancelling"
            click.echo(f"gpubox: {stopped}: job {job_id} {state}", err=True)
        except Exception as exc:  # an ended job (409), or the coordinator away: say, go on
            click.echo(f"gpubox: {stopped}: could not cancel job {job_id}: {exc}", err=True)
    sys.exit(128 + stopped.signum)


def follow(
    client: Client,
    job_id: int,
    since: int = 0,
    cancel_on_exit: bool = False,
    as_json: bool = False,
) -> NoReturn:
    """Print a job's output until it ends and exit with its code. Ctrl-C at a terminal stops
    following only (exit 130), and says so; with `cancel_on_exit`, a stopping signal cancels
    the job first. With `as_json`, every line of the job goes to stderr and the ended job's
    JSON to stdout. A job still queued after QUEUED_NOTE_S is said to be, with why."""

    def note_if_queued() -> None:
        with contextlib.suppress(Exception):  # only a note: the follow itself reports errors
            job = client.job(job_id)
            if job["status"] == "QUEUED":
                why = job.get("queue_reason") or "waiting to be scheduled"
                click.echo(f"gpubox: job {job_id} is still queued: {why}", err=True)

    timer = threading.Timer(QUEUED_NOTE_S, note_if_queued)
    timer.daemon = True
    timer.start()
    try:
        with stopping_signals(cancel_on_exit):
            out = sys.stderr if as_json else sys.stdout
            code = client.tail(job_id, since, out=out)
    except Stopped as stopped:
        cancel_and_exit(client, [job_id], stopped)
    except KeyboardInterrupt:
        click.echo(
            f"\ngpubox: stopped following job {job_id}, which is not cancelled"
            f" (gpubox cancel {job_id} stops it)",
            err=True,
        )
        sys.exit(exits.CANCELLED)
    finally:
        timer.cancel()
    if as_json:
        click.echo(json.dumps(client.job(job_id), indent=2))
    sys.exit(code)


@click.command()
@click.argument("job_ids", metavar="JOB_ID...", type=int, nargs=-1, required=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="give up after this many seconds (exit 75); the jobs run on",
)
@click.option("--cancel-on-exit", is_flag=True, help=CANCEL_ON_EXIT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the ended jobs as a JSON list")
@options.client_options
@failures.friendly
def wait(
    job_ids: tuple[int, ...],
    timeout: float | None,
    cancel_on_exit: bool,
    as_json: bool,
    config_path: str | None,
    **flags: Any,
) -> NoReturn:
    """Wait until the jobs have ended, without following their output; exit with the code of
    the first of them that did not finish (0 when all did), like `sbatch --wait`.

    \b
    Examples:
      gpubox wait 42
      id=$(gpubox submit my/image) && gpubox wait --timeout 3600 "$id"
      gpubox wait 41 42 43 --json | jq '.[].status'
    Exit codes (see README): the job's own, or 0, 75 gave up, 69 coordinator unreachable,
    124 timeout, 125 not run, 130 cancelled.
    """
    from gpubox.cli.jobs import make_client

    client = make_client(config_path, flags)
    ended: list[dict[str, Any]] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with stopping_signals(cancel_on_exit):
            for job_id in job_ids:
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                job = client.wait(job_id, timeout_s=left)
                result = job.get("result") or {}
                how = result.get("error") or f"exit {result.get('exit_code')}"
                click.echo(f"job {job_id} {job['status']} ({how})", err=True)
                ended.append(job)
    except Stopped as stopped:
        cancel_and_exit(client, [j for j in job_ids if j not in {e["id"] for e in ended}], stopped)
    if as_json:
        click.echo(json.dumps(ended, indent=2))
    codes = [exit_code_for(job) for job in ended]
    sys.exit(next((code for code in codes if code != exits.OK), exits.OK))
