"""PostgreSQL as the durable store: `db copy`, `db upgrade`, and surviving a database restart."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpubox import config as cfg
from gpubox import errors, keys, models, validate
from gpubox.client import ApiError, Client
from gpubox.coordinator import tokens
from gpubox.coordinator.server import Coordinator
from gpubox.store import open_store, pgconn, postgres, redacted
from gpubox.store.base import TABLES
from gpubox.store.copy import copy_store
from tests.conftest import Cluster, wait_until

GPUBOX = [sys.executable, "-m", "gpubox"]


def gpubox(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command, as a user runs it."""
    return subprocess.run(
        [*GPUBOX, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture()
def db_url(pg_url: str) -> str:
    """This module's clusters run on PostgreSQL only."""
    return pg_url


def fill(url: str, jobs: int, lines_per_job: int) -> str:
    """A store with jobs in every status, labels, log lines, a worker and a token; the token."""
    store = open_store(url)
    try:
        now = models.utcnow()
        for index in range(jobs):
            spec = validate.parse_spec(
                {
                    "name": f"job-{index}",
                    "priority": index % 7,
                    "docker": {
                        "image": "busybox",
                        "command": ["echo", str(index)],
                        "env": {"I": str(index)},
                    },
                    "labels": {"zone": "a"} if index % 3 == 0 else {},
                    "metadata": {"index": index, "nested": {"x": [1, 2.5, None]}},
                    "max_retries": 1,
                }
            )
            # who submitted it, and whether it may use process workers: copied like the rest
            spec = dataclasses.replace(
                spec, submitter=f"user-{index % 3}", allow_process=index % 2 == 0
            )
            store.create_job(spec, now)
        with_lines = 0
        while with_lines < jobs // 2:
            head = store.queued_jobs(1)[0]
            job = store.claim_job(head.id, "w1", ["GPU-1", "GPU-2"][: head.spec.gpus], now)
            assert job is not None
            batch = [
                (
                    f"2024-01-01T00:00:00.{i:09d}Z",
                    "stdout" if i % 5 else "stderr",
                    f"line {i} of {job.id} ü",
                )
                for i in range(1, lines_per_job + 1)
            ]
            for first in range(0, lines_per_job, 1000):
                store.append_logs(job.id, 1, first + 1, batch[first : first + 1000])
            status = models.Status.FINISHED if job.id % 2 else models.Status.ERROR
            store.finish_job(
                job.id, 1, status, job.id % 2 and 0 or 2, None, now, now, lines_per_job
            )
            with_lines += 1
        store.cancel_job(store.list_jobs(models.Status.QUEUED, 1)[0].id, now)
        store.save_worker(models.WorkerInfo("w1", "0.1.0", [], {"zone": "a"}, 4, False, now))
        return tokens.create(store, "ci", "submit", allow_process=True)
    finally:
        store.close()


def coordinator_on(url: str, state: Path) -> Coordinator:
    config = cfg.CoordinatorConfig(
        state_dir=str(state), db=url, http="127.0.0.1:0", bind="tcp://127.0.0.1:*"
    )
    keys.init(str(state))
    coordinator = Coordinator(config)
    coordinator.start()
    return coordinator


def answers(client: Client, job_ids: list[int]) -> list[Any]:
    """Everything the API says about these jobs, and every page of the job list."""
    seen: list[Any] = []
    before = None
    while True:
        page = client.jobs(limit=100, before=before)
        seen.append(page)
        before = page["next"]
        if before is None:
            break
    for status in ("QUEUED", "FINISHED", "ERROR", "CANCELLED", "RUNNING"):
        seen.append(client.jobs(status=status, limit=1000))
    for job_id in job_ids:
        seen.append(client.job(job_id))
        seen.append(list(client.logs(job_id)))
    return _without_reasons(seen)


def _without_reasons(value: Any) -> Any:
    """`value` without the queue_reason of its jobs: the scheduler's word of the moment."""
    if isinstance(value, dict):
        return {k: _without_reasons(v) for k, v in value.items() if k != "queue_reason"}
    if isinstance(value, list):
        return [_without_reasons(v) for v in value]
    return value


def test_many_rows_go_as_few_whole_statements_and_keep_their_clause(pg_url: str) -> None:
    """The store's executemany on PostgreSQL: rows of an INSERT … VALUES in statements of up
    to 65,535 parameters, the clause after VALUES (…) kept; another statement row by row."""
    store = open_store(pg_url)
    assert isinstance(store, postgres.PostgresStore)
    try:
        with store._write() as cur:
            cur.execute("CREATE TABLE pairs (a BIGINT PRIMARY KEY, b TEXT NOT NULL)")
            rows = [(n, f"'{n}'?") for n in range(70_000)]  # 140,000 parameters: 3 statements
            cur.executemany("INSERT INTO pairs (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING", rows)
            again = [(0, "again"), (70_000, "new")]  # the first one conflicts, and is skipped
            cur.executemany("INSERT INTO pairs (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING", again)
            cur.executemany("UPDATE pairs SET b = ? WHERE a = ?", [("x", 1), ("y", 2)])
            cur.execute("SELECT COUNT(*) AS n, MAX(a) AS top FROM pairs")
            assert dict(cur.fetchone()) == {"n": 70_001, "top": 70_000}
            cur.execute("SELECT a, b FROM pairs WHERE a IN (0, 1, 2, 69999) ORDER BY a")
            got = [(row["a"], row["b"]) for row in cur.fetchall()]
            assert got == [(0, "'0'?"), (1, "x"), (2, "y"), (69_999, "'69999'?")]
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.serial
def test_a_store_url_in_an_error_shows_no_password() -> None:
    assert (
        redacted("postgresql://gpubox:hunter2@db:5432/q?sslmode=require")
        == "postgresql://gpubox:***@db:5432/q?sslmode=require"
    )
    assert redacted("postgresql://gpubox@db/q?password=hunter2") == (
        "postgresql://gpubox@db/q?password=***"
    )
    assert redacted("postgresql:///q?host=/var/run/postgresql") == (
        "postgresql:///q?host=/var/run/postgresql"
    )
    with pytest.raises(errors.ConfigError) as bad:
        open_store("mysql://gpubox:hunter2@db/q")
    assert "hunter2" not in str(bad.value) and "gpubox:***@db" in str(bad.value)


def test_an_unreachable_postgresql_is_named_without_its_password_and_with_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool tries for a while (10 s; 1 here), then the error says why, as libpq does."""
    monkeypatch.setattr(postgres, "OPEN_TIMEOUT_S", 1.0)
    with pytest.raises(errors.StoreUnavailable) as down:
        open_store("postgresql://gpubox:hunter2@127.0.0.1:1/q")
    message = str(down.value)
    assert "hunter2" not in message
    assert message.startswith(
        "cannot connect to PostgreSQL at postgresql://gpubox:***@127.0.0.1:1/q:"
    )
    assert "Connection refused" in message
    assert "Connection refused" in pgconn.connect_error("postgresql://x:y@127.0.0.1:1/q")


def test_a_missing_postgresql_database_is_one_error_without_the_pools_warnings(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(postgres, "OPEN_TIMEOUT_S", 1.0)
    missing = pg_url.replace("/gpubox_test?", f"/no_such_db_{os.getpid()}?")
    assert missing != pg_url
    with caplog.at_level(logging.DEBUG), pytest.raises(errors.StoreUnavailable) as down:
        open_store(missing)
    assert "does not exist" in str(down.value)
    # the pool's warning for each failed try (4 of them, before `Error: …`, from the CLI)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []


def test_db_copy_sqlite_into_postgresql_gives_identical_answers(tmp_path: Path, pg_url: str):
    source = f"sqlite:///{tmp_path}/source.db"
    token = fill(source, jobs=1000, lines_per_job=200)  # 500 jobs with lines: 100,000 lines
    result = gpubox("db", "copy", source, pg_url, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "copied and checked: 1000 jobs" in result.stderr
    assert "100000 logs" in result.stderr

    sample = [1, 2, 3, 500, 999, 1000]
    before = coordinator_on(source, tmp_path / "a")
    try:
        expected = answers(Client(before.http_url, token), sample)
    finally:
        before.stop()
    after = coordinator_on(pg_url, tmp_path / "b")
    try:
        client = Client(after.http_url, token)  # the token was copied too
        assert answers(client, sample) == expected
        new = client.submit({"name": "after the copy", "docker": {"image": "busybox"}})
        assert new["id"] == 1001
    finally:
        after.stop()


def test_db_copy_refuses_a_non_empty_destination_unless_replace(tmp_path: Path, pg_url: str):
    source = f"sqlite:///{tmp_path}/source.db"
    fill(source, jobs=6, lines_per_job=3)
    back = f"sqlite:///{tmp_path}/back.db"
    src, dst = open_store(source), open_store(pg_url)
    try:
        assert copy_store(src, dst)["jobs"] == 6
        assert [job.spec for job in dst.list_jobs()] == [job.spec for job in src.list_jobs()]
        assert {job.spec.submitter for job in dst.list_jobs()} == {"user-0", "user-1", "user-2"}
        assert [(t.name, t.allow_process) for t in dst.list_tokens()] == [("ci", True)]
        with pytest.raises(errors.WrongState, match="--replace"):
            copy_store(src, dst)
        assert copy_store(src, dst, replace=True) == {t: src.count(t) for t in TABLES}
    finally:
        src.close()
        dst.close()
    # and back, from PostgreSQL into a new SQLite file
    src, dst = open_store(pg_url), open_store(back)
    try:
        copied = copy_store(src, dst)
        assert copied["logs"] == 9 and copied["jobs"] == 6
        assert (
            dst.create_job(
                validate.parse_spec({"name": "n", "docker": {"image": "b"}}), models.utcnow()
            ).id
            == 7
        )
    finally:
        src.close()
        dst.close()


def db_copy(*args: str) -> subprocess.CompletedProcess[str]:
    return gpubox("db", "copy", *args)


def test_db_copy_refuses_to_copy_a_store_onto_itself(tmp_path: Path, pg_url: str):
    # --replace would empty the only copy of the data, then copy nothing back
    path = tmp_path / "jobs.db"
    fill(f"sqlite:///{path}", jobs=4, lines_per_job=2)
    fill(pg_url, jobs=3, lines_per_job=2)
    (tmp_path / "link.db").symlink_to(path)
    for source, destination in [
        (f"sqlite:///{path}", f"sqlite:///{tmp_path}/link.db"),  # one file, two names
        (pg_url, pg_url),
    ]:
        result = db_copy(source, destination, "--replace")
        assert result.returncode != 0
        assert "the source and the destination are the same store" in result.stderr
        assert "copying" not in result.stderr  # refused before anything started
    for url, jobs in [(f"sqlite:///{path}", 4), (pg_url, 3)]:
        store = open_store(url, upgrade=False)
        try:
            assert store.count("jobs") == jobs and store.count("tokens") == 1
        finally:
            store.close()


def test_db_copy_from_a_missing_sqlite_file_creates_nothing(tmp_path: Path):
    result = db_copy(f"sqlite:///{tmp_path}/typo.db", f"sqlite:///{tmp_path}/out.db")
    assert result.returncode != 0
    assert f"no SQLite store at {tmp_path}/typo.db" in result.stderr
    assert list(tmp_path.iterdir()) == []
    # an existing file that holds no store is refused too, before the destination is touched
    (tmp_path / "empty.db").write_bytes(b"")
    result = db_copy(f"sqlite:///{tmp_path}/empty.db", f"sqlite:///{tmp_path}/out.db")
    assert result.returncode != 0 and "holds no gpubox store" in result.stderr
    assert not (tmp_path / "out.db").exists()


def test_db_upgrade_twice_is_a_no_op_the_second_time(pg_url: str, tmp_path: Path):
    for url in (pg_url, f"sqlite:///{tmp_path}/fresh.db"):
        first = gpubox("db", "upgrade", "--db", url)
        assert first.returncode == 0 and "upgraded from version 0 to 12" in first.stderr
        second = gpubox("db", "upgrade", "--db", url)
        assert second.returncode == 0 and "nothing to do" in second.stderr
        store = open_store(url, upgrade=False)
        try:
            assert store.schema_version() == store.latest_version == 12
        finally:
            store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_store_is_upgraded_and_its_jobs_read_as_before(
    backend: str, pg_url: str, tmp_path: Path
):
    """Version 2 added gpu_model, gpu_memory_gb and the container options: a job stored by
    version 1 reads with none of them asked for. Version 3 added the shape the scheduler reads
    the queue by: the upgrade writes it for the old job. Version 4 added its submitter."""
    from gpubox.store import postgres, sqlite

    row = (
        "INSERT INTO jobs (id, name, description, priority, image, command, env, gpus, labels,"
        " max_retries, metadata, status, created_at, updated_at) VALUES (7, 'old', '', 0,"
        " 'busybox', '[\"true\"]', '{}', 1, '{}', 0, '{}', 'QUEUED',"
        " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')"
    )
    if backend == "sqlite":
        import sqlite3

        url = f"sqlite:///{tmp_path}/v1.db"
        conn = sqlite3.connect(f"{tmp_path}/v1.db")
        conn.executescript(sqlite.MIGRATIONS[0] + "INSERT INTO schema_version VALUES (1);" + row)
        conn.close()
    else:
        import psycopg

        url = pg_url
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for statement in postgres.MIGRATIONS[0].split(";\n"):
                if statement.strip():
                    conn.execute(statement)  # type: ignore[arg-type]
            conn.execute("INSERT INTO schema_version VALUES (1)")
            conn.execute(row)  # type: ignore[arg-type]
    store = open_store(url)
    try:
        assert store.schema_version() == 12
        job = store.get_job(7)
        assert job.spec.name == "old" and job.spec.gpus == 1
        assert job.spec.gpu_model is None and job.spec.gpu_memory_gb is None
        assert job.spec.container == models.ContainerOptions()
        # version 4: no submitter recorded (only an admin token cancels it), and no process
        # workers for it
        assert job.spec.submitter is None and job.spec.allow_process is False
        assert [queued.id for queued in store.queued_jobs()] == [7]
        assert store.queued_shapes() == [job.spec.needs.shape]
        assert [queued.id for queued in store.queued_jobs(shape=job.spec.needs.shape)] == [7]
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_2_store_keeps_its_tokens_and_jobs_which_get_no_submitter(
    backend: str, pg_url: str, tmp_path: Path
):
    """Version 4 added who submitted a job and the process-worker permission of tokens and
    jobs: a store of version 2 reads its tokens and jobs with neither."""
    from gpubox.store import sqlite

    digest = tokens.digest("gpbx_old")
    rows = [
        "INSERT INTO jobs (id, name, description, priority, image, command, env, gpus, labels,"
        " max_retries, metadata, status, created_at, updated_at) VALUES (9, 'old', '', 0,"
        " 'busybox', '[\"true\"]', '{}', 0, '{}', 0, '{}', 'QUEUED',"
        " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')",
        "INSERT INTO tokens (name, digest, role, created_at) VALUES"
        f" ('ci', '{digest}', 'submit', '2026-01-01T00:00:00.000000Z')",
    ]
    scripts = {"sqlite": sqlite.MIGRATIONS, "postgresql": postgres.MIGRATIONS}[backend][:2]
    statements = [s for script in scripts for s in script.split(";\n") if s.strip()]
    statements += ["INSERT INTO schema_version VALUES (2)", *rows]
    if backend == "sqlite":
        import sqlite3

        url = f"sqlite:///{tmp_path}/v2.db"
        conn = sqlite3.connect(f"{tmp_path}/v2.db")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        conn.close()
    else:
        import psycopg

        url = pg_url
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]
    store = open_store(url)
    try:
        assert store.schema_version() == 12
        job = store.get_job(9)
        assert (job.spec.submitter, job.spec.allow_process) == (None, False)
        assert job.to_dict()["submitter"] is None
        token = store.find_token(digest)
        assert token is not None and (token.role, token.allow_process) == ("submit", False)
    finally:
        store.close()


def test_coordinator_refuses_a_newer_schema(pg_url: str, tmp_path: Path, pg_admin: Any):
    open_store(pg_url).close()
    schema = pg_url.rsplit("%3D", 1)[1]
    pg_admin.execute(f"UPDATE {schema}.schema_version SET version = 99")
    keys.init(str(tmp_path))
    result = gpubox(
        "coordinator",
        *("--db", pg_url, "--state-dir", str(tmp_path)),
        *("--http", "127.0.0.1:0", "--bind", "tcp://127.0.0.1:*"),
    )
    assert result.returncode == 1
    assert "schema version 99" in result.stderr and "upgrade gpubox" in result.stderr
    assert "Traceback" not in result.stderr


def pg_cluster() -> list[str]:
    line = (
        subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True)
        .stdout.split("\n")[0]
        .split()
    )
    return line[:2]


def pg_ctl(action: str) -> None:
    subprocess.run(["pg_ctlcluster", *pg_cluster(), action], check=True, timeout=60)


def job_status(client: Client, job_id: int) -> str | None:
    try:
        return client.job(job_id)["status"]  # type: ignore[no-any-return]
    except ApiError as exc:
        assert exc.status == 503 and exc.code == "store_unavailable"
        return None


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.serial
def test_postgresql_restart_while_a_job_runs_loses_no_line(make_cluster, image: str):
    cluster: Cluster = make_cluster()
    script = "for i in $(seq 1 80); do echo line-$i; sleep 0.05; done"
    job = cluster.submit(image, ["sh", "-c", script])
    wait_until(lambda: job_status(cluster.client, job["id"]) == "RUNNING", 20, "the start")
    time.sleep(1.0)
    pg_ctl("restart")
    wait_until(lambda: job_status(cluster.client, job["id"]) == "FINISHED", 60, "the end")
    lines = cluster.lines(job["id"])
    assert [r["line"] for r in lines] == [f"line-{i}" for i in range(1, 81)]
    assert [r["seq"] for r in lines] == list(range(1, 81))


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.serial
def test_database_down_gives_503_then_the_queue_recovers_by_itself(make_cluster, image: str):
    cluster: Cluster = make_cluster()
    pg_ctl("stop")
    try:
        with pytest.raises(ApiError) as refused:
            cluster.submit(image, ["true"])
        assert refused.value.status == 503 and refused.value.code == "store_unavailable"
        time.sleep(1.5)  # the broker's scheduling and expiry run into the outage too
    finally:
        pg_ctl("start")
    job = wait_until(lambda: submitted(cluster, image), 30, "a submit after the restart")
    done = wait_until(
        lambda: job_status(cluster.client, job["id"]) == "FINISHED",
        30,
        "the job to run on the idle worker",
    )
    assert done


def submitted(cluster: Cluster, image: str) -> dict[str, Any] | None:
    try:
        return cluster.submit(image, ["echo", "back"])
    except ApiError as exc:
        assert exc.status == 503
        return None


def test_a_version_4_store_counts_the_log_bytes_of_its_running_jobs(tmp_path: Path):
    """Version 5 added the bytes of each job's stored log (for max_log_bytes): a job still
    running when the store is upgraded has what it stored counted, an ended one is left."""
    import sqlite3

    from gpubox.store import sqlite

    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "".join(sqlite.MIGRATIONS[:4])
        + "INSERT INTO schema_version VALUES (4);"
        + "".join(
            "INSERT INTO jobs (id, name, description, priority, image, env, gpus, labels,"
            f" max_retries, metadata, status, created_at, updated_at) VALUES ({job}, 'j', '',"
            f" 0, 'busybox', '{{}}', 0, '{{}}', 0, '{{}}', '{status}', 't', 't');"
            f"INSERT INTO logs VALUES ({job}, 1, 't', 'stdout', 'ü{'x' * 98}');"
            for job, status in ((1, "RUNNING"), (2, "FINISHED"))
        )
    )
    conn.close()
    open_store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, log_bytes, log_cut FROM jobs ORDER BY id").fetchall()
        assert rows == [(1, 100, 0), (2, 0, 0)]  # ü is 2 bytes in UTF-8
    finally:
        conn.close()
