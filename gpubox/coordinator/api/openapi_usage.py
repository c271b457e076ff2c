"""The usage report's route and answer in the API's OpenAPI document (openapi.py): GET
/api/v1/usage (api/usage.py), its figures as gpubox.usage makes them."""

from __future__ import annotations

from typing import Any

from gpubox import usage
from gpubox.coordinator.api.openapi_paths import EMPTY, json_answer, operation, query
from gpubox.coordinator.api.openapi_schemas import Schema, closed, ref

WHEN = {
    "type": "string",
    "examples": ["7d", "12h", "30m", "2w", "2026-12-01T00:00:00Z", "2026-12-01"],
}
NUMBER_OR_NULL = {"type": ["number", "null"]}


def paths() -> dict[str, Any]:
    """GET /api/v1/usage."""
    parameters = (
        query(
            "since",
            WHEN,
            "where the window starts: a relative age meaning that long before now (30m, 12h,"
            " 7d, 2w), an RFC 3339 time with a time zone, or a date (its midnight UTC)",
            **EMPTY,
        ),
        query(
            "until",
            WHEN,
            "where the window ends, not included: the same forms; default now",
            **EMPTY,
        ),
        query(
            "by",
            {"enum": list(usage.BY), "default": usage.BY[0]},
            "how the jobs are grouped: the token that submitted them, each of their labels"
            " (a job counts under each of its KEY=VALUE pairs), or the worker of their last"
            " attempt",
            **EMPTY,
        ),
    )
    return {
        "/api/v1/usage": {
            "get": operation(
                "usage_report",
                "GPU-hours, jobs, GPU utilization and queue waits of the jobs that ended in a"
                " window, per submitter, label or worker (any token)",
                {200: json_answer("the report", ref("Usage"))},
                (),
                parameters,
            ),
        },
    }


def figures() -> dict[str, Schema]:
    """The figures of a group, and of the total (gpubox.usage says how each is made)."""
    count = {"type": "integer", "minimum": 0}
    jobs = closed({status: count for status in (*usage.STATUSES, "total")})
    jobs["description"] = "the jobs that ended, by how they ended (FINISHED: exit code 0)"
    return {
        "gpu_hours": {
            "type": "number",
            "description": "Σ gpus × result.duration / 3600 (a job that never started adds 0)",
        },
        "jobs": jobs,
        "util_mean": {
            **NUMBER_OR_NULL,
            "description": "the mean GPU utilization (%): each job's result.telemetry.util_mean"
            " weighted by its telemetry gpu_seconds; null when no job has telemetry",
        },
        "wait_p50_s": {
            **NUMBER_OR_NULL,
            "description": "the median seconds from submit to the start of the last attempt,"
            " over the jobs that started; null when none did",
        },
        "wait_p95_s": {
            **NUMBER_OR_NULL,
            "description": "the 95th percentile of the same (linear between the two nearest ranks)",
        },
    }


def schema() -> Schema:
    """GET /api/v1/usage's answer (usage.report)."""
    key = {
        "type": "string",
        "description": f"the submitter's token name, a label as KEY=VALUE, or the worker;"
        f" {usage.NOT_RECORDED}, {usage.NO_LABELS} or {usage.NEVER_RAN} where a job has none",
    }
    group = closed({"key": key, **figures()})
    total = closed(figures())
    total["description"] = "over every job once (by label, not the sum of the groups)"
    time = {"type": "string", "format": "date-time"}
    return {
        **closed(
            {
                "since": time,
                "until": time,
                "by": {"enum": list(usage.BY)},
                "groups": {
                    "type": "array",
                    "items": group,
                    "description": "by gpu_hours, most first, then by key",
                },
                "total": total,
            }
        ),
        "description": "The usage report over the jobs that ended (finished_at) in [since, until).",
    }
