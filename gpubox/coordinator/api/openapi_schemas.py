"""The JSON Schemas of the API's bodies, for its OpenAPI document (openapi.py). Each comes from
the code that makes or checks the body where it can: the Job from models.JOB_FIELDS, each
field typed by the attribute it reads; a telemetry point from telemetry.Point; the error codes
from the classes in gpubox.errors and the statuses in http_errors.STATUS. A job as submitted
is in openapi_submit.py. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import re
import types
import typing
from typing import Any

from gpubox import errors, jobfilter, keys, models, protocol, telemetry, validate
from gpubox.coordinator import tokens
from gpubox.coordinator.api import http_errors
from gpubox.coordinator.api.openapi_text import JOB_DOCS

Schema = dict[str, Any]
NO_NUL = "^[^\\u0000]*$"  # text that the store, a command line and an environment can hold

_SCALARS: dict[Any, Schema] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    datetime.datetime: {"type": "string", "format": "date-time"},  # models.format_time
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema`, or null."""
    kind = schema.get("type")
    if isinstance(kind, str) and "enum" not in schema:
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Schema], required: typing.Iterable[str] | None = None) -> Schema:
    """An object with no properties but these; those `required` (all, by default) present."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


def from_hint(hint: Any) -> Schema:
    """The schema of what the API shows for a value of the Python type `hint`."""
    if hint is Any:
        return {}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [arg for arg in args if arg is not type(None)]
        schema = from_hint(inner[0]) if len(inner) == 1 else {"anyOf": list(map(from_hint, inner))}
        return nullable(schema) if len(inner) < len(args) else schema
    if origin is list:
        return {"type": "array", "items": from_hint(args[0])}
    if origin is dict:
        values = from_hint(args[1])
        return {"type": "object", **({"additionalProperties": values} if values else {})}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [member.value for member in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return record(hint, [field.name for field in dataclasses.fields(hint)])
    raise TypeError(f"openapi_schemas.from_hint has no schema for {hint!r}")


def record(cls: type, names: typing.Sequence[str]) -> Schema:
    """An object with the attributes `names` of class `cls`, typed by their annotations."""
    hints = typing.get_type_hints(cls)
    return closed({name: from_hint(hints[name]) for name in names})


def attribute_hint(cls: Any, path: str) -> Any:
    """The type of the attribute that `path` ("spec.name", a property too) reads from a `cls`."""
    hint: Any = cls
    for name in path.split("."):
        hints = typing.get_type_hints(hint)
        if name in hints:
            hint = hints[name]
        else:  # a property: its return type
            hint = typing.get_type_hints(getattr(hint, name).fget)["return"]
    return hint


# --- the job as the API shows it ----------------------------------------------------------------

# The API fields whose type no attribute says: the API fills queue_reason in itself, and a
# result's telemetry is a summary with a shape of its own (telemetry.summarize).
JOB_TYPES: dict[str, Schema] = {
    "queue_reason": {"type": ["string", "null"]},
    "queue_place": {
        "oneOf": [
            {"type": "null"},
            closed(
                {
                    "place": {"type": "integer", "minimum": 1},
                    "ahead": {
                        "type": "array",
                        "items": closed(
                            {
                                "submitter": {"type": ["string", "null"]},
                                "jobs": {"type": "integer", "minimum": 1},
                                "use_gpu_hours": {"type": "number"},
                            }
                        ),
                    },
                    "use_gpu_hours": {"type": "number"},
                    "half_life_s": {"type": "number"},
                }
            ),
        ]
    },
    "webhooks": {
        "type": "array",
        "items": closed(
            {
                "url": {"type": "string"},
                "events": {"type": "array", "items": {"enum": list(validate.WEBHOOK_EVENTS)}},
            }
        ),
    },
    "result.telemetry": nullable(ref("TelemetrySummary")),
}


def _described(schema: Schema, key: str) -> Schema:
    return {**schema, "description": JOB_DOCS[key]} if key in JOB_DOCS else schema


def job() -> Schema:
    """The Job: every field of models.JOB_FIELDS with an `api` key, where that key puts it
    (a "group.key" inside the group's object; "group.*" merges a record's own fields)."""
    top: dict[str, Any] = {}
    for field in models.JOB_FIELDS:
        if field.api is None:
            continue
        group, _, key = field.api.rpartition(".")
        where = top.setdefault(group, {}) if group else top
        if field.api in JOB_TYPES:
            where[key] = _described(JOB_TYPES[field.api], field.api)
            continue
        if field.path is None:
            raise TypeError(f"JOB_FIELDS' {field.name} reads no attribute: add it to JOB_TYPES")
        schema = from_hint(attribute_hint(models.Job, field.path))
        if key == "*":
            for name, inner in schema["properties"].items():
                where[name] = _described(inner, f"{group}.{name}")
        else:
            where[key] = _described(schema, field.api)
    shown = {
        key: _described(closed(value), key) if key in ("docker", "result") else value
        for key, value in top.items()
    }
    shown["id"] = {**shown["id"], "minimum": 1}
    return {**closed(shown), "description": "A job as the API shows it."}


def telemetry_summary() -> Schema:
    """A result's telemetry (telemetry.summarize): the job's usage, and each GPU's under gpus."""
    usage = record(telemetry.Usage, [f.name for f in dataclasses.fields(telemetry.Usage)])
    gpus = {"type": "object", "additionalProperties": usage, "description": "by GPU uuid"}
    return closed({**usage["properties"], "gpus": gpus})


def telemetry_page() -> Schema:
    """GET /jobs/<id>/telemetry's answer."""
    point = record(telemetry.Point, telemetry.POINT_FIELDS)
    point["properties"] = {"attempt": {"type": "integer"}, **point["properties"]}
    point["required"].insert(0, "attempt")
    return closed(
        {
            "job_id": {"type": "integer"},
            "status": from_hint(models.Status),
            "points": {"type": "array", "items": point},
            "next": {"type": ["number", "null"], "description": "pass as since for newer points"},
            "more": {"type": "boolean", "description": "whether more points wait past next"},
        }
    )


# --- errors -------------------------------------------------------------------------------------


def error_classes() -> list[type[errors.GpuboxError]]:
    """Every error class of gpubox.errors."""
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.GpuboxError) and cls.__module__ == errors.__name__
    ]


def error_codes(status: int | None = None) -> list[str]:
    """The codes of the errors the API answers with `status` (None: with any status): those
    of gpubox's error classes (a 500's is "internal"), and of the errors Bottle raises."""
    codes = {cls.code for cls in error_classes() if status in (None, http_errors.status_of(cls))}
    bottle = http_errors.BOTTLE_CODES
    if status is None:
        codes |= {*bottle.values(), http_errors.OTHER_CODE}
    elif status in bottle:
        codes.add(bottle[status])
    return sorted(codes)


def error() -> Schema:
    inner = closed(
        {
            "code": ref("ErrorCode"),
            "message": {"type": "string", "minLength": 1, "description": "what is wrong, in words"},
            "field": {
                "type": "string",
                "minLength": 1,
                "description": "the field, query parameter or header at fault, where one is",
            },
        },
        required=("code", "message"),
    )
    return {**closed({"error": inner}), "description": "Every error answer's body."}


# --- the other bodies ---------------------------------------------------------------------------


def log_line() -> Schema:
    """One NDJSON record of a job's log (models.LogLine)."""
    schema = record(models.LogLine, models.LogLine._fields)
    schema["properties"]["stream"] = {"enum": [*protocol.STREAMS, models.GPUBOX_STREAM]}
    schema["properties"]["seq"]["minimum"] = 1
    return schema


def log_end() -> Schema:
    """The last record of an NDJSON follow stream (logs.end_record): how the job ended."""
    return closed(
        {
            "end": {"const": True},
            "id": {"type": "integer"},
            "status": from_hint(models.Status),
            "exit_code": from_hint(attribute_hint(models.Job, "exit_code")),
            "error": from_hint(attribute_hint(models.Job, "error")),
        }
    )


def webhook_deliveries() -> Schema:
    """GET /jobs/<id>/webhooks: the job's webhooks and each delivery (WebhookDelivery)."""
    time_or_null = {"type": ["string", "null"]}
    delivery = closed(
        {
            "url": {"type": "string"},
            "event": {"enum": ["job.started", "job.ended"]},
            "delivery": {"type": "string"},
            "state": {"enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "integer", "minimum": 0},
            "last_status": {"type": ["integer", "null"]},
            "last_error": {"type": ["string", "null"]},
            "next_at": time_or_null,
            "created_at": {"type": "string"},
            "delivered_at": time_or_null,
        }
    )
    return closed(
        {
            "webhooks": JOB_TYPES["webhooks"],
            "deliveries": {"type": "array", "items": delivery},
        }
    )


def worker() -> Schema:
    """A worker as GET /workers shows it (models.WorkerInfo.to_dict, and quarantined)."""
    gpu = {name: from_hint(hint) for name, hint in typing.get_type_hints(models.Gpu).items()}
    usage = {
        "memory_used_mb": {"type": ["integer", "null"]},
        "utilization": {"type": ["integer", "null"]},
        "power_w": {"type": ["number", "null"]},
        "temperature_c": {"type": ["number", "null"]},
    }
    required = ("uuid", "name", "memory_mb")  # a worker may leave the others out
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return closed(
        {
            "name": {"type": "string", "pattern": keys.NAME.pattern},
            "version": {"type": "string"},
            "connected": {"type": "boolean"},
            "gpus": {"type": "array", "items": closed({**gpu, **usage}, required)},
            "labels": strings,
            "mounts": {"type": "array", "items": {"type": "string"}},
            "max_jobs": {"type": "integer"},
            "running_jobs": {"type": "array", "items": {"type": "integer"}},
            "last_heartbeat": from_hint(datetime.datetime),
            "quarantined": {
                "type": ["string", "null"],
                "description": "why it gets no jobs now, or null",
            },
        }
    )


# Printable (str.isprintable, which no pattern says exactly: control characters at least), no /.
TOKEN_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": tokens.MAX_NAME,
    "pattern": "^[^/\\u0000-\\u001f\\u007f-\\u009f]*$",
}
ROLE = {"type": "string", "enum": list(tokens.ROLES)}


CAP = {"type": ["integer", "null"], "minimum": 0, "maximum": 10**9}
CAPS_TEXT = {
    "max_gpus": "the most GPUs its running jobs may hold at once (null: no cap); the"
    " scheduler starts none of its jobs past it",
    "max_running": "the most jobs of it that may run at once (null: no cap)",
    "max_queued": "the most jobs of it that may wait queued at once (null: no cap); a submit"
    " past it is refused with 429 over_cap and Retry-After",
}


def caps() -> dict[str, Schema]:
    """A token's caps (models.Caps), each as the API shows and takes it."""
    return {name: {**CAP, "description": text} for name, text in CAPS_TEXT.items()}


def token() -> Schema:
    return closed(
        {
            "name": {"type": "string"},
            "role": ROLE,
            "allow_process": {"type": "boolean"},
            **caps(),
            "created_at": from_hint(datetime.datetime),
        }
    )


def token_change() -> Schema:
    """PATCH /tokens/{name}'s body: the caps to change."""
    return {**closed(caps(), required=()), "minProperties": 1}


def token_request() -> Schema:
    """POST /tokens's body (tokens.create checks it)."""
    return closed(
        {
            "name": {**TOKEN_NAME, "description": "printable characters, no /"},
            "role": {**ROLE, "default": "submit"},
            "allow_process": {
                "type": "boolean",
                "default": False,
                "description": "whether its jobs may run on process-runtime workers",
            },
            **caps(),
        },
        required=("name",),
    )


def token_made() -> Schema:
    return closed(
        {
            "name": {"type": "string"},
            "role": ROLE,
            "allow_process": {"type": "boolean"},
            **caps(),
            "token": {"type": "string", "description": "the token itself: shown only here"},
        }
    )


def metadata_filter() -> Schema:
    """The metadata.KEY=VALUE query parameters of GET /jobs, as one object."""
    name = f"^{re.escape(jobfilter.METADATA)}{jobfilter.KEY.pattern}$"
    return {
        "type": "object",
        "propertyNames": {"pattern": name},
        "additionalProperties": {"type": "string", "pattern": NO_NUL},
    }


def coordinators() -> Schema:
    """GET /api/v1/coordinators (api/health.py)."""
    time = {"type": "string", "format": "date-time"}
    leader = closed(
        {
            "id": {"type": "string", "description": "the leading coordinator's id"},
            "epoch": {"type": "integer", "description": "grows by one with each new leader"},
            "since": time,
        }
    )
    coordinator = closed(
        {
            "id": {"type": "string"},
            "host": {"type": "string"},
            "pid": {"type": "integer"},
            "http": {"type": "string", "description": "where it serves HTTP"},
            "link": {"type": "string", "description": "where workers reach it"},
            "started_at": time,
            "seen_at": time,
            "takeovers": {"type": "integer", "description": "times it took the lead"},
            "leader": {"type": "boolean"},
        }
    )
    return closed(
        {
            "store": {
                "enum": ["sqlite", "postgresql"],
                "description": "a SQLite store has one coordinator, and lists none here",
            },
            "leader": {"oneOf": [leader, {"type": "null"}]},
            "coordinators": {"type": "array", "items": coordinator},
        }
    )
