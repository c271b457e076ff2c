"""The `gpubox` command: the group that every command joins, and --version.

The commands live in one module per kind: the services (`roles`), the client commands
(`jobs`, `listing`, `following` and `usage`, with `tables` for what they print), and the
administration of the store (`store_admin`) and of the worker link's keys (`key_admin`).
Each command parses its flags, loads its config, calls one function, and turns gpubox errors
into one clear line on stderr (`failures`); the flags made from the settings come from
`options`.
"""

from __future__ import annotations

import click

from gpubox import __version__, revision
from gpubox.cli import following, jobs, key_admin, listing, roles, store_admin, top, usage


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"gpubox {__version__} ({revision()})")
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the git revision it was built from, and exit.",
)
def main() -> None:
    """gpubox: a GPU job queue. Submit Docker jobs over HTTP, run them on free GPUs,
    follow their logs live.

    \b
    Try it on one box:
      gpubox up                                   # coordinator + local worker
      gpubox submit --follow busybox echo hello   # in another shell
    """


# Every command, by the module that defines it; `gpubox --help` lists them sorted by name.
for _command in (
    roles.coordinator,
    roles.worker,
    roles.up,
    roles.gpus,
    jobs.submit,
    jobs.show,
    listing.ls,
    jobs.logs,
    jobs.tail,
    following.wait,
    jobs.cancel,
    jobs.workers,
    jobs.coordinators,
    top.top,
    usage.usage_report,
    store_admin.token,
    store_admin.db,
    key_admin.keys_group,
):
    main.add_command(_command)
