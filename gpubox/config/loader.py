"""Where settings come from, highest first: a command-line flag, a GPUBOX_* environment
variable, the TOML config file ([section], then top level), the built-in default."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gpubox import errors
from gpubox.config.host import default_state_dir
from gpubox.config.settings import ClientConfig, CoordinatorConfig, WorkerConfig

T = TypeVar("T")


def _convert(value: Any, kind: type, name: str) -> Any:
    if kind is str:
        if isinstance(value, Mapping):  # labels or mounts as a TOML table
            return ",".join(f"{k}={v}" for k, v in value.items())
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise errors.ConfigError(f"{name}: {value!r} is not true or false")
    try:
        if kind is int:
            if isinstance(value, (bool, float)):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except (TypeError, ValueError):
        raise errors.ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
    raise AssertionError(kind)


SECTIONS = {CoordinatorConfig: "coordinator", WorkerConfig: "worker", ClientConfig: "client"}
TABLES = ("labels", "mounts")  # settings a config file may give as a TOML table


def read_file(path: str | None) -> dict[str, Any]:
    """A TOML config file as a dict; {} when no file is given. Checks its shape: sections
    [coordinator], [worker], [client] and top-level keys, each naming a known setting."""
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise errors.ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise errors.ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    check_file(data)
    return data


def _names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def check_file(data: Mapping[str, Any]) -> None:
    """ConfigError for a section that is not a table or a key that names no setting."""
    everything = set().union(*(_names(cls) for cls in SECTIONS))
    for key, value in data.items():
        if key in SECTIONS.values():
            if not isinstance(value, Mapping):
                raise errors.ConfigError(f"config: [{key}] must be a table of settings")
            cls = next(c for c, name in SECTIONS.items() if name == key)
            for name in value:
                if name not in _names(cls):
                    raise errors.ConfigError(f"config: unknown setting {key}.{name}")
        elif key not in everything or isinstance(value, Mapping) and key not in TABLES:
            raise errors.ConfigError(f"config: unknown setting {key!r}")


def load(
    cls: Callable[..., T],
    flags: Mapping[str, Any] | None = None,
    file_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Build and validate a config: flags > environment > file ([section], then top level) >
    `defaults` > the built-in default."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    file_data = file_data or {}
    check_file(file_data)
    section_name = SECTIONS[cls]  # type: ignore[index]
    section = file_data.get(section_name, {})
    # Top-level keys are shared settings; the sections' tables never count as values.
    top = {k: v for k, v in file_data.items() if k not in SECTIONS.values()}
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = {"str": str, "int": int, "float": float, "bool": bool}[str(field.type)]
        raw: Any = flags.get(field.name)
        if raw is None:
            raw = environ.get(field.metadata["env"])
        if raw is None:
            raw = section.get(field.name, top.get(field.name))
        if raw is None and defaults:
            raw = defaults.get(field.name)
        if raw is not None:
            values[field.name] = _convert(raw, kind, field.name)
    config = cls(**values)
    if hasattr(config, "state_dir"):
        state_dir = os.path.abspath(config.state_dir or default_state_dir())  # type: ignore[attr-defined]
        config = dataclasses.replace(config, state_dir=state_dir)  # type: ignore[type-var]
    if isinstance(config, CoordinatorConfig) and not config.db:
        config = dataclasses.replace(config, db=f"sqlite:///{Path(config.state_dir) / 'gpubox.db'}")
    config.validate()  # type: ignore[attr-defined]
    return config
