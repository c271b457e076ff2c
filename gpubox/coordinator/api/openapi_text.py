"""The words of the API's OpenAPI document (openapi.py): what the document says about the API
as a whole, and what each field of a job means, as the API shows it (JOB_DOCS, by its `api`
key in models.JOB_FIELDS) and as a client submits it (SPEC_DOCS, by its key in the body).
tests/test_openapi.py checks that every field has its words here."""

from __future__ import annotations

from gpubox.coordinator import streams

INTRODUCTION = f"""\
gpubox's HTTP API: submit Docker jobs, follow their logs, cancel them, see the workers.

JSON in and out. Every route but `/healthz` and `/api/v1/openapi.json` needs
`Authorization: Bearer <token>` (a dashboard session's cookie also reads). A token has a role:
`view` reads only, `submit` also submits and cancels its own jobs, `admin` does anything.

Every error is `{{"error": {{"code", "message", "field"?}}}}`, with `code` from the ErrorCode
list: 400 bad input (`field` names what is wrong: a field of the body, a query parameter, a
header; an unknown field or query parameter is refused, so a typo never passes silently), 401
no or unknown token, 403 a role that may not do this, 404 no such job or route, 405 a method the
route does not take (on every path, for the methods not listed here), 409 a state that does not
allow it, 413 a body over the coordinator's limit (1 MiB by default; a body far over it is
refused by the HTTP server itself, as plain text), 422 an Idempotency-Key used for another
request, 503 the store cannot be reached or the follow streams are at their cap: try again.
Headers over 16 KiB get 431 from the HTTP server, as plain text. No request a client sends
makes a 500: one is a fault of gpubox (`internal`), said in the coordinator's log.

A job's log comes as plain text lines, or as NDJSON records `{{seq, ts, stream, line}}`;
`follow=1` streams it until the job ends. A follow stream ends cleanly only at the job's end
(in NDJSON, after a last record `{{"end": true, "id", "status", "exit_code", "error"}}`); cut
for any other reason (the coordinator stopping, the token revoked), it is aborted: resume with
`since=` the last `seq` received. An NDJSON stream starts with, and after
{streams.KEEPALIVE_S:g} s of silence sends, an empty line."""

# The Job's fields as the API shows them, by their `api` key (a group's by its name).
JOB_DOCS = {
    "id": "assigned by the coordinator, increasing",
    "name": "the job's name, as submitted",
    "description": "as submitted",
    "priority": "higher runs first; equal priority runs in submission order",
    "docker": "what the job runs: its image, command, environment and container options",
    "docker.image": "the image the job runs",
    "docker.command": "exec form (a string submitted is split as a shell would); null: the "
    "image's own command",
    "docker.env": "environment variables (docker.secrets, write-only, are never shown)",
    "docker.shm_size": "bytes of /dev/shm; null: Docker's default (64 MiB)",
    "docker.workdir": "the working folder in the container; null: the image's",
    "docker.user": "user[:group] the container runs as; null: the image's",
    "docker.memory": "the container's memory limit in bytes; null: none",
    "docker.mounts": "folders that a worker declares, by name, mounted into the container",
    "gpus": "how many GPUs the job needs",
    "gpu_model": "a part of the GPU's name (any case) that its GPUs must have, or null",
    "gpu_memory_gb": "the least memory in GB (10^9 bytes) its GPUs must have, or null",
    "labels": "a job runs only on a worker whose labels include all of these",
    "timeout": "seconds it may run before its worker stops it (ERROR, error timeout), or null",
    "idle_timeout": "seconds its GPUs may all stay idle before it is stopped; 0: never; null: "
    "the coordinator's setting",
    "queue_timeout": "seconds it may stay QUEUED before it ends ERROR; null: never (the "
    "coordinator fills in its own setting for a job that names none)",
    "max_retries": "how often the job is queued again when its worker is lost",
    "webhooks": "the URLs told of its start or end (their secrets, write-only, are never "
    "shown); GET /api/v1/jobs/{job_id}/webhooks lists each delivery",
    "metadata": "any JSON object, stored and returned untouched",
    "submitter": "the name of the token that submitted it (null: stored before gpubox kept it)",
    "allow_process": "whether its token lets it run on process-runtime workers",
    "status": "QUEUED → RUNNING → FINISHED (exit code 0) | ERROR | CANCELLED; QUEUED → "
    "CANCELLED; RUNNING → QUEUED when its worker is lost and retries are left",
    "queue_reason": "why a QUEUED job waits, in words; null otherwise",
    "queue_place": "where a QUEUED job stands in the fair order (in GET /api/v1/jobs/{job_id}"
    " and the answer to a submit, which may count the queue as it was up to 0.1 s before;"
    " null elsewhere): place (1: next), the jobs ahead of it by"
    " submitter with each one's use of the GPUs lately (GPU-hours, decayed with half_life_s;"
    " 0 when fair share is off), and its own submitter's use",
    "cancel_requested": "whether a cancel was asked while it ran (its worker stops it)",
    "result": "how its last attempt went",
    "result.executed_at": "when the last attempt started, or null",
    "result.finished_at": "when it ended, or null",
    "result.gpus": "the uuids of the GPUs it ran on",
    "result.duration": "seconds from executed_at to finished_at, or null",
    "result.exit_code": "the container's exit code, or null",
    "result.error": "why it ended ERROR (a pull failure names the image; timeout; idle: …; "
    "worker lost; queue timeout: …), or null",
    "result.image_id": "the ID (sha256:…) of the image its container was made from, or null",
    "result.image_digest": "the image's repo digest (name@sha256:…), where the engine has one",
    "result.telemetry": "what its GPUs did, summed up when it ended; null: no GPUs, or not ended",
    "worker": "the worker that ran its last attempt, or null",
    "attempts": "how many attempts started",
    "log_lines": "the sequence number of its last stored log line (0: none)",
    "created_at": "RFC 3339, UTC",
    "updated_at": "RFC 3339, UTC",
}

# The fields of a job as submitted (POST /jobs), by their key in the body ("": the body).
SPEC_DOCS = {
    "": "A job to submit. Only name and docker.image are required. No text may hold NUL or "
    "a lone surrogate (\\ud800), but metadata's; integers are written without a fraction.",
    "name": "the job's name",
    "description": "free text",
    "priority": "higher runs first",
    "docker": "what the job runs",
    "gpus": "how many GPUs it needs",
    "gpu_model": "a part of the GPU's name, any case (needs gpus ≥ 1)",
    "gpu_memory_gb": "the least GPU memory in GB (needs gpus ≥ 1)",
    "labels": "the worker labels it needs",
    "timeout": "seconds it may run, up to a year; null: no limit",
    "idle_timeout": "seconds its GPUs may all stay idle; 0: never; null: the coordinator's",
    "queue_timeout": "seconds it may stay QUEUED; null: the coordinator's (or never)",
    "max_retries": "how often it is queued again when its worker is lost",
    "webhooks": "URLs to tell of its start or end: each under the coordinator's webhook_allow"
    " prefixes, each delivery signed with its secret (X-Gpubox-Signature-256)",
    "metadata": "any JSON object, returned untouched",
    "docker.image": "the image to run",
    "docker.command": "a list of strings (exec form) or a string, split as a shell would",
    "docker.env": "environment variables; NVIDIA_*, GPUBOX_* and CUDA_VISIBLE_DEVICES are "
    "gpubox's to set",
    "docker.secrets": "environment variables whose values are secret: write-only, masked in "
    "the stored output; none may also be in env",
    "docker.auth": "credentials to pull a private image: write-only, erased when the job ends",
    "docker.shm_size": 'bytes of /dev/shm, or a size like "16g" (units of 1024)',
    "docker.memory": 'the memory limit in bytes, or a size like "64g" (units of 1024)',
    "docker.workdir": "an absolute path in the container",
    "docker.user": "a user name or id, optionally :group (like 1000:1000)",
    "docker.mounts": "names of folders that a worker declares (400 for a name none declares)",
}
