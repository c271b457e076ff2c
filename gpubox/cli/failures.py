"""How a command reports a failure: one `Error: …` line and its exit status (gpubox.exits)."""

from __future__ import annotations

import errno
import functools
import os
import pwd
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from gpubox import errors, exits
from gpubox.cli.options import F
from gpubox.client import ApiError, OutputClosed


class SettingError(click.ClickException):
    """A bad setting: `Error: …` on one line (no usage block), exit status 2."""

    exit_code = exits.USAGE


class Failed(click.ClickException):
    """`Error: …` on one line, and the exit status that says which failure it was."""

    def __init__(self, message: str, exit_code: int = exits.FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Errors writing stdout or stderr: the output is gone, not the command's own failure.
UNWRITABLE = {errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def friendly(fn: F) -> F:
    """Turn gpubox errors, and errors reading or writing a file, into `Error: …` and the exit
    status gpubox.exits gives each (2 for bad settings, 69 for a coordinator out of reach, …;
    1 for what it names no code for)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.ConfigError as exc:
            raise SettingError(str(exc)) from None
        except ApiError as exc:
            where = f" ({exc.field})" if exc.field and exc.field not in exc.message else ""
            message = f"{exc.message}{where} [HTTP {exc.status}]"
            raise Failed(message, exc.exit_code) from None
        except OutputClosed as exc:  # a GpuboxError, but it needs its own handling
            _output_failed(exc)
        except errors.GpuboxError as exc:
            raise Failed(str(exc), getattr(exc, "exit_code", exits.FAILED)) from None
        except OSError as exc:
            if exc.filename is None:
                _output_failed(exc)
            raise click.ClickException(_file_error(exc)) from None

    return wrapper


def _output_failed(exc: OutputClosed | OSError) -> NoReturn:
    """Writing stdout or stderr failed: exit quietly if its reader left, say so in one line if
    the output cannot take more; re-raise anything else."""
    cause = exc.__cause__ if isinstance(exc, OutputClosed) else exc
    if not isinstance(cause, OSError) or cause.errno not in UNWRITABLE:
        raise exc
    # Nothing more can be written (and nothing should flush into stdout at exit).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if cause.errno == errno.EPIPE:
        # The reader of a pipe left (`gpubox tail 42 | head`): stop quietly, as a command
        # killed by SIGPIPE would.
        sys.exit(128 + signal.SIGPIPE)
    raise click.ClickException(f"cannot write the output: {cause}") from None


def _file_error(exc: OSError) -> str:
    """One line for a file the command could not read or write (a key file, the state folder):
    its path and why; for "Permission denied", which user to run the command as."""
    paths = " and ".join(str(path) for path in (exc.filename, exc.filename2) if path is not None)
    line = f"{paths}: {exc.strerror or exc}"
    if not isinstance(exc, PermissionError):
        return line
    owner = _owner(str(exc.filename))
    command = f"runuser -u {owner or 'gpubox'} -- {shlex.join(['gpubox', *sys.argv[1:]])}"
    advice = f": {command}" if owner else f" (e.g. {command})"
    return f"{line}; run the command as the user that owns the state folder{advice}"


def _owner(path: str) -> str | None:
    """The user that owns `path`, or the nearest folder above it this process may look at;
    None where that is this process's own user (the mode is the problem, not the user)."""
    for part in (path, *(str(p) for p in Path(path).absolute().parents)):
        try:
            uid = os.stat(part).st_uid
        except OSError:
            continue
        if uid == os.geteuid():
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)
    return None
