"""How gpubox writes its own log: one line per event, its level, and key=value fields.

    log.info("job %d sent to %s", job.id, name, extra=fields(job=job.id, worker=name))

On a terminal or into a file a line reads

    2026-11-28T10:09:46.765Z INFO gpubox.broker: job 7 sent to gpu-01 job=7 worker=gpu-01

Under systemd (stderr is the journal's stream) the timestamp is left to journald and the line
starts with the syslog priority (`<6>`), so `journalctl -p warning` filters by level; line
breaks inside a message (a traceback) are written as `\\n`, keeping one event one line.
No colour, anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import IO, Any

PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# The log_level setting's values, least kept last.
LEVELS = ("debug", "info", "warning", "error")


# What must not reach a log line raw: C0 and C1 control characters (a newline would start a
# line that looks like gpubox's own, an escape sequence would drive the reader's terminal)
# and Unicode's line and paragraph separators.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """A value from a job (its image, a remote server's message) made fit for one log line:
    each control character written as Python writes it in a string (\\n, \\x1b)."""
    return CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: key=value fields appended to its line (job, worker, …)."""
    return {"fields": values}


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class Formatter(logging.Formatter):
    """The line format above; `journal` selects the systemd variant."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        extra = getattr(record, "fields", None)
        if extra:
            line += "".join(f" {key}={_value(value)}" for key, value in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            return f"<{PRIORITY.get(record.levelname, 6)}>" + line.replace("\n", "\\n")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {line}"


def on_journal(stream: IO[str]) -> bool:
    """Whether `stream` is systemd's journal stream (JOURNAL_STREAM names its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send gpubox's log to stderr (or `stream`) in the format above, from `level` up."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Formatter(journal=on_journal(stream)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Keep the records of `level` (one of LEVELS) and above: the log_level setting, applied
    once the settings are read (what reading them says goes out at the default, info).
    `debug` is gpubox's own: the libraries under it (urllib3, docker, psycopg, waitress)
    stay at info, where their debug lines would bury gpubox's."""
    number = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(max(number, logging.INFO))
    logging.getLogger("gpubox").setLevel(number if number < logging.INFO else logging.NOTSET)
