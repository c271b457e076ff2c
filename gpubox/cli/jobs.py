"""The client commands: submit a job, show, list, follow and cancel jobs, list workers.

Each talks to the coordinator over HTTP (gpubox.client) with the token it finds.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from typing import Any

import click

from gpubox import config as cfg
from gpubox import errors
from gpubox.cli import failures, following, options, tables
from gpubox.client import Client, local_token


def make_client(config_path: str | None, flags: dict[str, Any]) -> Client:
    """A client for the coordinator the client settings name (taking them out of `flags`),
    with their token or else the local token file's."""
    keys = ("url", "token", "state_dir")
    config = cfg.load(
        cfg.ClientConfig, {k: flags.pop(k, None) for k in keys}, cfg.read_file(config_path)
    )
    token = config.token or local_token(config.state_dir)
    if not token:
        raise errors.GpuboxError(
            f"no API token: set GPUBOX_TOKEN or --token (no local token file in"
            f" {config.state_dir}; `gpubox up` and `gpubox coordinator` write one there)"
        )
    return Client(config.url, token)


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=what)
        if key in result and result[key] != val:
            raise click.BadParameter(
                f"{key} is given twice, as {result[key]!r} and {val!r}", param_hint=what
            )
        result[key] = val
    return result


def _finite(value: float | None, what: str) -> float | None:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=what)
    return value


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="job name [default: the command, or the image]")
@click.option("--description", default="", help="free text shown with the job")
@click.option(
    "--gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs the job needs"
)
@click.option(
    "--env", "-e", "env", multiple=True, metavar="K=V", help="environment variable (repeatable)"
)
@click.option(
    "--label",
    "-l",
    "labels",
    multiple=True,
    metavar="K=V",
    help="run only on workers with this label (repeatable)",
)
@click.option("--gpu-model", help="only GPUs whose NVML name contains this, like A100")
@click.option(
    "--gpu-memory-gb",
    type=click.FloatRange(min=0, min_open=True),
    help="only GPUs with at least this much memory (GB)",
)
@click.option("--shm-size", metavar="SIZE", help="size of /dev/shm, like 8g (Docker's is 64m)")
@click.option("--memory", metavar="SIZE", help="the container's memory limit, like 32g")
@click.option("--workdir", metavar="PATH", help="working folder inside the container")
@click.option("--user", metavar="USER[:GROUP]", help="user to run as inside the container")
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    metavar="NAME",
    help="a host folder the worker declares by this name (repeatable)",
)
@click.option("--priority", type=int, default=0, show_default=True, help="higher runs first")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=366 * 86400),
    callback=lambda _ctx, _param, value: _finite(value, "--timeout"),
    help="seconds before the job is stopped (ERROR 'timeout')",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, max=366 * 86400),
    callback=lambda _ctx, _param, value: _finite(value, "--idle-timeout"),
    help="seconds its GPUs may all stay idle (under the coordinator's idle_threshold, 5 %)"
    " before it is stopped (ERROR 'idle: …'); 0: never; default: the coordinator's",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 100),
    default=0,
    show_default=True,
    help="requeues if its worker is lost",
)
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=0, min_open=True, max=366 * 86400),
    callback=lambda _ctx, _param, value: _finite(value, "--queue-timeout"),
    help="seconds it may wait in the queue before it ends ERROR ('queue timeout: <why it"
    " waited>'); default: the coordinator's",
)
@click.option(
    "--secret",
    "secrets",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="a secret environment variable, masked in the log (repeatable); NAME alone takes"
    " the value of the variable NAME here, so it is never on a command line",
)
@click.option(
    "--webhook",
    "webhooks",
    multiple=True,
    metavar="URL",
    help="POST the job's end to this URL, signed (HMAC-SHA256) with the secret in"
    " GPUBOX_WEBHOOK_SECRET; the coordinator must allow the URL (webhook_allow) (repeatable)",
)
@click.option(
    "--webhook-events",
    type=click.Choice(["end", "start,end"]),
    default="end",
    show_default=True,
    help="which events the webhooks get",
)
@click.option(
    "--metadata",
    "metadata",
    multiple=True,
    metavar="K=V|JSON",
    help="stored and returned untouched: a KEY=VALUE pair, or a JSON object merged in (repeatable)",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="the same KEY within 24 h gives the job made the first time instead of a new one:"
    ' a retried CI step ("$CI_PIPELINE_ID-$CI_JOB_ID") follows its job again [default: a'
    " new key per command]",
)
@click.option(
    "--follow", "-f", is_flag=True, help="print the job's output live; exit with the job's code"
)
@click.option(
    "--cancel-on-exit/--no-cancel-on-exit",
    default=True,
    show_default=True,
    help="with --follow: " + following.CANCEL_ON_EXIT_HELP,
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="print the created job as JSON (with --follow: the ended job, on stdout, and the"
    " job's output on stderr)",
)
@options.client_options
@failures.friendly
def submit(
    image: str,
    command: tuple[str, ...],
    name: str | None,
    description: str,
    gpus: int,
    env: tuple[str, ...],
    labels: tuple[str, ...],
    gpu_model: str | None,
    gpu_memory_gb: float | None,
    shm_size: str | None,
    memory: str | None,
    workdir: str | None,
    user: str | None,
    mounts: tuple[str, ...],
    priority: int,
    timeout: float | None,
    idle_timeout: float | None,
    max_retries: int,
    queue_timeout: float | None,
    secrets: tuple[str, ...],
    webhooks: tuple[str, ...],
    webhook_events: str,
    metadata: tuple[str, ...],
    idempotency_key: str | None,
    follow: bool,
    cancel_on_exit: bool,
    as_json: bool,
    config_path: str | None,
    **flags: Any,
) -> None:
    """Queue IMAGE [COMMAND…] as a job and print its id (with --follow: print its output
    instead, the id going to stderr, and exit with the job's code).

    \b
    Examples:
      gpubox submit busybox echo hello
      gpubox submit --gpus 2 -e EPOCHS=3 --follow my/trainer:1.2 python train.py
      gpubox submit --gpus 8 --gpu-model H100 --shm-size 16g --mount datasets my/trainer
      id=$(gpubox submit my/image) && gpubox tail "$id"
      HF_TOKEN=… gpubox submit --secret HF_TOKEN my/trainer -- python train.py --epochs 3
    Options go before IMAGE; everything after IMAGE (or after a -- that follows it) is the
    command. With --follow, stopping this command (SIGTERM, SIGHUP, or SIGINT outside a
    terminal) cancels the job; exit codes are in README's table (the job's own, or 69
    coordinator unreachable, 124 timeout, 125 not run, 130 cancelled, …).
    """
    if command[:1] == ("--",):
        command = command[1:]  # `submit IMAGE -- cmd args`, as kubectl and others take it
    client = make_client(config_path, flags)
    spec: dict[str, Any] = {
        "name": name or (shlex.join(command) if command else image)[:200],
        "description": description,
        "docker": {"image": image, "env": _pairs(env, "--env")},
        "gpus": gpus,
        "labels": _pairs(labels, "--label"),
        "priority": priority,
        "timeout": timeout,
        "max_retries": max_retries,
    }
    if idle_timeout is not None:
        spec["idle_timeout"] = idle_timeout
    if queue_timeout is not None:
        spec["queue_timeout"] = queue_timeout
    if secrets:
        spec["docker"]["secrets"] = _secrets(secrets)
    if webhooks:
        secret = os.environ.get("GPUBOX_WEBHOOK_SECRET", "")
        if not secret:
            raise click.BadParameter(
                "set GPUBOX_WEBHOOK_SECRET to the secret the receiver checks signatures with",
                param_hint="--webhook",
            )
        events = webhook_events.split(",")
        spec["webhooks"] = [{"url": u, "secret": secret, "events": events} for u in webhooks]
    if command:
        spec["docker"]["command"] = list(command)
    for key, value in (("gpu_model", gpu_model), ("gpu_memory_gb", gpu_memory_gb)):
        if value is not None:
            spec[key] = value
    options = {"shm_size": shm_size, "memory": memory, "workdir": workdir, "user": user}
    spec["docker"].update({key: value for key, value in options.items() if value is not None})
    if mounts:
        spec["docker"]["mounts"] = list(mounts)
    if metadata:
        spec["metadata"] = _metadata(metadata)
    job = client.submit(spec, idempotency_key=idempotency_key)
    if follow:  # stdout is the job's output alone (with --json: the ended job alone)
        click.echo(f"job {job['id']} queued; following its output", err=True)
        following.follow(client, job["id"], cancel_on_exit=cancel_on_exit, as_json=as_json)
    if as_json:
        _print_json(job)
    else:
        click.echo(job["id"])


def _metadata(values: tuple[str, ...]) -> dict[str, Any]:
    """--metadata values: JSON objects merged in order, and KEY=VALUE pairs (text values)."""
    found: dict[str, Any] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
            if not isinstance(parsed, dict):
                raise click.BadParameter("not a JSON object", param_hint="--metadata")
            found.update(parsed)
        else:
            found.update(_pairs((value,), "--metadata"))
    return found


def _secrets(values: tuple[str, ...]) -> dict[str, str]:
    """--secret NAME=VALUE, or NAME: the value of the environment variable NAME."""
    found: dict[str, str] = {}
    for value in values:
        name, sep, secret = value.partition("=")
        if not sep:
            if name not in os.environ:
                raise click.BadParameter(
                    f"{name} is not set in this environment (give NAME=VALUE, or export it)",
                    param_hint="--secret",
                )
            secret = os.environ[name]
        found[name] = secret
    return found


@click.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print the whole job as JSON")
@options.client_options
@failures.friendly
def show(job_id: int, as_json: bool, config_path: str | None, **flags: Any) -> None:
    """Show one job: status, result, where it ran, and its webhooks' deliveries."""
    client = make_client(config_path, flags)
    job = client.job(job_id)
    if as_json:
        _print_json(job)
        return
    click.echo(tables.summary(job))
    if job.get("webhooks"):
        sent = client.call("GET", f"/api/v1/jobs/{job_id}/webhooks")["deliveries"]
        for line in tables.deliveries(sent):
            click.echo(line)


@click.command()
@click.argument("job_id", type=int)
@click.option(
    "--since", type=click.IntRange(0), default=0, help="only lines after this sequence number"
)
@options.client_options
@failures.friendly
def logs(job_id: int, since: int, config_path: str | None, **flags: Any) -> None:
    """Print the lines a job has logged so far (stderr lines, and gpubox's own, to stderr)."""
    for record in make_client(config_path, flags).logs(job_id, since):
        # color=True: the line as the job printed it, escape sequences too, also into a file
        click.echo(record["line"], err=record["stream"] != "stdout", color=True)


@click.command()
@click.argument("job_id", type=int)
@click.option("--since", type=click.IntRange(0), default=0, help="start after this sequence number")
@click.option("--cancel-on-exit", is_flag=True, help=following.CANCEL_ON_EXIT_HELP)
@options.client_options
@failures.friendly
def tail(
    job_id: int, since: int, cancel_on_exit: bool, config_path: str | None, **flags: Any
) -> None:
    """Follow a job's output live until it ends; exit with its code.

    Exit status: 0 FINISHED, the job's own code on a non-zero exit, 124 its timeout, 125 it
    ended ERROR without running (an image that cannot be pulled, …), 130 cancelled, 70 its
    worker was lost, 69 the coordinator cannot be reached, 75 gave up (README has the whole
    table). A dropped connection is resumed without a gap or a repeated line; a coordinator
    with no stream free is read a page at a time instead.
    """
    following.follow(make_client(config_path, flags), job_id, since, cancel_on_exit)


@click.command()
@click.argument("job_id", type=int)
@options.client_options
@failures.friendly
def cancel(job_id: int, config_path: str | None, **flags: Any) -> None:
    """Cancel a job: a queued one at once, a running one is stopped by its worker."""
    job = make_client(config_path, flags).cancel(job_id)
    state = (
        "cancelled"
        if job["status"] == "CANCELLED"
        else "stopping (SIGTERM, then SIGKILL after the grace period)"
    )
    click.echo(f"job {job_id}: {state}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@options.client_options
@failures.friendly
def workers(as_json: bool, config_path: str | None, **flags: Any) -> None:
    """List connected and recently lost workers."""
    answer = make_client(config_path, flags).workers()
    if as_json:
        _print_json(answer)
        return
    for line in tables.workers(answer["workers"]):
        click.echo(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@options.client_options
@failures.friendly
def coordinators(as_json: bool, config_path: str | None, **flags: Any) -> None:
    """List the coordinators sharing the store, and which one leads.

    On a PostgreSQL store every coordinator serves the HTTP API and one of them, the leader,
    runs the worker link and the scheduling; the others stand by and take over when it
    stops or dies. A SQLite store has one coordinator, and nothing to list.
    """
    answer = make_client(config_path, flags).coordinators()
    if as_json:
        _print_json(answer)
        return
    for line in tables.coordinators(answer):
        click.echo(line)
