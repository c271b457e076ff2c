"""What the settings need of this host: the state folder, and mount folders that jobs
cannot turn into a way to root."""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path

from gpubox import errors
from gpubox.config.values import Mount


def default_state_dir() -> str:
    """/var/lib/gpubox as root, else ~/.local/state/gpubox."""
    if os.geteuid() == 0:
        return "/var/lib/gpubox"
    return str(Path.home() / ".local" / "state" / "gpubox")


def private_state_dir(path: str) -> None:
    """Make the state folder readable by its owner alone: it holds the store (jobs' env,
    metadata and logs), keys and tokens. A new one is made 0700; one that gpubox already
    keeps things in (a store or keys) is tightened to 0700, whoever made it and however gpubox
    is started; any other folder named as the state folder is left as it is, with a warning
    (it may be shared, like /tmp), since the files gpubox writes there are 0600 anyway."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077 == 0:
        return
    ours = (folder / "gpubox.db").exists() or (folder / "keys").is_dir()
    if ours and folder.stat().st_uid == os.geteuid():
        os.chmod(folder, 0o700)
    else:
        logging.getLogger(__name__).warning(
            "state folder %s may be read by other users (mode %03o): chmod 700 it", path, mode
        )


def check_mount_folders(mounts: dict[str, Mount]) -> None:
    """ConfigError for a declared mount whose host folder does not exist on this box, or that
    jobs may write to on a filesystem that honours setuid bits or device files.

    A job runs as root in its container unless it asks otherwise, and root owns whatever it
    writes: without nosuid, a copy of a shell with its setuid bit set, left in a writable
    mount, runs as root for any local user who finds it at the host path; without nodev, a
    device file left there opens the device. A `nosuid` seen only inside the container does
    not help, as local users reach the files through the host path. On a nosuid,nodev
    filesystem such files are inert, and no other file a job leaves gives anyone more rights
    than they had: ownership alone (a job with `user: "1000:1000"`, or root's chown) lets that
    user change the file, nothing else. Filesystems mounted below the folder count too: the
    container gets them as well."""
    for mount in mounts.values():
        if not os.path.isdir(mount.host_path):
            raise errors.ConfigError(
                f"mounts: {mount.name}: {mount.host_path} is not a folder on this box"
            )
        if mount.read_only:
            continue
        lacking = setuid_risk(mount.host_path)
        if lacking:
            path = mount.host_path
            quoted = shlex.quote(path)
            raise errors.ConfigError(
                f"mounts: {mount.name}: jobs may write to {path}, but {lacking}, so a program a"
                " job leaves there could run as root for anyone on this box. Mount it"
                f" nosuid,nodev: `mount --bind {quoted} {quoted} && mount -o"
                f" remount,bind,nosuid,nodev {quoted}`, and for the next boot the fstab line"
                f" `{_fstab_path(path)} {_fstab_path(path)} none bind,nosuid,nodev 0 0`;"
                " or make the mount :ro"
            )


def setuid_risk(path: str) -> str | None:
    """What lets files under `path` work as setuid programs or devices on this host: "its
    filesystem is mounted without nosuid,nodev", or the same of a filesystem mounted below
    it; None when neither can happen."""
    flags = os.statvfs(path).f_flag
    lacking = [
        name for name, bit in (("nosuid", os.ST_NOSUID), ("nodev", os.ST_NODEV)) if not flags & bit
    ]
    if lacking:
        return f"its filesystem is mounted without {','.join(lacking)}"
    inside = os.path.realpath(path).rstrip("/") + "/"
    for point, options in _mounted():
        if point.startswith(inside):
            lacking = [name for name in ("nosuid", "nodev") if name not in options]
            if lacking:
                return f"{point}, mounted inside it, is mounted without {','.join(lacking)}"
    return None


def _mounted() -> list[tuple[str, set[str]]]:
    """(mount point, options) of each filesystem this process sees (/proc/self/mounts, which
    writes a space in a path as \\040)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return []
    octal = re.compile(r"\\([0-7]{3})")
    return [
        (octal.sub(lambda m: chr(int(m.group(1), 8)), row[1]), set(row[3].split(",")))
        for row in rows
        if len(row) >= 4
    ]


def _fstab_path(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
