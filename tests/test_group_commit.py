"""SQLite's group commit (gpubox.store.sqlite): concurrent writers share one transaction and
its COMMIT, yet each returns only once its write is durable, and each failure stays its own."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox import errors, models, validate
from gpubox.store.sqlite import SqliteStore
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

SPEC = validate.parse_spec({"name": "job", "docker": {"image": "busybox"}})


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(str(tmp_path / "gpubox.db"))
    try:
        yield opened
    finally:
        opened.close()


def names_on_disk(path: str) -> list[str]:
    """Job names as a separate connection (another process) sees them: only what committed."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM jobs ORDER BY id")]


class Writers:
    """A thread per write, started at once; finish() joins them and returns what each write
    returned or raised."""

    def __init__(self, store: SqliteStore, writes: list[Callable[[], Any]]) -> None:
        self.results: list[Any] = [None] * len(writes)
        self.threads = [
            threading.Thread(target=self._run, args=(w, i)) for i, w in enumerate(writes)
        ]
        for thread in self.threads:
            thread.start()
        # all of them wait for the write lock
        wait_until(lambda: store._queued >= len(writes), 10, "the writers to queue", 0.001)

    def _run(self, write: Callable[[], Any], index: int) -> None:
        try:
            self.results[index] = write()
        except Exception as exc:  # the test looks at it
            self.results[index] = exc

    def finish(self) -> list[Any]:
        for thread in self.threads:
            thread.join(10)
        return self.results


def create(store: SqliteStore, name: str) -> Callable[[], Any]:
    def write() -> Any:
        job = store.create_job(
            validate.parse_spec({"name": name, "docker": {"image": "x"}}), models.utcnow()
        )
        # Returned: it must already be on disk for everyone.
        assert name in names_on_disk(store.path)
        return job

    return write


def test_writers_that_queue_together_share_one_commit_and_each_is_durable_on_return(
    store: SqliteStore,
) -> None:
    before = store._txn
    with store.batch():  # holds the writer while eight more writers queue behind it
        store.create_job(SPEC, models.utcnow())
        writers = Writers(store, [create(store, f"w{i}") for i in range(8)])
        assert names_on_disk(store.path) == []  # nothing committed while the group is open
    results = writers.finish()
    assert all(isinstance(job, models.Job) for job in results), results
    assert sorted(names_on_disk(store.path)) == ["job"] + [f"w{i}" for i in range(8)]
    assert store._txn - before == 1  # nine writes, one transaction


def test_a_failed_write_in_a_group_undoes_only_itself(store: SqliteStore) -> None:
    def half_done() -> None:
        with store._write() as cur:
            cur.execute(
                "INSERT INTO tokens (name, digest, role, created_at)"
                " VALUES ('t', 'd', 'submit', '')"
            )
            raise RuntimeError("fails after its first statement")

    with store.batch():
        writers = Writers(store, [create(store, "a"), half_done, create(store, "b")])
    results = writers.finish()
    assert isinstance(results[1], RuntimeError), results
    assert isinstance(results[0], models.Job) and isinstance(results[2], models.Job)
    assert sorted(names_on_disk(store.path)) == ["a", "b"]
    assert store.list_tokens() == []


class FailingCommit:
    """The writer connection, except that COMMIT fails (a full disk, an I/O error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def commit(self) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_failed_commit_fails_every_writer_of_the_group_and_keeps_nothing(
    store: SqliteStore,
) -> None:
    store.create_job(SPEC, models.utcnow())  # opens the writer connection
    real = store._writer
    assert real is not None
    store._writer = FailingCommit(real)  # type: ignore[assignment]
    try:
        with pytest.raises(errors.StoreUnavailable, match="commit failed"), store.batch():
            writers = Writers(store, [create(store, "a"), create(store, "b")])
        results = writers.finish()
    finally:
        store._writer = real
    assert all(isinstance(r, errors.StoreUnavailable) for r in results), results
    assert names_on_disk(store.path) == ["job"]
    store.create_job(SPEC, models.utcnow())  # and the store writes again
    assert names_on_disk(store.path) == ["job", "job"]
