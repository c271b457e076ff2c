"""A job's fields are declared once (models.JOB_FIELDS): every field there reaches both stores'
schema, survives an insert and a read, shows in the API where it says, and reaches the worker
when it has a wire key. A field added to that table reaches the store (a new schema version
that upgrades an older store) and the API with no other change, and the wire once
protocol.WireJob declares it too."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import gpubox
from gpubox import errors, fields, models, protocol
from gpubox.store import columns, open_store, sql, sqlite

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

# A job whose every field differs from its default, and each text from every other: a value
# written into another column, or not read back, shows.
SPEC = models.JobSpec(
    name="the-name",
    image="the-image",
    command=["the", "command"],
    env={"THE_ENV": "1"},
    description="the-description",
    priority=7,
    gpus=2,
    labels={"the": "label"},
    timeout=30.5,
    idle_timeout=600.0,
    queue_timeout=900.0,
    webhooks=[{"url": "https://the.example/hook", "events": ["end"]}],
    webhooks_sealed="the-sealed-webhook-secrets",
    max_retries=3,
    metadata={"the": ["metadata"]},
    sealed="the-sealed",
    gpu_model="the-model",
    gpu_memory_gb=12.5,
    container=models.ContainerOptions(
        shm_size=2**20, workdir="/w", user="1000", memory=2**30, mounts=["data"]
    ),
    submitter="the-submitter",
    allow_process=True,
)
JOB = models.Job(
    id=42,
    spec=SPEC,
    status=models.Status.RUNNING,
    created_at=T0,
    updated_at=T0 + timedelta(seconds=1),
    worker="the-worker",
    attempts=2,
    executed_at=T0 + timedelta(seconds=2),
    finished_at=T0 + timedelta(seconds=5.25),
    exit_code=3,
    error="the-error",
    gpu_ids=["GPU-1", "GPU-2"],
    log_seq=41,
    cancel_requested=True,
    image_id="sha256:the-id",
    image_digest="the-image@sha256:the-digest",
    telemetry={"gpu_seconds": 6.5, "gpus": {"GPU-1": {"gpu_seconds": 3.25}}},
)
PLAIN = models.Job(
    1, models.JobSpec(name="", image=""), models.Status.QUEUED, T0 - timedelta(days=1), T0
)

# The job as the API showed it before JOB_FIELDS, byte for byte (key order included), with
# the fields added since (result.image_id and result.image_digest, schema 6; idle_timeout
# and result.telemetry, schema 7; queue_timeout, schema 8; webhooks, schema 9; queue_place,
# no column, with fair share).
API_JSON = (
    '{"id": 42, "name": "the-name", "description": "the-description", "priority": 7,'
    ' "docker": {"image": "the-image", "command": ["the", "command"], "env": {"THE_ENV": "1"},'
    ' "shm_size": 1048576, "workdir": "/w", "user": "1000", "memory": 1073741824,'
    ' "mounts": ["data"]}, "gpus": 2, "gpu_model": "the-model", "gpu_memory_gb": 12.5,'
    ' "labels": {"the": "label"}, "timeout": 30.5, "idle_timeout": 600.0,'
    ' "queue_timeout": 900.0,'
    ' "webhooks": [{"url": "https://the.example/hook", "events": ["end"]}], "max_retries": 3,'
    ' "metadata": {"the": ["metadata"]}, "submitter": "the-submitter", "allow_process": true,'
    ' "status": "RUNNING", "queue_reason": null, "queue_place": null, "cancel_requested": true,'
    ' "result": {"executed_at": "2024-05-01T12:00:02.123456Z",'
    ' "finished_at": "2024-05-01T12:00:05.373456Z", "gpus": ["GPU-1", "GPU-2"],'
    ' "duration": 3.25, "exit_code": 3, "error": "the-error", "image_id": "sha256:the-id",'
    ' "image_digest": "the-image@sha256:the-digest", "telemetry": {"gpu_seconds": 6.5,'
    ' "gpus": {"GPU-1": {"gpu_seconds": 3.25}}}}, "worker": "the-worker",'
    ' "attempts": 2, "log_lines": 41, "created_at": "2024-05-01T12:00:00.123456Z",'
    ' "updated_at": "2024-05-01T12:00:01.123456Z"}'
)

# The keys of JOB (protocol.wire_job) that come from JOB_FIELDS; the protocol adds secrets,
# auth and first_seq.
WIRE_KEYS = {
    "id",
    "attempt",
    "name",
    "image",
    "command",
    "env",
    "gpus",
    "timeout",
    "priority",
    "container",
    "submitter",
}

READ_BACK = [f for f in columns.COLUMNS if f.path and not f.computed and f.kind is not fields.KEY]


def column_names(store: sql.SqlStore) -> set[str]:
    with store._read() as cur:
        cur.execute("SELECT * FROM jobs LIMIT 0")
        return {column[0] for column in cur.description}


def test_the_sample_job_sets_every_field_the_store_reads_back() -> None:
    """So that the round trip below covers a field added later (give it a value in JOB)."""
    unset = [f.name for f in READ_BACK if f.get(JOB) == f.get(PLAIN)]
    assert unset == []


def test_every_column_is_in_both_stores_schema(store: sql.SqlStore) -> None:
    assert column_names(store) == set(columns.NAMES)
    assert store.schema_version() == store.latest_version >= columns.LATEST


def test_a_column_added_later_has_a_default_when_not_null() -> None:
    """ALTER TABLE ADD COLUMN of a NOT NULL column needs a default for the rows there."""
    lacking = [f.name for f in columns.COLUMNS if f.since > 1 and not f.null and not f.default]
    assert lacking == []


def test_every_field_survives_an_insert_and_a_read(store: sql.SqlStore) -> None:
    with store._write() as cur:
        job_id = store._insert_job(cur, columns.insert_row(JOB))
    assert store.get_job(job_id) == dataclasses.replace(JOB, id=job_id)
    assert store.list_jobs() == [dataclasses.replace(JOB, id=job_id)]


def test_create_job_returns_the_job_as_it_reads_back(store: sql.SqlStore) -> None:
    spec = dataclasses.replace(SPEC, auth={"username": "u", "password": "p"}, timeout=30)
    created = store.create_job(spec, T0)
    assert store.get_job(created.id) == created
    assert created.spec.auth is None and isinstance(created.spec.timeout, float)
    with store._read() as cur:
        cur.execute("SELECT shape FROM jobs WHERE id = ?", (created.id,))
        assert cur.fetchone()["shape"] == spec.needs.shape  # written, never read back


def test_a_store_that_lacks_a_column_of_the_table_is_refused(db_url: str) -> None:
    """A field given a schema version that a store had already reached never got its column:
    the store says so at open, rather than failing at the first insert."""
    open_store(db_url).close()
    store = open_store(db_url)
    assert isinstance(store, sql.SqlStore)
    try:
        with store._write() as cur:
            cur.execute("ALTER TABLE jobs DROP COLUMN description")
    finally:
        store.close()
    with pytest.raises(errors.StoreError, match=r"lacks the column\(s\) description"):
        open_store(db_url)


def test_the_api_shows_a_job_as_before() -> None:
    assert json.dumps(JOB.to_dict()) == API_JSON


def test_every_field_with_an_api_key_is_in_the_api() -> None:
    shown = JOB.to_dict()
    for field in models.JOB_FIELDS:
        if field.api is None:
            continue
        *groups, key = field.api.split(".")
        where = shown
        for group in groups:
            where = where[group]
        if key == "*":  # merged: its keys are the object's own
            assert field.shown(JOB).items() <= where.items()
        else:
            assert where[key] == field.shown(JOB), field.name


def test_the_wire_fields_are_those_of_the_job_a_worker_receives() -> None:
    assert {f.wire for f in models.JOB_FIELDS if f.wire} == WIRE_KEYS
    wire = protocol.wire_job(JOB, {"secrets": {}, "auth": None}).to_body()
    assert models.wire_values(JOB).items() <= wire.items()


# --- a field added in one place ------------------------------------------------------------

# What a developer writes to add an optional text field `team` that clients set and workers
# see (besides its check in validate.parse_spec): its attribute, one line of JOB_FIELDS with
# the next schema version, and, since workers see it, its field in protocol.WireJob (the
# worker link's contract is written out there on purpose).
NEXT_VERSION = len(sqlite.MIGRATIONS) + 1  # the schema version after the latest
TEAM_ATTRIBUTE = "    team: str | None = None\n"
TEAM_FIELD = (
    f'    Field("team", TEXT, "spec.team", api="team", wire="team", null=True,'
    f" since={NEXT_VERSION}),\n"
)

TEAM_WIRE = "    team: str | None = wire(opt(is_str), omit=True)\n"

# Run with the edited package: upgrade the store, read the job stored before, store one
# with a team, and say what each part sees.
CHECK_TEAM = """
import dataclasses, json, sys
from gpubox import models, protocol
from gpubox.store import open_store
assert models.__file__.startswith(sys.argv[3]), models.__file__
store = open_store(sys.argv[1])
old = store.get_job(int(sys.argv[2]))
spec = dataclasses.replace(old.spec, name="new", team="blue")
job = store.get_job(store.create_job(spec, models.utcnow()).id)
wire = protocol.wire_job(job, {"secrets": {}, "auth": None})
sent = protocol.encode(protocol.Job(coordinator="c", job=wire))
received = protocol.decode_from_coordinator(sent).job
print(json.dumps({
    "version": store.schema_version(),
    "old": [old.spec.team, old.to_dict()["team"]],
    "new": [job.spec.team, job.to_dict()["team"], received.team],
    "listed": [listed.spec.team for listed in store.list_jobs()],
}))
store.close()
"""


def with_team(tmp_path: Path) -> Path:
    """A copy of the gpubox package with the field `team` added to models.py (and, for the
    worker, to protocol.WireJob)."""
    package = Path(gpubox.__file__).parent
    root = tmp_path / "edited"
    shutil.copytree(package, root / "gpubox", ignore=shutil.ignore_patterns("__pycache__"))
    models_py = root / "gpubox" / "models.py"
    text = models_py.read_text()
    spec_at = text.index("class JobSpec:")
    attribute_at = text.index("\n\n    @functools.cached_property", spec_at) + 1
    text = text[:attribute_at] + TEAM_ATTRIBUTE + text[attribute_at:]
    field_at = text.index('    Field("status", STATUS')
    text = text[:field_at] + TEAM_FIELD + text[field_at:]
    models_py.write_text(text)
    protocol_py = root / "gpubox" / "protocol.py"
    text = protocol_py.read_text()
    submitter_at = text.index("    submitter: str | None = wire(", text.index("class WireJob("))
    text = text[:submitter_at] + TEAM_WIRE + text[submitter_at:]
    protocol_py.write_text(text)
    return root


def test_a_field_added_to_models_and_wirejob_reaches_the_store_the_api_and_the_wire(
    db_url: str, tmp_path: Path
) -> None:
    store = open_store(db_url)  # the store as this gpubox leaves it, with one job in it
    try:
        old_id = store.create_job(SPEC, T0).id
    finally:
        store.close()
    edited = with_team(tmp_path)
    env: dict[str, Any] = {**os.environ, "PYTHONPATH": str(edited)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_TEAM, db_url, str(old_id), str(edited)],
        capture_output=True,
        text=True,
        env=env,
        cwd=edited,  # `python -c` looks in its working folder first
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "version": NEXT_VERSION,  # the upgrade added the column to the older store
        "old": [None, None],
        "new": ["blue", "blue", "blue"],
        "listed": ["blue", None],
    }


def test_a_shape_is_the_text_that_stores_already_hold() -> None:
    # Queued jobs keep their shape in the store, written by whichever version queued them:
    # the same needs must give the same text, byte for byte, or those jobs lose their group.
    needs = models.Needs(
        gpus=2,
        gpu_model="A100",
        gpu_memory_gb=40.0,
        labels={"pool": "h100", "az": "b"},
        mounts=("data", "cache"),
        docker_only=("memory",),
        command=True,
        allow_process=True,
    )
    assert needs.shape == (
        '{"allow_process":true,"command":true,"docker_only":["memory"],"gpu_memory_gb":40.0,'
        '"gpu_model":"A100","gpus":2,"labels":{"az":"b","pool":"h100"},'
        '"mounts":["data","cache"]}'
    )
    assert models.Needs.from_shape(needs.shape) == needs
    assert models.Needs().shape == (
        '{"allow_process":false,"command":false,"docker_only":[],"gpu_memory_gb":null,'
        '"gpu_model":null,"gpus":0,"labels":{},"mounts":[]}'
    )
