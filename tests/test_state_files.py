"""Who may read gpubox's state: the state folder, the store and the worker's spill are its
owner's alone, however gpubox is started (as root from a shell with umask 022, say)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from gpubox import config as cfg
from gpubox.store.sqlite import SqliteStore
from gpubox.worker.spill import Spill

GPUBOX = [sys.executable, "-m", "gpubox"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_folder_and_its_store_are_private_under_a_loose_umask(tmp_path: Path):
    state = tmp_path / "state"
    env = {**os.environ, "GPUBOX_STATE_DIR": str(state)}
    # `token create` opens the store the coordinator will use; umask 022 as root's shell has.
    subprocess.run([*GPUBOX, "keys", "init"], env=env, check=True, capture_output=True)
    old = os.umask(0o022)
    try:
        cfg.private_state_dir(str(state))
        store = SqliteStore(str(state / "gpubox.db"))
        store.close()
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    for name in ("gpubox.db", "gpubox.db-wal", "gpubox.db-shm"):
        if (state / name).exists():
            assert mode(state / name) == 0o600, name
    assert mode(state / "gpubox.db") == 0o600


def test_a_state_folder_an_older_gpubox_left_readable_is_tightened(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    store = SqliteStore(str(state / "gpubox.db"))
    store.close()
    for name in ("gpubox.db", "gpubox.db-wal"):
        if (state / name).exists():
            os.chmod(state / name, 0o644)
    cfg.private_state_dir(str(state))
    SqliteStore(str(state / "gpubox.db")).close()
    assert mode(state) == 0o700
    assert mode(state / "gpubox.db") == 0o600


def test_a_folder_that_is_not_a_state_folder_yet_is_left_alone(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    cfg.private_state_dir(str(shared))
    assert mode(shared) == 0o1777


def test_spill_files_are_private(tmp_path: Path):
    old = os.umask(0o022)
    try:
        spill = Spill(tmp_path / "spill" / "w1", max_bytes=1 << 20)
        spill.push(7, 1, [["2026-01-01T00:00:00Z", "stdout", "secret output"]])
    finally:
        os.umask(old)
    files = list((tmp_path / "spill" / "w1").iterdir())
    assert files and all(mode(path) == 0o600 for path in files)
    assert mode(tmp_path / "spill" / "w1") == 0o700
    spill.close()
