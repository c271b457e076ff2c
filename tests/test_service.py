"""gpubox as a systemd service: its log lines (journald-ready), sd_notify readiness, reload."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpubox import keys, logfmt, systemd

GPUBOX = [sys.executable, "-m", "gpubox"]


def record(message: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("gpubox.test", level, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_line_has_time_level_logger_message_and_fields() -> None:
    line = logfmt.Formatter(journal=False).format(
        record("job 7 sent", **logfmt.fields(job=7, worker="gpu-01", error="no such image"))
    )
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z") and "T" in stamp
    assert rest == 'INFO gpubox.test: job 7 sent job=7 worker=gpu-01 error="no such image"'


def test_on_the_journal_a_line_has_its_priority_and_no_time_and_stays_one_line() -> None:
    formatter = logfmt.Formatter(journal=True)
    assert formatter.format(record("hello", logging.WARNING)) == "<4>WARNING gpubox.test: hello"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("it failed", logging.ERROR, **logfmt.fields(job=3))
        failed.exc_info = sys.exc_info()
    line = formatter.format(failed)
    assert line.startswith("<3>ERROR gpubox.test: it failed job=3\\nTraceback")
    assert "\n" not in line and "ValueError: boom" in line
    quoted = formatter.format(record("x", **logfmt.fields(text='a "b"\nc')))
    assert quoted == '<6>INFO gpubox.test: x text="a \\"b\\"\\nc"'


def test_each_log_level_keeps_what_it_names_and_debug_is_gpuboxs_own() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("gpubox").level
    try:
        logfmt.setup("info", stream)
        # A library's logger that nothing else sets a level on (urllib3's, say).
        library = "test_service.a_library"
        for level, kept in (
            ("warning", {"gpubox.x": logging.WARNING, library: logging.WARNING}),
            ("error", {"gpubox.x": logging.ERROR, library: logging.ERROR}),
            ("info", {"gpubox.x": logging.INFO, library: logging.INFO}),
            # gpubox's debug lines, not its libraries': theirs would bury gpubox's
            ("debug", {"gpubox.x": logging.DEBUG, library: logging.INFO}),
        ):
            logfmt.set_level(level)
            for name, lowest in kept.items():
                logger = logging.getLogger(name)
                assert logger.getEffectiveLevel() == lowest, (level, name)
        logging.getLogger("gpubox.x").debug("a debug line of gpubox's")
        assert "a debug line of gpubox's" in stream.getvalue()  # past the root's own level
    finally:
        handlers, level, own = saved
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("gpubox").setLevel(own)


def test_the_journal_is_recognised_by_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "stream", "w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not logfmt.on_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert logfmt.on_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not logfmt.on_journal(stream)  # inherited by a child writing elsewhere
    assert not logfmt.on_journal(io.StringIO())


def listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock


def test_notify_sends_to_the_socket_systemd_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False  # not under systemd: nothing to do
    with listen(str(tmp_path / "notify")) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.notify("READY=1", "STATUS=up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    abstract = f"@gpubox-test-{os.getpid()}"
    with listen("\0" + abstract[1:]) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", abstract)
        assert systemd.notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def messages(sock: socket.socket, until: bytes) -> list[bytes]:
    got = []
    while until not in got:
        got.append(sock.recv(4096).split(b"\n")[0])
    return got


@pytest.mark.slow
@pytest.mark.serial
def test_the_coordinator_says_ready_once_serving_reloads_on_sighup_and_says_stopping(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    keys.init(str(state))
    port = free_port()
    env = {
        **os.environ,
        "GPUBOX_STATE_DIR": str(state),
        "GPUBOX_HTTP": f"127.0.0.1:{port}",
        "GPUBOX_BIND": f"tcp://127.0.0.1:{free_port()}",
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
    }
    with listen(str(tmp_path / "notify")) as sock:
        proc = subprocess.Popen(
            [*GPUBOX, "coordinator"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            assert messages(sock, b"READY=1") == [b"READY=1"]
            # READY means serving: the port answers now
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            keys.add_worker(str(state), "late")
            proc.send_signal(signal.SIGHUP)
            assert messages(sock, b"READY=1") == [b"RELOADING=1", b"READY=1"]
            assert proc.poll() is None  # a reload is not a stop
            proc.send_signal(signal.SIGTERM)
            assert messages(sock, b"STOPPING=1") == [b"STOPPING=1"]
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = proc.stderr.read() if proc.stderr else ""
    assert "reloaded: 1 worker key(s) on the allow list" in log
    # not a journal stream here: every line starts with a UTC timestamp
    assert all(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S") for line in log.splitlines())


# Signals as the service commands use them, with a reload that counts.
SIGNALS = """
from gpubox.cli.roles import Signals
signals, reloads = Signals(), []
print("ready", flush=True)
dead = signals.wait([], reload=lambda: reloads.append(1))
print(f"stopping={signals.stopping} dead={dead} reloads={len(reloads)}", flush=True)
"""


def test_storms_of_reloads_then_a_stop_end_the_process_at_once() -> None:
    """The handlers only note a signal; the main thread acts on it. (Handlers that set a
    threading.Event hung 3 processes of 40 under 300 SIGHUPs: one ran while the main thread
    held that Event's lock.) Four processes each get 2,000 SIGHUPs sent as fast as possible,
    then SIGTERM: each reloads, stops and exits 0."""
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", SIGNALS], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            for _ in range(2000):
                proc.send_signal(signal.SIGHUP)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            said = proc.stdout.read().split()
            assert said[:2] == ["stopping=True", "dead=None"], said
            assert 1 <= int(said[2].split("=")[1]) <= 2000, said
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
