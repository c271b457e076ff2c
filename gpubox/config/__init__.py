"""Settings of each process: one frozen dataclass per role, filled from (highest first) a
command-line flag, a GPUBOX_* environment variable, the TOML config file, the built-in default.

Every setting is declared once, as a dataclass field with `setting(...)`; the CLI's flags,
the environment names and the config examples all come from these declarations.

The records are in `settings`, the parsers of their values in `values`, what they need of
this host (the state folder, mount folders) in `host`, and where they are read from in
`loader`. The rest of gpubox uses them through this package: `from gpubox import config as
cfg`, then `cfg.load(cfg.WorkerConfig, …)`.
"""

from __future__ import annotations

from gpubox.config.host import (
    check_mount_folders,
    default_state_dir,
    private_state_dir,
    setuid_risk,
)
from gpubox.config.loader import SECTIONS, TABLES, check_file, load, read_file
from gpubox.config.settings import ClientConfig, CoordinatorConfig, WorkerConfig, setting
from gpubox.config.values import (
    ANY,
    CAPABILITY,
    MOUNT_NAME,
    PUBLIC,
    REGISTRY_PATTERN,
    Mount,
    check_link,
    check_public_url,
    half_the_memory,
    parse_address,
    parse_capabilities,
    parse_fake_gpus,
    parse_labels,
    parse_mounts,
    parse_registries,
    parse_shm_size,
)

__all__ = [
    "ANY",
    "CAPABILITY",
    "MOUNT_NAME",
    "PUBLIC",
    "REGISTRY_PATTERN",
    "SECTIONS",
    "TABLES",
    "ClientConfig",
    "CoordinatorConfig",
    "Mount",
    "WorkerConfig",
    "check_file",
    "check_link",
    "check_public_url",
    "check_mount_folders",
    "default_state_dir",
    "half_the_memory",
    "load",
    "parse_address",
    "parse_capabilities",
    "parse_fake_gpus",
    "parse_labels",
    "parse_mounts",
    "parse_registries",
    "parse_shm_size",
    "private_state_dir",
    "read_file",
    "setting",
    "setuid_risk",
]
