"""The commands that manage the worker link's CURVE keys, on the coordinator's box."""

from __future__ import annotations

from typing import Any

import click

from gpubox import config as cfg
from gpubox import errors
from gpubox.cli import failures, options


@click.group(name="keys")
def keys_group() -> None:
    """Manage the worker link's CURVE keys (run on the coordinator's box).

    \b
    gpubox keys init            the coordinator's keypair (once)
    gpubox keys worker gpu-01   a keypair for worker gpu-01, put on the allow list;
                                copy the printed .key_secret file to that box
    gpubox keys revoke gpu-01   off the allow list: its next message is refused
    """


def _state_dir(config_path: str | None, flags: dict[str, Any]) -> str:
    return cfg.load(cfg.CoordinatorConfig, flags, cfg.read_file(config_path)).state_dir


@keys_group.command("init")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir",))
@failures.friendly
def keys_init(config_path: str | None, **flags: Any) -> None:
    """Make the coordinator's keypair (does nothing if it exists)."""
    from gpubox import keys

    public, made = keys.init(_state_dir(config_path, flags))
    click.echo(
        f"{'made' if made else 'kept'} the coordinator key; its public half: {public}", err=True
    )
    click.echo("give workers that file (--coordinator-key) or this text:", err=True)
    click.echo(keys.load_public(str(public)).decode())


@keys_group.command("worker")
@click.argument("name")
@click.option(
    "--labels",
    default=None,
    help='the labels it may offer, KEY=VALUE,… ("" for none) [default: any]',
)
@click.option(
    "--gpus", "gpu_count", type=click.IntRange(0), default=None, help="at most this many GPUs"
)
@click.option("--gpu-model", default=None, help="every GPU's name must contain this (any case)")
@click.option("--mounts", default=None, help='the mount names it may declare, NAME,… ("" for none)')
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir",))
@failures.friendly
def keys_worker(
    name: str,
    labels: str | None,
    gpu_count: int | None,
    gpu_model: str | None,
    mounts: str | None,
    config_path: str | None,
    **flags: Any,
) -> None:
    """Make a keypair for worker NAME and allow it; print where its secret key file is.

    With --labels, --gpus, --gpu-model or --mounts, the worker may claim no more than that
    when it connects (it is refused otherwise), so its key cannot attract jobs, with their
    secrets, that were never meant for it. Left out, a claim has no limit.
    """
    from gpubox import keys

    claims = None
    if (labels, gpu_count, gpu_model, mounts) != (None, None, None, None):
        names = None if mounts is None else [m.strip() for m in mounts.split(",") if m.strip()]
        for mount in names or []:
            if not cfg.MOUNT_NAME.match(mount):
                raise click.BadParameter(f"{mount!r} is not a mount name", param_hint="--mounts")
        claims = keys.Claims(
            labels=None if labels is None else cfg.parse_labels(labels, "--labels"),
            gpus=gpu_count,
            gpu_model=gpu_model.strip() if gpu_model else None,
            mounts=names,
        )
    state_dir = _state_dir(config_path, flags)
    keys.init(state_dir)
    secret = keys.add_worker(state_dir, name, claims)
    limits = f" (it may claim {claims.describe()})" if claims else ""
    click.echo(
        f"worker {name!r} is on the allow list{limits}; copy its secret key file to the"
        " worker's box and pass it as --key-file (mode 0600):",
        err=True,
    )
    click.echo(str(secret))


@keys_group.command("revoke")
@click.argument("name")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir",))
@failures.friendly
def keys_revoke(name: str, config_path: str | None, **flags: Any) -> None:
    """Take worker NAME off the allow list; a running coordinator refuses its next message."""
    from gpubox import keys

    if not keys.revoke(_state_dir(config_path, flags), name):
        raise errors.GpuboxError(f"worker {name!r} is not on the allow list")
    click.echo(f"worker {name!r} revoked", err=True)


@keys_group.command("list")
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig, only=("state_dir",))
@failures.friendly
def keys_list(config_path: str | None, **flags: Any) -> None:
    """List the workers on the allow list, with their public keys."""
    from gpubox import keys

    folder = keys.allowed_dir(_state_dir(config_path, flags))
    allow = keys.AllowList(folder)
    names = allow.names()
    if names:
        click.echo(f"{'WORKER':<24}  {'PUBLIC KEY':<40}  MAY CLAIM")
    for name, public in sorted(names.items()):
        claims = allow.claims_for(name)
        click.echo(f"{name:<24}  {public:<40}  {claims.describe() if claims else 'anything'}")
    if not names:
        click.echo(f"no worker keys on the allow list ({folder})", err=True)
