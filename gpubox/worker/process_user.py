"""Who a process worker's jobs run as: the process_user setting checked and resolved to a
user, never root, and one this worker may switch to; and how a job's command is started as
that user."""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import pwd
import shutil
from typing import Any

from gpubox import errors

CAP_SETGID, CAP_SETUID = 6, 7  # the capabilities a process needs to change its groups and user


@dataclasses.dataclass(frozen=True)
class JobUser:
    """The user a process worker runs its jobs as."""

    name: str
    uid: int
    gid: int
    groups: list[int]  # its supplementary groups (the worker's own are not passed on)
    home: str
    switch: bool  # True: the worker runs as another user (root) and switches to this one

    def launch(self, command: list[str], cwd: str, env: dict[str, str]) -> tuple[list[str], Any]:
        """What to hand subprocess.Popen to run `command` as this user: the arguments, and
        the keyword arguments that switch user (none, or user, group and extra_groups).

        Python forks the whole worker to switch user in the child (vfork cannot do it): on a
        worker of ~100 MB that takes ~3 ms per job, more than a short job's whole run. So
        where util-linux's setpriv is installed (always, on Debian) the switch is left to it:
        Python vforks (~0.2 ms), the child execs setpriv, which sets the user, its groups and
        the saved ids (dropping root's capabilities) and execs the command. A command that
        cannot start is found before, so it ends the job as an ERROR as it would without
        setpriv (OSError); one that setpriv then fails to run (a file only root may run)
        exits 126 with setpriv's reason on stderr."""
        if not self.switch:
            return command, {}
        switch = self.switch_command()
        if switch is None:
            return command, {"user": self.uid, "group": self.gid, "extra_groups": self.groups}
        check_runnable(command[0], cwd, env)
        return [*switch, *command], {}

    def switch_command(self) -> list[str] | None:
        """The setpriv command line that runs what follows it as this user, its groups and
        saved ids too (root's capabilities go with the switch); None where there is no
        setpriv, or no switch to make."""
        setpriv = _setpriv()
        if not self.switch or setpriv is None:
            return None
        groups = f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups"
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]


def _can_switch_users() -> bool:
    """Whether this process may change its user and groups (CAP_SETUID and CAP_SETGID):
    root usually may; root under a unit without capabilities, and other users, may not."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def job_user(setting: str = "") -> JobUser:
    """The user jobs run as, from the worker's process_user setting: a user name or id, or ""
    for the default ("nobody" when the worker runs as root, else the worker's own user).
    errors.ConfigError for root, for an unknown user, and for a user this worker cannot
    switch to (only root can: a worker running as gpubox under its systemd unit, without
    capabilities, runs jobs as gpubox)."""
    me = os.geteuid()
    if not setting:
        setting = "nobody" if me == 0 else str(me)
    try:
        entry = pwd.getpwuid(int(setting)) if setting.isdigit() else pwd.getpwnam(setting)
    except KeyError:
        if setting != str(me):
            raise errors.ConfigError(f"process_user: no user {setting!r} on this host") from None
        entry = None  # the worker's own uid has no name here (a container): run as it
    if entry is None:
        name, uid, gid, home = setting, me, os.getegid(), os.environ.get("HOME", "/")
    else:
        name, uid, gid, home = entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir
    if uid == 0:
        raise errors.ConfigError(
            f"process_user: {name} is root (uid 0); the process runtime never runs jobs as"
            " root: name an unprivileged user (the default is nobody when the worker runs"
            " as root)"
        )
    if uid == me:
        return JobUser(name, uid, gid, [], home, switch=False)
    if not _can_switch_users():
        own = _user_name(me)
        raise errors.ConfigError(
            f"process_user: this worker runs as {own} and cannot run jobs as {name} (that"
            f" needs root with CAP_SETUID and CAP_SETGID): leave process_user unset to run"
            f" them as {own}, or run the worker as root"
        )
    groups = os.getgrouplist(name, gid) if entry is not None else [gid]
    return JobUser(name, uid, gid, groups, home, switch=True)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, looked up once."""
    return shutil.which("setpriv", path=os.defpath + ":/usr/sbin:/sbin")


def check_runnable(program: str, cwd: str, env: dict[str, str]) -> None:
    """OSError, as exec would fail, when `program` is missing (ENOENT) or found but not
    executable (EACCES): searched on the job's PATH as exec does, unless it names a path."""
    if "/" in program:
        candidates = [os.path.join(cwd, program)]
    else:
        candidates = [os.path.join(cwd, folder, program) for folder in os.get_exec_path(env)]
    denied = False
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return
            denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
