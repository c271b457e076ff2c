"""The values of settings, from text: each parser returns the checked value or raises
ConfigError naming the setting. Pure, apart from asking the host's memory size for the
default of max_shm_size."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from gpubox import errors, validate


def parse_address(value: str, name: str) -> tuple[str, int]:
    """HOST:PORT for the HTTP listener."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(f"{name}: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_labels(value: str | Mapping[str, str], name: str = "labels") -> dict[str, str]:
    """`k=v,k2=v2` (or a TOML table) as a dict."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    labels = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise errors.ConfigError(f"{name}: {part!r} is not KEY=VALUE")
        labels[key.strip()] = val.strip()
    return labels


MOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Mount:
    """A host folder a worker lets jobs mount by name."""

    name: str
    host_path: str
    container_path: str
    read_only: bool = True


def parse_mounts(value: str) -> dict[str, Mount]:
    """`NAME=HOST_PATH[:CONTAINER_PATH][:ro|rw],…` (or a TOML table NAME = "HOST…") by name.
    The container path defaults to /mnt/NAME; the mode to ro."""
    mounts: dict[str, Mount] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, spec = (s.strip() for s in part.partition("="))
        paths = spec.split(":")
        mode = paths.pop() if len(paths) > 1 and paths[-1] in ("ro", "rw") else "ro"
        if not sep or not MOUNT_NAME.match(name) or not 1 <= len(paths) <= 2:
            raise errors.ConfigError(
                f"mounts: {part!r} is not NAME=HOST_PATH[:CONTAINER_PATH][:ro|rw]"
                " (names: lower-case letters, digits, . _ -)"
            )
        host, container = paths[0], paths[1] if len(paths) == 2 else f"/mnt/{name}"
        for path in (host, container):
            if not path.startswith("/"):
                raise errors.ConfigError(f"mounts: {name}: {path!r} is not an absolute path")
        if name in mounts:
            raise errors.ConfigError(f"mounts: {name} is declared twice")
        if any(other.container_path == container for other in mounts.values()):
            raise errors.ConfigError(f"mounts: {name}: {container} is another mount's place")
        mounts[name] = Mount(name, host, container, read_only=mode == "ro")
    return mounts


def parse_fake_gpus(spec: str) -> list[tuple[int, str, int]]:
    """(count, name, memory MiB) groups of the test-only fake_gpus setting: a count ("4":
    GPUs named "Fake GPU" of 16,384 MiB) or entries "[COUNT*]NAME:MEMORY_MB", comma-separated,
    like "2*NVIDIA A100-SXM4-80GB:81920,NVIDIA T4:15360"."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.isdigit():
        return [(int(spec), "Fake GPU", 16384)]
    groups = []
    for entry in (e.strip() for e in spec.split(",")):
        count, _, rest = entry.partition("*") if "*" in entry else ("1", "", entry)
        name, _, memory = rest.rpartition(":")
        if not count.strip().isdigit() or not name.strip() or not memory.strip().isdigit():
            raise errors.ConfigError(
                f"fake_gpus: {entry!r} is not COUNT, or [COUNT*]NAME:MEMORY_MB entries"
            )
        groups.append((int(count), name.strip(), int(memory)))
    return groups


PUBLIC = "public"  # in `registries`: any registry whose addresses are all public
ANY = "*"  # in `registries`: any registry at all
CAPABILITY = re.compile(r"^[A-Z][A-Z0-9_]*$")
REGISTRY_PATTERN = re.compile(r"^[a-z0-9.*?:\[\]_-]+$")


def half_the_memory() -> int:
    """Half of this host's memory, in bytes, rounded down to MiB: the default max_shm_size."""
    half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return half // 1024**2 * 1024**2


def parse_shm_size(value: str) -> int:
    """max_shm_size in bytes: a size like "16g", or "" for half of this host's memory."""
    if not value.strip():
        return half_the_memory()
    try:
        size = validate.parse_size(value, "max_shm_size", 1024**2, 1024**5)
    except errors.BadInput:
        size = None
    if size is None:
        raise errors.ConfigError(
            f'max_shm_size: {value!r} is not a size like "16g" or "512m" (at least 1m)'
        )
    return size


def parse_capabilities(value: str) -> tuple[str, ...]:
    """cap_drop as Docker's capability names, upper-case without CAP_: "MKNOD,NET_RAW"."""
    names = []
    for part in filter(None, (p.strip().upper() for p in value.split(","))):
        name = part.removeprefix("CAP_")
        if not CAPABILITY.match(name):
            raise errors.ConfigError(f"cap_drop: {part!r} is not a capability name like MKNOD")
        names.append(name)
    return tuple(names)


def parse_registries(value: str) -> tuple[str, ...]:
    """`registries` as its entries: "public", "*", or registry names and patterns like
    "nvcr.io", "*.corp.example", "10.1.2.3:5000"."""
    entries = tuple(filter(None, (p.strip().lower() for p in value.split(","))))
    for entry in entries:
        if entry not in (PUBLIC, ANY) and not REGISTRY_PATTERN.match(entry):
            raise errors.ConfigError(
                f"registries: {entry!r} is not public, *, or a registry like nvcr.io,"
                " *.corp.example or 10.1.2.3:5000"
            )
    if not entries:
        raise errors.ConfigError("registries: empty (the default is public)")
    return entries


def check_public_url(value: str) -> None:
    """ConfigError unless `value` is empty or an origin: http(s)://HOST[:PORT], no path (the
    dashboard is served at the root of its host)."""
    if value and not re.fullmatch(r"https?://[^\s/?#@]+/?", value):
        raise errors.ConfigError(
            f"public_url: {value!r} is not http(s)://HOST[:PORT] (no path: the dashboard is"
            " served at /)"
        )


def check_link(value: str, name: str) -> None:
    """ConfigError unless `value` is a ZeroMQ address gpubox can bind or connect to."""
    if not re.fullmatch(r"(tcp://[^\s]+:(\d+|\*)|ipc://\S+|inproc://\S+)", value):
        raise errors.ConfigError(f"{name}: {value!r} is not tcp://HOST:PORT or ipc://PATH")
