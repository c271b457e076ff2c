"""What a job's container may do and reach, beyond what its submitter chose: its limits
(processes, /dev/shm), the privileges it loses, and the registries its image may come from.

A worker runs containers for anyone who can submit, on a box it shares with other jobs and
with local users, so each job's container runs with:

- `no-new-privileges`: a setuid program inside the container gives no one more rights than
  they started with (sudo inside a job does not work; root in a job stays root).
- a limit on processes and threads (pids_limit): a fork bomb stops at it, not at the host's.
- no CAP_MKNOD (cap_drop): a job cannot make device files, neither for itself nor for the
  host through a writable mount. Docker's other default capabilities stay: apt-get needs
  CHOWN, SETUID and SETGID (it drops to its _apt user), and FSETID or SETFCAP would not stop
  a setuid-root file anyway (the owner of a file may always set its setuid bit). What stops
  such a file from working on the host is that writable mounts must be on a filesystem
  mounted nosuid,nodev (config.check_mount_folders).
- /dev/shm no larger than max_shm_size: /dev/shm is memory, and without a memory limit a job
  could take the host's.
- an image pulled only from an allowed registry (`registries`): without that, a job naming
  `127.0.0.1:8470/x` has the engine call services only this box can reach.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
import socket
from typing import Any

from gpubox import config
from gpubox.config import ANY, PUBLIC

HUB = "docker.io"
NO_NEW_PRIVILEGES = "no-new-privileges"


def registry_of(image: str) -> str:
    """The registry an image reference names, as host[:port] in lower case; "docker.io" for
    Docker Hub. Docker's own rule: the part before the first "/" names a registry when it
    holds a "." or ":", is "localhost", or has upper-case letters; else it is Docker Hub's
    (busybox, nvidia/cuda)."""
    first, slash, _ = image.partition("/")
    if not slash or (
        not any(c in first for c in ".:") and first != "localhost" and first == first.lower()
    ):
        return HUB
    return first.lower()


def host_of(registry: str) -> str:
    """The host of a registry's host[:port] ("[::1]:5000" → "::1")."""
    if registry.startswith("["):
        return registry[1:].partition("]")[0]
    return registry.partition(":")[0]


def is_public(address: str) -> bool:
    """Whether an IP address is one on the internet: not loopback, private, link-local
    (169.254.169.254, where clouds serve their instance secrets), shared, multicast or
    unspecified (0.0.0.0 reaches this host)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast


def human_size(size: int) -> str:
    """Bytes, exactly, for messages: in GiB or MiB where they are whole."""
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB")):
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


@dataclasses.dataclass(frozen=True)
class ContainerPolicy:
    """What a worker imposes on every job's container (the module docstring says why).
    The defaults are the worker settings' defaults."""

    pids_limit: int = 4096  # 0: no limit
    max_shm_size: int = dataclasses.field(default_factory=config.half_the_memory)
    cap_drop: tuple[str, ...] = ("MKNOD",)
    registries: tuple[str, ...] = (PUBLIC,)

    @classmethod
    def from_config(cls, settings: config.WorkerConfig) -> ContainerPolicy:
        """The policy a WorkerConfig's settings describe."""
        return cls(
            pids_limit=settings.pids_limit,
            max_shm_size=config.parse_shm_size(settings.max_shm_size),
            cap_drop=config.parse_capabilities(settings.cap_drop),
            registries=config.parse_registries(settings.registries),
        )

    def create_options(self, shm_size: int | None) -> dict[str, Any]:
        """The keyword arguments of containers.create that apply this policy, for a job that
        asks for `shm_size` bytes of /dev/shm (None: Docker's 64 MiB). Raises ValueError,
        saying why, when the job asks for more /dev/shm than this worker allows."""
        if shm_size is not None and shm_size > self.max_shm_size:
            raise ValueError(
                f"docker.shm_size of {human_size(shm_size)} is more than this worker allows"
                f" (max_shm_size, {human_size(self.max_shm_size)})"
            )
        options: dict[str, Any] = {"security_opt": [NO_NEW_PRIVILEGES]}
        if self.pids_limit > 0:
            options["pids_limit"] = self.pids_limit
        if self.cap_drop:
            options["cap_drop"] = list(self.cap_drop)
        return options

    def registry_refusal(self, image: str) -> str | None:
        """Why this worker must not pull `image` (its registry is not allowed), or None.

        Under "public" the registry's host is resolved here, as the engine on this box will
        resolve it: a name that resolves to a loopback, private or link-local address is
        refused like that address. The engine resolves it again when it pulls, so a name
        whose DNS answer changes in between (DNS rebinding) can still reach a private address;
        and a public registry can redirect the engine's requests elsewhere. Only an explicit
        list of trusted registries, without "public", closes both."""
        registry = registry_of(image)
        host = host_of(registry)
        for entry in self.registries:
            if entry == ANY or fnmatch.fnmatchcase(registry, entry):
                return None
            if fnmatch.fnmatchcase(host, entry):  # an entry without a port allows any port
                return None
        if PUBLIC not in self.registries:
            return f"registry {registry} is not allowed on this worker (worker setting registries)"
        if registry == HUB:
            return None
        try:
            found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return f"registry host {host} could not be resolved"
        if found and all(is_public(str(info[4][0])) for info in found):
            return None
        return (
            f"registry {registry} is not allowed on this worker: it is on a loopback, private"
            " or link-local address (the worker setting registries can allow it)"
        )


# How a failed pull is told to the submitter: a fixed phrase per kind of failure, never
# Docker's text, which can hold what the remote server answered (the body of any web page
# the engine was pointed at). The first matching entry wins; its pattern is matched against
# Docker's message in lower case.
PULL_FAILURES = [
    # Docker quotes the body of an answer it could not parse: say its status only.
    (re.compile(r"error parsing http (\d{3}) response body"), "registry answered {0}"),
    (re.compile(r"no such host|server misbehaving"), "registry host not found"),
    (re.compile(r"connection refused"), "connection refused"),
    (re.compile(r"timeout|timed out|deadline exceeded"), "timed out"),
    (re.compile(r"http response to https client"), "the registry does not speak HTTPS"),
    (re.compile(r"x509|certificate|tls:"), "TLS error: the registry's certificate"),
    (re.compile(r"toomanyrequests|rate limit"), "the registry limits pulls: try later"),
    (re.compile(r"no matching manifest"), "no image for this platform"),
    (
        re.compile(r"unauthorized|authentication required|denied"),
        "not found, or access denied (check the name and docker.auth)",
    ),
    (
        re.compile(r"not found|manifest unknown|does not exist|no such image"),
        "not found",
    ),
    (re.compile(r"\b(?:http|status(?: code)?:?) ?([1-5]\d\d)\b"), "registry answered {0}"),
]


def pull_failure(message: str) -> str:
    """A failed pull in a few fixed words (PULL_FAILURES), from Docker's message."""
    text = message.lower()
    for pattern, words in PULL_FAILURES:
        if match := pattern.search(text):
            return words.format(*match.groups())
    return "pull failed (the worker's log has Docker's message)"
