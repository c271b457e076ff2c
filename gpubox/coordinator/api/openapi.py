"""The API's reference as an OpenAPI 3.1 document, served at GET /api/v1/openapi.json (no
token needed). Its routes are in openapi_paths.py (the usage report's in openapi_usage.py), its
schemas come from the code (openapi_schemas.py, openapi_submit.py, openapi_usage.py), its words
from openapi_text.py. tests/test_openapi.py checks it against the app's routes and against
every answer the API tests receive."""

from __future__ import annotations

import functools
from typing import Any

import bottle

from gpubox import __version__
from gpubox.coordinator.api import context, endpoints, openapi_paths, openapi_submit, openapi_usage
from gpubox.coordinator.api import openapi_schemas as schemas
from gpubox.coordinator.api.openapi_paths import MEANING, PATH, STRING, error
from gpubox.coordinator.api.openapi_schemas import ref
from gpubox.coordinator.api.openapi_text import INTRODUCTION

__all__ = ["PATH", "add_routes", "document"]


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add GET /api/v1/openapi.json to `app`."""

    @app.get(PATH)
    @endpoints.endpoint(ctx.store, auth=False)
    def openapi_document() -> dict[str, Any]:
        return document()


def components() -> dict[str, Any]:
    """What the routes share: the bearer scheme, the error answers, the bodies' schemas."""
    listed = {"type": "array"}
    health = {
        "status": {"const": "ok"},
        "version": STRING,
        "broker_last_turn_s": {"type": "number"},
    }
    unhealthy = {"status": {"const": "unavailable"}, "reason": STRING, "version": STRING}
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            f"Error{status}": error(status, meaning) for status, meaning in MEANING.items()
        },
        "schemas": {
            "Job": schemas.job(),
            "JobSpec": openapi_submit.job_spec(),
            "JobList": schemas.closed(
                {"jobs": {**listed, "items": ref("Job")}, "next": {"type": ["integer", "null"]}}
            ),
            "LogLine": schemas.log_line(),
            "LogEnd": schemas.log_end(),
            "WebhookDeliveries": schemas.webhook_deliveries(),
            "Telemetry": schemas.telemetry_page(),
            "TelemetrySummary": schemas.telemetry_summary(),
            "Usage": openapi_usage.schema(),
            "Worker": schemas.worker(),
            "WorkerList": schemas.closed({"workers": {**listed, "items": ref("Worker")}}),
            "Token": schemas.token(),
            "TokenList": schemas.closed({"tokens": {**listed, "items": ref("Token")}}),
            "TokenRequest": schemas.token_request(),
            "TokenMade": schemas.token_made(),
            "TokenChange": schemas.token_change(),
            "Revoked": schemas.closed({"name": STRING, "revoked": {"const": True}}),
            "Health": schemas.closed(health, required=("status", "version")),
            "Coordinators": schemas.coordinators(),
            "Unhealthy": schemas.closed(unhealthy),
            "Error": schemas.error(),
            "ErrorCode": {
                "type": "string",
                "enum": schemas.error_codes(),
                "description": "what went wrong, for a program to act on (a 500's is internal)",
            },
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API (the same for every app: built once, not to be
    changed)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpubox", "version": __version__, "description": INTRODUCTION},
        "security": [{"bearer": []}],
        "paths": {
            **openapi_paths.health_paths(),
            **openapi_paths.jobs_paths(),
            **openapi_paths.logs_paths(),
            **openapi_paths.admin_paths(),
            **openapi_usage.paths(),
        },
        "components": components(),
    }
