"""The flags made from the settings' declarations (gpubox.config), and the --config flag."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from gpubox import config as cfg

F = Callable[..., Any]


def config_options(
    cls: type, only: tuple[str, ...] | None = None, defaults: dict[str, Any] | None = None
) -> Callable[[F], F]:
    """Add a flag for each setting of `cls` that has one (help names its environment variable
    and its default, or the one `defaults` gives for this command)."""

    def decorate(fn: F) -> F:
        for field in reversed(dataclasses.fields(cls)):
            flag = field.metadata.get("flag")
            if not flag or (only is not None and field.name not in only):
                continue
            kind = {"str": str, "int": int, "float": float, "bool": bool}[str(field.type)]
            default = (defaults or {}).get(field.name, field.default)
            help_text = f"{field.metadata['help']} [env {field.metadata['env']}"
            help_text += f"; default {default}]" if default not in ("", None) else "]"
            if field.metadata.get("many"):  # repeatable: the values joined, as one list
                fn = click.option(
                    flag,
                    field.name,
                    type=kind,
                    multiple=True,
                    callback=lambda _ctx, _param, values: ",".join(values) or None,
                    help=help_text + " (repeatable)",
                )(fn)
                continue
            if kind is bool:  # a pair of flags, --x/--no-x
                fn = click.option(flag, field.name, default=None, help=help_text)(fn)
                continue
            fn = click.option(flag, field.name, type=kind, default=None, help=help_text)(fn)
        return fn

    return decorate


def config_file_option(fn: F) -> F:
    """The --config flag: the TOML config file, also named by GPUBOX_CONFIG."""
    return click.option(
        "--config",
        "config_path",
        envvar="GPUBOX_CONFIG",
        type=click.Path(dir_okay=False),
        help="TOML config file [env GPUBOX_CONFIG]",
    )(fn)


def client_options(fn: F) -> F:
    """The client commands' flags: --url, --token, --state-dir and --config."""
    fn = config_options(cfg.ClientConfig)(fn)
    return config_file_option(fn)
