"""Who a process worker's jobs run as: the process_user setting checked and resolved to a
user, never root, and one this worker may switch to."""

from __future__ import annotations

import dataclasses
import os
import pwd

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
