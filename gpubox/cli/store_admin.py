"""The commands run on the coordinator's box against its store: API tokens and the store's
schema and copies."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from gpubox import config as cfg
from gpubox import errors, models
from gpubox.cli import failures, options


@click.group()
def token() -> None:
    """Manage API tokens (run on the coordinator's box; talks to the store directly)."""


def _open_store(config_path: str | None, flags: dict[str, Any]) -> tuple[Any, str]:
    """The coordinator's store, and its URL as it may be shown."""
    from gpubox.store import missing_file, open_store, redacted

    config = cfg.load(cfg.CoordinatorConfig, flags, cfg.read_file(config_path))
    if missing := missing_file(config.db):
        with contextlib.suppress(FileNotFoundError):
            os.stat(missing)  # there but hidden from this user: PermissionError, said by friendly
        # A new, empty store here would hold tokens no coordinator reads.
        raise errors.GpuboxError(
            f"no store at {missing}: is {config.state_dir} the coordinator's state folder"
            " (--state-dir, GPUBOX_STATE_DIR or --config as it runs with)? A coordinator makes"
            " its store when it first starts."
        )
    return _owned_store(open_store(config.db)), redacted(config.db)


def _owned_store(store: Any) -> Any:
    """`store`, its files given to the owner of their folder when root opened a SQLite store
    there (keys.give_to_owner): a store file root made would stop the service."""
    from gpubox import keys
    from gpubox.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore) and store.path != ":memory:":
        files = [store.path + suffix for suffix in ("", "-wal", "-shm")]
        folder = os.path.dirname(os.path.abspath(store.path))
        keys.give_to_owner(folder, *(path for path in files if os.path.exists(path)))
    return store


class _Cap(click.ParamType):
    """A cap's value: a whole number from 0, or "none" to lift it."""

    name = "N|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("none", "off", "-"):
            return "none"
        if text.isdigit():
            return int(text)
        self.fail(f"{value!r} is not a whole number from 0, nor none", param, ctx)


CAP_HELP = {
    "max_gpus": "GPUs its running jobs may hold at once",
    "max_running": "jobs of it that may run at once",
    "max_queued": "jobs of it that may wait queued at once: a submit past it is refused (HTTP"
    " 429, Retry-After)",
}


def cap_options(fn: Any) -> Any:
    """--max-gpus, --max-running and --max-queued."""
    for name in reversed(models.Caps.NAMES):
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, name, type=_Cap(), help=CAP_HELP[name] + "; none: no cap")(fn)
    return fn


def _caps_given(flags: dict[str, Any]) -> dict[str, int | None]:
    """The caps given as flags (taken out of `flags`): "none" lifts one."""
    given = {name: flags.pop(name) for name in models.Caps.NAMES}
    return {name: None if v == "none" else v for name, v in given.items() if v is not None}


def _caps_text(caps: Any) -> str:
    shown = [f"{name} {value}" for name, value in caps.to_dict().items() if value is not None]
    return ", ".join(shown) or "no caps"


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["view", "submit", "admin"]),
    default="submit",
    show_default=True,
    help="view: reads only (the API's GETs and the dashboard, for viewers and wall displays);"
    " submit: also submits and cancels its own jobs; admin: everything",
)
@click.option(
    "--allow-process",
    is_flag=True,
    help="its jobs may also run on process-runtime workers, which run them on their hosts"
    " (admin tokens' jobs always may)",
)
@cap_options
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@failures.friendly
def token_create(
    name: str, role: str, allow_process: bool, config_path: str | None, **flags: Any
) -> None:
    """Create a token NAME and print it once, alone on stdout (only a hash is kept).

    \b
    Caps limit what its jobs take at once (fair share orders the rest):
      gpubox token create ci --max-gpus 8 --max-queued 500
    """
    from gpubox.coordinator import tokens

    caps = models.Caps(**_caps_given(flags))
    store, where = _open_store(config_path, flags)
    try:
        value = tokens.create(store, name, role, allow_process, caps)
    finally:
        store.close()
    kind = f"{role}, may use process workers" if allow_process else role
    click.echo(
        f"token {name!r} ({kind}; {_caps_text(caps)}) created in {where}; it is shown only"
        " this once",
        err=True,
    )
    click.echo(value)


@token.command("set")
@click.argument("name")
@cap_options
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@failures.friendly
def token_set(name: str, config_path: str | None, **flags: Any) -> None:
    """Change the caps of token NAME; a running coordinator's scheduler applies them at
    once, its submits (max_queued) within a second.

    \b
      gpubox token set ci --max-gpus 16         # its running jobs hold 16 GPUs at most
      gpubox token set ci --max-queued none     # lift a cap
    """
    caps = _caps_given(flags)
    if not caps:
        raise click.UsageError("name a cap to change: --max-gpus, --max-running or --max-queued")
    store, _ = _open_store(config_path, flags)
    try:
        changed = store.set_caps(name, caps)
    finally:
        store.close()
    click.echo(f"token {name!r}: {_caps_text(changed.caps)}", err=True)


@token.command("list")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@failures.friendly
def token_list(config_path: str | None, **flags: Any) -> None:
    """List tokens by name and role."""
    store, where = _open_store(config_path, flags)
    try:
        found = store.list_tokens()
        if not found:
            click.echo(f"no tokens in {where}", err=True)
            return
        click.echo(
            f"{'NAME':<24}  {'ROLE':<7}  {'PROCESS':<7}  {'MAX GPUS':>8}  {'MAX RUN':>8}"
            f"  {'MAX QUEUED':>10}  CREATED (UTC)"
        )
        for item in found:
            process = "yes" if item.may_use_process else "-"
            gpus, running, queued = (
                "-" if value is None else str(value) for value in item.caps.to_dict().values()
            )
            click.echo(
                f"{item.name:<24}  {item.role:<7}  {process:<7}  {gpus:>8}  {running:>8}"
                f"  {queued:>10}  {item.created_at:%Y-%m-%d %H:%M}"
            )
    finally:
        store.close()


@token.command("revoke")
@click.argument("name")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@failures.friendly
def token_revoke(name: str, config_path: str | None, **flags: Any) -> None:
    """Revoke token NAME: a running coordinator refuses requests carrying it within a second
    (it trusts a token it found for that long)."""
    store, _ = _open_store(config_path, flags)
    try:
        if not store.revoke_token(name):
            raise errors.GpuboxError(f"no token named {name!r}")
    finally:
        store.close()
    click.echo(f"token {name!r} revoked", err=True)


# --- store maintenance ------------------------------------------------------------------------


@click.group()
def db() -> None:
    """Maintain the store: upgrade its schema, copy it into another database."""


@db.command("upgrade")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@failures.friendly
def db_upgrade(config_path: str | None, **flags: Any) -> None:
    """Create the schema, or bring it up to date. Safe to run twice: the second run does
    nothing. The coordinator does the same when it starts."""
    from gpubox.store import open_store

    config = cfg.load(cfg.CoordinatorConfig, flags, cfg.read_file(config_path))
    store = _owned_store(open_store(config.db, upgrade=False))
    try:
        before = store.schema_version()
        applied = store.upgrade()
    finally:
        store.close()
    if applied:
        click.echo(f"schema upgraded from version {before} to {applied[-1]}", err=True)
    else:
        click.echo(f"schema is at version {before}: nothing to do", err=True)


@db.command("copy")
@click.argument("source")
@click.argument("destination")
@click.option("--replace", is_flag=True, help="empty a non-empty destination first")
@failures.friendly
def db_copy(source: str, destination: str, replace: bool) -> None:
    """Copy a whole store (jobs, logs, tokens, workers) from SOURCE to DESTINATION, keeping
    ids; new jobs in the destination continue after the copied ones. Stop the coordinator
    first.

    \b
    Example:
      gpubox db copy sqlite:///var/lib/gpubox/gpubox.db \\
          'postgresql://gpubox@db.example.com/gpubox'
    """
    from gpubox.store import copy as store_copy
    from gpubox.store import open_existing, open_store
    from gpubox.store.base import TABLES

    src = open_existing(source)
    try:
        dst = _owned_store(open_store(destination))
        try:
            store_copy.check(src, dst, replace)  # refused before the progress bar shows
            total = sum(src.count(table) for table in TABLES)
            with click.progressbar(length=total, label="copying rows", file=sys.stderr) as bar:
                copied = store_copy.copy_store(src, dst, replace, lambda _, n: bar.update(n))
        finally:
            dst.close()
    finally:
        src.close()
    summary = ", ".join(f"{count} {table}" for table, count in copied.items())
    click.echo(f"copied and checked: {summary}", err=True)
