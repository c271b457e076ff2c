"""The commands that run gpubox's services: coordinator, worker, up (both on one box), and
gpus, which shows what this box's worker would offer."""

from __future__ import annotations

import dataclasses
import select
import shlex
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from gpubox import config as cfg
from gpubox import logfmt, supervise, systemd
from gpubox.cli import failures, options, tables

UP_DEFAULTS = {"bind": "tcp://127.0.0.1:8471"}  # one box: the worker link stays local


class Signals:
    """SIGINT/SIGTERM (stop) and SIGHUP (reload), caught from the moment this is made: make
    it before telling systemd READY=1, so a reload sent right after never kills the process.

    The handlers only note the signal (a list's append, which takes no lock) and wake wait()
    through Python's wakeup socket; wait() acts on it. Setting a threading.Event in a
    handler could hang the process for good: a handler runs in the main thread between two
    of its bytecodes, maybe while that thread holds the lock that Event.set() takes (inside
    Event.wait() or clear()), as a second SIGTERM once hung an HTTP process (httpproc)."""

    def __init__(self) -> None:
        self.stopping = False  # a stop signal came (wait() sets it)
        self._asked: list[int] = []
        self._wake, wake_w = socket.socketpair()
        self._wake.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w  # kept open: Python writes a byte to it on each signal
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self._asked.append(signum))

    def wait(
        self,
        threads: Sequence[threading.Thread] = (),
        reload: Callable[[], None] | None = None,
    ) -> threading.Thread | None:
        """Block until a stop signal, or until one of `threads` ends (then return it); on
        SIGHUP call `reload`. A signal that came before this call counts."""
        while True:
            while self._asked:
                if self._asked.pop(0) != signal.SIGHUP:
                    self.stopping = True
                elif reload is not None:
                    systemd.notify("RELOADING=1")
                    reload()
                    systemd.notify("READY=1")
            if self.stopping:
                return None
            if (dead := supervise.first_dead(threads)) is not None:
                return dead
            if select.select([self._wake], [], [], 0.2)[0]:
                self._wake.recv(4096)  # the signals' bytes: their numbers are in _asked

    def check(self, dead: threading.Thread | None) -> None:
        """A thread the service needs ended without a stop signal: one error line, exit 1,
        so that systemd (Restart=on-failure) starts the service again."""
        if dead is not None and not self.stopping:
            raise click.ClickException(f"{supervise.why(dead)}: gpubox cannot go on without it")


@click.command()
@options.config_file_option
@options.config_options(cfg.CoordinatorConfig)
@failures.friendly
def coordinator(config_path: str | None, **flags: Any) -> None:
    """Run the coordinator: the HTTP API and the worker link."""
    from gpubox.coordinator.server import Coordinator

    logfmt.setup()
    config = cfg.load(cfg.CoordinatorConfig, flags, cfg.read_file(config_path))
    logfmt.set_level(config.log_level)
    signals = Signals()
    server = Coordinator(config)
    server.start()
    systemd.notify("READY=1", f"STATUS=serving HTTP on {server.http_url}")
    dead = signals.wait(server.threads, reload=server.reload)
    systemd.notify("STOPPING=1")
    server.stop()
    signals.check(dead)


@click.command()
@click.option(
    "--drain",
    is_flag=True,
    help="on SIGTERM/SIGINT, take no new job and exit once running jobs have ended (a second"
    " signal exits at once)",
)
@options.config_file_option
@options.config_options(cfg.WorkerConfig)
@failures.friendly
def worker(drain: bool, config_path: str | None, **flags: Any) -> None:
    """Run a worker: take jobs from the coordinator and run them as Docker containers (or,
    with --runtime process, as child processes on this host: no isolation).

    Stopping it (SIGTERM, Ctrl-C) leaves running containers alone: the next start finds them
    and re-attaches, and their jobs finish with every line. The process runtime cannot: its
    jobs' processes are stopped, and each job is queued again while it has retries left (else
    it ends ERROR). With --drain it first waits for running jobs to end.
    """
    from gpubox.worker import wiring

    logfmt.setup()
    config = cfg.load(cfg.WorkerConfig, flags, cfg.read_file(config_path))
    logfmt.set_level(config.log_level)
    cfg.private_state_dir(config.state_dir)
    signals = Signals()
    agent, thread = wiring.start_worker(config)
    systemd.notify("READY=1", f"STATUS=working for {config.coordinator}")
    dead = signals.wait([thread])
    systemd.notify("STOPPING=1")
    if drain and thread.is_alive():
        agent.stop(drain=True)
        signals.stopping = False  # a second signal stops at once
        signals.wait([thread])
    agent.stop()
    thread.join()
    signals.check(dead)


@click.command()
@options.config_file_option
@options.config_options(
    cfg.CoordinatorConfig,
    only=("state_dir", "db", "http", "bind", "dashboard", "log_level"),
    defaults=UP_DEFAULTS,
)
@options.config_options(cfg.WorkerConfig, only=("name", "gpus", "max_jobs", "mounts"))
@failures.friendly
def up(config_path: str | None, **flags: Any) -> None:
    """Run a coordinator and one local worker in one process: gpubox on a single box.

    Keeps everything in the state folder (SQLite store, local API token); needs nothing
    configured. The client commands on this box pick up the token by themselves.
    """
    from gpubox import keys
    from gpubox.coordinator.server import Coordinator
    from gpubox.worker import wiring

    logfmt.setup()
    file_data = cfg.read_file(config_path)
    config = cfg.load(cfg.CoordinatorConfig, flags, file_data, defaults=UP_DEFAULTS)
    logfmt.set_level(config.log_level)
    worker_flags = {k: flags.get(k) for k in ("name", "gpus", "max_jobs", "mounts")}
    worker_flags["state_dir"] = config.state_dir
    # The worker's settings are checked before anything starts.
    worker_config = cfg.load(cfg.WorkerConfig, worker_flags, file_data)
    worker_name = keys.check_name(worker_config.name or socket.gethostname())
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
    if config.dashboard:
        token_file = Path(config.state_dir) / "token"
        click.echo(
            f"dashboard: {server.http_url}/ (sign in with the token in {token_file})", err=True
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


@click.command()
@click.option(
    "--gpus",
    "choice",
    default=None,
    help="which GPUs: all, none or indices like 0,2 [env GPUBOX_GPUS]",
)
@failures.friendly
def gpus(choice: str | None) -> None:
    """Print the GPUs this box's worker would offer, as NVML sees them now: index, UUID
    (what jobs are pinned by), model name, memory, PCI bus id, memory in use, utilization."""
    from gpubox.worker import gpu

    logfmt.setup()
    config = cfg.load(cfg.WorkerConfig, {"gpus": choice})
    source = gpu.source_for(config.fake_gpus, config.name or socket.gethostname(), config.state_dir)
    found = gpu.select(source.list(), config.gpus)
    if not found:
        click.echo("no GPUs offered (jobs with gpus: 0 still run)", err=True)
        return
    for line in tables.gpus(found, source.usage()):
        click.echo(line)
