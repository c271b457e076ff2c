"""The routes of the API as its OpenAPI document (openapi.py) describes them: each one's
parameters, body, answers and headers, with the bounds the routes check (jobs.py, logs.py,
telemetry.py, admin.py, health.py)."""

from __future__ import annotations

from typing import Any

from gpubox import jobfilter, keys, models
from gpubox.coordinator.api import jobs, logs, params
from gpubox.coordinator.api import openapi_schemas as schemas
from gpubox.coordinator.api.openapi_schemas import Schema, ref

PATH = "/api/v1/openapi.json"  # the document's own route (openapi.add_routes)

# What each status means, where a route says no more.
MEANING = {
    400: "bad input: `field` names what is wrong (an unknown query parameter too)",
    401: "no token, or not a valid one",
    403: "the token's role does not allow this",
    404: "no such job or resource",
    405: "the route does not take this method (on every path, for the methods not listed)",
    409: "the state does not allow this",
    413: "the body is over the coordinator's limit (far over it: plain text, from the server)",
    422: "this Idempotency-Key was used for a request with another body",
    429: "a cap of the token refuses it (`field` names the cap: max_queued): try again after"
    " Retry-After seconds",
    503: "the store cannot be reached right now: try again",
}
JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": params.MAX_ID},
}
STRING = {"type": "string"}
INTEGER = {"type": "integer", "minimum": 1}
EMPTY = {"allowEmptyValue": True}  # for a parameter that, empty, counts as left out


def error(status: int, meaning: str = "") -> dict[str, Any]:
    """An error answer: the Error body, with the codes that go with `status`; with no
    `meaning` of its own, the shared one (components.responses)."""
    if not meaning:
        return {"$ref": f"#/components/responses/Error{status}"}
    codes = {
        "properties": {"error": {"properties": {"code": {"enum": schemas.error_codes(status)}}}}
    }
    content: dict[str, Any] = {"application/json": {"schema": {"allOf": [ref("Error"), codes]}}}
    if status == 413:
        content["text/plain"] = {"schema": STRING}
    answer: dict[str, Any] = {"description": meaning, "content": content}
    if status == 401:
        answer["headers"] = {"WWW-Authenticate": {"schema": {"const": 'Bearer realm="gpubox"'}}}
    if status == 429:
        retry = {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}
        answer["headers"] = {"Retry-After": retry}
    return answer


def json_answer(description: str, schema: Schema, **headers: Schema) -> dict[str, Any]:
    """A JSON answer; `headers`: the schema of each header it always has (_ for -)."""
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:  # each one is always sent
        answer["headers"] = {
            name.replace("_", "-"): {"schema": header, "required": True}
            for name, header in headers.items()
        }
    return answer


def query(name: str, schema: Schema, description: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description, **more}


def operation(
    name: str,
    summary: str,
    answers: dict[int, dict[str, Any]],
    errors: tuple[int, ...],
    parameters: tuple[dict[str, Any], ...] = (),
    body: Schema | None = None,
    auth: bool = True,
) -> dict[str, Any]:
    """One operation; `name`, its operationId, is the name of the function that serves it.
    Every one may answer 400 (an unknown query parameter); those that need a token 401, and
    503 (the store checks the token)."""
    shared = (400, 401, 503) if auth else (400,)
    responses = {str(status): answer for status, answer in answers.items()}
    for status in sorted({*shared, *errors}):
        responses.setdefault(str(status), error(status))
    made: dict[str, Any] = {"operationId": name, "summary": summary, "responses": responses}
    if not auth:
        made["security"] = []
    if parameters:
        made["parameters"] = list(parameters)
    if body is not None:
        made["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return made


def jobs_paths() -> dict[str, Any]:
    """POST and GET /api/v1/jobs, GET /api/v1/jobs/<id> and its /cancel (api/jobs.py)."""
    located = {"type": "string", "pattern": "^/api/v1/jobs/[0-9]+$"}
    default, most = jobs.LIST_LIMIT
    statuses = [status.value for status in models.Status]
    text_filter = {
        "type": "string",
        "maxLength": jobfilter.MAX_TEXT,
        "pattern": schemas.NO_NUL,
    }
    when = {
        "anyOf": [
            {"type": "string", "format": "date-time"},
            {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
        ]
    }
    idempotency = {
        "name": "Idempotency-Key",
        "in": "header",
        "schema": {"type": "string", "pattern": f"^[ -~]{{1,{jobs.MAX_IDEMPOTENCY_KEY}}}$"},
        "description": "makes a retried submit safe: the same key and body (as JSON, whatever "
        "its spacing or key order) from the same token give the same job (200), never a second",
    }
    created = json_answer("the job, made", ref("Job"), Location=located)
    replayed = json_answer(
        "the job made by an earlier request with this Idempotency-Key and body",
        ref("Job"),
        Location=located,
        Idempotent_Replayed={"const": "true"},
    )
    listed = [
        query("limit", {**INTEGER, "maximum": most, "default": default}, "jobs per page", **EMPTY),
        query(
            "before", {**INTEGER, "maximum": params.MAX_ID}, "only jobs of a smaller id", **EMPTY
        ),
        query(
            "status",
            {"type": "array", "items": {"enum": statuses}},
            "any of these statuses (repeated, or separated by commas; any case)",
            style="form",
            explode=True,
            **EMPTY,
        ),
        query("name", text_filter, "names that start with this (case matters)", **EMPTY),
        query("submitter", text_filter, "the name of the token that submitted it", **EMPTY),
        query(
            "label",
            {"type": "array", "items": {"type": "string", "pattern": "^[^=\\u0000]+=[^\\u0000]*$"}},
            "KEY=VALUE among the job's labels (repeat it for each)",
            style="form",
            explode=True,
        ),
        query("created_after", when, "RFC 3339 with a time zone, or Unix seconds"),
        query("created_before", when, "RFC 3339 with a time zone, or Unix seconds"),
        query(
            "metadata",
            schemas.metadata_filter(),
            f"{jobfilter.METADATA}KEY=VALUE: a top-level metadata KEY whose value, as text,"
            " is VALUE (repeat it for each KEY)",
            style="form",
            explode=True,
        ),
    ]
    wait = query(
        "wait",
        {"type": "number", "minimum": 0, "maximum": jobs.MAX_WAIT_S, "default": 0},
        "a long poll: answer once the job has ended, or after this many seconds",
        **EMPTY,
    )
    polled = json_answer(
        "the job (after a long poll with no place free for it (--http-streams), as it is now,"
        " with Retry-After: the seconds after which to ask again)",
        ref("Job"),
    )
    polled["headers"] = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return {
        "/api/v1/jobs": {
            "post": operation(
                "create_job",
                "Submit a job",
                {201: created, 200: replayed},
                (403, 413, 422, 429),
                (idempotency,),
                body=ref("JobSpec"),
            ),
            "get": operation(
                "list_jobs",
                "List jobs, newest first",
                {
                    200: json_answer(
                        "a page of jobs; next: pass as before for the next", ref("JobList")
                    )
                },
                (),
                tuple(listed),
            ),
        },
        "/api/v1/jobs/{job_id}": {
            "get": operation("get_job", "One job", {200: polled}, (404,), (JOB_ID, wait)),
        },
        "/api/v1/jobs/{job_id}/cancel": {
            "post": operation(
                "cancel_job",
                "Cancel a job: QUEUED → CANCELLED now; RUNNING: its worker stops it",
                {200: json_answer("the job", ref("Job"))},
                (403, 404, 409),
                (JOB_ID,),
            ),
        },
    }


def logs_paths() -> dict[str, Any]:
    """GET /api/v1/jobs/<id>/logs (api/logs.py) and /telemetry (api/telemetry.py)."""
    lines = {
        "text/plain": {"schema": {"type": "string", "description": "the lines, one a line"}},
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one JSON record a line"},
            # OpenAPI 3.2's itemSchema, which 3.1 lacks: what each non-empty line holds.
            "x-itemSchema": {"oneOf": [ref("LogLine"), ref("LogEnd")]},
        },
    }
    page = f"one page: at most this many lines (and about {logs.PAGE_BYTES // 2**20} MiB)"
    parameters = (
        JOB_ID,
        query(
            "since",
            {**INTEGER, "minimum": 0, "maximum": params.MAX_ID},
            "lines after this seq",
            **EMPTY,
        ),
        query(
            "limit", {**INTEGER, "maximum": logs.PAGE_LINES}, f"{page}; not with follow", **EMPTY
        ),
        query(
            "follow",
            {"type": "boolean"},
            "stream until the job ends (1, true, yes; 0, no)",
            **EMPTY,
        ),
        query("format", {"enum": ["text", "ndjson"], "default": "text"}, "lines, or NDJSON"),
    )
    busy = error(503, "the store cannot be reached, or the follow streams are at their cap")
    since = query(
        "since",
        {"type": "number", "minimum": 0},
        "Unix seconds: only the points that end after this (the last answer's next)",
        **EMPTY,
    )
    return {
        "/api/v1/jobs/{job_id}/logs": {
            "get": operation(
                "job_logs",
                "A job's log: stored lines, one page of them, or a stream that follows the job",
                {200: {"description": "the lines", "content": lines}, 503: busy},
                (404,),
                parameters,
            ),
        },
        "/api/v1/jobs/{job_id}/webhooks": {
            "get": operation(
                "job_webhooks",
                "A job's webhooks, and each delivery with what its attempts gave",
                {200: json_answer("its deliveries", ref("WebhookDeliveries"))},
                (404,),
                (JOB_ID,),
            ),
        },
        "/api/v1/jobs/{job_id}/telemetry": {
            "get": operation(
                "job_telemetry",
                "A job's GPU telemetry points",
                {200: json_answer("its points", ref("Telemetry"))},
                (404,),
                (JOB_ID, since),
            ),
        },
    }


def admin_paths() -> dict[str, Any]:
    """/api/v1/workers and /api/v1/tokens (api/admin.py)."""
    named = {"name": "name", "in": "path", "required": True}
    worker = {**named, "schema": {"type": "string", "pattern": keys.NAME.pattern}}
    token = {**named, "schema": schemas.TOKEN_NAME}
    revoked = json_answer("revoked", ref("Revoked"))
    return {
        "/api/v1/workers": {
            "get": operation(
                "list_workers",
                "Connected and recently lost workers",
                {200: json_answer("the workers", ref("WorkerList"))},
                (),
            ),
        },
        "/api/v1/workers/{name}/revoke": {
            "post": operation(
                "revoke_worker",
                "Take a worker's key off the allow list (admin)",
                {200: revoked, 404: error(404, "the worker is not on the allow list")},
                (403,),
                (worker,),
            ),
        },
        "/api/v1/tokens": {
            "get": operation(
                "list_tokens",
                "The API tokens (admin)",
                {200: json_answer("the tokens", ref("TokenList"))},
                (403,),
            ),
            "post": operation(
                "create_token",
                "Make an API token (admin): the answer holds it, once",
                {201: json_answer("the token", ref("TokenMade"))},
                (403, 409, 413),
                body=ref("TokenRequest"),
            ),
        },
        "/api/v1/tokens/{name}": {
            "patch": operation(
                "change_token",
                "Change a token's caps (admin); they apply at once",
                {
                    200: json_answer("the token as it is now", ref("Token")),
                    404: error(404, "no token has this name"),
                },
                (403, 413),
                (token,),
                body=ref("TokenChange"),
            ),
            "delete": operation(
                "revoke_token",
                "Revoke an API token (admin)",
                {200: revoked, 404: error(404, "no token has this name")},
                (403,),
                (token,),
            ),
        },
    }


def health_paths() -> dict[str, Any]:
    """/healthz, /metrics (api/health.py) and this document."""
    metrics = {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": STRING}},
    }
    return {
        "/healthz": {
            "get": operation(
                "healthz",
                "Liveness: up means the broker turns its loop too",
                {
                    200: json_answer("up", ref("Health")),
                    503: json_answer("the broker thread is dead or stuck", ref("Unhealthy")),
                },
                (),
                auth=False,
            ),
        },
        "/metrics": {
            "get": operation("metrics", "Prometheus metrics", {200: metrics}, (404,)),
        },
        "/api/v1/coordinators": {
            "get": operation(
                "list_coordinators",
                "The coordinators sharing this store, and which one leads",
                {200: json_answer("the coordinators", ref("Coordinators"))},
                (),
            ),
        },
        PATH: {
            "get": operation(
                "openapi_document",
                "This document",
                {200: json_answer("an OpenAPI 3.1 document", {"type": "object"})},
                (),
                auth=False,
            ),
        },
    }
