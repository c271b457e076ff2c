"""Which jobs a list asks for: the filters of GET /api/v1/jobs and `gpubox ls`, read from a
query string (every value checked, errors.BadInput naming the parameter) and written back
into one, so that a next page keeps them."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Iterable
from datetime import UTC, datetime

from gpubox import errors, models

METADATA = "metadata."  # the prefix of a query parameter that filters on a metadata key
KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
QUERY = ("status", "name", "submitter", "label", "created_after", "created_before", METADATA)
MAX_TEXT = 200  # the longest name or submitter a filter takes


@dataclasses.dataclass(frozen=True)
class JobFilter:
    """Jobs that match every field given (an empty field matches any job)."""

    statuses: tuple[models.Status, ...] = ()  # any of these
    name: str = ""  # names that start with this (case matters)
    submitter: str = ""  # the token name that submitted it, exactly
    labels: tuple[tuple[str, str], ...] = ()  # every KEY=VALUE among the job's labels
    metadata: tuple[tuple[str, str], ...] = ()  # each top-level KEY whose value, as text, is VALUE
    created_after: datetime | None = None
    created_before: datetime | None = None

    @classmethod
    def from_query(cls, pairs: Iterable[tuple[str, str]]) -> JobFilter:
        """From a query string's (name, value) pairs: status (repeated, or comma-separated),
        name, submitter, label=KEY=VALUE (repeated), metadata.KEY=VALUE (repeated),
        created_after and created_before (RFC 3339, or Unix seconds). Other names are not
        looked at (the endpoint refuses those it does not know)."""
        statuses: list[models.Status] = []
        labels: list[tuple[str, str]] = []
        metadata: list[tuple[str, str]] = []
        fields: dict[str, object] = {}
        for name, value in pairs:
            if name == "status":
                for part in filter(None, (p.strip() for p in value.split(","))):
                    status = _status(part)
                    if status not in statuses:
                        statuses.append(status)
            elif name == "label":
                labels.append(_pair(value, "label"))
            elif name.startswith(METADATA):
                key = name[len(METADATA) :]
                if not KEY.fullmatch(key):
                    raise errors.BadInput(
                        f"{name}: a metadata key is 1-64 letters, digits, _ or -", name
                    )
                metadata.append((key, _no_nul(value, name)))
            elif name in ("name", "submitter"):
                fields[name] = _text(value, name)
            elif name in ("created_after", "created_before"):
                fields[name] = _time(value, name)
        return cls(
            statuses=tuple(statuses),
            labels=tuple(labels),
            metadata=tuple(metadata),
            **fields,  # type: ignore[arg-type]
        )

    def query(self) -> list[tuple[str, str]]:
        """The filters as query-string pairs (the inverse of from_query)."""
        pairs: list[tuple[str, str]] = []
        if self.statuses:
            pairs.append(("status", ",".join(s.value for s in self.statuses)))
        for name in ("name", "submitter"):
            if getattr(self, name):
                pairs.append((name, getattr(self, name)))
        pairs += [("label", f"{k}={v}") for k, v in self.labels]
        pairs += [(METADATA + k, v) for k, v in self.metadata]
        for name in ("created_after", "created_before"):
            when = getattr(self, name)
            if when is not None:
                pairs.append((name, models.format_time(when) or ""))
        return pairs

    def query_string(self) -> str:
        return urllib.parse.urlencode(self.query())


def _status(value: str) -> models.Status:
    try:
        return models.Status(value.upper())
    except ValueError:
        names = ", ".join(s.value for s in models.Status)
        raise errors.BadInput(f"status {value!r} is not one of {names}", "status") from None


def _pair(value: str, name: str) -> tuple[str, str]:
    key, sep, val = _no_nul(value, name).partition("=")
    if not sep or not key:
        raise errors.BadInput(f"{name} {value!r} is not KEY=VALUE", name)
    return key, val


def _no_nul(value: str, name: str) -> str:
    """`value`, unless it holds NUL, which PostgreSQL text cannot (its query failed: a 500)."""
    if "\x00" in value:
        raise errors.BadInput(f"{name} must not contain NUL characters", name)
    return value


def _text(value: str, name: str) -> str:
    if len(value) > MAX_TEXT or "\x00" in value:
        raise errors.BadInput(f"{name} is at most {MAX_TEXT} characters, without NUL", name)
    return value


def _time(value: str, name: str) -> datetime:
    """RFC 3339 (2026-12-06T10:00:00Z, or with an offset) or Unix seconds."""
    try:
        if re.fullmatch(r"\d+(\.\d+)?", value):
            return datetime.fromtimestamp(float(value), UTC)
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise errors.BadInput(
            f"{name} {value!r} is not an RFC 3339 time or Unix seconds", name
        ) from None
    if when.tzinfo is None:
        raise errors.BadInput(f"{name} {value!r} has no time zone (add Z for UTC)", name)
    try:
        return when.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first UTC time Python has
        raise errors.BadInput(f"{name} {value!r} is out of range", name) from None
