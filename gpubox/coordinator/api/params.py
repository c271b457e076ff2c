"""Reading a request: its JSON body and its query parameters, each checked, with errors.BadInput
(or errors.TooLarge) naming what is wrong."""

from __future__ import annotations

import json
from typing import Any

import bottle

from gpubox import errors

MAX_ID = 2**63 - 1  # the largest job id, and ?since= or ?before= value, that the API reads


def _no_constant(name: str) -> Any:
    raise errors.BadInput(f"{name} is not valid JSON")


def json_body(max_body_bytes: int) -> Any:
    """The request's body read as JSON: errors.TooLarge past `max_body_bytes`, errors.BadInput
    for anything that is not plain JSON (NaN and Infinity included)."""
    length = bottle.request.content_length
    if length > max_body_bytes:
        raise errors.TooLarge(f"the body is larger than {max_body_bytes} bytes")
    raw = bottle.request.body.read(max_body_bytes + 1)
    if len(raw) > max_body_bytes:
        raise errors.TooLarge(f"the body is larger than {max_body_bytes} bytes")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.BadInput(f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (int's own limit)
        raise errors.BadInput(f"the body holds a number too long to read: {exc}") from None
    except RecursionError:
        raise errors.BadInput("the body is nested too deeply") from None


def only(allowed: tuple[str, ...]) -> None:
    """errors.BadInput naming the first query parameter that is not one of `allowed` (a name
    ending in "." allows every parameter that starts with it, like metadata.KEY)."""
    prefixes = tuple(a for a in allowed if a.endswith("."))
    for name in bottle.request.query:
        if name not in allowed and not (prefixes and name.startswith(prefixes)):
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise errors.BadInput(f"unknown query parameter {name!r}: {takes}", name)


def text_query() -> list[tuple[str, str]]:
    """The query's (name, value) pairs as text. WSGI hands them over as latin-1; they are
    read as UTF-8 here, and a name or value that is not UTF-8 is errors.BadInput naming it
    (Bottle's own decode() raises, which was a 500)."""
    pairs = []
    for name, value in bottle.request.query.allitems():
        try:
            pairs.append((_utf8(name), _utf8(value)))
        except UnicodeError:
            shown = name.encode("latin-1", "replace").decode("utf-8", "replace")
            raise errors.BadInput(
                f"the query parameter {shown!r} is not UTF-8 text", shown
            ) from None
    return pairs


def _utf8(text: str) -> str:
    return text.encode("latin-1").decode("utf-8")


def int_param(name: str, default: int | None, low: int, high: int) -> int | None:
    """The query parameter `name` as an integer from `low` to `high`, or `default` if absent."""
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.BadInput(f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise errors.BadInput(f"{name} must be between {low} and {high}", name)
    return value


def float_param(name: str, default: float, low: float, high: float) -> float:
    """The query parameter `name` as a number from `low` to `high`, or `default` if absent."""
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise errors.BadInput(f"{name} must be a number", name) from None
    if not low <= value <= high:  # NaN fails this too
        raise errors.BadInput(f"{name} must be between {low:g} and {high:g}", name)
    return value


def flag(name: str) -> bool:
    """The query parameter `name` as true or false (1, true, yes; 0, false, no or empty)."""
    raw = bottle.request.query.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise errors.BadInput(f"{name} must be 0 or 1", name)
    return raw in ("1", "true", "yes")
