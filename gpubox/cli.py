"""The `gpubox` command: every role (coordinator, worker, up) and the client commands.

Each command parses its flags, loads its config, calls one function, and turns gpubox errors
into one clear line on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import pwd
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from gpubox import __version__, errors, logfmt, revision, supervise, systemd
from gpubox import config as cfg
from gpubox.client import ApiError, Client, OutputClosed, local_token

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
            kind = {"str": str, "int": int, "float": float}[str(field.type)]
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
            fn = click.option(flag, field.name, type=kind, default=None, help=help_text)(fn)
        return fn

    return decorate


def config_file_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="GPUBOX_CONFIG",
        type=click.Path(dir_okay=False),
        help="TOML config file [env GPUBOX_CONFIG]",
    )(fn)


class SettingError(click.ClickException):
    """A bad setting: `Error: …` on one line (no usage block), exit status 2."""

    exit_code = 2


QUEUED_NOTE_S = 5.0  # a followed job queued this long is said to be, with why

# Errors writing stdout or stderr: the output is gone, not the command's own failure.
UNWRITABLE = {errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def friendly(fn: F) -> F:
    """Turn gpubox errors, and errors reading or writing a file, into `Error: …` and exit
    status 1 (2 for bad settings)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.ConfigError as exc:
            raise SettingError(str(exc)) from None
        except ApiError as exc:
            where = f" ({exc.field})" if exc.field and exc.field not in exc.message else ""
            raise click.ClickException(f"{exc.message}{where} [HTTP {exc.status}]") from None
        except OutputClosed as exc:  # a GpuboxError, but it needs its own handling
            _output_failed(exc)
        except errors.GpuboxError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.filename is None:
                _output_failed(exc)
            raise click.ClickException(_file_error(exc)) from None

    return wrapper


def _output_failed(exc: OutputClosed | OSError) -> NoReturn:
    """Writing stdout or stderr failed: exit quietly if its reader left, say so in one line if
    the output cannot take more; re-raise anything else."""
    cause = exc.__cause__ if isinstance(exc, OutputClosed) else exc
    if not isinstance(cause, OSError) or cause.errno not in UNWRITABLE:
        raise exc
    # Nothing more can be written (and nothing should flush into stdout at exit).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if cause.errno == errno.EPIPE:
        # The reader of a pipe left (`gpubox tail 42 | head`): stop quietly, as a command
        # killed by SIGPIPE would.
        sys.exit(128 + signal.SIGPIPE)
    raise click.ClickException(f"cannot write the output: {cause}") from None


def _file_error(exc: OSError) -> str:
    """One line for a file the command could not read or write (a key file, the state folder):
    its path and why; for "Permission denied", which user to run the command as."""
    paths = " and ".join(str(path) for path in (exc.filename, exc.filename2) if path is not None)
    line = f"{paths}: {exc.strerror or exc}"
    if not isinstance(exc, PermissionError):
        return line
    owner = _owner(str(exc.filename))
    command = f"runuser -u {owner or 'gpubox'} -- {shlex.join(['gpubox', *sys.argv[1:]])}"
    advice = f": {command}" if owner else f" (e.g. {command})"
    return f"{line}; run the command as the user that owns the state folder{advice}"


def _owner(path: str) -> str | None:
    """The user that owns `path`, or the nearest folder above it this process may look at;
    None where that is this process's own user (the mode is the problem, not the user)."""
    for part in (path, *(str(p) for p in Path(path).absolute().parents)):
        try:
            uid = os.stat(part).st_uid
        except OSError:
            continue
        if uid == os.geteuid():
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)
    return None


def setup_logging(verbose: bool = False) -> None:
    logfmt.setup(verbose)


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


# --- server roles -----------------------------------------------------------------------------


UP_DEFAULTS = {"bind": "tcp://127.0.0.1:8471"}  # one box: the worker link stays local


class Signals:
    """SIGINT/SIGTERM (stop) and SIGHUP (reload), caught from the moment this is made: make
    it before telling systemd READY=1, so a reload sent right after never kills the process."""

    def __init__(self) -> None:
        self.stop, self.hup = threading.Event(), threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.hup.set())

    def wait(
        self,
        threads: Sequence[threading.Thread] = (),
        reload: Callable[[], None] | None = None,
    ) -> threading.Thread | None:
        """Block until a stop signal, or until one of `threads` ends (then return it); on
        SIGHUP call `reload`. A signal that came before this call counts."""
        while not self.stop.wait(0.2):
            if self.hup.is_set():
                self.hup.clear()
                if reload is not None:
                    systemd.notify("RELOADING=1")
                    reload()
                    systemd.notify("READY=1")
            if (dead := supervise.first_dead(threads)) is not None:
                return dead
        return None

    def check(self, dead: threading.Thread | None) -> None:
        """A thread the service needs ended without a stop signal: one error line, exit 1,
        so that systemd (Restart=on-failure) starts the service again."""
        if dead is not None and not self.stop.is_set():
            raise click.ClickException(f"{supervise.why(dead)}: gpubox cannot go on without it")


def _hostname() -> str:
    import socket

    return socket.gethostname()


@main.command()
@config_file_option
@config_options(cfg.CoordinatorConfig)
@friendly
def coordinator(config_path: str | None, **flags: Any) -> None:
    """Run the coordinator: the HTTP API and the worker link."""
    from gpubox.coordinator.server import Coordinator

    setup_logging()
    config = cfg.load(cfg.CoordinatorConfig, flags, cfg.read_file(config_path))
    signals = Signals()
    server = Coordinator(config)
    server.start()
    systemd.notify("READY=1", f"STATUS=serving HTTP on {server.http_url}")
    dead = signals.wait(server.threads, reload=server.reload)
    systemd.notify("STOPPING=1")
    server.stop()
    signals.check(dead)


@main.command()
@click.option(
    "--drain",
    is_flag=True,
    help="on SIGTERM/SIGINT, take no new job and exit once running jobs have ended (a second"
    " signal exits at once)",
)
@config_file_option
@config_options(cfg.WorkerConfig)
@friendly
def worker(drain: bool, config_path: str | None, **flags: Any) -> None:
    """Run a worker: take jobs from the coordinator and run them as Docker containers (or,
    with --runtime process, as child processes on this host: no isolation).

    Stopping it (SIGTERM, Ctrl-C) leaves running containers alone: the next start finds them
    and re-attaches, and their jobs finish with every line. The process runtime cannot: its
    jobs' processes are stopped, and each job is queued again while it has retries left (else
    it ends ERROR). With --drain it first waits for running jobs to end.
    """
    from gpubox.worker import wiring

    setup_logging()
    config = cfg.load(cfg.WorkerConfig, flags, cfg.read_file(config_path))
    cfg.private_state_dir(config.state_dir)
    signals = Signals()
    agent, thread = wiring.start_worker(config)
    systemd.notify("READY=1", f"STATUS=working for {config.coordinator}")
    dead = signals.wait([thread])
    systemd.notify("STOPPING=1")
    if drain and thread.is_alive():
        agent.stop(drain=True)
        signals.stop.clear()  # a second signal stops at once
        signals.wait([thread])
    agent.stop()
    thread.join()
    signals.check(dead)


@main.command()
@config_file_option
@config_options(
    cfg.CoordinatorConfig, only=("state_dir", "db", "http", "bind"), defaults=UP_DEFAULTS
)
@config_options(cfg.WorkerConfig, only=("name", "gpus", "max_jobs", "mounts"))
@friendly
def up(config_path: str | None, **flags: Any) -> None:
    """Run a coordinator and one local worker in one process: gpubox on a single box.

    Keeps everything in the state folder (SQLite store, local API token); needs nothing
    configured. The client commands on this box pick up the token by themselves.
    """
    from gpubox import keys
    from gpubox.coordinator.server import Coordinator
    from gpubox.worker import wiring

    setup_logging()
    file_data = cfg.read_file(config_path)
    config = cfg.load(cfg.CoordinatorConfig, flags, file_data, defaults=UP_DEFAULTS)
    worker_flags = {k: flags.get(k) for k in ("name", "gpus", "max_jobs", "mounts")}
    worker_flags["state_dir"] = config.state_dir
    # The worker's settings are checked before anything starts.
    worker_config = cfg.load(cfg.WorkerConfig, worker_flags, file_data)
    worker_name = keys.check_name(worker_config.name or _hostname())
    worker_config = dataclasses.replace(worker_config, name=worker_name)
    cfg.check_mount_folders(worker_config.mount_map)
    # First start: the coordinator's keypair, and a key on the allow list for our worker.
    cfg.private_state_dir(config.state_dir)
    keys.init(config.state_dir)
    if not keys.worker_secret_file(config.state_dir, worker_name).exists():
        keys.add_worker(config.state_dir, worker_name)
    signals = Signals()
    server = Coordinator(config)
    server.start()
    link = server.link_endpoint.replace("0.0.0.0", "127.0.0.1")
    try:
        agent, thread = wiring.start_worker(dataclasses.replace(worker_config, coordinator=link))
    except BaseException:
        server.stop()
        raise
    click.echo(f"gpubox is up: HTTP {server.http_url}, state in {config.state_dir}", err=True)
    click.echo(
        f"submit a job from another shell: {_client_env(server.http_url, config.state_dir)}"
        "gpubox submit --follow IMAGE CMD…",
        err=True,
    )
    systemd.notify("READY=1", f"STATUS=serving HTTP on {server.http_url}")
    dead = signals.wait([*server.threads, thread], reload=server.reload)
    systemd.notify("STOPPING=1")
    click.echo("stopping…", err=True)
    agent.stop()
    thread.join()
    server.stop()
    signals.check(dead)


def _client_env(url: str, state_dir: str) -> str:
    """What a client on this box must be told of a coordinator on `url` with its token in
    `state_dir`, as environment variables: nothing where the client's defaults find it."""
    told = []
    if url != cfg.ClientConfig().url:
        told.append(f"GPUBOX_URL={url}")
    if state_dir != cfg.default_state_dir():
        told.append(f"GPUBOX_STATE_DIR={shlex.quote(state_dir)}")
    return "".join(f"{item} " for item in told)


# --- client commands --------------------------------------------------------------------------


def client_options(fn: F) -> F:
    fn = config_options(cfg.ClientConfig)(fn)
    return config_file_option(fn)


def make_client(config_path: str | None, flags: dict[str, Any]) -> Client:
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


def _printable(text: str) -> str:
    """A value for one line of a table: control characters (a newline, an escape sequence
    that would drive the terminal) shown as escapes, as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _finite(value: float | None, what: str) -> float | None:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=what)
    return value


def _follow(client: Client, job_id: int, since: int = 0) -> NoReturn:
    """Print a job's output until it ends and exit with its code; Ctrl-C stops following
    only (exit 130), and says so: the job is not cancelled. A job still queued after
    QUEUED_NOTE_S is said to be, with why (a follow that prints nothing says nothing)."""

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
        code = client.tail(job_id, since)
    except KeyboardInterrupt:
        click.echo(
            f"\ngpubox: stopped following job {job_id}, which is not cancelled"
            f" (gpubox cancel {job_id} stops it)",
            err=True,
        )
        sys.exit(130)
    finally:
        timer.cancel()
    sys.exit(code)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _needs(job: dict[str, Any]) -> str:
    """What the job asks of a worker and of its run, beyond GPUs: what a queue reason such as
    'no connected worker has the labels …' is checked against."""
    docker = job["docker"]
    parts = [f"label {_printable(k)}={_printable(v)}" for k, v in sorted(job["labels"].items())]
    if job.get("gpu_model"):
        parts.append(f"GPU model {_printable(job['gpu_model'])}")
    if job.get("gpu_memory_gb"):
        parts.append(f"{job['gpu_memory_gb']:g} GB per GPU")
    parts += [f"mount {_printable(name)}" for name in docker.get("mounts") or []]
    for key in ("memory", "shm_size"):
        if docker.get(key):
            size = docker[key]
            parts.append(
                f"{key} {size / 1024**3:g} GiB"
                if size >= 1024**3
                else f"{key} {size / 1024**2:g} MiB"
            )
    for key in ("user", "workdir"):
        if docker.get(key):
            parts.append(f"{key} {_printable(docker[key])}")
    if job.get("timeout"):
        parts.append(f"timeout {job['timeout']:g} s")
    if job.get("max_retries"):
        parts.append(f"{job['max_retries']} retries")
    return ", ".join(parts) or "-"


def _summary(job: dict[str, Any]) -> str:
    result = job["result"]
    command = job["docker"]["command"]
    rows = [
        ("id", job["id"]),
        ("name", job["name"]),
        (
            "status",
            job["status"]
            + (
                " (cancel requested)"
                if job.get("cancel_requested") and job["status"] == "RUNNING"
                else ""
            ),
        ),
        ("image", job["docker"]["image"]),
        ("command", shlex.join(command) if command else "(image default)"),
        (
            "gpus",
            job["gpus"] if not result["gpus"] else f"{job['gpus']}: {', '.join(result['gpus'])}",
        ),
        ("priority", job["priority"]),
        ("submitter", _printable(job.get("submitter") or "-")),
        ("needs", _needs(job)),
        ("worker", job["worker"] or "-"),
        ("attempts", job["attempts"]),
        ("created", job["created_at"]),
        ("started", result["executed_at"] or "-"),
        ("finished", result["finished_at"] or "-"),
        ("duration", f"{result['duration']} s" if result["duration"] is not None else "-"),
        ("exit code", result["exit_code"] if result["exit_code"] is not None else "-"),
        ("error", result["error"] or "-"),
        ("log lines", job.get("log_lines", 0)),
    ]
    if job.get("queue_reason"):
        rows.insert(3, ("waiting", job["queue_reason"]))
    # Every value escaped: image, command, error and the reason come from the submitter or
    # the registry, and an escape sequence in them would drive the terminal.
    return "\n".join(f"{key:>10}  {_printable(str(value))}" for key, value in rows)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
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
    "--max-retries",
    type=click.IntRange(0, 100),
    default=0,
    show_default=True,
    help="requeues if its worker is lost",
)
@click.option("--metadata", help="JSON object stored and returned untouched")
@click.option(
    "--follow", "-f", is_flag=True, help="print the job's output live; exit with the job's code"
)
@click.option("--json", "as_json", is_flag=True, help="print the created job as JSON")
@client_options
@friendly
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
    max_retries: int,
    metadata: str | None,
    follow: bool,
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
    Options go before IMAGE; everything after IMAGE is the command.
    """
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
        try:
            spec["metadata"] = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
    job = client.submit(spec)
    if as_json:
        _print_json(job)
    elif not follow:  # when following, stdout is the job's output alone
        click.echo(job["id"])
    if follow:
        click.echo(f"job {job['id']} queued; following its output", err=True)
        _follow(client, job["id"])


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print the whole job as JSON")
@client_options
@friendly
def show(job_id: int, as_json: bool, config_path: str | None, **flags: Any) -> None:
    """Show one job: status, result, where it ran."""
    job = make_client(config_path, flags).job(job_id)
    _print_json(job) if as_json else click.echo(_summary(job))


@main.command(name="ls")
@click.option(
    "--status",
    type=click.Choice(
        ["QUEUED", "RUNNING", "FINISHED", "ERROR", "CANCELLED"], case_sensitive=False
    ),
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--before", type=int, help="only jobs with a smaller id (for paging)")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@client_options
@friendly
def ls(
    status: str | None,
    limit: int,
    before: int | None,
    as_json: bool,
    config_path: str | None,
    **flags: Any,
) -> None:
    """List jobs, newest first."""
    page = make_client(config_path, flags).jobs(status, limit, before)
    if as_json:
        _print_json(page)
        return
    click.echo(
        f"{'ID':>6}  {'STATUS':<9}  {'PRI':>4}  {'GPUS':>4}  {'WORKER':<16}  {'SUBMITTER':<12}"
        "  NAME"
    )
    for job in page["jobs"]:
        submitter = _printable(job.get("submitter") or "-")[:12]
        click.echo(
            f"{job['id']:>6}  {job['status']:<9}  {job['priority']:>4}  {job['gpus']:>4}  "
            f"{(job['worker'] or '-')[:16]:<16}  {submitter:<12}  {_printable(job['name'])}"
        )
    if page["next"]:
        click.echo(f"(more: gpubox ls --before {page['next']})", err=True)


@main.command()
@click.argument("job_id", type=int)
@click.option(
    "--since", type=click.IntRange(0), default=0, help="only lines after this sequence number"
)
@client_options
@friendly
def logs(job_id: int, since: int, config_path: str | None, **flags: Any) -> None:
    """Print the lines a job has logged so far (stderr lines, and gpubox's own, to stderr)."""
    for record in make_client(config_path, flags).logs(job_id, since):
        # color=True: the line as the job printed it, escape sequences too, also into a file
        click.echo(record["line"], err=record["stream"] != "stdout", color=True)


@main.command()
@click.argument("job_id", type=int)
@click.option("--since", type=click.IntRange(0), default=0, help="start after this sequence number")
@client_options
@friendly
def tail(job_id: int, since: int, config_path: str | None, **flags: Any) -> None:
    """Follow a job's output live until it ends; exit with its code.

    Exit status: 0 FINISHED, the container's code on a non-zero exit, 1 for other errors,
    130 cancelled. A dropped connection is resumed without a gap or a repeated line.
    """
    _follow(make_client(config_path, flags), job_id, since)


@main.command()
@click.argument("job_id", type=int)
@client_options
@friendly
def cancel(job_id: int, config_path: str | None, **flags: Any) -> None:
    """Cancel a job: a queued one at once, a running one is stopped by its worker."""
    job = make_client(config_path, flags).cancel(job_id)
    state = (
        "cancelled"
        if job["status"] == "CANCELLED"
        else "stopping (SIGTERM, then SIGKILL after the grace period)"
    )
    click.echo(f"job {job_id}: {state}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON answer")
@client_options
@friendly
def workers(as_json: bool, config_path: str | None, **flags: Any) -> None:
    """List connected and recently lost workers."""
    answer = make_client(config_path, flags).workers()
    if as_json:
        _print_json(answer)
        return
    click.echo(f"{'NAME':<20}  {'STATE':<12}  {'GPUS':>4}  {'JOBS':<12}  LAST HEARTBEAT")
    for w in answer["workers"]:
        state = "connected" if w["connected"] else "lost"
        if w.get("quarantined"):
            state = "quarantined"  # sent a job it never confirmed: gets no more this session
        jobs = ",".join(map(str, w["running_jobs"])) or "-"
        click.echo(
            f"{w['name'][:20]:<20}  {state:<12}  {len(w['gpus']):>4}  {jobs:<12}  "
            f"{w['last_heartbeat']}"
        )


@main.command()
@click.option(
    "--gpus",
    "choice",
    default=None,
    help="which GPUs: all, none or indices like 0,2 [env GPUBOX_GPUS]",
)
@friendly
def gpus(choice: str | None) -> None:
    """Print the GPUs this box's worker would offer, as NVML sees them now: index, UUID
    (what jobs are pinned by), model name, memory, PCI bus id, memory in use, utilization."""
    from gpubox.worker import gpu

    setup_logging()
    config = cfg.load(cfg.WorkerConfig, {"gpus": choice})
    source = gpu.source_for(config.fake_gpus, config.name or _hostname())
    found = gpu.select(source.list(), config.gpus)
    if not found:
        click.echo("no GPUs offered (jobs with gpus: 0 still run)", err=True)
        return
    usage = {item["uuid"]: item for item in source.usage()}
    rows = [("INDEX", "UUID", "NAME", "MEMORY", "PCI BUS ID", "USED", "UTIL")]
    for item in found:
        now = usage.get(item.uuid, {})
        used, util = now.get("memory_used_mb"), now.get("utilization")
        rows.append(
            (
                str(item.index),
                item.uuid,
                item.name,
                f"{item.memory_mb} MiB",
                item.pci_bus_id or "-",
                "-" if used is None else f"{used} MiB",
                "-" if util is None else f"{util} %",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --- admin commands on the store --------------------------------------------------------------


@main.group()
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


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["submit", "admin"]), default="submit", show_default=True)
@click.option(
    "--allow-process",
    is_flag=True,
    help="its jobs may also run on process-runtime workers, which run them on their hosts"
    " (admin tokens' jobs always may)",
)
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@friendly
def token_create(
    name: str, role: str, allow_process: bool, config_path: str | None, **flags: Any
) -> None:
    """Create a token NAME and print it once, alone on stdout (only a hash is kept)."""
    from gpubox.coordinator import tokens

    store, where = _open_store(config_path, flags)
    try:
        value = tokens.create(store, name, role, allow_process)
    finally:
        store.close()
    kind = f"{role}, may use process workers" if allow_process else role
    click.echo(f"token {name!r} ({kind}) created in {where}; it is shown only this once", err=True)
    click.echo(value)


@token.command("list")
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@friendly
def token_list(config_path: str | None, **flags: Any) -> None:
    """List tokens by name and role."""
    store, where = _open_store(config_path, flags)
    try:
        found = store.list_tokens()
        if not found:
            click.echo(f"no tokens in {where}", err=True)
            return
        click.echo(f"{'NAME':<24}  {'ROLE':<7}  {'PROCESS':<7}  CREATED (UTC)")
        for item in found:
            process = "yes" if item.may_use_process else "-"
            click.echo(
                f"{item.name:<24}  {item.role:<7}  {process:<7}  {item.created_at:%Y-%m-%d %H:%M}"
            )
    finally:
        store.close()


@token.command("revoke")
@click.argument("name")
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@friendly
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


@main.group()
def db() -> None:
    """Maintain the store: upgrade its schema, copy it into another database."""


@db.command("upgrade")
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir", "db"))
@friendly
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
@friendly
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


# --- CURVE keys for the worker link -------------------------------------------------------------


@main.group(name="keys")
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
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir",))
@friendly
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
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir",))
@friendly
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
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir",))
@friendly
def keys_revoke(name: str, config_path: str | None, **flags: Any) -> None:
    """Take worker NAME off the allow list; a running coordinator refuses its next message."""
    from gpubox import keys

    if not keys.revoke(_state_dir(config_path, flags), name):
        raise errors.GpuboxError(f"worker {name!r} is not on the allow list")
    click.echo(f"worker {name!r} revoked", err=True)


@keys_group.command("list")
@config_file_option
@config_options(cfg.CoordinatorConfig, only=("state_dir",))
@friendly
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
