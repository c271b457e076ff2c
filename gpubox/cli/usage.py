"""`gpubox usage`: the usage report (GET /api/v1/usage) as a table, as CSV or as the API's
JSON. `rows` and `table` turn the report into cells and lines without I/O."""

from __future__ import annotations

import csv
import sys
from typing import Any

import click

from gpubox import errors, models, usage
from gpubox.cli import failures, options
from gpubox.cli.jobs import _print_json, make_client
from gpubox.cli.tables import _seconds, printable

TOTAL = "(total)"  # the key of the line that counts every job once
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula
# The columns after the group's key: each one's title in the table and in CSV.
COLUMNS = (
    ("GPU-HOURS", "gpu_hours"),
    ("JOBS", "jobs"),
    ("FINISHED", "finished"),
    ("ERROR", "error"),
    ("CANCELLED", "cancelled"),
    ("UTIL %", "util_mean"),
    ("WAIT P50", "wait_p50_s"),
    ("WAIT P95", "wait_p95_s"),
)


def _when(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check a --since or --until value here, with the parser the coordinator uses, so a
    typo is a usage error before any request. The text itself is sent: the coordinator
    reads a relative age against its own clock."""
    if value:
        try:
            usage.parse_when(value, str(param.name), models.utcnow())
        except errors.BadInput as exc:
            said = str(exc).removeprefix(f"{param.name} ")
            raise click.BadParameter(said, param=param) from None
    return value


def spreadsheet_safe(key: str) -> str:
    """A group's key for a CSV cell: one that starts like a formula (a label is whatever a
    submitter wrote) gets a ' before it, so that a spreadsheet shows it as text rather than
    running it."""
    return f"'{key}" if key[:1] in FORMULA_START else key


def rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per group, then the total's: the key, then the figures in COLUMNS order, as
    the API gives them (None where a figure has no value)."""
    found = []
    groups = [(group["key"], group) for group in report["groups"]]
    for key, figures in [*groups, (TOTAL, report["total"])]:
        jobs = figures["jobs"]
        found.append(
            [
                key,
                figures["gpu_hours"],
                jobs["total"],
                jobs["FINISHED"],
                jobs["ERROR"],
                jobs["CANCELLED"],
                figures["util_mean"],
                figures["wait_p50_s"],
                figures["wait_p95_s"],
            ]
        )
    return found


def table(report: dict[str, Any]) -> list[str]:
    """The report as a terminal shows it: a line saying its window, the header, a line per
    group and the TOTAL line, each column as wide as its widest cell."""
    header = [report["by"].upper(), *(title for title, _ in COLUMNS)]
    shown = [header]
    found = rows(report)
    for index, (key, hours, *counts, util, p50, p95) in enumerate(found):
        shown.append(
            [
                "TOTAL" if index == len(found) - 1 else printable(key),
                f"{hours:.2f}",
                *(str(n) for n in counts),
                "-" if util is None else f"{util:.1f}",
                _seconds(p50),
                _seconds(p95),
            ]
        )
    widths = [max(len(line[i]) for line in shown) for i in range(len(header))]
    lines = [f"Jobs that ended from {report['since']} to {report['until']}:"]
    for line in shown:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return lines


@click.command(name="usage")
@click.option(
    "--since",
    default=usage.DEFAULT_SINCE,
    show_default=True,
    metavar="WHEN",
    callback=_when,
    help="count the jobs that ended from then on: an age before now (30m, 12h, 7d, 2w), an "
    "RFC 3339 time (2026-12-01T00:00:00Z) or a date (2026-12-01, midnight UTC)",
)
@click.option(
    "--until",
    metavar="WHEN",
    callback=_when,
    help="…and before then (not included), in the same forms  [default: now]",
)
@click.option(
    "--by",
    type=click.Choice(usage.BY),
    default=usage.BY[0],
    show_default=True,
    help="one line per submitter (token name), per label KEY=VALUE, or per worker",
)
@click.option("--csv", "as_csv", is_flag=True, help="write CSV to standard output")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@options.client_options
@failures.friendly
def usage_report(
    since: str,
    until: str | None,
    by: str,
    as_csv: bool,
    as_json: bool,
    config_path: str | None,
    **flags: Any,
) -> None:
    """GPU use of the jobs that ended in a window of time, per submitter, label or worker:
    for the people who pay for the GPUs.

    \b
    Columns:
      GPU-HOURS  Σ GPUs asked for × run time (result.duration) / 3600
      JOBS       jobs that ended: FINISHED (exit code 0), ERROR, CANCELLED
      UTIL %     mean GPU utilization over the GPU time telemetry measured
      WAIT P50   median wait from submit to start (jobs that started)
      WAIT P95   95th percentile of that wait

    TOTAL counts every job once. By label, a job counts under each of its labels, so the
    groups can add up to more than TOTAL. Jobs with no submitter recorded, no labels or no
    worker are counted under (not recorded), (no labels) and (never ran). With --csv the
    numbers are written as they are, and the last row, (total), is the TOTAL line.

    \b
    Examples:
      gpubox usage                                   # the last 7 days, per submitter
      gpubox usage --since 30d --by label --csv > usage.csv
      gpubox usage --since 2026-11-01 --until 2026-12-01 --by worker
    """
    if as_csv and as_json:
        raise click.UsageError("--csv and --json: choose one")
    report = make_client(config_path, flags).usage(since, until, by)
    if as_json:
        _print_json(report)
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([by, *(name for _, name in COLUMNS)])
        for key, *numbers in rows(report):
            writer.writerow([spreadsheet_safe(key), *("" if n is None else n for n in numbers)])
    else:
        for line in table(report):
            click.echo(line)
