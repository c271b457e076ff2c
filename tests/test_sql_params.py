"""The shared SQL's `?` placeholders on each backend: a `?` or a `%` inside a quoted string or
a quoted name is text, never a placeholder, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpubox import models, validate
from gpubox.store import sql
from gpubox.store.pgconn import pg_sql

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("shared", "psycopg_text"),
    [
        ("SELECT * FROM jobs WHERE id = ?", "SELECT * FROM jobs WHERE id = %s"),
        ("WHERE name LIKE 'what?%' AND id > ?", "WHERE name LIKE 'what?%%' AND id > %s"),
        ("SELECT 'it''s ?', ? AS \"why?\"", "SELECT 'it''s ?', %s AS \"why?\""),
        ("SELECT 7 % ? -- why ?%\nFROM t", "SELECT 7 %% %s -- why ?%%\nFROM t"),
    ],
)
def test_pg_sql_keeps_quoted_text(shared: str, psycopg_text: str) -> None:
    assert pg_sql(shared) == psycopg_text


def test_like_literal_with_question_mark_and_percent(store: sql.SqlStore) -> None:
    for name in ("what?", "what?%", "whatnot", "what"):
        store.create_job(validate.parse_spec({"name": name, "docker": {"image": "busybox"}}), T0)
    with store._read() as cur:
        cur.execute("SELECT name FROM jobs WHERE name LIKE 'what?%' AND id > ? ORDER BY id", (0,))
        names = [row["name"] for row in cur.fetchall()]
    assert names == ["what?", "what?%"]


def test_literals_without_parameters(store: sql.SqlStore) -> None:
    with store._read() as cur:
        cur.execute("SELECT '100%' AS share, 'it''s ?' AS said, 1 AS \"why?\"")
        row = cur.fetchone()
    assert dict(row) == {"share": "100%", "said": "it's ?", "why?": 1}


def test_literals_in_a_write(store: sql.SqlStore) -> None:
    job = store.create_job(validate.parse_spec({"name": "j", "docker": {"image": "busybox"}}), T0)
    with store._write() as cur:
        cur.execute("UPDATE jobs SET description = '?% done' || ? WHERE id = ?", ("!", job.id))
    with store._read() as cur:
        cur.execute("SELECT description FROM jobs WHERE id = ?", (job.id,))
        assert cur.fetchone()["description"] == "?% done!"


def test_every_field_of_a_job_lands_in_its_own_column(store: sql.SqlStore) -> None:
    # Each text a distinct value: a value written into another column would show here.
    spec = models.JobSpec(
        name="the-name",
        image="the-image",
        description="the-description",
        command=["the-command"],
        env={"THE_ENV": "1"},
        labels={"the": "label"},
        metadata={"the": "metadata"},
        gpu_model="the-model",
        gpu_memory_gb=12.5,
        priority=7,
        max_retries=2,
        timeout=30.0,
        submitter="the-submitter",
        allow_process=True,
    )
    job = store.get_job(store.create_job(spec, models.utcnow()).id)
    got = job.spec
    assert (got.name, got.image, got.description) == ("the-name", "the-image", "the-description")
    assert (got.command, got.env, got.labels) == (
        ["the-command"],
        {"THE_ENV": "1"},
        {"the": "label"},
    )
    assert (got.metadata, got.gpu_model, got.gpu_memory_gb) == (
        {"the": "metadata"},
        "the-model",
        12.5,
    )
    assert (got.priority, got.max_retries, got.timeout) == (7, 2, 30.0)
    assert (got.submitter, got.allow_process) == ("the-submitter", True)
    assert job.status is models.Status.QUEUED
