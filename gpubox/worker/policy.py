"""What a job's container may do, beyond what its submitter chose: its limits (processes,
/dev/shm) and the privileges it loses.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpubox import config

NO_NEW_PRIVILEGES = "no-new-privileges"


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

    @classmethod
    def from_config(cls, settings: config.WorkerConfig) -> ContainerPolicy:
        """The policy a WorkerConfig's settings describe."""
        return cls(
            pids_limit=settings.pids_limit,
            max_shm_size=config.parse_shm_size(settings.max_shm_size),
            cap_drop=config.parse_capabilities(settings.cap_drop),
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
