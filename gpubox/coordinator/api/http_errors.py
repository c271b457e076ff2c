"""How the API answers an error: the HTTP status of each gpubox error, and the JSON body."""

from __future__ import annotations

import json
from typing import Any

import bottle

from gpubox import errors

# The HTTP status of each gpubox error. An error takes the status of the first class here that
# it is an instance of, so a subclass must come before its parent class. Any other error (a
# StoreError, a ProtocolError, a ConfigError or a plain GpuboxError) is a fault of gpubox, not
# of the request, and is a 500.
STATUS: dict[type[errors.GpuboxError], int] = {
    errors.BadInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,  # NotYourJob too
    errors.NotFound: 404,  # JobNotFound too
    errors.WrongState: 409,
    errors.TooLarge: 413,
    errors.IdempotencyConflict: 422,
    errors.OverCap: 429,
    errors.StoreUnavailable: 503,  # a StoreError, but the client may try again
    errors.Busy: 503,
    errors.Deposed: 503,  # this coordinator no longer leads: another one answers
}


def status_for(exc: errors.GpuboxError) -> int:
    """The HTTP status that the API answers `exc` with (see STATUS)."""
    return status_of(type(exc))


def status_of(kind: type[errors.GpuboxError]) -> int:
    """The HTTP status that the API answers an error of class `kind` with (see STATUS)."""
    return next((status for cls, status in STATUS.items() if issubclass(kind, cls)), 500)


def error_body(code: str, message: str, field: str | None = None) -> str:
    """The JSON body of an error answer: {"error": {"code", "message", "field"?}}."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return json.dumps({"error": error})


# The code of an error that Bottle itself raises, by its status (any other status: OTHER_CODE).
BOTTLE_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
OTHER_CODE = "error"


def default_error(res: bottle.HTTPError) -> str:
    """The body of an error that Bottle itself raises (no such route, wrong method, a body
    too large), in the same JSON shape as gpubox's own errors."""
    bottle.response.content_type = "application/json"
    message = {404: "no such endpoint", 405: "method not allowed"}.get(res.status_code)
    return error_body(BOTTLE_CODES.get(res.status_code, OTHER_CODE), message or str(res.body))
