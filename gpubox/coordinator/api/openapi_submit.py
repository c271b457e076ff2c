"""The JSON Schema of a job as a client submits it (POST /jobs's body), for the API's OpenAPI
document: what validate.parse_spec takes, written out from validate's key sets and bounds
(its checks are code, not a table). Pure: no I/O."""

from __future__ import annotations

from gpubox import models, validate
from gpubox.coordinator.api.openapi_schemas import NO_NUL, Schema, closed, nullable
from gpubox.coordinator.api.openapi_text import SPEC_DOCS

NOT_BLANK = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"  # the same, and not only white space
# A size as validate.SIZE reads it: bytes, or a number and a unit of 1024 ("8g", "16GiB").
SIZE = "^\\s*[0-9]+(\\.[0-9]+)?\\s*[kmgtKMGT]?([iI]?[bB])?\\s*$"


def text(limit: int | None = None, required: bool = False) -> Schema:
    """A string without NUL, of at most `limit` characters; `required`: not blank either."""
    schema: Schema = {"type": "string", "pattern": NOT_BLANK if required else NO_NUL}
    if required:
        schema["minLength"] = 1
    if limit is not None:
        schema["maxLength"] = limit
    return schema


def string_map(names: Schema | None = None, values: Schema | None = None) -> Schema:
    """An object of strings (validate._str_map), or null for none."""
    keys_schema = {"minLength": 1, "maxLength": validate.MAX_KEY, "pattern": NO_NUL}
    return {
        "type": ["object", "null"],
        "propertyNames": {**keys_schema, **(names or {})},
        "additionalProperties": values or text(),
    }


def _number(low: float, high: float, low_included: bool) -> Schema:
    bound = "minimum" if low_included else "exclusiveMinimum"
    return {"type": ["number", "null"], bound: low, "maximum": high}


def _size(low: int, high: int) -> Schema:
    return {
        "anyOf": [
            {"type": "integer", "minimum": low, "maximum": high},
            {"type": "string", "pattern": SIZE},
            {"type": "null"},
        ]
    }


def _spec_docs(properties: dict[str, Schema], prefix: str = "") -> dict[str, Schema]:
    return {
        name: {**schema, "description": SPEC_DOCS[f"{prefix}{name}"]}
        if f"{prefix}{name}" in SPEC_DOCS
        else schema
        for name, schema in properties.items()
    }


def job_spec() -> Schema:
    """POST /jobs's body: what validate.parse_spec takes (validate.JOB_KEYS, DOCKER_KEYS,
    AUTH_KEYS), with its bounds."""
    env_names = {
        "pattern": validate.ENV_NAME.pattern,
        "not": {
            "anyOf": [
                {"enum": sorted(validate.RESERVED_ENV)},
                *({"pattern": f"^{prefix}"} for prefix in validate.RESERVED_ENV_PREFIXES),
            ]
        },
    }
    auth = closed({name: text() for name in sorted(validate.AUTH_KEYS)}, ["username", "password"])
    auth["type"] = ["object", "null"]
    docker: dict[str, Schema] = {
        "image": text(validate.MAX_IMAGE, required=True),
        "command": {
            "anyOf": [
                {"type": "array", "items": text()},
                text(),
                {"type": "null"},
            ]
        },
        "env": string_map(env_names),
        "secrets": string_map(env_names, {**text(), "minLength": models.MIN_SECRET}),
        "auth": auth,
        "shm_size": _size(*validate.SHM_SIZE),
        "memory": _size(*validate.MEMORY),
        "workdir": nullable({**text(validate.MAX_PATH, required=True), "pattern": "^/"}),
        "user": {"type": ["string", "null"], "pattern": validate.USER.pattern},
        "mounts": {
            "type": ["array", "null"],
            "items": {"type": "string", "pattern": validate.MOUNT_NAME.pattern},
            "uniqueItems": True,
        },
    }
    top: dict[str, Schema] = {
        "name": text(validate.MAX_NAME, required=True),
        "description": text(validate.MAX_DESCRIPTION),
        "priority": {"type": "integer", "minimum": -validate.MAX_INT, "maximum": validate.MAX_INT},
        "docker": closed(_spec_docs(docker, "docker."), ["image"]),
        "gpus": {"type": "integer", "minimum": 0, "maximum": validate.MAX_GPUS},
        "gpu_model": nullable(text(validate.MAX_NAME, required=True)),
        "gpu_memory_gb": _number(0, validate.MAX_GPU_MEMORY_GB, low_included=False),
        "labels": string_map(),
        "timeout": _number(0, validate.MAX_SECONDS, low_included=False),
        "idle_timeout": _number(0, validate.MAX_SECONDS, low_included=True),
        "queue_timeout": _number(0, validate.MAX_SECONDS, low_included=False),
        "max_retries": {"type": "integer", "minimum": 0, "maximum": validate.MAX_RETRIES},
        "webhooks": {
            "type": ["array", "null"],
            "maxItems": validate.MAX_WEBHOOKS,
            "items": closed(
                {
                    "url": {
                        "type": "string",
                        "maxLength": 2000,
                        "pattern": "^https?://[^\\s/?#@]+(/\\S*)?$",
                    },
                    "secret": {**text(200, required=True), "minLength": 16},
                    "events": {
                        "type": "array",
                        "items": {"enum": list(validate.WEBHOOK_EVENTS)},
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                },
                ["url", "secret"],
            ),
        },
        "metadata": {"type": ["object", "null"]},
    }
    # gpu_model and gpu_memory_gb, when not null, need gpus of 1 or more.
    needs_gpus = [
        {
            "if": {"properties": {name: {"not": {"type": "null"}}}, "required": [name]},
            "then": {"properties": {"gpus": {"minimum": 1}}, "required": ["gpus"]},
        }
        for name in ("gpu_model", "gpu_memory_gb")
    ]
    spec = closed(_spec_docs(top), ["name", "docker"])
    return {**spec, "allOf": needs_gpus, "description": SPEC_DOCS[""]}
