"""The exit codes of gpubox's client commands (submit --follow, tail, wait, and every command
that talks to a coordinator), in one table, so that a CI system can tell the job's own failure
from gpubox's: GitLab's `retry: exit_codes:` and Buildkite's `exit_status` retry a step on the
codes of failures that another try may mend (UNAVAILABLE, JOB_LOST, GAVE_UP).

A job's own non-zero exit code (1-255) passes through as it is, as `docker run` and
`sbatch --wait` do, so a job that exits 69 looks like gpubox's UNAVAILABLE: the codes below
come from sysexits.h and the shell's conventions, which jobs seldom use for themselves.
"""

from __future__ import annotations

import dataclasses

OK = 0  # the job FINISHED (it exited 0)
FAILED = 1  # a command failed for a reason not below (a file it could not read, …)
USAGE = 2  # a bad flag, argument or setting: nothing was sent
INVALID = 65  # the coordinator refused the request as invalid (HTTP 400, 409, 413)
NO_SUCH_JOB = 66  # no such job (HTTP 404)
UNAVAILABLE = 69  # the coordinator could not be reached, or answered 5xx (its store away, busy)
JOB_LOST = 70  # the job's worker was lost and the job had no retry left
GAVE_UP = 75  # gpubox stopped following or waiting (the job may still run); or over a cap
REFUSED = 77  # the token was refused (HTTP 401) or may not do this (HTTP 403)
TIMEOUT = 124  # the job ran past its timeout (as GNU timeout exits)
NOT_RUN = 125  # the job ended ERROR without an exit code of its own (as docker run exits)
CANCELLED = 130  # the job was cancelled, or Ctrl-C stopped following it


@dataclasses.dataclass(frozen=True)
class Code:
    code: str  # "0", "1-255", …
    meaning: str
    retry: bool  # whether another try of the CI step may succeed where this one failed


TABLE = [
    Code(str(OK), "the job FINISHED: it exited 0", False),
    Code(
        "1-255",
        "the job's own non-zero exit code (a job killed by signal N: 128+N, like 137)",
        False,
    ),
    Code(
        str(FAILED), "a gpubox command failed for another reason (a file it could not read)", False
    ),
    Code(str(USAGE), "bad usage: a flag, an argument or a setting; nothing was sent", False),
    Code(
        str(INVALID), "the coordinator refused the request as invalid (HTTP 400, 409, 413)", False
    ),
    Code(str(NO_SUCH_JOB), "no such job (HTTP 404)", False),
    Code(
        str(UNAVAILABLE),
        "the coordinator could not be reached, or answered 5xx (its store away, too busy)",
        True,
    ),
    Code(str(JOB_LOST), "the job's worker was lost and the job had no retry left", True),
    Code(
        str(GAVE_UP),
        "gpubox gave up following or waiting; the job may still run. Or a cap of the token"
        " refused the submit for now (HTTP 429: too many jobs queued)",
        True,
    ),
    Code(str(REFUSED), "the token was refused (HTTP 401) or may not do this (HTTP 403)", False),
    Code(str(TIMEOUT), "the job ran past its timeout", False),
    Code(
        str(NOT_RUN),
        "the job ended ERROR without an exit code of its own: its image could not be pulled,"
        " its container not started, it waited past its queue_timeout, or the idle-GPU policy"
        " stopped it",
        False,
    ),
    Code(str(CANCELLED), "the job was cancelled, or Ctrl-C stopped following it", False),
]


def for_job(status: str, exit_code: int | None, error: str | None) -> int:
    """What a command that saw the job end exits with."""
    if status == "FINISHED":
        return OK
    if status == "CANCELLED":
        return CANCELLED
    error = error or ""
    if error == "timeout":
        return TIMEOUT
    if error.startswith("worker lost"):
        return JOB_LOST
    if isinstance(exit_code, int) and 0 < exit_code < 256:
        return exit_code
    return NOT_RUN


def for_http_status(status: int) -> int:
    """What a command whose request the coordinator refused exits with."""
    if status in (401, 403):
        return REFUSED
    if status == 404:
        return NO_SUCH_JOB
    if status == 429:
        return GAVE_UP  # as EX_TEMPFAIL means: another try, later, may pass
    if status >= 500:
        return UNAVAILABLE
    return INVALID
