"""`gpubox ls`: the jobs, newest first, by the filters of GET /api/v1/jobs, with a paging
hint that keeps them."""

from __future__ import annotations

import shlex
from typing import Any

import click

from gpubox.cli import failures, options, tables
from gpubox.cli.jobs import _pairs, _print_json, make_client


@click.command(name="ls")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(
        ["QUEUED", "RUNNING", "FINISHED", "ERROR", "CANCELLED"], case_sensitive=False
    ),
    help="only jobs in this status (repeatable: any of them)",
)
@click.option("--name", help="only jobs whose name starts with this")
@click.option("--submitter", help="only jobs submitted with the token of this name")
@click.option(
    "--label", "-l", "labels", multiple=True, metavar="K=V", help="only jobs with this label"
)
@click.option(
    "--metadata",
    "metadata",
    multiple=True,
    metavar="K=V",
    help="only jobs whose metadata has this top-level key with this value (repeatable)",
)
@click.option("--created-after", metavar="TIME", help="RFC 3339 (2026-12-06T10:00:00Z)")
@click.option("--created-before", metavar="TIME", help="RFC 3339")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--before", type=int, help="only jobs with a smaller id (for paging)")
@click.option("--quiet", "-q", is_flag=True, help="print the jobs' ids alone, one a line")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@options.client_options
@failures.friendly
def ls(
    statuses: tuple[str, ...],
    name: str | None,
    submitter: str | None,
    labels: tuple[str, ...],
    metadata: tuple[str, ...],
    created_after: str | None,
    created_before: str | None,
    limit: int,
    before: int | None,
    quiet: bool,
    as_json: bool,
    config_path: str | None,
    **flags: Any,
) -> None:
    """List jobs, newest first; every filter given must match.

    
    Examples:
      gpubox ls --status error --status cancelled
      gpubox ls --metadata pipeline=p42 --json | jq '.jobs[].id'
      gpubox ls --name train- --created-after 2026-12-06T00:00:00Z
      gpubox ls -q --status running --metadata pipeline=p42 | xargs -r -n1 gpubox cancel
    """
    statuses = tuple(s.upper() for s in statuses)
    page = make_client(config_path, flags).jobs(
        statuses,
        limit,
        before,
        name=name,
        submitter=submitter,
        labels=_pairs(labels, "--label"),
        metadata=_pairs(metadata, "--metadata"),
        created_after=created_after,
        created_before=created_before,
    )
    if as_json:
        _print_json(page)
        return
    if quiet:
        for job in page["jobs"]:
            click.echo(job["id"])
    else:
        for line in tables.jobs(page["jobs"]):
            click.echo(line)
    if page["next"]:
        again = ["gpubox", "ls"]
        again += [f for s in statuses for f in ("--status", s)]
        for flag, value in (
            ("--name", name),
            ("--submitter", submitter),
            ("--created-after", created_after),
            ("--created-before", created_before),
        ):
            again += [flag, value] if value else []
        again += [f for pair in labels for f in ("--label", pair)]
        again += [f for pair in metadata for f in ("--metadata", pair)]
        again += ["--limit", str(limit)] if limit != 20 else []
        again += ["-q"] if quiet else []
        again += ["--before", str(page["next"])]
        click.echo(f"(more: {shlex.join(again)})", err=True)
