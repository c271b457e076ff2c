"""One coordinator per SQLite store: a second coordinator on the same store (another state
folder, the same file) refuses to start and names the one running; once that one stops, it
starts. (Several coordinators on one PostgreSQL store share it under one leader:
tests/test_leadership.py.)

Two coordinators on one database each ran a broker: one took the other's worker for lost
and ended its running job as ERROR while the job went on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpubox import config as cfg
from gpubox import errors, keys
from gpubox.coordinator.server import Coordinator

pytestmark = pytest.mark.timeout(60)


def coordinator(state: Path, db_url: str) -> Coordinator:
    config = cfg.CoordinatorConfig(
        state_dir=str(state), db=db_url, http="127.0.0.1:0", bind="tcp://127.0.0.1:*"
    )
    keys.init(str(state))
    return Coordinator(config)


def test_a_second_coordinator_on_the_same_store_refuses_to_start_until_the_first_stops(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path}/shared.db"
    first = coordinator(tmp_path / "a", db_url)
    first.start()
    second = coordinator(tmp_path / "b", db_url)
    try:
        with pytest.raises(errors.ConfigError) as refused:
            second.start()
        message = str(refused.value)
        assert "another gpubox coordinator already runs on the store" in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert first.threads and all(t.is_alive() for t in first.threads)  # untouched
    finally:
        first.stop()
    again = Coordinator(second.config)  # the first one's lock went with it
    again.start()
    again.stop()


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/shared.db"
    first = coordinator(tmp_path / "a", db)
    first.start()
    try:
        env = {**os.environ, "GPUBOX_STATE_DIR": str(tmp_path / "b"), "GPUBOX_DB": db}
        command = [sys.executable, "-m", "gpubox", "keys", "init"]
        subprocess.run(command, env=env, check=True, capture_output=True)
        command = [sys.executable, "-m", "gpubox", "coordinator", "--http", "127.0.0.1:0"]
        command += ["--bind", "tcp://127.0.0.1:0"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert "another gpubox coordinator already runs on the store" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        first.stop()
