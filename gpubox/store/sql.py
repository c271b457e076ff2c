"""The store contract in portable SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies connections and transactions (`_write`, `_read`), its DDL for what is not
a job's column (the jobs table comes from models.JOB_FIELDS: columns.migrations), and the few
statements that differ (backend.Backend lists them). The SQL is the same text on both (no
RETURNING, `?` placeholders, rewritten by a backend that needs another style), one module per
part: jobs, sharing, logs, telemetry, usage, webhooks, workers, tokens, schema.
"""

from __future__ import annotations

from gpubox.store import (
    jobs,
    logs,
    schema,
    sharing,
    telemetry,
    tokens,
    usage,
    webhooks,
    workers,
)


class SqlStore(
    jobs.JobStore,
    sharing.SharingStore,
    logs.LogStore,
    telemetry.TelemetryStore,
    usage.UsageStore,
    webhooks.WebhookStore,
    workers.WorkerStore,
    tokens.TokenStore,
    schema.SchemaStore,
):
    """Every store operation written once in SQL; backends provide connections."""
