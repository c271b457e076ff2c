"""The checks of what clients submit: a job's JSON into a models.JobSpec, a status name, a
size, each refused with errors.BadInput naming the field. Pure: no I/O."""

from __future__ import annotations

import re
import shlex
from typing import Any

from gpubox import errors, models

MAX_NAME = 200
MAX_DESCRIPTION = 4000
MAX_IMAGE = 512
MAX_GPUS = 64
MAX_INT = 2**31 - 1
MAX_SECONDS = 366 * 86400  # the longest timeout, idle_timeout or queue_timeout: a year
MAX_RETRIES = 100
MAX_GPU_MEMORY_GB = 4096
MAX_KEY = 256  # the longest key of env, secrets, labels
MAX_PATH = 4096  # the longest docker.workdir
SHM_SIZE = (1024**2, 1024**4)  # the bytes docker.shm_size may be, least and most
MEMORY = (6 * 1024**2, 64 * 1024**4)  # the bytes docker.memory may be, least and most
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Environment variables a job may not set. gpubox sets CUDA_VISIBLE_DEVICES (process
# runtime) and NVIDIA_VISIBLE_DEVICES to the job's GPUs; the other NVIDIA_* variables steer
# the NVIDIA container runtime (NVIDIA_DRIVER_CAPABILITIES, NVIDIA_MIG_CONFIG_DEVICES give a
# container more of the driver than its GPUs); GPUBOX_* are gpubox's own (the process runtime
# finds its jobs' processes by one).
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})
RESERVED_ENV_PREFIXES = ("NVIDIA_", "GPUBOX_")
MOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


# The keys a submission may hold, at its top, in its docker object and in docker.auth: any
# other is refused, so a typo never passes silently.
JOB_KEYS = {
    "name",
    "description",
    "priority",
    "docker",
    "gpus",
    "gpu_model",
    "gpu_memory_gb",
    "labels",
    "timeout",
    "idle_timeout",
    "queue_timeout",
    "webhooks",
    "max_retries",
    "metadata",
}
DOCKER_KEYS = {
    "image",
    "command",
    "env",
    "auth",
    "secrets",
    "shm_size",
    "workdir",
    "user",
    "memory",
    "mounts",
}
AUTH_KEYS = {"registry", "username", "password"}


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.BadInput(f"{field} must be an integer", field)
    if not low <= value <= high:
        raise errors.BadInput(f"{field} must be between {low} and {high}", field)
    return value


def _str(value: Any, field: str, limit: int, required: bool = False) -> str:
    if not isinstance(value, str):
        raise errors.BadInput(f"{field} must be a string", field)
    if required and not value.strip():
        raise errors.BadInput(f"{field} must not be empty", field)
    if len(value) > limit:
        raise errors.BadInput(f"{field} must be at most {limit} characters", field)
    return value


def _str_map(value: Any, field: str, env_names: bool = False) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.BadInput(f"{field} must be an object of strings", field)
    for key, item in value.items():
        if not isinstance(item, str):
            raise errors.BadInput(f"{field}.{key} must be a string", f"{field}.{key}")
        if env_names and not ENV_NAME.match(key):
            raise errors.BadInput(f"{field}: {key!r} is not a valid variable name", field)
        if not key or len(key) > MAX_KEY:
            raise errors.BadInput(f"{field} keys must be 1 to {MAX_KEY} characters", field)
    return dict(value)


def _check_text(value: Any, field: str, nul_ok: bool = False) -> None:
    """Every string in a submitted value (keys too) must be text that UTF-8, the store and the
    worker link can hold: JSON's \\ud800 escapes let a lone surrogate through (a shell
    argument that is not UTF-8 arrives as one), and PostgreSQL text, a command line and an
    environment cannot hold NUL (metadata, stored as JSON, can: `nul_ok`). Without this such a
    job failed at its insert (a 500) or, in a command, at every dispatch, never to run."""
    pending = [(value, field)]
    while pending:  # not recursive: metadata may nest as deep as JSON allows
        item, where = pending.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                _check_string(key, f"a key in {where}", where, nul_ok)
                pending.append((inner, f"{where}.{key}"))
        elif isinstance(item, list):
            pending.extend((inner, f"{where}[{index}]") for index, inner in enumerate(item))
        elif isinstance(item, str):
            _check_string(item, where, where, nul_ok)


def _check_string(text: str, what: str, field: str, nul_ok: bool) -> None:
    if not nul_ok and "\x00" in text:
        raise errors.BadInput(f"{what} must not contain NUL characters", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.BadInput(
            f"{what} is not valid Unicode text (it holds a lone surrogate, such as \\ud800,"
            " which is what a shell argument that is not UTF-8 becomes)",
            field,
        ) from None


def _unknown(data: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            field = f"{prefix}{key}"
            raise errors.BadInput(f"unknown field {field!r}", field)


def parse_command(value: Any, field: str = "docker.command") -> list[str] | None:
    """Exec-form command: a list of strings as given, or a string split like a shell would."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise errors.BadInput(f"{field} cannot be split: {exc}", field) from exc
        return parts or None
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return list(value) or None
    raise errors.BadInput(f"{field} must be a list of strings or a string", field)


def parse_size(value: Any, field: str, low: int, high: int) -> int | None:
    """Bytes from an integer or a string like "8g", "512m", "16GiB" (units of 1024)."""
    if value is None:
        return None
    if isinstance(value, str) and (match := SIZE.match(value.strip())):
        number = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise errors.BadInput(f'{field} must be bytes, or a size like "8g" or "512m"', field)
    if not low <= number <= high:
        raise errors.BadInput(f"{field} must be between {low} and {high} bytes", field)
    return int(number)


def parse_container(docker: dict[str, Any]) -> models.ContainerOptions:
    """The container options of a submission's docker object."""
    workdir = docker.get("workdir")
    if workdir is not None:
        workdir = _str(workdir, "docker.workdir", MAX_PATH, required=True)
        if not workdir.startswith("/"):
            raise errors.BadInput("docker.workdir must be an absolute path", "docker.workdir")
    user = docker.get("user")
    if user is not None and (not isinstance(user, str) or not USER.match(user)):
        raise errors.BadInput(
            "docker.user must be a user name or id, optionally :group (like 1000:1000)",
            "docker.user",
        )
    mounts = docker.get("mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, str) for m in mounts):
        raise errors.BadInput("docker.mounts must be a list of mount names", "docker.mounts")
    for name in mounts:
        if not MOUNT_NAME.match(name):
            raise errors.BadInput(f"docker.mounts: {name!r} is not a mount name", "docker.mounts")
    if len(set(mounts)) != len(mounts):
        raise errors.BadInput("docker.mounts names a mount twice", "docker.mounts")
    return models.ContainerOptions(
        shm_size=parse_size(docker.get("shm_size"), "docker.shm_size", *SHM_SIZE),
        workdir=workdir,
        user=user,
        memory=parse_size(docker.get("memory"), "docker.memory", *MEMORY),
        mounts=list(mounts),
    )


# An image reference as Docker reads it (the grammar of distribution/reference):
# [DOMAIN/]PATH[:TAG][@DIGEST]. The first part is a domain only when it has a "." or a ":"
# or is "localhost"; the path's parts are lowercase.
_PATH_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
NO_IMAGE = "-"  # for the process runtime, which runs no image


def check_image(image: str) -> str:
    """`image` if Docker would take it as an image reference (or it is "-", no image: for
    process-runtime workers), else errors.BadInput saying what is wrong, so that a job a
    worker could never pull fails at submission, not on the worker."""
    if image == NO_IMAGE:
        return image
    rest, _, digest = image.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise _bad_image(image, f"its digest {digest!r} is not ALGORITHM:HEX")
    name, tag = rest, ""
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):  # a ":" after the last "/" starts the tag
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _bad_image(image, f"its tag {tag!r} is not letters, digits, _ . - (128 at most)")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        if not _DOMAIN.fullmatch(parts[0]):
            raise _bad_image(image, f"{parts[0]!r} is not a registry host[:port]")
        parts = parts[1:]
    for part in parts:
        if not _PATH_PART.fullmatch(part):
            raise _bad_image(
                image, f"{part!r} is not lowercase letters and digits joined by . _ __ or -"
            )
    return image


def _bad_image(image: str, why: str) -> errors.BadInput:
    return errors.BadInput(
        f"docker.image {image!r} is not an image reference Docker would take: {why}",
        "docker.image",
    )


MAX_WEBHOOKS = 5
WEBHOOK_EVENTS = ("start", "end")


def parse_webhooks(value: Any) -> list[dict[str, Any]]:
    """A job's webhooks: up to MAX_WEBHOOKS of {"url": http(s)://…, "secret": 16-200
    characters (the HMAC key the receiver checks each delivery with), "events": a list of
    "start" and "end", by default ["end"]}. Whether the coordinator may call a URL is its
    own setting (webhook_allow), checked by the API."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_WEBHOOKS:
        raise errors.BadInput(f"webhooks must be a list of at most {MAX_WEBHOOKS}", "webhooks")
    hooks = []
    for index, hook in enumerate(value):
        where = f"webhooks[{index}]"
        if not isinstance(hook, dict):
            raise errors.BadInput(f"{where} must be an object with url and secret", where)
        _unknown(hook, {"url", "secret", "events"}, f"{where}.")
        url = _str(hook.get("url"), f"{where}.url", 2000, required=True)
        if not re.fullmatch(r"https?://[^\s/?#@]+(/\S*)?", url):
            raise errors.BadInput(f"{where}.url must be an http:// or https:// URL", f"{where}.url")
        secret = _str(hook.get("secret"), f"{where}.secret", 200, required=True)
        if len(secret) < 16:
            raise errors.BadInput(
                f"{where}.secret must be 16 characters or more", f"{where}.secret"
            )
        events = hook.get("events", ["end"])
        if (
            not isinstance(events, list)
            or not events
            or any(e not in WEBHOOK_EVENTS for e in events)
            or len(set(events)) != len(events)
        ):
            raise errors.BadInput(f"{where}.events must list start and/or end", f"{where}.events")
        hooks.append({"url": url, "secret": secret, "events": events})
    return hooks


def parse_spec(data: Any) -> models.JobSpec:
    """Validate a submission (decoded JSON) into a JobSpec, or raise BadInput naming the field."""
    if not isinstance(data, dict):
        raise errors.BadInput("the body must be a JSON object")
    for key, value in data.items():
        _check_string(key, "a field name", "", nul_ok=False)
        _check_text(value, key, nul_ok=key == "metadata")
    _unknown(data, JOB_KEYS, "")
    if "name" not in data:
        raise errors.BadInput("name is required", "name")
    name = _str(data["name"], "name", MAX_NAME, required=True)
    docker = data.get("docker")
    if not isinstance(docker, dict):
        raise errors.BadInput("docker must be an object with at least an image", "docker")
    _unknown(docker, DOCKER_KEYS, "docker.")
    if "image" not in docker:
        raise errors.BadInput("docker.image is required", "docker.image")
    image = check_image(_str(docker["image"], "docker.image", MAX_IMAGE, required=True))
    auth = docker.get("auth")
    if auth is not None:
        if not isinstance(auth, dict):
            raise errors.BadInput("docker.auth must be an object", "docker.auth")
        _unknown(auth, AUTH_KEYS, "docker.auth.")
        auth = _str_map(auth, "docker.auth")
        for key in ("username", "password"):
            if key not in auth:
                raise errors.BadInput(f"docker.auth.{key} is required", f"docker.auth.{key}")
    env = _str_map(docker.get("env"), "docker.env", env_names=True)
    secrets = _str_map(docker.get("secrets"), "docker.secrets", env_names=True)
    for field, values in (("docker.env", env), ("docker.secrets", secrets)):
        for key in values:
            if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
                raise errors.BadInput(
                    f"{field}: {key} is gpubox's to set: a job sets no NVIDIA_* or GPUBOX_*"
                    " variable, nor CUDA_VISIBLE_DEVICES (ask for GPUs with gpus)",
                    field,
                )
    for key, value in secrets.items():
        if key in env:
            raise errors.BadInput(
                f"{key} is both in docker.env and docker.secrets", "docker.secrets"
            )
        if len(value) < models.MIN_SECRET:
            raise errors.BadInput(
                f"docker.secrets.{key} must be at least {models.MIN_SECRET} characters",
                f"docker.secrets.{key}",
            )
    timeout = data.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise errors.BadInput("timeout must be a number of seconds or null", "timeout")
        if not 0 < timeout <= MAX_SECONDS:
            raise errors.BadInput("timeout must be positive and at most a year", "timeout")
    idle_timeout = data.get("idle_timeout")
    if idle_timeout is not None and (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, int | float)
        or not 0 <= idle_timeout <= MAX_SECONDS
    ):
        raise errors.BadInput(
            "idle_timeout must be a number of seconds from 0 (never) to a year, or null (the"
            " coordinator's)",
            "idle_timeout",
        )
    queue_timeout = data.get("queue_timeout")
    if queue_timeout is not None and (
        isinstance(queue_timeout, bool)
        or not isinstance(queue_timeout, int | float)
        or not 0 < queue_timeout <= MAX_SECONDS
    ):
        raise errors.BadInput(
            "queue_timeout must be a number of seconds above 0, at most a year, or null (the"
            " coordinator's)",
            "queue_timeout",
        )
    webhooks = parse_webhooks(data.get("webhooks"))
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise errors.BadInput("metadata must be a JSON object", "metadata")
    gpus = _int(data.get("gpus", 0), "gpus", 0, MAX_GPUS)
    gpu_model = data.get("gpu_model")
    if gpu_model is not None:
        gpu_model = _str(gpu_model, "gpu_model", MAX_NAME, required=True).strip()
    gpu_memory_gb = data.get("gpu_memory_gb")
    if gpu_memory_gb is not None and (
        isinstance(gpu_memory_gb, bool)
        or not isinstance(gpu_memory_gb, int | float)
        or not 0 < gpu_memory_gb <= MAX_GPU_MEMORY_GB
    ):
        raise errors.BadInput("gpu_memory_gb must be a number of GB above 0", "gpu_memory_gb")
    for field in ("gpu_model", "gpu_memory_gb"):
        if data.get(field) is not None and gpus == 0:
            raise errors.BadInput(f"{field} needs gpus of 1 or more", field)
    return models.JobSpec(
        name=name,
        image=image,
        command=parse_command(docker.get("command")),
        env=env,
        auth=auth,
        secrets=secrets,
        description=_str(data.get("description", ""), "description", MAX_DESCRIPTION),
        priority=_int(data.get("priority", 0), "priority", -MAX_INT, MAX_INT),
        gpus=gpus,
        labels=_str_map(data.get("labels"), "labels"),
        timeout=timeout,
        idle_timeout=idle_timeout,
        queue_timeout=queue_timeout,
        webhooks=webhooks,
        max_retries=_int(data.get("max_retries", 0), "max_retries", 0, MAX_RETRIES),
        metadata=metadata,
        gpu_model=gpu_model,
        gpu_memory_gb=gpu_memory_gb,
        container=parse_container(docker),
    )


def parse_status(value: str) -> models.Status:
    """A status name from a query string, case-insensitive."""
    try:
        return models.Status(value.upper())
    except ValueError:
        names = ", ".join(s.value for s in models.Status)
        raise errors.BadInput(f"status must be one of {names}", "status") from None
