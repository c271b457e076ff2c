"""Admin commands and the owner of the state folder. Run as root on a state folder another user
owns (the `gpubox` service user's /var/lib/gpubox), `gpubox keys …`, `gpubox token …` and
`gpubox db upgrade` leave everything they write to that user; a user who may not write there
gets one `Error:` line naming the path, not a traceback.

Root runs the real `gpubox` command in subprocesses. The other user, nobody (uid 65534), is a
forked child that drops to that uid and runs the same click command in-process: it may not be
allowed to start this Python at all (pyenv's lives under /root, mode 0700)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth  # noqa: F401 (see below)

# The modules the commands import when they run are imported here, with zmq.auth: the child
# running as nobody may not be allowed to read them from site-packages.
import gpubox.coordinator.tokens  # noqa: F401
import gpubox.store.sqlite  # noqa: F401
from gpubox import cli, keys

NOBODY = 65534
GPUBOX = [sys.executable, "-m", "gpubox"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: to chown the state folder and to become nobody"
)


@pytest.fixture()
def top() -> Iterator[Path]:
    """A folder every user may pass through (pytest's tmp_path is root's alone, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="gpubox-owner-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture()
def state(top: Path) -> Path:
    """A state folder owned by nobody, mode 0700, as a service user's is."""
    folder = top / "state"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    return folder


def gpubox(*args: str) -> subprocess.CompletedProcess[str]:
    """`gpubox ARGS` as this user (root), with no store or state folder from the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUBOX_DB", "GPUBOX_STATE_DIR")}
    return subprocess.run(
        [*GPUBOX, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def as_nobody(work: Callable[[], Any]) -> tuple[int, str, str]:
    """Run `work` in a forked child as uid and gid 65534: (exit status, stdout, stderr). An
    exception escaping it is printed as Python prints one, with exit status 1."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                work()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def gpubox_as_nobody(*args: str) -> tuple[int, str, str]:
    """`gpubox ARGS` as nobody: the click command in-process, as the `gpubox` script runs it."""

    def command() -> None:
        sys.argv = ["gpubox", *args]
        os.environ.pop("GPUBOX_DB", None)
        cli.main(prog_name="gpubox")

    return as_nobody(command)


def owners(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: relative path → (uid, gid)."""
    found = {}
    for path in folder.rglob("*"):
        info = path.lstat()
        found[str(path.relative_to(folder))] = (info.st_uid, info.st_gid)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_made_by_root_belong_to_the_state_folders_owner(state: Path) -> None:
    made = gpubox("keys", "worker", "w1", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    found = owners(state)
    assert "keys/workers/w1.key_secret" in found and "keys/allowed/w1.key" in found
    assert set(found.values()) == {(NOBODY, NOBODY)}, found
    # modes as they were: secrets and the folders holding them for the owner alone
    assert mode(state / "keys" / "workers" / "w1.key_secret") == 0o600
    assert mode(state / "keys" / "coordinator.key_secret") == 0o600
    assert mode(state / "keys" / "workers") == 0o700
    assert mode(state / "keys") == 0o700

    # The owner (the service user) can use all of it: list, read a secret, add and revoke.
    listed = gpubox_as_nobody("keys", "list", "--state-dir", str(state))
    assert listed[0] == 0, listed
    assert listed[1].splitlines()[1].split()[0] == "w1"
    secret_file = keys.worker_secret_file(str(state), "w1")
    assert as_nobody(lambda: keys.load_secret(secret_file)) == (0, "", "")
    added = gpubox_as_nobody("keys", "worker", "w2", "--state-dir", str(state))
    assert added[0] == 0, added
    revoked = gpubox_as_nobody("keys", "revoke", "w1", "--state-dir", str(state))
    assert revoked[0] == 0, revoked

    # Root again, on top of what the owner made: still all the owner's.
    assert gpubox("keys", "worker", "w3", "--state-dir", str(state)).returncode == 0
    assert set(owners(state).values()) == {(NOBODY, NOBODY)}


def test_a_store_root_makes_or_writes_belongs_to_the_state_folders_owner(state: Path) -> None:
    upgraded = gpubox("db", "upgrade", "--state-dir", str(state))  # makes gpubox.db
    assert upgraded.returncode == 0, upgraded.stderr
    made = gpubox("token", "create", "ci", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    found = owners(state)
    assert "gpubox.db" in found
    assert set(found.values()) == {(NOBODY, NOBODY)}, found

    # The owner writes to it (a coordinator running as that user does too).
    again = gpubox_as_nobody("token", "create", "ops", "--state-dir", str(state))
    assert again[0] == 0, again
    listed = gpubox_as_nobody("token", "list", "--state-dir", str(state))
    assert listed[0] == 0, listed
    assert [line.split()[0] for line in listed[1].splitlines()[1:]] == ["ci", "ops"]
    assert set(owners(state).values()) == {(NOBODY, NOBODY)}


def test_a_user_who_may_not_use_the_state_folder_gets_one_error_line(top: Path) -> None:
    # Root's state folder, mode 0700, with keys and a store in it.
    state = top / "state"
    assert gpubox("keys", "worker", "w1", "--state-dir", str(state)).returncode == 0
    assert gpubox("db", "upgrade", "--state-dir", str(state)).returncode == 0
    state.chmod(0o700)
    hint = "; run the command as the user that owns the state folder: runuser -u root -- gpubox"
    for args in (["keys", "worker", "w2"], ["keys", "list"], ["token", "list"]):
        code, out, err = gpubox_as_nobody(*args, "--state-dir", str(state))
        assert (code, out) == (1, ""), err
        command = " ".join([*args, "--state-dir", str(state)])
        # one line: the file or folder it was refused (one in the state folder), and who may
        assert err.startswith(f"Error: {state}/") and err.count("\n") == 1, err
        assert err.endswith(f": Permission denied{hint} {command}\n"), err

    # A folder of its own that it may not write: the same line, without a user to name.
    mine = top / "mine"
    mine.mkdir(mode=0o500)
    os.chown(mine, NOBODY, NOBODY)
    code, out, err = gpubox_as_nobody("keys", "init", "--state-dir", str(mine))
    assert (code, out) == (1, ""), err
    assert err == (
        f"Error: {mine / 'keys'}: Permission denied; run the command as the user that owns the"
        f" state folder (e.g. runuser -u gpubox -- gpubox keys init --state-dir {mine})\n"
    )
